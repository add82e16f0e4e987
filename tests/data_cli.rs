//! `samtrain data` as a user runs it: synth then validate end to end, and
//! validate's exit status and `--json` report on a broken dataset.

use std::fs;
use std::process::{Command, Output};

use serde_json::Value;

fn samtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(args)
        .output()
        .expect("run samtrain")
}

#[test]
fn synth_then_validate_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    for task in ["group", "story"] {
        let out = dir.path().join(task);
        let out = out.to_str().unwrap();
        let args = ["data", "synth", "--task", task, "--samples", "5"];
        let synth =
            samtrain(&[&args[..], &["--images", "4", "--seed", "3", "--out", out]].concat());
        assert!(synth.status.success(), "{synth:?}");
        let text = samtrain(&["data", "validate", out]);
        assert!(text.status.success(), "{text:?}");
        assert!(String::from_utf8_lossy(&text.stdout).contains("5 records, 5 valid"));
        let json = samtrain(&["data", "validate", out, "--json"]);
        assert!(json.status.success());
        let v: Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["records"], 5);
        assert_eq!(v["valid"], 5);
        assert_eq!(v["problems"], serde_json::json!([]));
    }
}

#[test]
fn validate_fails_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let synth = samtrain(&[
        "data",
        "synth",
        "--task",
        "group",
        "--samples",
        "2",
        "--out",
        root,
    ]);
    assert!(synth.status.success(), "{synth:?}");
    fs::remove_file(dir.path().join("images/000001_2.png")).unwrap();
    let ann = dir.path().join("annotations.json");
    let mut records: Value = serde_json::from_slice(&fs::read(&ann).unwrap()).unwrap();
    records[0]["output"] = Value::String(String::new());
    fs::write(&ann, serde_json::to_vec(&records).unwrap()).unwrap();

    let text = samtrain(&["data", "validate", root]);
    assert_eq!(text.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("record 0 (index 0), field `output`: is empty"),
        "{stdout}"
    );
    assert!(
        stdout.contains("000001_2.png: record 1 (index 1), field `img_list[2]`: image not found"),
        "{stdout}"
    );
    assert!(stdout.contains("2 records, 0 valid"), "{stdout}");

    let json = samtrain(&["data", "validate", root, "--json"]);
    assert_eq!(json.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        (v["records"].as_u64(), v["valid"].as_u64()),
        (Some(2), Some(0))
    );
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2);
    assert_eq!(problems[0]["record"], 0);
    assert_eq!(problems[0]["field"], "output");
    assert!(problems[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("annotations.json"));
    assert_eq!(problems[1]["record"], 1);
    assert_eq!(problems[1]["field"], "img_list[2]");
    assert!(problems[1]["file"]
        .as_str()
        .unwrap()
        .ends_with("images/000001_2.png"));
    assert_eq!(problems[1]["message"], "image not found");

    let missing = samtrain(&["data", "validate", &format!("{root}/nowhere")]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open dataset"));
}
