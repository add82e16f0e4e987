//! One MmLINK sample as `annotations.json` holds it (SAM's `test.py`): an
//! id, the images (paths relative to the dataset folder), the instruction
//! and the reference answer.

use serde::{Deserialize, Serialize};

/// A record's id: MmLINK uses integers; strings are accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RecordId {
    Int(i64),
    Str(String),
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordId::Int(i) => write!(f, "{i}"),
            RecordId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A checked record: every field present with its type, `output` not empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: RecordId,
    pub img_list: Vec<String>,
    pub instruction: String,
    pub output: String,
}
