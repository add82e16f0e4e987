//! The worker's error types. Every message names what failed (the file, the
//! field, the peer, the step), and [`TrainError::retriable`] says whether a
//! new generation could get past it: a dead peer, a stuck collective, an
//! unreachable store or an abort are worth a restart from the newest
//! checkpoint; a bad spec, bad data or a model that does not load are not,
//! and restarting them would only burn the job's restart budget (Kubeflow's
//! `ExitCode` restart policy draws the same line, see [`TrainError::exit_code`]).
//!
//! Prediction has its own [`PredictError`] (`samtrain predict` runs it
//! without training); a job's evaluation wraps it.

use samtrain_checkpoint::CheckpointError;
use samtrain_comm::{CollectiveError, CollectiveFailure};
use samtrain_model::ModelError;
use thiserror::Error;

/// A dataset cannot be read, or a record cannot be preprocessed.
#[derive(Debug, Error)]
#[error("data {location}: {message}")]
pub struct DataError {
    pub location: String,
    pub message: String,
}

impl DataError {
    pub fn new(location: &str, message: impl Into<String>) -> Self {
        Self {
            location: location.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    /// The spec, or the layout the worker was given, cannot run.
    #[error("configuration: {field}: {message}")]
    Config { field: String, message: String },
    /// The model folder does not load (missing tensor, wrong shape...).
    #[error("model {path}: {source}")]
    Model {
        path: String,
        // Boxed, as the next ones: the sources are large and would bloat
        // every `Result` of the crate.
        #[source]
        source: Box<ModelError>,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    /// A collective with a peer failed (it died, stalled or was aborted):
    /// the generation is over on every rank.
    #[error("collective during {context}: {source}")]
    Collective {
        context: String,
        #[source]
        source: Box<CollectiveError>,
    },
    /// The checkpoint store could not be read (listing, loading).
    #[error("checkpoint store {url}: {source}")]
    Checkpoint {
        url: String,
        #[source]
        source: Box<CheckpointError>,
    },
    /// The checkpoint of the last step was not committed: the run's result
    /// exists nowhere but in this process.
    #[error("the final checkpoint {url} was not saved: {reason}{}",
            if *.out_of_space { " (the store is out of space: free some, then run the job again to resume from its last checkpoint)" } else { "" })]
    FinalSave {
        url: String,
        reason: String,
        out_of_space: bool,
    },
    /// A committed checkpoint does not fit this job's model.
    #[error("checkpoint {url}: {message}")]
    Resume { url: String, message: String },
    /// The abort flag was set (the generation was ended from outside).
    #[error("aborted before step {step}")]
    Aborted { step: u64 },
    /// A tensor operation of a step failed for a reason other than a peer.
    #[error("step {step}: {message}")]
    Step { step: u64, message: String },
    /// Prediction or scoring of the evaluation set failed.
    #[error(transparent)]
    Predict(#[from] PredictError),

    #[error("logging.tensorboard: {0}")]
    TensorBoard(#[from] samtrain_tensorboard::TensorBoardError),
}

impl TrainError {
    /// Whether a new generation, restored from the newest checkpoint, may
    /// succeed where this one failed.
    pub fn retriable(&self) -> bool {
        match self {
            TrainError::Collective { .. }
            | TrainError::Checkpoint { .. }
            | TrainError::Aborted { .. } => true,
            // Training again from the last checkpoint will not find space.
            TrainError::FinalSave { out_of_space, .. } => !out_of_space,
            TrainError::Predict(e) => e.retriable(),
            // A store that did not answer may the next time; a malformed
            // location will not.
            TrainError::TensorBoard(e) => {
                !matches!(e, samtrain_tensorboard::TensorBoardError::Location { .. })
            }
            _ => false,
        }
    }

    /// The process exit code for this error under Kubeflow's `ExitCode`
    /// restart policy: 1 to 127 are permanent failures, 128 to 255 are retried.
    pub fn exit_code(&self) -> i32 {
        if self.retriable() {
            128
        } else {
            1
        }
    }

    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        TrainError::Config {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// A model error met while `context` ran: a failed collective inside the
    /// model is a peer's failure, anything else is the model's.
    pub(crate) fn from_model(path: &str, context: &str, source: ModelError) -> Self {
        match source {
            ModelError::Collective(source) => TrainError::collective(context, source),
            source => TrainError::Model {
                path: path.to_owned(),
                source: Box::new(source),
            },
        }
    }

    /// The checkpoint store at `url` failed.
    pub(crate) fn store(url: &str, source: CheckpointError) -> Self {
        TrainError::Checkpoint {
            url: url.to_owned(),
            source: Box::new(source),
        }
    }

    /// A collective's failure during `context`.
    pub(crate) fn collective(context: &str, source: CollectiveError) -> Self {
        TrainError::Collective {
            context: context.to_owned(),
            source: Box::new(source),
        }
    }

    /// A panic caught around step `step`: a collective that failed inside
    /// the model (tensor parallelism) is a peer's failure, anything else a
    /// failure of the step.
    pub(crate) fn from_panic(step: u64, payload: Box<dyn std::any::Any + Send>) -> Self {
        match CollectiveFailure::from_panic(payload) {
            Ok(source) => TrainError::collective(
                &format!("the forward pass of step {step} (tensor parallel)"),
                source,
            ),
            Err(other) => TrainError::Step {
                step,
                message: format!("panicked: {}", panic_message(other.as_ref())),
            },
        }
    }
}

/// Why prediction (`samtrain predict`, a job's final evaluation) failed.
#[derive(Debug, Error)]
pub enum PredictError {
    /// The model folder does not load.
    #[error("model {path}: {source}")]
    Model {
        path: String,
        #[source]
        source: Box<ModelError>,
    },
    /// A tensor-parallel peer failed during generation.
    #[error("collective during generation: {0}")]
    Collective(#[source] Box<CollectiveError>),
    /// The checkpoint store could not be read.
    #[error("checkpoint store {url}: {source}")]
    Checkpoint {
        url: String,
        #[source]
        source: Box<CheckpointError>,
    },
    /// The location holds no usable checkpoint or model.
    #[error("checkpoint {url}: {message}")]
    Location { url: String, message: String },
    /// Preparing inputs, decoding answers, writing or scoring failed.
    #[error("evaluation: {message}")]
    Eval { message: String },
}

impl PredictError {
    /// Only a peer's failure is worth another generation.
    pub fn retriable(&self) -> bool {
        matches!(self, PredictError::Collective(_))
    }

    pub(crate) fn eval(message: impl Into<String>) -> Self {
        PredictError::Eval {
            message: message.into(),
        }
    }

    pub(crate) fn model(path: &str, source: ModelError) -> Self {
        match source {
            ModelError::Collective(source) => PredictError::Collective(Box::new(source)),
            source => PredictError::Model {
                path: path.to_owned(),
                source: Box::new(source),
            },
        }
    }

    pub(crate) fn store(url: &str, source: CheckpointError) -> Self {
        PredictError::Checkpoint {
            url: url.to_owned(),
            source: Box::new(source),
        }
    }

    /// A panic caught around generation (see [`TrainError::from_panic`]).
    pub(crate) fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        match CollectiveFailure::from_panic(payload) {
            Ok(source) => PredictError::Collective(Box::new(source)),
            Err(other) => PredictError::eval(format!(
                "generation panicked: {}",
                panic_message(other.as_ref())
            )),
        }
    }
}

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .or_else(|| {
            panic
                .downcast_ref::<CollectiveFailure>()
                .map(|f| f.0.to_string())
        })
        .unwrap_or_else(|| "a panic without a message".into())
}
