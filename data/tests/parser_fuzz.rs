//! The annotation and pred.json readers against input nobody meant:
//! arbitrary bytes as an annotations file, and arbitrary JSON as records or
//! predictions. They never panic, and every problem names its file or its
//! record. (Bounded: a few hundred cases, a few seconds.)

use proptest::prelude::*;
use samtrain_data::eval::{evaluate, parse_predictions};
use samtrain_data::mmlink::{load_blocking, ImageCheck, LoadOptions, Policy};
use serde_json::Value;

/// Any JSON value, a few levels deep, with the fields the readers look for
/// among its keys.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id".to_owned()),
        Just("img_list".to_owned()),
        Just("instruction".to_owned()),
        Just("input".to_owned()),
        Just("output".to_owned()),
        Just("sample_id".to_owned()),
        Just("pred_response".to_owned()),
        Just("gt_response".to_owned()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("images/../../etc/passwd")),
        Just(Value::from(". . .")),
    ];
    leaf.prop_recursive(3, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn options() -> LoadOptions {
    LoadOptions {
        policy: Policy::Skip,
        images: ImageCheck::Exists,
        ..LoadOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_annotations_file_is_read_or_refused_with_its_name(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        jsonl in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let name = if jsonl { "annotations.jsonl" } else { "annotations.json" };
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        match load_blocking(dir.path().to_str().unwrap(), options()) {
            Ok(loaded) => {
                for p in &loaded.report.problems {
                    prop_assert!(p.file.ends_with(name), "{}", p);
                }
            }
            Err(e) => prop_assert!(e.to_string().contains(name), "{}", e),
        }
    }

    #[test]
    fn any_records_are_read_or_named_as_bad(records in prop::collection::vec(json(), 0..8)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("annotations.json"),
            serde_json::to_vec(&records).unwrap(),
        )
        .unwrap();
        if let Ok(loaded) = load_blocking(dir.path().to_str().unwrap(), options()) {
            prop_assert_eq!(
                loaded.report.records,
                loaded.report.valid + loaded.report.problems.iter().map(|p| p.index).collect::<std::collections::HashSet<_>>().len()
            );
        }
    }

    #[test]
    fn any_predictions_are_scored_or_refused(value in json()) {
        if let Ok(predictions) = parse_predictions(&value) {
            if let Ok(scores) = evaluate(&predictions) {
                for x in [scores.summary.rouge, scores.summary.cider, scores.summary.bleu4] {
                    prop_assert!(x.is_finite() && x >= 0.0, "{}", x);
                }
            }
        }
    }

    #[test]
    fn any_answers_are_scored_in_range(pairs in prop::collection::vec((".{0,60}", ".{1,60}"), 1..6)) {
        let records: Vec<Value> = pairs
            .iter()
            .enumerate()
            .map(|(i, (p, g))| serde_json::json!({"sample_id": i, "pred_response": p, "gt_response": g}))
            .collect();
        let predictions = parse_predictions(&Value::Array(records)).unwrap();
        if let Ok(scores) = evaluate(&predictions) {
            prop_assert!((0.0..=100.0).contains(&scores.summary.rouge));
            prop_assert!((0.0..=100.0).contains(&scores.summary.bleu4));
        }
    }
}
