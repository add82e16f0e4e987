//! `samtrain eval` as a user runs it: a real process on real files. The
//! scores themselves are checked against SAM's script in
//! `data/tests/eval_parity.rs`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn samtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(args)
        .output()
        .expect("run samtrain")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bad_pred_json_names_file_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("pred.json");
    let cases = [
        (
            r#"[{"sample_id": 0, "pred_response": "a dog", "gt_response": "a dog"},
                {"sample_id": "s1", "pred_response": "a cat", "gt_response": null}]"#,
            "record at index 1 (sample_id \"s1\"): field `gt_response` must be a string, found null",
        ),
        (
            r#"[{"sample_id": 0, "pred_response": "a dog"}]"#,
            "record at index 0 (sample_id 0): field `gt_response` is missing",
        ),
        (
            r#"[{"sample_id": 0, "pred_response": "a dog", "gt_response": "!?"}]"#,
            "record at index 0 (sample_id 0): field `gt_response` \"!?\" is empty after SAM's normalisation",
        ),
        (
            r#"{"sample_id": 0}"#,
            "expected a JSON list",
        ),
        ("[1,", "is not valid JSON"),
    ];
    for (text, want) in cases {
        std::fs::write(&pred, text).unwrap();
        let out = samtrain(&["eval", "--pred", path(&pred)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: samtrain eval succeeded");
        assert!(stderr.contains(path(&pred)), "{text}: {stderr}");
        assert!(stderr.contains(want), "{text}: {stderr:?} lacks {want:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = dir.path().join("missing.json");
    let out = samtrain(&["eval", "--pred", path(&missing)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read") && stderr.contains(path(&missing)),
        "{stderr}"
    );
}

#[test]
fn writes_sams_files_and_prints_scores() {
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("pred.json");
    std::fs::write(
        &pred,
        r#"[{"sample_id": 0, "pred_response": "A dog runs on the beach.", "gt_response": "A dog runs on the beach."},
            {"sample_id": 1, "pred_response": "", "gt_response": "Two cats sleep."}]"#,
    )
    .unwrap();

    // By default the files go next to pred.json, as SAM writes them.
    let out = samtrain(&["eval", "--pred", path(&pred)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("ROUGE-L  50.00"), "{table}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("eval.json")).unwrap()).unwrap();
    let samples: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("eval_score.json")).unwrap())
            .unwrap();
    assert_eq!(samples.as_array().unwrap().len(), 2);
    assert_eq!(samples[1]["rouge"], 0.0);

    let other = dir.path().join("scores");
    let out = samtrain(&[
        "eval",
        "--pred",
        path(&pred),
        "--out",
        path(&other),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, summary);
    assert!(other.join("eval.json").exists() && other.join("eval_score.json").exists());
}
