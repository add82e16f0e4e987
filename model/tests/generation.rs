//! Generation against transformers' `generate` on the same weights and
//! prompts: greedy and beam search, text padding in the batch, several
//! images per sample, the repetition penalty, and answers that end in EOS
//! before the token limit. Tokens must be equal, not merely close.

mod common;

use std::collections::HashMap;

use samtrain_model::generation::{generate, GenerationConfig, PenaltyScope};
use samtrain_model::LoadedModel;
use tch::{Device, Tensor};

use common::{Fixture, Spec};

/// A reference fixture and the model loaded from it.
struct Case {
    fixture: Fixture,
    loaded: LoadedModel,
}

impl Case {
    /// The seeds of the EOS tests were chosen on checkpoints whose image
    /// placeholder row of `lm_head` is zero (`zero_row`).
    fn new(variant: &str, seed: u32, images: &str, text_len: u32, zero_row: bool) -> Self {
        let flags: &[&str] = if zero_row {
            &["--image-token-id-zero-row"]
        } else {
            &[]
        };
        let fixture = Fixture::new(Spec {
            variant,
            seed,
            images,
            text_len,
            qformer_len: 5,
            checkpoint_flags: flags,
            ..Spec::default()
        });
        let loaded = LoadedModel::load(&fixture.model, Device::Cpu, None).unwrap();
        Self { fixture, loaded }
    }

    /// Generates with both implementations, asserts equal tokens and returns
    /// the answers.
    fn compare(
        &self,
        num_beams: i64,
        max_new_tokens: i64,
        repetition_penalty: f64,
    ) -> Vec<Vec<i64>> {
        self.compare_scoped(
            num_beams,
            max_new_tokens,
            repetition_penalty,
            PenaltyScope::Prompt,
        )
    }

    fn compare_scoped(
        &self,
        num_beams: i64,
        max_new_tokens: i64,
        repetition_penalty: f64,
        penalty_scope: PenaltyScope,
    ) -> Vec<Vec<i64>> {
        let scope = match penalty_scope {
            PenaltyScope::Prompt => "prompt",
            PenaltyScope::Generated => "generated",
        };
        let expected = answers(&self.fixture.reference(
            "generate",
            &[
                "--num-beams",
                &num_beams.to_string(),
                "--max-new-tokens",
                &max_new_tokens.to_string(),
                "--repetition-penalty",
                &repetition_penalty.to_string(),
                "--penalty-scope",
                scope,
            ],
        ));
        let config = GenerationConfig {
            max_new_tokens,
            num_beams,
            repetition_penalty,
            length_penalty: 1.0,
            eos_token_ids: Vec::new(),
            penalty_scope,
        };
        let batch = self.fixture.batch();
        let got = generate(&self.loaded.model, &common::inputs_from(&batch), &config).unwrap();
        assert_eq!(
            got, expected,
            "beams {num_beams}, max {max_new_tokens}, penalty {repetition_penalty} ({scope}): Rust (left) vs transformers"
        );
        got
    }
}

/// `sequences` `[B, M]` cut to `lengths` `[B]`.
fn answers(t: &HashMap<String, Tensor>) -> Vec<Vec<i64>> {
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
    let c = Case::new("mha", 7, "1", 8, true);
    c.compare(1, 12, 1.0);
    let penalised = c.compare(1, 12, 1.5);
    assert_eos_and_limit(&penalised, 12);
}

#[test]
fn beam_search_matches_transformers_gqa() {
    let c = Case::new("gqa", 2, "1", 8, true);
    let answers = c.compare(5, 16, 1.5);
    assert_eos_and_limit(&answers, 16);
}

#[test]
fn beam_search_matches_transformers_with_several_images() {
    // Sample 1 has 2 images and a padded slot between them and its text.
    let c = Case::new("mha", 3, "3,2", 8, true);
    let answers = c.compare(3, 16, 1.5);
    assert_eos_and_limit(&answers, 16);
}

#[test]
fn penalty_scopes_match_transformers_and_sam() {
    // A live placeholder row: transformers penalises the placeholder id in
    // beam search's log-probabilities, SAM's code penalises no prompt id.
    let c = Case::new("gqa", 5, "2,1", 8, false);
    let hf = c.compare_scoped(4, 10, 1.5, PenaltyScope::Prompt);
    let sam = c.compare_scoped(4, 10, 1.5, PenaltyScope::Generated);
    assert_ne!(hf, sam, "the scopes should differ on this prompt");
}

#[test]
fn rejects_bad_settings_and_allows_zero_tokens() {
    let c = Case::new("mha", 1, "1", 8, true);
    let batch = c.fixture.batch();
    let inputs = common::inputs_from(&batch);
    let run = |config: GenerationConfig| generate(&c.loaded.model, &inputs, &config);
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
