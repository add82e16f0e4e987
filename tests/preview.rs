//! `samtrain data preview` against a Python reference written from SAM's
//! code (`tests/reference/preview_reference.py`: the `tokenizers` library
//! and torchvision on the same tokenizer.json and images): the evaluation
//! split and the training split without augmentation give the same ids,
//! labels and texts, and images of the same shape and statistics; with
//! augmentation, the crops and flips follow torchvision's distribution and
//! each augmented image equals torchvision's transform of its crop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn samtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(args)
        .output()
        .expect("run samtrain")
}

fn reference(args: &[&str]) -> Vec<Value> {
    let script = samtrain_testkit::workspace_root().join("tests/reference/preview_reference.py");
    let out = Command::new(samtrain_testkit::python())
        .arg(script)
        .args(args)
        .output()
        .expect("run the Python reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The instructions are longer than 8 tokens, so training cuts them (on
/// the left) and prediction does not.
const MAX_TXT_LEN: usize = 8;
const MAX_OUTPUT_TXT_LEN: usize = 6;
/// `examples/demo-model.json`'s image size.
const IMAGE_SIZE: u32 = 48;

struct Job {
    _dir: tempfile::TempDir,
    spec: PathBuf,
    data: PathBuf,
}

/// A synthetic dataset (also the eval split) and a job over it, with
/// `extra` added to `[data]`.
fn job(samples: usize, extra: &str) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let synth = samtrain(&[
        "data",
        "synth",
        "--task",
        "group",
        "--samples",
        &samples.to_string(),
        "--images",
        "3",
        "--seed",
        "3",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(synth.status.success(), "{synth:?}");
    let init = samtrain_testkit::workspace_root().join("examples/demo-model.json");
    let spec = dir.path().join("job.toml");
    let text = format!(
        r#"name = "preview"
[model]
path = "{model}"
init = "{init}"
[data]
train = "{data}"
eval = "{data}"
llm_tokenizer = "{data}/tokenizer.json"
max_txt_len = {MAX_TXT_LEN}
max_output_txt_len = {MAX_OUTPUT_TXT_LEN}
{extra}
[training]
steps = 1
batch_size = 1
seed = 11
device = "cpu"
[checkpoint]
url = "{ckpt}"
"#,
        model = dir.path().join("model").display(),
        init = init.display(),
        data = data.display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    std::fs::write(&spec, text).unwrap();
    Job {
        _dir: dir,
        spec,
        data,
    }
}

fn preview(job: &Job, args: &[&str]) -> Vec<Value> {
    let spec = job.spec.to_str().unwrap();
    let out = samtrain(&[&["data", "preview", spec, "--json"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

fn reference_samples(data: &Path, split: &str, samples: usize) -> Vec<Value> {
    let data = data.to_str().unwrap();
    let tokenizer = format!("{data}/tokenizer.json");
    reference(&[
        "samples",
        "--data",
        data,
        "--tokenizer",
        &tokenizer,
        "--split",
        split,
        "--samples",
        &samples.to_string(),
        "--image-size",
        &IMAGE_SIZE.to_string(),
        "--max-txt-len",
        &MAX_TXT_LEN.to_string(),
        "--max-output-txt-len",
        &MAX_OUTPUT_TXT_LEN.to_string(),
    ])
}

/// Pixel statistics agree to this: PIL's bicubic resampling and the image
/// crate's Catmull–Rom are the same kernel, but round differently.
const STAT_TOL: f64 = 5e-3;

fn assert_same_image(ours: &Value, theirs: &Value, what: &str) {
    assert_eq!(ours["shape"], theirs["shape"], "{what}: shape");
    for stat in ["mean", "std"] {
        let (a, b) = (ours[stat].as_f64().unwrap(), theirs[stat].as_f64().unwrap());
        assert!((a - b).abs() < STAT_TOL, "{what}: {stat} {a} against {b}");
    }
}

fn assert_same_samples(ours: &[Value], theirs: &[Value], split: &str) {
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        let what = format!("{split} sample {}", o["index"]);
        for field in [
            "llm_input_ids",
            "labels",
            "qformer_input_ids",
            "qformer_attention_mask",
            "decoded",
        ] {
            assert_eq!(o[field], t[field], "{what}: {field}");
        }
        let (oi, ti) = (
            o["images"].as_array().unwrap(),
            t["images"].as_array().unwrap(),
        );
        assert_eq!(oi.len(), ti.len(), "{what}: images");
        for (k, (a, b)) in oi.iter().zip(ti).enumerate() {
            assert_same_image(a, b, &format!("{what}, image {k}"));
            assert!(a.get("crop").is_none(), "{what}: augmented");
        }
    }
}

#[test]
fn preview_equals_sams_preprocessing() {
    let job = job(6, r#"augmentation = "none""#);
    for split in ["train", "eval"] {
        let ours = preview(&job, &["--split", split, "--samples", "6"]);
        let theirs = reference_samples(&job.data, split, 6);
        assert_same_samples(&ours, &theirs, split);
    }
    // What the comparison covered: SAM's BOS, left truncation in training
    // only, the answer's EOS.
    let train = preview(&job, &["--samples", "1"]);
    let eval = preview(&job, &["--split", "eval", "--samples", "1"]);
    let decoded = train[0]["decoded"]["llm_input_ids"].as_str().unwrap();
    assert!(decoded.starts_with("</s>"), "{decoded}");
    let prompt = |v: &Value| {
        v["labels"]
            .as_array()
            .unwrap()
            .iter()
            .take_while(|l| l.as_i64() == Some(-100))
            .count()
    };
    assert_eq!(prompt(&train[0]), MAX_TXT_LEN);
    assert!(prompt(&eval[0]) > MAX_TXT_LEN, "prediction cut the prompt");
    assert!(train[0]["qformer_input_ids"].as_array().unwrap().len() <= MAX_TXT_LEN);
}

#[test]
fn augmentation_draws_as_torchvision_and_the_same_on_every_run() {
    let job = job(200, "");
    let ours = preview(&job, &["--samples", "200"]);
    assert_eq!(
        ours,
        preview(&job, &["--samples", "200"]),
        "not reproducible"
    );
    let other_epoch = preview(&job, &["--samples", "3", "--epoch", "1"]);
    assert_ne!(other_epoch[..], ours[..3], "epoch 1 drew epoch 0's crops");

    let mut drawn = Vec::new();
    for sample in &ours {
        for image in sample["images"].as_array().unwrap() {
            let crop: Vec<f64> = image["crop"]
                .as_array()
                .expect("an augmented image reports its crop")
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            drawn.push((crop, image["flip"].as_bool().unwrap()));
        }
    }
    let side = 96.0; // the synthetic images' size
    let torchvision: Vec<(Vec<f64>, bool)> = reference(&[
        "crops", "--width", "96", "--height", "96", "--draws", "20000",
    ])
    .into_iter()
    .map(|v| {
        let a = v.as_array().unwrap();
        let crop = a[..4].iter().map(|x| x.as_f64().unwrap()).collect();
        (crop, a[4].as_bool().unwrap())
    })
    .collect();
    // Area share, log aspect ratio and flip rate: means within about four
    // standard errors of 600 draws.
    let summary = |draws: &[(Vec<f64>, bool)]| {
        let n = draws.len() as f64;
        let area = draws
            .iter()
            .map(|(c, _)| c[2] * c[3] / (side * side))
            .sum::<f64>()
            / n;
        let aspect = draws.iter().map(|(c, _)| (c[2] / c[3]).ln()).sum::<f64>() / n;
        let flips = draws.iter().filter(|(_, f)| *f).count() as f64 / n;
        (area, aspect, flips)
    };
    let (a, r, f) = summary(&drawn);
    let (ta, tr, tf) = summary(&torchvision);
    eprintln!("area {a:.4} / {ta:.4}, log aspect {r:.4} / {tr:.4}, flips {f:.3} / {tf:.3}");
    assert!((a - ta).abs() < 0.025, "area share {a} against {ta}");
    assert!((r - tr).abs() < 0.03, "log aspect {r} against {tr}");
    assert!((f - tf).abs() < 0.09, "flip rate {f} against {tf}");
    for (c, _) in &drawn {
        assert!(
            c[0] + c[2] <= side && c[1] + c[3] <= side,
            "crop {c:?} leaves the image"
        );
    }

    // Each augmented image is torchvision's resized crop (and flip) of it.
    let records: Value =
        serde_json::from_slice(&std::fs::read(job.data.join("annotations.json")).unwrap()).unwrap();
    for (s, sample) in ours.iter().take(3).enumerate() {
        for (k, image) in sample["images"].as_array().unwrap().iter().enumerate() {
            let file = job.data.join(records[s]["img_list"][k].as_str().unwrap());
            let crop: Vec<String> = image["crop"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.to_string())
                .collect();
            let mut args = vec![
                "apply".to_owned(),
                "--image".to_owned(),
                file.display().to_string(),
                "--image-size".to_owned(),
                IMAGE_SIZE.to_string(),
                "--crop".to_owned(),
                crop.join(","),
            ];
            if image["flip"].as_bool().unwrap() {
                args.push("--flip".to_owned());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let theirs = reference(&args).remove(0);
            assert_same_image(image, &theirs, &format!("sample {s}, image {k}"));
        }
    }
}
