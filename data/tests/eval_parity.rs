//! `samtrain eval` against SAM's evaluation flow on the real PyPI `rouge`
//! and `pycocoevalcap` packages (`tests/reference/eval_reference.py`), on
//! seeded corpora of predictions built to hit every branch of the
//! normalisation and the scorers: punctuation next to spaces or not, numbers
//! with commas and periods, quotes, newlines and tabs, upper case, non-ASCII
//! text, empty predictions, repeated words, predictions equal to their
//! reference, stories with more than 32 periods, and integer and string ids
//! that look alike.

use std::path::Path;
use std::process::Command;

use samtrain_testkit::{python, workspace_root};

use samtrain_data::eval::normalize::normalize;
use samtrain_data::eval::{self, SAMPLES_FILE, SUMMARY_FILE};
use samtrain_data::rng::SplitMix64;
use serde_json::{json, Value};

/// Runs `eval_reference.py ARGS...` with `stdin`, returns its stdout.
fn reference(args: &[&str], stdin: Option<&Path>) -> String {
    let script = workspace_root().join("tests/reference/eval_reference.py");
    let mut command = Command::new(python());
    command.arg(&script).args(args);
    if let Some(path) = stdin {
        command.stdin(std::fs::File::open(path).unwrap());
    }
    let out = command.output().expect("start the reference python");
    assert!(
        out.status.success(),
        "eval_reference.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The crate's SplitMix64 with the draws the corpus needs.
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Plain words, so that references share n-grams and scores are not all 0.
const WORDS: &[&str] = &[
    "a", "the", "dog", "cat", "man", "woman", "children", "runs", "is", "on", "in", "at", "park",
    "beach", "sunset", "group", "of", "people", "playing", "with", "ball", "red", "blue", "happy",
    "family", "story", "ends", "they", "all", "share", "common", "theme", "water", "city", "night",
    "friends", "walk", "together", "and", "then", "home",
];

/// Words that exercise the normalisation: SAM's punctuation list, numbers
/// with commas and periods, quotes, case, non-ASCII letters and digits.
const TRICKY: &[&str] = &[
    "1,000",
    "3.5",
    "10,000.50",
    ".5",
    "v2.0",
    "U.S.",
    "e.g.",
    "2",
    "0.25",
    "dog,",
    "(cat)",
    "a-b",
    "x/y",
    "[note]",
    "{brace}",
    "a=b",
    "c+d",
    "back\\slash",
    "snake_case",
    "<tag>",
    "@user",
    "what?",
    "wow!",
    "semi;colon",
    "end.",
    "...",
    "-",
    " - ",
    "\"quoted\"",
    "'single'",
    "`tick`",
    "don't",
    "it's",
    "DOG",
    "The",
    "CAT",
    "Sunset",
    "café",
    "ÉCOLE",
    "ΣΟΦΊΑΣ",
    "naïve",
    "\u{663},\u{665}",
    "x.\u{665}",
    "?",
    "!",
    ",",
    ";",
    "\"",
    "'",
];

const SEPARATORS: &[&str] = &[
    " ", " ", " ", " ", "  ", "\n", "\t", " \n ", "\u{a0}", "\r\n",
];

/// `len` words; ends with a period if `period`, else half of the time.
fn sentence(rng: &mut Rng, len: usize, period: bool) -> String {
    let mut text = String::new();
    for i in 0..len {
        if i > 0 {
            text.push_str(rng.pick(SEPARATORS));
        }
        let word = if rng.chance(20) {
            rng.pick(TRICKY)
        } else {
            rng.pick(WORDS)
        };
        text.push_str(word);
    }
    if period || rng.chance(50) {
        text.push('.');
    }
    text
}

/// A reference: one or more sentences with at least one plain word, so that
/// it never normalises to nothing; sometimes a story of 35 sentences that
/// end in periods, more than SAM's normalisation deletes.
fn reference_text(rng: &mut Rng) -> String {
    let story = rng.chance(5);
    let sentences = if story { 35 } else { 1 + rng.below(3) };
    let mut parts: Vec<String> = (0..sentences)
        .map(|_| {
            let len = 2 + rng.below(12);
            sentence(rng, len, story)
        })
        .collect();
    parts.push(rng.pick(WORDS).to_string());
    parts.join(" ")
}

/// A prediction for `reference`, of one of several kinds.
fn prediction_text(rng: &mut Rng, reference: &str) -> String {
    match rng.below(10) {
        0 => reference.to_string(),
        1 => ["", " ", "?!", "... ", "\n\t", "\"\"", "''", "-", "(  )"][rng.below(9)].to_string(),
        2 => {
            let word = rng.pick(WORDS);
            vec![word; 1 + rng.below(6)].join(" ")
        }
        3 => {
            let len = 1 + rng.below(3);
            sentence(rng, len, false)
        }
        4 => {
            let len = 40 + rng.below(80);
            sentence(rng, len, false)
        }
        5 => reference.to_uppercase(),
        _ => {
            // The reference with words dropped, replaced and inserted.
            let mut words: Vec<String> = reference.split(' ').map(str::to_string).collect();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(words.len() + 1);
                match rng.below(3) {
                    0 if at < words.len() => {
                        words.remove(at);
                    }
                    1 if at < words.len() => words[at] = rng.pick(WORDS).to_string(),
                    _ => words.insert(at, rng.pick(WORDS).to_string()),
                }
            }
            words.join(" ")
        }
    }
}

/// `n` records; ids alternate between integers and strings that spell
/// another record's integer (`0` and `"0"` are two samples to SAM).
fn corpus(seed: u64, n: usize) -> Value {
    let mut rng = Rng(SplitMix64::new(seed));
    let records: Vec<Value> = (0..n)
        .map(|i| {
            let gt = reference_text(&mut rng);
            let pred = prediction_text(&mut rng, &gt);
            let id = if i % 2 == 0 {
                json!(i)
            } else {
                json!((i - 1).to_string())
            };
            let mut record = json!({"sample_id": id, "pred_response": pred, "gt_response": gt});
            if rng.chance(10) {
                record["image"] = json!(["a.jpg", "b.jpg"]);
            }
            record
        })
        .collect();
    Value::Array(records)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Largest difference of one per-sample score over all samples.
fn max_diff(ours: &[Value], theirs: &[Value], key: &str) -> f64 {
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a[key].as_f64().unwrap() - b[key].as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

/// Evaluates one corpus both ways and compares everything.
fn compare(seed: u64, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("pred.json");
    std::fs::write(&pred, serde_json::to_vec_pretty(&corpus(seed, n)).unwrap()).unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    eval::run(&pred, &ours).unwrap();
    reference(
        &[
            "--pred",
            pred.to_str().unwrap(),
            "--out",
            theirs.to_str().unwrap(),
        ],
        None,
    );

    let summary = read_json(&ours.join(SUMMARY_FILE));
    let expected = read_json(&theirs.join(SUMMARY_FILE));
    for key in ["rouge", "cider", "bleu4"] {
        assert_eq!(
            summary[key].as_f64(),
            expected[key].as_f64(),
            "{key}: ours {summary}, SAM's {expected}"
        );
    }

    let samples = read_json(&ours.join(SAMPLES_FILE));
    let expected_samples = read_json(&theirs.join(SAMPLES_FILE));
    let (samples, expected_samples) = (
        samples.as_array().unwrap(),
        expected_samples.as_array().unwrap(),
    );
    assert_eq!(samples.len(), n);
    assert_eq!(expected_samples.len(), n);
    for (a, b) in samples.iter().zip(expected_samples) {
        assert_eq!(a["id"], b["id"]);
    }
    for key in ["rouge", "cider", "bleu4"] {
        let diff = max_diff(samples, expected_samples, key);
        println!("seed {seed}, {n} samples: per-sample {key} max |diff| {diff:e}");
        assert!(diff <= 1e-9, "{key}: per-sample difference {diff}");
    }
    println!("seed {seed}, {n} samples: eval.json {summary}");
}

#[test]
fn scores_match_sams_script() {
    // Over 128 samples numpy's mean sums pairwise in blocks.
    compare(1, 600);
}

#[test]
fn scores_match_sams_script_on_few_samples() {
    // Under 8 samples numpy's mean sums in plain order.
    compare(2, 5);
}

#[test]
fn normalisation_matches_python() {
    let records = corpus(3, 400);
    let answers: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            [
                r["pred_response"].as_str().unwrap(),
                r["gt_response"].as_str().unwrap(),
            ]
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("answers.json");
    std::fs::write(&input, serde_json::to_vec(&answers).unwrap()).unwrap();
    let expected: Vec<String> =
        serde_json::from_str(&reference(&["--normalize"], Some(&input))).unwrap();
    assert_eq!(expected.len(), answers.len());
    for (answer, want) in answers.iter().zip(&expected) {
        assert_eq!(&normalize(answer), want, "normalize({answer:?})");
    }
}
