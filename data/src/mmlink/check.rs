//! The checks of one MmLINK record, done on a lenient `serde_json::Value`
//! so that every problem of a record is found, not only the first one a
//! typed parser would stop at.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::record::{Record, RecordId};

/// One thing wrong with a dataset, precise enough to find and fix it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// The record's id; `None` when the id itself is missing or mistyped.
    pub record: Option<RecordId>,
    /// The record's position in the annotations (from 0), always known.
    pub index: usize,
    /// The field at fault (`img_list[2]` for one image); `None` when the
    /// record as a whole is (not an object, not JSON).
    pub field: Option<String>,
    /// The file at fault: the annotations, or the image.
    pub file: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        match &self.record {
            Some(id) => write!(f, "record {id} (index {})", self.index)?,
            None => write!(f, "record at index {}", self.index)?,
        }
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What the field checks of one record found. The image paths that are
/// well-formed are kept even when another field is wrong, so that their
/// files are checked too and every problem is reported in one pass.
#[derive(Debug)]
pub(crate) struct Checked {
    pub id: Option<RecordId>,
    /// `(position in img_list, path relative to the dataset folder)`.
    pub images: Vec<(usize, String)>,
    /// The record when every field is right.
    pub record: Option<Record>,
    pub problems: Vec<Problem>,
}

/// The JSON type of a value, as messages name it.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks every field of the record at `index` of `file`; a record may list
/// at most `max_images` images.
pub(crate) fn check_record(value: &Value, index: usize, file: &str, max_images: usize) -> Checked {
    let mut problems = Vec::new();
    let mut problem = |id: &Option<RecordId>, field: Option<&str>, message: String| {
        problems.push(Problem {
            record: id.clone(),
            index,
            field: field.map(str::to_owned),
            file: file.to_owned(),
            message,
        })
    };
    let Some(object) = value.as_object() else {
        problem(
            &None,
            None,
            format!("a record must be an object, found {}", kind(value)),
        );
        return Checked {
            id: None,
            images: Vec::new(),
            record: None,
            problems,
        };
    };

    let id = match object.get("id") {
        None => {
            problem(&None, Some("id"), "is missing".into());
            None
        }
        Some(Value::Number(n)) if n.is_i64() => n.as_i64().map(RecordId::Int),
        Some(Value::String(s)) => Some(RecordId::Str(s.clone())),
        Some(other) => {
            problem(
                &None,
                Some("id"),
                format!("must be an integer or a string, found {}", kind(other)),
            );
            None
        }
    };

    let mut images = Vec::new();
    let mut img_list_ok = false;
    match object.get("img_list") {
        None => problem(&id, Some("img_list"), "is missing".into()),
        Some(Value::Array(list)) if list.is_empty() => problem(
            &id,
            Some("img_list"),
            "is empty: a record needs at least one image".into(),
        ),
        Some(Value::Array(list)) if list.len() > max_images => problem(
            &id,
            Some("img_list"),
            format!(
                "lists {} images, more than data.max_images_per_record ({max_images})",
                list.len()
            ),
        ),
        Some(Value::Array(list)) => {
            img_list_ok = true;
            for (k, entry) in list.iter().enumerate() {
                let field = format!("img_list[{k}]");
                match entry {
                    Value::String(path) => match image_path_problem(path) {
                        Some(message) => {
                            img_list_ok = false;
                            problem(&id, Some(&field), message);
                        }
                        None => images.push((k, path.clone())),
                    },
                    other => {
                        img_list_ok = false;
                        problem(
                            &id,
                            Some(&field),
                            format!("must be a string, found {}", kind(other)),
                        );
                    }
                }
            }
        }
        Some(other) => problem(
            &id,
            Some("img_list"),
            format!("must be a list of strings, found {}", kind(other)),
        ),
    }

    let mut string_field = |name: &str, non_empty: bool| match object.get(name) {
        None => {
            problem(&id, Some(name), "is missing".into());
            None
        }
        Some(Value::String(s)) if non_empty && s.trim().is_empty() => {
            problem(&id, Some(name), "is empty".into());
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            problem(
                &id,
                Some(name),
                format!("must be a string, found {}", kind(other)),
            );
            None
        }
    };
    // SAM's prompts may be empty for some tasks; the answer never may.
    let instruction = string_field("instruction", false);
    let output = string_field("output", true);

    let record = match (&id, img_list_ok, instruction, output) {
        (Some(id), true, Some(instruction), Some(output)) => Some(Record {
            id: id.clone(),
            img_list: images.iter().map(|(_, p)| p.clone()).collect(),
            instruction,
            output,
        }),
        _ => None,
    };
    Checked {
        id,
        images,
        record,
        problems,
    }
}

/// Why an `img_list` entry cannot be read safely from inside the dataset
/// folder, if it cannot: a dataset must never make samtrain read files
/// outside it (a shared bucket, `/etc`, a neighbour's data).
pub(crate) fn image_path_problem(path: &str) -> Option<String> {
    if path.trim().is_empty() {
        return Some("is an empty path".into());
    }
    let bytes = path.as_bytes();
    let windows_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if path.starts_with('/') || path.starts_with('\\') || windows_drive {
        return Some(format!(
            "{path:?} is absolute: image paths must be relative to the dataset folder"
        ));
    }
    if path.split(['/', '\\']).any(|part| part == "..") {
        return Some(format!(
            "{path:?} contains `..`: image paths must stay inside the dataset folder"
        ));
    }
    None
}

/// The segments of a checked image path, without the empty and `.` ones
/// that object stores do not accept.
pub(crate) fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty() && *s != ".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_good_record_passes() {
        let v =
            json!({"id": 3, "img_list": ["a.png", "./b/c.png"], "instruction": "", "output": "x"});
        let c = check_record(&v, 0, "ann.json", 64);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.record.unwrap().id, RecordId::Int(3));
    }

    #[test]
    fn every_problem_of_a_record_is_reported() {
        let v =
            json!({"img_list": [1, "../x.png", "/etc/passwd"], "instruction": 5, "output": " "});
        let c = check_record(&v, 4, "ann.json", 64);
        let fields: Vec<_> = c
            .problems
            .iter()
            .map(|p| p.field.clone().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "id",
                "img_list[0]",
                "img_list[1]",
                "img_list[2]",
                "instruction",
                "output"
            ]
        );
        assert!(c
            .problems
            .iter()
            .all(|p| p.index == 4 && p.record.is_none()));
        assert!(c.record.is_none());
    }

    #[test]
    fn ids_must_be_integers_or_strings() {
        for bad in [json!(1.5), json!(null), json!([1]), json!(true)] {
            let v = json!({"id": bad, "img_list": ["a.png"], "instruction": "", "output": "x"});
            let c = check_record(&v, 0, "f", 64);
            assert_eq!(c.problems.len(), 1);
            assert_eq!(c.problems[0].field.as_deref(), Some("id"));
        }
    }

    #[test]
    fn windows_and_dot_paths() {
        assert!(image_path_problem("C:\\x.png").is_some());
        assert!(image_path_problem("a\\..\\..\\x.png").is_some());
        assert!(image_path_problem("a..b.png").is_none());
        assert_eq!(
            path_segments("./a//b.png").collect::<Vec<_>>(),
            ["a", "b.png"]
        );
    }
}
