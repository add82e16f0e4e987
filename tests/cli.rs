//! The `samtrain model` commands as a user runs them: real processes, real
//! files, values checked.

use std::path::Path;
use std::process::{Command, Output};

use samtrain_model::rng;
use tch::{Device, Kind, Tensor};

const CONFIG: &str = r#"{
  "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
  "qformer_config": {"hidden_size": 12, "intermediate_size": 24, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "encoder_hidden_size": 16, "vocab_size": 30,
                     "max_position_embeddings": 16},
  "text_config": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "vocab_size": 37},
  "num_query_tokens": 2
}"#;

fn samtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(args)
        .output()
        .expect("run samtrain")
}

fn ok(args: &[&str]) -> String {
    let out = samtrain(args);
    assert!(
        out.status.success(),
        "samtrain {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn init(dir: &Path) -> String {
    let config = dir.join("config.json");
    std::fs::write(&config, CONFIG).unwrap();
    let model = dir.join("model");
    ok(&[
        "model",
        "init",
        "--config",
        config.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--seed",
        "9",
    ]);
    model.to_str().unwrap().to_string()
}

fn forward(model: &str, inputs: &Path, out: &Path) -> Output {
    samtrain(&[
        "model",
        "forward",
        "--model",
        model,
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn write_inputs(path: &Path, with_mask: bool) {
    let mut tensors = vec![
        (
            "pixel_values",
            rng::normal(41, &[2, 2, 3, 8, 8], Device::Cpu),
        ),
        (
            "qformer_input_ids",
            rng::integers(42, 1, 30, &[2, 3], Device::Cpu),
        ),
        ("input_ids", rng::integers(43, 3, 37, &[2, 5], Device::Cpu)),
    ];
    if with_mask {
        tensors.push(("image_mask", Tensor::from_slice2(&[[1i64, 1], [1, 0]])));
    }
    Tensor::write_safetensors(&tensors, path).unwrap();
}

#[test]
fn inspect_counts_sams_trainable_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    let out: serde_json::Value =
        serde_json::from_str(&ok(&["model", "inspect", "--model", &model, "--json"])).unwrap();
    // Adaptive adjustment Linear(16 -> 1) and two exchange Linear(12 -> 12).
    assert_eq!(out["trainable"], 16 + 1 + 2 * (12 * 12 + 12));
    assert!(out["parameters"].as_i64().unwrap() > 10_000);
}

#[test]
fn forward_writes_the_logits_of_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    let inputs = dir.path().join("inputs.safetensors");
    let out = dir.path().join("out.safetensors");
    write_inputs(&inputs, true);
    let run = forward(&model, &inputs, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let logits: Vec<(String, Tensor)> = Tensor::read_safetensors(&out).unwrap();
    assert_eq!(logits[0].0, "logits");
    // 2 slots x 2 query tokens + 5 text tokens, vocabulary 37, float32.
    assert_eq!(logits[0].1.size(), vec![2, 9, 37]);
    assert_eq!(logits[0].1.kind(), Kind::Float);

    let loaded = samtrain_model::LoadedModel::load(Path::new(&model), Device::Cpu, None).unwrap();
    let read: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&inputs)
        .unwrap()
        .into_iter()
        .collect();
    let expected = tch::no_grad(|| {
        loaded.model.forward(&samtrain_model::SamInputs {
            pixel_values: read["pixel_values"].shallow_clone(),
            image_mask: Some(read["image_mask"].shallow_clone()),
            qformer_input_ids: read["qformer_input_ids"].shallow_clone(),
            qformer_attention_mask: None,
            input_ids: read["input_ids"].shallow_clone(),
            attention_mask: None,
            dropout: None,
        })
    })
    .unwrap();
    assert!(logits[0].1.equal(&expected));
}

#[test]
fn bad_input_files_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("input_ids", Tensor::from_slice2(&[[1i64, 2]]))], &inputs)
        .unwrap();
    let out = forward(&model, &inputs, &dir.path().join("o.safetensors"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pixel_values") && stderr.contains("inputs.safetensors"),
        "{stderr}"
    );

    let config = dir.path().join("bad.json");
    std::fs::write(
        &config,
        r#"{"vision_config": {"image_size": 10, "patch_size": 4}}"#,
    )
    .unwrap();
    let out = samtrain(&[
        "model",
        "init",
        "--config",
        config.to_str().unwrap(),
        "--out",
        "x",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("image_size 10") && stderr.contains("bad.json"),
        "{stderr}"
    );
}

/// A cluster's workers only read what exists, so `submit` refuses a spec
/// that asks the launcher to synthesise data or initialise a model, before
/// it looks for a coordinator, and says what to do instead.
#[test]
fn submit_refuses_a_spec_that_needs_local_preparation() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
    // Nothing listens on this address: the refusal must come first.
    let out = samtrain(&[
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for part in [
        "examples/demo.toml",
        "`[data.synth]`",
        "`[model] init`",
        "samtrain data synth",
        "samtrain model init",
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
}

/// `submit --preflight` reads the datasets as a worker's first generation
/// would, and refuses a corrupt one, naming the file, record and field,
/// before it looks for a coordinator.
#[test]
fn submit_preflight_refuses_a_corrupt_dataset_before_submitting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&[
        "data",
        "synth",
        "--task",
        "group",
        "--samples",
        "4",
        "--images",
        "2",
        "--out",
        data.to_str().unwrap(),
    ]);
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"preflight\"\n[model]\npath = {:?}\n[data]\ntrain = {:?}\n\
             [checkpoint]\nurl = {:?}\n",
            dir.path().join("model"),
            data,
            dir.path().join("checkpoints")
        ),
    )
    .unwrap();
    let submit = || {
        samtrain(&[
            "submit",
            spec.to_str().unwrap(),
            "--preflight",
            "--coordinator",
            "http://127.0.0.1:9",
        ])
    };
    // A clean dataset passes: the command goes on to the (absent) coordinator.
    let out = submit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("preflight: data.train") && err.contains("4 records, 4 used"),
        "{err}"
    );

    let annotations: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("annotations.json")).unwrap()).unwrap();
    let first = annotations[0]["img_list"][0].as_str().unwrap();
    std::fs::write(data.join(first), b"not an image").unwrap();
    let out = submit();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for part in [
        "preflight: data.train",
        first,
        "img_list[0]",
        "cannot be decoded",
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
    assert!(!err.contains("coordinator"), "{err}");
}

#[test]
fn plan_prints_the_memory_of_the_shipped_7b_job() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sam-vicuna7b/config.json"
    );
    let plan = |tp: &str| -> serde_json::Value {
        let out = ok(&[
            "model", "plan", "--config", config, "--tp", tp, "--batch", "4", "--images", "8",
            "--dtype", "bf16", "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let (one, two) = (plan("1"), plan("2"));
    let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    // SAM's guidance: 1408 + 1 + 2 * (768 * 768 + 768).
    assert_eq!(field(&one, "trainable_params"), 1_182_593);
    let total = field(&one, "frozen_params") + field(&one, "trainable_params");
    assert!((7_800_000_000..8_000_000_000).contains(&total), "{total}");
    // tp 2 halves every decoder projection: 32 layers of q, k, v, o and the MLP.
    let split = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) / 2;
    assert_eq!(
        field(&one, "frozen_params") - field(&two, "frozen_params"),
        split
    );
    assert_eq!(
        field(&two, "frozen_bytes"),
        2 * field(&two, "frozen_params")
    );
    assert_eq!(field(&two, "trainable_bytes"), 16 * 1_182_593);

    let human = ok(&["model", "plan", "--config", config, "--tp", "2"]);
    assert_eq!(
        human
            .lines()
            .filter(|l| l.starts_with('0') || l.starts_with('1'))
            .count(),
        2,
        "{human}"
    );
    let bad = samtrain(&["model", "plan", "--config", config, "--tp", "3"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--tp 3 must divide"));
}

#[test]
fn the_shipped_7b_job_spec_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sam-vicuna7b.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let spec = samtrain_proto::spec::JobSpec::from_toml(&text, Some(path)).unwrap();
    assert_eq!(spec.model.dtype, Some(samtrain_proto::spec::Dtype::Bf16));
    assert_eq!((spec.parallel.tp, spec.parallel.max_workers), (2, 8));
}

/// A reader that goes away (`samtrain model plan ... | head -0`) ends the
/// command quietly, by SIGPIPE as Unix tools end, not with a panic.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sam-vicuna7b/config.json"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(["model", "plan", "--config", config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run samtrain");
    // The reader goes away before samtrain, still loading, writes a line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
