//! MmLINK reading, checking and synthesis end to end on real files: the
//! synthetic datasets validate clean and are reproducible, and a dataset
//! with one of every problem reports each with its file, record and field.

use std::fs;
use std::path::Path;

use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_data::mmlink::{load_blocking, LoadError, LoadOptions, Policy, RecordId};

fn options(task: Task, seed: u64) -> SynthOptions {
    SynthOptions {
        task,
        samples: 6,
        images: 3,
        min_images: 0,
        max_distractors: samtrain_data::mmlink::synth::MAX_DISTRACTORS,
        seed,
    }
}

/// Every file under `dir`, relative path and bytes, in a stable order.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn synth_validates_clean_for_both_tasks() {
    for task in [Task::Group, Task::Story] {
        let dir = tempfile::tempdir().unwrap();
        let done = synth(dir.path(), &options(task, 1)).unwrap();
        assert_eq!((done.records, done.images), (6, 18));
        let loaded = load_blocking(dir.path().to_str().unwrap(), LoadOptions::default()).unwrap();
        assert_eq!(loaded.records.len(), 6);
        assert!(loaded.report.problems.is_empty());
        for r in &loaded.records {
            assert_eq!(r.img_list.len(), 3);
            let img = image::open(dir.path().join(&r.img_list[0])).unwrap();
            assert_eq!((img.width(), img.height()), (96, 96));
        }
    }
}

#[test]
fn a_mixed_set_has_between_min_images_and_images_per_sample() {
    for task in [Task::Group, Task::Story] {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            samples: 40,
            images: 5,
            min_images: 2,
            ..options(task, 3)
        };
        let done = synth(dir.path(), &opts).unwrap();
        let loaded = load_blocking(dir.path().to_str().unwrap(), LoadOptions::default()).unwrap();
        assert!(loaded.report.problems.is_empty());
        let counts: Vec<usize> = loaded.records.iter().map(|r| r.img_list.len()).collect();
        assert!(counts.iter().all(|n| (2..=5).contains(n)), "{counts:?}");
        assert!(counts.contains(&2) && counts.contains(&5), "{counts:?}");
        assert_eq!(done.images, counts.iter().sum::<usize>());
    }
    let dir = tempfile::tempdir().unwrap();
    for min_images in [1, 4] {
        let opts = SynthOptions {
            images: 3,
            min_images,
            ..options(Task::Group, 3)
        };
        let e = synth(dir.path(), &opts).unwrap_err().to_string();
        assert!(
            e.contains("--min-images") && e.contains(&format!("got {min_images}")),
            "{e}"
        );
    }
}

#[test]
fn synth_is_reproducible_and_seed_dependent() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    synth(a.path(), &options(Task::Group, 42)).unwrap();
    synth(b.path(), &options(Task::Group, 42)).unwrap();
    synth(c.path(), &options(Task::Group, 43)).unwrap();
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    assert_eq!(ta, tb);
    assert_ne!(ta, tc);
    let annotations = |t: &[(String, Vec<u8>)]| {
        t.iter()
            .find(|(n, _)| n == "annotations.json")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(annotations(&ta), annotations(&tc));
}

#[test]
fn tokenizer_loads_and_round_trips_every_text() {
    for task in [Task::Group, Task::Story] {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            task,
            samples: 40,
            images: 12,
            min_images: 0,
            max_distractors: samtrain_data::mmlink::synth::MAX_DISTRACTORS,
            seed: 9,
        };
        synth(dir.path(), &opts).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        for (token, id) in [("<pad>", 0), ("<s>", 1), ("</s>", 2), ("<unk>", 3)] {
            assert_eq!(tok.token_to_id(token), Some(id));
        }
        let loaded = load_blocking(dir.path().to_str().unwrap(), LoadOptions::default()).unwrap();
        for r in &loaded.records {
            for text in [&r.instruction, &r.output] {
                let enc = tok.encode(text.as_str(), true).unwrap();
                let ids = enc.get_ids();
                assert_eq!((ids[0], ids[ids.len() - 1]), (1, 2), "BOS/EOS");
                assert!(!ids.contains(&3), "unknown word in {text:?}");
                let decoded = tok.decode(ids, true).unwrap();
                let squash = |s: &str| s.to_lowercase().replace(' ', "");
                assert_eq!(squash(&decoded), squash(text));
            }
        }
    }
}

/// A dataset with one good record and one of every problem.
fn corrupted(dir: &Path) {
    synth(dir, &options(Task::Group, 3)).unwrap();
    fs::write(dir.join("images/broken.png"), b"not a png at all").unwrap();
    let ok = "images/000000_0.png";
    let annotations = serde_json::json!([
        {"id": 0, "img_list": [ok, "images/000000_1.png"], "instruction": "q", "output": "a"},
        {"id": 1, "img_list": [ok, "images/missing.png"], "instruction": "q", "output": "a"},
        {"id": 2, "img_list": ["images/broken.png"], "instruction": "q", "output": "a"},
        {"id": "s3", "img_list": ok, "instruction": 7, "output": "a"},
        {"id": 4, "img_list": [ok], "instruction": "q", "output": ""},
        {"id": 0, "img_list": [ok], "instruction": "q", "output": "a"},
        {"img_list": [ok], "instruction": "q", "output": "a"},
        {"id": 7, "img_list": ["../secret.png", "/etc/passwd"], "instruction": "q", "output": "a"},
        {"id": 8, "img_list": [], "instruction": "q"},
        "not a record"
    ]);
    fs::write(
        dir.join("annotations.json"),
        serde_json::to_vec_pretty(&annotations).unwrap(),
    )
    .unwrap();
}

#[test]
fn every_problem_is_reported_with_file_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    corrupted(dir.path());
    let root = dir.path().to_str().unwrap();
    let ann = format!("{root}/annotations.json");
    let skip = LoadOptions {
        policy: Policy::Skip,
        ..LoadOptions::default()
    };
    let loaded = load_blocking(root, skip).unwrap();
    assert_eq!(loaded.records.len(), 1);
    assert_eq!(loaded.records[0].id, RecordId::Int(0));
    let report = &loaded.report;
    assert_eq!((report.records, report.valid, report.skipped()), (10, 1, 9));

    let got: Vec<(Option<RecordId>, usize, Option<&str>, String)> = report
        .problems
        .iter()
        .map(|p| {
            (
                p.record.clone(),
                p.index,
                p.field.as_deref(),
                p.file.clone(),
            )
        })
        .collect();
    let int = |i| Some(RecordId::Int(i));
    let expected = vec![
        (
            int(1),
            1,
            Some("img_list[1]"),
            format!("{root}/images/missing.png"),
        ),
        (
            int(2),
            2,
            Some("img_list[0]"),
            format!("{root}/images/broken.png"),
        ),
        (
            Some(RecordId::Str("s3".into())),
            3,
            Some("img_list"),
            ann.clone(),
        ),
        (
            Some(RecordId::Str("s3".into())),
            3,
            Some("instruction"),
            ann.clone(),
        ),
        (int(4), 4, Some("output"), ann.clone()),
        (int(0), 5, Some("id"), ann.clone()),
        (None, 6, Some("id"), ann.clone()),
        (int(7), 7, Some("img_list[0]"), ann.clone()),
        (int(7), 7, Some("img_list[1]"), ann.clone()),
        (int(8), 8, Some("img_list"), ann.clone()),
        (int(8), 8, Some("output"), ann.clone()),
        (None, 9, None, ann.clone()),
    ];
    assert_eq!(got, expected, "{report}");
    let messages: Vec<&str> = report.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(messages[0], "image not found");
    assert!(
        messages[1].starts_with("image cannot be decoded"),
        "{}",
        messages[1]
    );
    assert!(messages[5].contains("duplicate id"));
    assert!(messages[7].contains(".."));
    assert!(messages[8].contains("absolute"));
    assert!(messages[9].contains("empty"));
    assert_eq!(messages[10], "is missing");

    // Fail (the default) is an error whose text lists every problem.
    match load_blocking(root, LoadOptions::default()) {
        Err(LoadError::Invalid { report: r }) => {
            assert_eq!(&r, report);
            let text = LoadError::Invalid { report: r }.to_string();
            assert!(text.contains("record 1 (index 1), field `img_list[1]`: image not found"));
            assert!(text.contains("record at index 6, field `id`: is missing"));
            assert_eq!(text.lines().count(), 13);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn jsonl_reads_like_json_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &options(Task::Story, 5)).unwrap();
    let root = dir.path().to_str().unwrap();
    let from_json = load_blocking(root, LoadOptions::default()).unwrap().records;
    let lines: Vec<String> = from_json
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    fs::remove_file(dir.path().join("annotations.json")).unwrap();
    fs::write(
        dir.path().join("annotations.jsonl"),
        lines.join("\n\n") + "\n",
    )
    .unwrap();
    let from_jsonl = load_blocking(root, LoadOptions::default()).unwrap();
    assert_eq!(from_jsonl.records, from_json);
    assert!(from_jsonl.report.annotations.ends_with("annotations.jsonl"));

    // A line that is not JSON is that record's problem, not the file's.
    let jsonl = dir.path().join("annotations.jsonl");
    fs::write(&jsonl, format!("{}\n{{oops\n{}\n", lines[0], lines[1])).unwrap();
    let skip = LoadOptions {
        policy: Policy::Skip,
        ..LoadOptions::default()
    };
    let loaded = load_blocking(jsonl.to_str().unwrap(), skip).unwrap();
    assert_eq!(loaded.records, from_json[..2]);
    assert_eq!(loaded.report.problems.len(), 1);
    let p = &loaded.report.problems[0];
    assert_eq!((p.index, p.field.as_deref()), (1, None));
    assert!(
        p.message.starts_with("line 2 is not valid JSON"),
        "{}",
        p.message
    );
}

#[test]
fn file_url_and_file_path_read_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &options(Task::Group, 8)).unwrap();
    let root = dir.path().canonicalize().unwrap();
    let by_path = load_blocking(root.to_str().unwrap(), LoadOptions::default()).unwrap();
    let url = format!("file://{}", root.display());
    let by_url = load_blocking(&url, LoadOptions::default()).unwrap();
    assert_eq!(by_url.records, by_path.records);
    assert_eq!(by_url.report.annotations, format!("{url}/annotations.json"));
    let file_url = format!("{url}/annotations.json");
    assert_eq!(
        load_blocking(&file_url, LoadOptions::default())
            .unwrap()
            .records,
        by_path.records
    );
}

#[test]
fn file_level_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let err = load_blocking(root, LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LoadError::NoAnnotations { .. }), "{err}");
    fs::write(dir.path().join("annotations.json"), b"{\"id\": 1}").unwrap();
    let err = load_blocking(root, LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("annotations.json: annotations must be a JSON list"),
        "{err}"
    );
    fs::write(dir.path().join("annotations.json"), b"[{").unwrap();
    let err = load_blocking(root, LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LoadError::Json { .. }), "{err}");
    let err = load_blocking(&format!("{root}/nope"), LoadOptions::default()).unwrap_err();
    assert!(matches!(err, LoadError::Location { .. }), "{err}");
}

#[test]
fn synth_rejects_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(Task::Story, 0);
    o.images = 1;
    assert!(synth(dir.path(), &o).is_err());
    o.images = 2;
    o.samples = 0;
    assert!(synth(dir.path(), &o).is_err());
}

/// A record listing more images than the limit, and an image whose header
/// promises more pixels than the limit (its file is small: 10000 x 10000
/// grey, 100 MB decoded), are bad records named by record and field, found
/// without decoding the oversized image.
#[test]
fn oversized_records_and_images_are_problems_not_allocations() {
    use samtrain_data::limits::InputLimits;
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &options(Task::Group, 2)).unwrap();
    let root = dir.path().to_str().unwrap();
    let mut records: Vec<serde_json::Value> =
        serde_json::from_slice(&fs::read(dir.path().join("annotations.json")).unwrap()).unwrap();
    let first = records[0]["img_list"][0].clone();
    records[1]["img_list"] = serde_json::Value::Array(vec![first; 100]);
    image::GrayImage::new(10_000, 10_000)
        .save(dir.path().join("images/bomb.png"))
        .unwrap();
    records[2]["img_list"][1] = "images/bomb.png".into();
    fs::write(
        dir.path().join("annotations.json"),
        serde_json::to_vec(&records).unwrap(),
    )
    .unwrap();
    let skip = LoadOptions {
        policy: Policy::Skip,
        limits: InputLimits {
            max_images_per_record: 8,
            max_image_pixels: 50_000_000,
        },
        ..LoadOptions::default()
    };
    let loaded = load_blocking(root, skip).unwrap();
    assert_eq!(loaded.records.len(), 4);
    let problems: Vec<String> = loaded
        .report
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("img_list")
            && problems[0].contains("lists 100 images, more than data.max_images_per_record (8)"),
        "{problems:?}"
    );
    assert!(
        problems[1].contains("img_list[1]")
            && problems[1].contains("10000 x 10000 = 100000000 pixels"),
        "{problems:?}"
    );
}
