//! The worker: training a SAM model on MmLINK data as one rank of a
//! data-parallel x tensor-parallel job, resuming from the newest committed
//! checkpoint, and predicting answers for evaluation.
//!
//! - [`train`] ([`trainer`]): the training loop, the entry point of every
//!   launcher (`samtrain train`, the coordinator's agent);
//! - [`optim`], [`schedule`]: AdamW on tensors, warm-up plus cosine, clipping;
//! - [`ddp`]: data-parallel gradient averaging in buckets;
//! - [`launch`]: joining a generation's process groups over the TCP ring;
//! - [`inputs`]: datasets, tokenizers and batches as the model takes them;
//! - [`predict`]: beam search over a dataset to SAM's `pred.json`, and scores.

pub mod ddp;
pub mod error;
pub mod inputs;
pub mod launch;
pub mod optim;
pub mod predict;
pub mod schedule;
pub mod trainer;

pub use error::TrainError;
pub use trainer::{
    train, CheckpointReport, Groups, StepMetrics, TrainEvent, TrainJob, TrainOutcome,
};
