//! The errors of checkpointing, each naming the file, tensor or URL it is about.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot open checkpoint location {url}: {message}")]
    Location { url: String, message: String },
    #[error("{op} {path} failed after {attempts} attempt(s): {source}")]
    Store {
        op: &'static str,
        path: String,
        attempts: u32,
        source: object_store::Error,
    },
    #[error("{path} is not a valid checkpoint record: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors { path: String, message: String },
    /// A sound file whose tensor could not be placed: memory for it on the
    /// device, or the copy there, failed. Not damage: an older checkpoint
    /// would fail the same way.
    #[error("{path}: tensor {tensor} cannot be loaded onto {device}: {message}")]
    Placement {
        path: String,
        tensor: String,
        device: String,
        message: String,
    },
    #[error("{path}: {found} bytes, the manifest says {expected}")]
    Size {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("{path}: checksum {found}, the manifest says {expected}")]
    Checksum {
        path: String,
        expected: String,
        found: String,
    },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("step {step}: {message}")]
    Layout { step: u64, message: String },
    #[error("invalid tensor-parallel position: rank {tp_rank} of {tp_size}")]
    Rank { tp_rank: u32, tp_size: u32 },
    #[error("checkpoint runtime: {0}")]
    Runtime(String),
}

impl CheckpointError {
    /// Whether the store refused a write for want of space (a full disk,
    /// a quota, a file-size limit): retrying will not help.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Self::Store { source, .. } => crate::store::is_out_of_space(source),
            _ => false,
        }
    }

    /// Whether the error says the stored checkpoint itself is damaged (so an
    /// older one should be used), rather than that the store could not be
    /// reached.
    pub fn is_corrupt(&self) -> bool {
        match self {
            Self::Size { .. }
            | Self::Checksum { .. }
            | Self::Json { .. }
            | Self::Safetensors { .. }
            | Self::Layout { .. } => true,
            Self::Store { source, .. } => matches!(source, object_store::Error::NotFound { .. }),
            _ => false,
        }
    }
}
