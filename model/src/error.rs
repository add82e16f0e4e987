//! The model crate's error type: every message names the file, tensor or
//! field involved, so a user can act on it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("weights in {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} in {path}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
        path: PathBuf,
    },
    #[error("tensor {name} is missing from the checkpoint in {path}")]
    MissingTensor { name: String, path: PathBuf },
    #[error("input {name}: {message}")]
    Input { name: String, message: String },
    /// A collective of tensor parallelism failed (a peer died or stalled).
    #[error(transparent)]
    Collective(#[from] samtrain_comm::CollectiveError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
