//! Shared by the model's integration tests: the Python reference
//! (`tests/reference/sam_reference.py`, transformers on the same weights)
//! and tensor comparisons.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use samtrain_model::{SamConfig, SamInputs};
use samtrain_testkit::{python, workspace_root};
use tch::{Device, Kind, Tensor};

/// Runs `sam_reference.py ARGS...` and panics with its output on failure.
pub fn reference(args: &[&str]) {
    let script = workspace_root().join("tests/reference/sam_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .expect("start the reference python");
    assert!(
        out.status.success(),
        "reference {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn inputs_from(t: &HashMap<String, Tensor>) -> SamInputs {
    let get = |n: &str| t.get(n).map(|x| x.to_device(Device::Cpu).shallow_clone());
    SamInputs {
        pixel_values: get("pixel_values").unwrap().to_kind(Kind::Float),
        image_mask: get("image_mask"),
        qformer_input_ids: get("qformer_input_ids").unwrap(),
        qformer_attention_mask: get("qformer_attention_mask"),
        input_ids: get("input_ids").unwrap(),
        attention_mask: get("attention_mask"),
        dropout: None,
    }
}

/// Largest absolute difference of `a` and `b` where `mask` `[B, S]` is 1
/// (`a`, `b`: `[B, S, ...]`).
pub fn max_diff_where(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let m = mask.to_kind(Kind::Float);
    let mut m = m;
    while m.dim() < a.dim() {
        m = m.unsqueeze(-1);
    }
    ((a - b).abs() * m).max().double_value(&[])
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a - b).abs().max().double_value(&[])
}

/// A tiny checkpoint and an input batch, both made by the reference, in a
/// temporary folder that lives as long as the fixture.
pub struct Fixture {
    dir: tempfile::TempDir,
    pub model: PathBuf,
    pub inputs: PathBuf,
}

/// What [`Fixture::new`] builds.
pub struct Spec<'a> {
    pub variant: &'a str,
    pub seed: u32,
    /// "zero" (SAM at initialisation) or "random" exchange weights.
    pub guidance: &'a str,
    /// Real images per sample, e.g. "3,2" (one value: every sample).
    pub images: &'a str,
    pub text_len: u32,
    pub qformer_len: u32,
    /// Further `make-checkpoint` flags.
    pub checkpoint_flags: &'a [&'a str],
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Self {
            variant: "mha",
            seed: 1,
            guidance: "zero",
            images: "1",
            text_len: 9,
            qformer_len: 6,
            checkpoint_flags: &[],
        }
    }
}

impl Fixture {
    pub fn new(spec: Spec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let inputs = dir.path().join("inputs.safetensors");
        let seed = spec.seed.to_string();
        let mut args = vec![
            "make-checkpoint",
            "--variant",
            spec.variant,
            "--seed",
            &seed,
            "--guidance",
            spec.guidance,
            "--out",
            model.to_str().unwrap(),
        ];
        args.extend_from_slice(spec.checkpoint_flags);
        reference(&args);
        let (text, qformer) = (spec.text_len.to_string(), spec.qformer_len.to_string());
        reference(&[
            "make-inputs",
            "--model",
            model.to_str().unwrap(),
            "--batch",
            "2",
            "--images",
            spec.images,
            "--text-len",
            &text,
            "--qformer-len",
            &qformer,
            "--seed",
            &seed,
            "--pad-text",
            "--out",
            inputs.to_str().unwrap(),
        ]);
        Self { dir, model, inputs }
    }

    /// Runs a reference subcommand on this fixture's model and inputs and
    /// returns the tensors it wrote.
    pub fn reference(&self, command: &str, extra: &[&str]) -> HashMap<String, Tensor> {
        let out = self.dir.path().join(format!("{command}.safetensors"));
        let mut args = vec![
            command,
            "--model",
            self.model.to_str().unwrap(),
            "--inputs",
            self.inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        reference(&args);
        read(&out)
    }

    pub fn batch(&self) -> HashMap<String, Tensor> {
        read(&self.inputs)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A tiny SAM: every part, a layer or two each.
pub const CONFIG: &str = r#"{
  "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
  "qformer_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "encoder_hidden_size": 16, "vocab_size": 30,
                     "max_position_embeddings": 16},
  "text_config": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "vocab_size": 37},
  "num_query_tokens": 2
}"#;

pub fn config() -> SamConfig {
    serde_json::from_str(CONFIG).unwrap()
}

/// Fixed inputs made without libtorch's global generator, which tests on
/// other threads of this binary draw from at the same time.
pub fn inputs() -> SamInputs {
    let opts = (Kind::Int64, Device::Cpu);
    let ids = |n: i64, low: i64, high: i64, shape: [i64; 2]| {
        (Tensor::arange(n, opts) * 7 + 3)
            .remainder(high - low)
            .view(shape)
            + low
    };
    SamInputs {
        pixel_values: (Tensor::arange(2 * 2 * 3 * 8 * 8, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .view([2, 2, 3, 8, 8]),
        image_mask: Some(Tensor::from_slice2(&[[1i64, 1], [1, 0]])),
        qformer_input_ids: ids(6, 1, 30, [2, 3]),
        qformer_attention_mask: None,
        input_ids: ids(10, 3, 37, [2, 5]),
        attention_mask: None,
        dropout: None,
    }
}
