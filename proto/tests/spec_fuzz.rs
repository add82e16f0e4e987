//! The job-spec parser against input nobody meant: arbitrary text, and a
//! valid spec with each number replaced by an arbitrary one. It never
//! panics; what it accepts keeps every bound the spec promises; what it
//! refuses names a field. (Bounded: a few hundred cases, well under a
//! second.)

use proptest::prelude::*;
use samtrain_proto::spec::JobSpec;

const VALID: &str = r#"
name = "fuzz"
[model]
path = "models/sam"
[data]
train = "data/train"
max_txt_len = 128
loader_threads = 2
prefetch = 4
max_images_per_record = 64
max_image_pixels = 50000000
cache_max_gib = 100.0
[training]
steps = 100
batch_size = 4
lr = 1e-4
warmup_steps = 10
threads = 2
[parallel]
tp = 1
min_workers = 1
max_workers = 2
collective_timeout_s = 60.0
last_call_s = 1.0
[checkpoint]
url = "file:///tmp/ckpt"
every_steps = 10
keep = 3
[restart]
max_restarts = 3
[evaluation]
num_beams = 5
max_new_tokens = 32
"#;

/// Numbers that break parsers and arithmetic.
fn awkward_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        Just("-inf".to_owned()),
        Just("1e300".to_owned()),
        Just("-0.0".to_owned()),
        Just("18446744073709551616".to_owned()),
    ]
}

#[test]
fn the_spec_being_mutated_is_valid() {
    let spec = JobSpec::from_toml(VALID, None).unwrap();
    assert_eq!((spec.training.steps, spec.evaluation.num_beams), (100, 5));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_is_refused_or_accepted_without_panicking(text in ".{0,400}") {
        let _ = JobSpec::from_toml(&text, Some("fuzz.toml"));
    }

    #[test]
    fn any_number_in_any_field_is_bounded(index in 0usize..24, value in awkward_number()) {
        // Replace the index-th `= <number>` of the valid spec.
        let mut seen = 0;
        let mut text = String::new();
        for line in VALID.lines() {
            let numeric = line
                .split_once(" = ")
                .is_some_and(|(_, v)| v.parse::<f64>().is_ok());
            if numeric {
                if seen == index {
                    let (key, _) = line.split_once(" = ").unwrap();
                    text.push_str(&format!("{key} = {value}\n"));
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
                seen += 1;
            } else {
                text.push_str(line);
                text.push('\n');
            }
        }
        match JobSpec::from_toml(&text, Some("fuzz.toml")) {
            Ok(spec) => {
                prop_assert!(spec.training.steps <= 1_000_000_000);
                prop_assert!(spec.training.batch_size <= 65_536);
                prop_assert!(spec.evaluation.num_beams <= 64);
                prop_assert!(spec.parallel.collective_timeout_s.is_finite());
                prop_assert!(spec.parallel.collective_timeout_s <= 86_400.0);
                prop_assert!(spec.parallel.last_call_s.is_finite());
                prop_assert!(spec.parallel.last_call_s <= 3_600.0);
                prop_assert!(spec.data.max_image_pixels <= 1_000_000_000);
                prop_assert!(spec.data.max_images_per_record <= 1024);
                prop_assert!(spec.training.lr.is_finite());
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains("fuzz.toml"), "{}", message);
            }
        }
    }
}
