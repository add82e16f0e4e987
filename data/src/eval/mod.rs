//! SAM's evaluation protocol (its `evaluate_score.py`): read and validate a
//! `pred.json`, normalise every answer, score ROUGE-L, CIDEr-D and BLEU-4
//! with one reference per sample, and write `eval.json` (the three scores,
//! x100, rounded to 2 places) and `eval_score.json` (per sample, unscaled).
//!
//! The numbers equal SAM's script on the same file: the same normalisation
//! ([`normalize`]), the scorers as the PyPI `rouge` package and pycocoevalcap
//! compute them ([`rouge`], [`cider`], [`bleu`]), and numpy's and Python's
//! float steps (`pyfloat`). Where SAM's script would crash (a repeated
//! sample id, an empty reference, a text of only periods) this module
//! returns an error that names the file, the record and the field.

pub mod bleu;
pub mod cider;
pub mod normalize;
mod pyfloat;
pub mod rouge;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::ser::PrettyFormatter;
use serde_json::{Number, Value};
use thiserror::Error;
use tracing::info;

use self::normalize::normalize;
use self::pyfloat::{numpy_mean, numpy_round2, python_round2};
use self::rouge::{rouge_l_f, RougeError};

/// The three scores, as SAM writes them.
pub const SUMMARY_FILE: &str = "eval.json";
/// The per-sample scores, as SAM writes them.
pub const SAMPLES_FILE: &str = "eval_score.json";

/// A sample's id as `pred.json` has it. SAM keys its dictionaries by it, so
/// `7` and `"7"` are two samples, and an id may not repeat.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum SampleId {
    Integer(Number),
    Text(String),
}

impl fmt::Display for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleId::Integer(n) => write!(f, "{n}"),
            SampleId::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One record of `pred.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub sample_id: SampleId,
    pub pred_response: String,
    pub gt_response: String,
}

/// `eval.json`: each score x100, rounded to 2 places.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub rouge: f64,
    pub cider: f64,
    pub bleu4: f64,
}

/// One entry of `eval_score.json`, unscaled and unrounded as SAM writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleScores {
    pub id: SampleId,
    pub rouge: f64,
    pub cider: f64,
    pub bleu4: f64,
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub summary: Summary,
    /// In the order of `pred.json`.
    pub samples: Vec<SampleScores>,
}

/// Everything that can stop an evaluation; each message names the file.
#[derive(Debug, Error)]
pub enum EvalError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: Invalid },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What is wrong with a set of predictions. Records are counted from 0, as
/// in the JSON list.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Invalid {
    #[error(
        "expected a JSON list of {{\"sample_id\", \"pred_response\", \"gt_response\"}} records, found {found}"
    )]
    NotAList { found: String },
    #[error("the list of predictions is empty: there is nothing to evaluate")]
    Empty,
    #[error(
        "record at index {index}: expected an object with \"sample_id\", \"pred_response\" and \"gt_response\", found {found}"
    )]
    NotAnObject { index: usize, found: String },
    #[error("record at index {index}{}: field `{field}` {problem}", of_sample(.sample_id))]
    Field {
        index: usize,
        sample_id: Option<SampleId>,
        field: &'static str,
        problem: String,
    },
}

fn of_sample(sample_id: &Option<SampleId>) -> String {
    sample_id
        .as_ref()
        .map(|id| format!(" (sample_id {id})"))
        .unwrap_or_default()
}

/// Reads `pred.json`, evaluates it and writes `eval.json` and
/// `eval_score.json` into `out_dir` (created if missing).
pub fn run(pred: &Path, out_dir: &Path) -> Result<Evaluation, EvalError> {
    let predictions = read_predictions(pred)?;
    let evaluation = evaluate(&predictions).map_err(|problem| EvalError::Invalid {
        path: pred.to_owned(),
        problem,
    })?;
    write_outputs(&evaluation, out_dir)?;
    info!(
        samples = predictions.len(),
        out = %out_dir.display(),
        "wrote {SUMMARY_FILE} and {SAMPLES_FILE}"
    );
    Ok(evaluation)
}

/// Reads and validates `pred.json`: a list of objects, each with a
/// `sample_id` (string or integer) and the strings `pred_response` and
/// `gt_response`. Other fields are ignored.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, EvalError> {
    let text = fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| EvalError::Json {
        path: path.to_owned(),
        source,
    })?;
    parse_predictions(&value).map_err(|problem| EvalError::Invalid {
        path: path.to_owned(),
        problem,
    })
}

/// Validates the JSON value of a `pred.json`.
pub fn parse_predictions(value: &Value) -> Result<Vec<Prediction>, Invalid> {
    let Value::Array(records) = value else {
        return Err(Invalid::NotAList {
            found: describe(value),
        });
    };
    records
        .iter()
        .enumerate()
        .map(|(index, record)| parse_record(index, record))
        .collect()
}

fn parse_record(index: usize, record: &Value) -> Result<Prediction, Invalid> {
    let Value::Object(fields) = record else {
        return Err(Invalid::NotAnObject {
            index,
            found: describe(record),
        });
    };
    let problem = |sample_id: Option<&SampleId>, field, problem: String| Invalid::Field {
        index,
        sample_id: sample_id.cloned(),
        field,
        problem,
    };
    let sample_id = match fields.get("sample_id") {
        None => return Err(problem(None, "sample_id", "is missing".into())),
        Some(Value::String(s)) => SampleId::Text(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => SampleId::Integer(n.clone()),
        Some(other) => {
            let found = describe(other);
            let message = format!("must be a string or an integer, found {found}");
            return Err(problem(None, "sample_id", message));
        }
    };
    let text = |field: &'static str| match fields.get(field) {
        None => Err(problem(Some(&sample_id), field, "is missing".into())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => {
            let message = format!("must be a string, found {}", describe(other));
            Err(problem(Some(&sample_id), field, message))
        }
    };
    Ok(Prediction {
        pred_response: text("pred_response")?,
        gt_response: text("gt_response")?,
        sample_id,
    })
}

/// A JSON value's kind, for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Words of an answer that are scored; longer answers are cut here, with a
/// warning. ROUGE-L's table grows with the product of two answers' lengths
/// (three 200,000-word answers once asked for 320 GB); at this cap it stays
/// under 10 MB, and real captions are a few dozen words.
pub const MAX_SCORED_WORDS: usize = 1024;

/// `text` cut to its first [`MAX_SCORED_WORDS`] words (a normalised text's
/// words are separated by single spaces).
fn capped(text: String, index: usize, sample_id: &SampleId, field: &str) -> String {
    match text.match_indices(' ').nth(MAX_SCORED_WORDS - 1) {
        None => text,
        Some((at, _)) => {
            tracing::warn!(
                index,
                ?sample_id,
                field,
                words = text.split(' ').count(),
                limit = MAX_SCORED_WORDS,
                "answer longer than the scoring limit; only its first words are scored"
            );
            text[..at].to_owned()
        }
    }
}

/// Scores a set of predictions as SAM's `Eval.evaluate_rouge`.
pub fn evaluate(predictions: &[Prediction]) -> Result<Evaluation, Invalid> {
    if predictions.is_empty() {
        return Err(Invalid::Empty);
    }
    let mut first_index: HashMap<&SampleId, usize> = HashMap::new();
    let mut hypotheses = Vec::with_capacity(predictions.len());
    let mut references = Vec::with_capacity(predictions.len());
    let mut rouge = Vec::with_capacity(predictions.len());
    for (index, p) in predictions.iter().enumerate() {
        let problem = |field, problem| Invalid::Field {
            index,
            sample_id: Some(p.sample_id.clone()),
            field,
            problem,
        };
        // SAM's dictionaries keep the last record of an id while its lists
        // keep them all, and its script then fails on an index; refuse early.
        if let Some(first) = first_index.insert(&p.sample_id, index) {
            let message = format!(
                "repeats the id of record at index {first}: each sample is scored once, by id"
            );
            return Err(problem("sample_id", message));
        }
        let reference = capped(
            normalize(&p.gt_response),
            index,
            &p.sample_id,
            "gt_response",
        );
        if reference.is_empty() {
            let message = format!(
                "{:?} is empty after SAM's normalisation: every sample needs a reference",
                p.gt_response
            );
            return Err(problem("gt_response", message));
        }
        let hypothesis = capped(
            normalize(&p.pred_response),
            index,
            &p.sample_id,
            "pred_response",
        );
        // An empty prediction scores 0 without asking the `rouge` package,
        // which would reject it.
        let f = if hypothesis.is_empty() {
            0.0
        } else {
            rouge_l_f(&hypothesis, &reference).map_err(|e| {
                let (field, text) = match e {
                    RougeError::EmptyHypothesis => ("pred_response", &hypothesis),
                    RougeError::EmptyReference => ("gt_response", &reference),
                };
                problem(field, format!("normalises to {text:?}, which {e}"))
            })?
        };
        rouge.push(f);
        hypotheses.push(hypothesis);
        references.push(reference);
    }

    let hypotheses: Vec<&str> = hypotheses.iter().map(String::as_str).collect();
    let references: Vec<&str> = references.iter().map(String::as_str).collect();
    let cider = cider::cider(&hypotheses, &references);
    let bleu = bleu::bleu4(&hypotheses, &references);
    // SAM rounds numpy float64s for ROUGE-L and CIDEr, a Python float for BLEU.
    let summary = Summary {
        rouge: numpy_round2(numpy_mean(&rouge) * 100.0),
        cider: numpy_round2(cider.corpus * 100.0),
        bleu4: python_round2(bleu.corpus * 100.0),
    };
    let samples = predictions
        .iter()
        .zip(rouge)
        .zip(cider.per_sample.into_iter().zip(bleu.per_sample))
        .map(|((p, rouge), (cider, bleu4))| SampleScores {
            id: p.sample_id.clone(),
            rouge,
            cider,
            bleu4,
        })
        .collect();
    Ok(Evaluation { summary, samples })
}

/// Writes `eval.json` and `eval_score.json` (indented by 4, as SAM's) into
/// `dir`, creating it if missing.
pub fn write_outputs(evaluation: &Evaluation, dir: &Path) -> Result<(), EvalError> {
    fs::create_dir_all(dir).map_err(|source| EvalError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let summary = serde_json::to_vec(&evaluation.summary);
    write_file(&dir.join(SUMMARY_FILE), summary)?;
    let mut samples = Vec::new();
    let mut json =
        serde_json::Serializer::with_formatter(&mut samples, PrettyFormatter::with_indent(b"    "));
    let written = evaluation.samples.serialize(&mut json).map(|()| samples);
    write_file(&dir.join(SAMPLES_FILE), written)
}

fn write_file(path: &Path, bytes: serde_json::Result<Vec<u8>>) -> Result<(), EvalError> {
    let write = |mut bytes: Vec<u8>| {
        bytes.push(b'\n');
        fs::write(path, bytes)
    };
    bytes
        .map_err(io::Error::from)
        .and_then(write)
        .map_err(|source| EvalError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: Value, pred: &str, gt: &str) -> Value {
        json!({"sample_id": id, "pred_response": pred, "gt_response": gt})
    }

    fn invalid(value: Value) -> String {
        let predictions = parse_predictions(&value);
        let problem = match predictions {
            Ok(p) => evaluate(&p).expect_err("invalid predictions"),
            Err(problem) => problem,
        };
        problem.to_string()
    }

    /// Three 200,000-word answers once asked ROUGE-L for 320 GB. They are
    /// scored on their first words, as the same answers cut by hand are.
    #[test]
    fn huge_answers_are_scored_on_their_first_words() {
        let huge = "word ".repeat(200_000);
        let cut = "word ".repeat(MAX_SCORED_WORDS);
        let score = |pred: &str, gt: &str| {
            let p = parse_predictions(&json!([record(json!(1), pred, gt)])).unwrap();
            evaluate(&p).unwrap().summary
        };
        let started = std::time::Instant::now();
        let whole = score(&huge, &huge);
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        assert_eq!(whole, score(&cut, &cut));
        assert_eq!(
            capped("a b c".into(), 0, &SampleId::Text("s".into()), "x"),
            "a b c"
        );
    }

    #[test]
    fn bad_files_name_record_and_field() {
        let good = record(json!(1), "a", "a");
        let cases = [
            (json!({"a": 1}), "expected a JSON list"),
            (json!([]), "empty"),
            (json!([good, "x"]), "record at index 1: expected an object"),
            (json!([{"pred_response": "a", "gt_response": "b"}]), "record at index 0: field `sample_id` is missing"),
            (json!([record(json!(1.5), "a", "b")]), "field `sample_id` must be a string or an integer, found the number 1.5"),
            (json!([good, {"sample_id": "s7", "gt_response": "b"}]), "record at index 1 (sample_id \"s7\"): field `pred_response` is missing"),
            (json!([{"sample_id": 3, "pred_response": "a", "gt_response": null}]), "record at index 0 (sample_id 3): field `gt_response` must be a string, found null"),
            (json!([good, record(json!(2), "a", " ?! ")]), "record at index 1 (sample_id 2): field `gt_response` \" ?! \" is empty"),
            (json!([good, record(json!(1), "b", "b")]), "record at index 1 (sample_id 1): field `sample_id` repeats the id of record at index 0"),
            (json!([record(json!(4), &".".repeat(33), "a")]), "record at index 0 (sample_id 4): field `pred_response` normalises to \".\""),
        ];
        for (value, want) in cases {
            let got = invalid(value.clone());
            assert!(got.contains(want), "{value}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn integer_and_text_ids_are_different_samples() {
        let value = json!([
            record(json!(7), "a dog", "a dog"),
            record(json!("7"), "", "a cat")
        ]);
        let evaluation = evaluate(&parse_predictions(&value).unwrap()).unwrap();
        let ids: Vec<String> = evaluation
            .samples
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        assert_eq!(ids, ["7", "\"7\""]);
        // The empty prediction scores 0 everywhere.
        assert_eq!(evaluation.samples[1].rouge, 0.0);
        assert_eq!(evaluation.samples[1].cider, 0.0);
        assert_eq!(evaluation.samples[1].bleu4, 0.0);
    }

    #[test]
    fn outputs_as_sam_writes_them() {
        let value = json!([
            record(json!(0), "A cat sits on a mat.", "The cat sits on the mat."),
            record(json!(1), "a dog runs", "A dog runs, fast!"),
        ]);
        let evaluation = evaluate(&parse_predictions(&value).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_outputs(&evaluation, dir.path()).unwrap();
        let summary = fs::read_to_string(dir.path().join(SUMMARY_FILE)).unwrap();
        let want = serde_json::to_string(&evaluation.summary).unwrap();
        assert!(summary.starts_with(r#"{"rouge":"#), "{summary}");
        assert_eq!(summary.trim_end(), want);
        let samples = fs::read_to_string(dir.path().join(SAMPLES_FILE)).unwrap();
        assert!(
            samples.starts_with("[\n    {\n        \"id\": 0,\n        \"rouge\": "),
            "{samples}"
        );
    }
}
