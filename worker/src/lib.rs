//! The worker: training a SAM model on MmLINK data as one rank of a
//! data-parallel x tensor-parallel job, resuming from the newest committed
//! checkpoint, and predicting answers for evaluation.
//!
//! - [`train`] ([`trainer`]): the [`Trainer`] (set-up, step, checkpoint,
//!   finish), the entry point of every launcher (`samtrain train`, the
//!   coordinator's agent);
//! - [`step`]: one step's forward, backward and gradient reduction;
//! - [`checkpointing`]: checkpoint metadata, resume, and following saves;
//! - [`optim`], [`schedule`]: AdamW on tensors, warm-up plus cosine, clipping;
//! - [`ddp`]: data-parallel gradient averaging in buckets;
//! - [`launch`], [`device`]: joining a generation's process groups, and
//!   which device a rank trains on;
//! - [`inputs`]: datasets, tokenizers and batches as the model takes them;
//! - [`predict`]: beam search over a dataset to SAM's `pred.json`, and scores;
//! - [`report`]: the events and outcome a rank reports;
//! - [`resident`]: the model a worker keeps loaded between generations;
//! - `tensorboard`: what world rank 0 writes to TensorBoard;
//! - [`error`]: [`TrainError`], [`PredictError`], [`DataError`];
//! - [`write_roots`]: the places a worker may write to (`--allow-write`);
//! - [`fault`]: faults tests inject through the environment (a hung
//!   collective, a slow rank).

pub mod checkpointing;
pub mod ddp;
pub mod device;
pub mod error;
pub mod fault;
pub mod inputs;
pub mod launch;
pub mod optim;
pub mod predict;
pub mod report;
pub mod resident;
pub mod schedule;
pub mod step;
mod tensorboard;
pub mod trainer;
pub mod write_roots;

pub use error::{DataError, PredictError, TrainError};
pub use report::{EvalExample, EventSink, SaveTiming, StepMetrics, TrainEvent, TrainOutcome};
pub use resident::ResidentModels;
pub use trainer::{train, TrainJob, Trainer};
