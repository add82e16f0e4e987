//! Generation against transformers' `generate` on the same weights and
//! prompts: greedy and beam search, text padding in the batch, several
//! images per sample, the repetition penalty, and answers that end in EOS
//! before the token limit. Tokens must be equal, not merely close.

mod common;

use std::path::{Path, PathBuf};

use samtrain_model::generation::{generate, GenerationConfig};
use samtrain_model::LoadedModel;
use tch::Device;

/// A tiny checkpoint and one input batch, written by the reference.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    inputs: PathBuf,
    loaded: LoadedModel,
}

/// The checkpoint zeroes the image placeholder's row of `lm_head`: transformers
/// puts the placeholder ids in its repetition-penalty set, samtrain has no id
/// for visual tokens, and a logit of exactly 0 is left as it is by the penalty.
fn fixture(variant: &str, images: &str, text_len: u32, input_seed: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let inputs = dir.path().join("inputs.safetensors");
    let (m, i) = (model.to_str().unwrap(), inputs.to_str().unwrap());
    common::reference(&[
        "make-checkpoint",
        "--variant",
        variant,
        "--seed",
        "1",
        "--image-token-id-zero-row",
        "--out",
        m,
    ]);
    common::reference(&[
        "make-inputs",
        "--model",
        m,
        "--batch",
        "2",
        "--images",
        images,
        "--text-len",
        &text_len.to_string(),
        "--qformer-len",
        "5",
        "--seed",
        &input_seed.to_string(),
        "--pad-text",
        "--out",
        i,
    ]);
    let loaded = LoadedModel::load(&model, Device::Cpu, None).unwrap();
    Fixture {
        _dir: dir,
        model,
        inputs,
        loaded,
    }
}

impl Fixture {
    /// Generates with both implementations, asserts equal tokens and returns
    /// the answers.
    fn compare(
        &self,
        num_beams: i64,
        max_new_tokens: i64,
        repetition_penalty: f64,
    ) -> Vec<Vec<i64>> {
        let expected = self.reference(num_beams, max_new_tokens, repetition_penalty);
        let batch = common::read(&self.inputs);
        let config = GenerationConfig {
            max_new_tokens,
            num_beams,
            repetition_penalty,
            length_penalty: 1.0,
            eos_token_ids: Vec::new(),
        };
        let got = generate(&self.loaded.model, &common::inputs_from(&batch), &config).unwrap();
        assert_eq!(
            got, expected,
            "beams {num_beams}, max {max_new_tokens}, penalty {repetition_penalty}: Rust (left) vs transformers"
        );
        got
    }

    fn reference(
        &self,
        num_beams: i64,
        max_new_tokens: i64,
        repetition_penalty: f64,
    ) -> Vec<Vec<i64>> {
        let out = self.model.parent().unwrap().join("generated.safetensors");
        common::reference(&[
            "generate",
            "--model",
            self.model.to_str().unwrap(),
            "--inputs",
            self.inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--num-beams",
            &num_beams.to_string(),
            "--max-new-tokens",
            &max_new_tokens.to_string(),
            "--repetition-penalty",
            &repetition_penalty.to_string(),
        ]);
        answers(&out)
    }
}

/// `sequences` `[B, M]` cut to `lengths` `[B]`.
fn answers(path: &Path) -> Vec<Vec<i64>> {
    let t = common::read(path);
    let sequences = Vec::<Vec<i64>>::try_from(&t["sequences"]).unwrap();
    let lengths = Vec::<i64>::try_from(&t["lengths"]).unwrap();
    sequences
        .into_iter()
        .zip(lengths)
        .map(|(s, n)| s[..n as usize].to_vec())
        .collect()
}

const EOS: i64 = 2;

/// Some answer ends in EOS before the limit, and every other one is cut there.
fn assert_eos_and_limit(answers: &[Vec<i64>], max_new_tokens: usize) {
    assert!(
        answers
            .iter()
            .any(|a| a.len() < max_new_tokens && a.last() == Some(&EOS)),
        "no answer ends in EOS early: {answers:?}"
    );
    for a in answers {
        assert!(a.len() == max_new_tokens || a.last() == Some(&EOS), "{a:?}");
        assert!(!a[..a.len() - 1].contains(&EOS), "EOS inside {a:?}");
    }
}

#[test]
fn greedy_matches_transformers_with_text_padding() {
    // Sample 1's text is padded on the right.
    let f = fixture("mha", "1", 7, 2);
    f.compare(1, 12, 1.0);
    let penalised = f.compare(1, 12, 1.5);
    assert_eos_and_limit(&penalised, 12);
}

#[test]
fn beam_search_matches_transformers_gqa() {
    let f = fixture("gqa", "1", 8, 2);
    let answers = f.compare(5, 16, 1.5);
    assert_eos_and_limit(&answers, 16);
}

#[test]
fn beam_search_matches_transformers_with_several_images() {
    // Sample 1 has 2 images and a padded slot between them and its text.
    let f = fixture("mha", "3,2", 8, 3);
    let answers = f.compare(3, 16, 1.5);
    assert_eos_and_limit(&answers, 16);
}

#[test]
fn rejects_bad_settings_and_allows_zero_tokens() {
    let f = fixture("mha", "1", 8, 2);
    let batch = common::read(&f.inputs);
    let inputs = common::inputs_from(&batch);
    let run = |config: GenerationConfig| generate(&f.loaded.model, &inputs, &config);
    for bad in [
        GenerationConfig {
            num_beams: 0,
            ..GenerationConfig::default()
        },
        GenerationConfig {
            max_new_tokens: -1,
            ..GenerationConfig::default()
        },
        GenerationConfig {
            repetition_penalty: 0.0,
            ..GenerationConfig::default()
        },
    ] {
        let err = run(bad.clone()).expect_err(&format!("{bad:?} must be refused"));
        assert!(err.to_string().contains("generation."), "{err}");
    }
    let none = run(GenerationConfig {
        max_new_tokens: 0,
        ..GenerationConfig::default()
    })
    .unwrap();
    assert_eq!(none, vec![Vec::<i64>::new(); 2]);
}
