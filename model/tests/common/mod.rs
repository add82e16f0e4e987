//! Shared by the model's integration tests: the Python reference
//! (`tests/reference/sam_reference.py`, transformers on the same weights)
//! and tensor comparisons.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use samtrain_model::SamInputs;
use tch::{Device, Kind, Tensor};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv python that has torch and transformers (set up by scripts/setup.sh).
pub fn python() -> PathBuf {
    let path = std::env::var_os("SAMTRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "the reference python {} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

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
