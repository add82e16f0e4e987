//! The worker's error type. Every message names what failed (the file, the
//! field, the peer, the step), and [`TrainError::retriable`] says whether a
//! new generation could get past it: a dead peer, a stuck collective, an
//! unreachable store or an abort are worth a restart from the newest
//! checkpoint; a bad spec, bad data or a model that does not load are not,
//! and restarting them would only burn the job's restart budget (Kubeflow's
//! `ExitCode` restart policy draws the same line, see [`TrainError::exit_code`]).

use samtrain_checkpoint::CheckpointError;
use samtrain_model::ModelError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    /// The spec, or the layout the worker was given, cannot run.
    #[error("configuration: {field}: {message}")]
    Config { field: String, message: String },
    /// The model folder does not load (missing tensor, wrong shape...).
    #[error("model {path}: {source}")]
    Model {
        path: String,
        // Boxed, as the next one: the sources are large and would bloat
        // every `Result` of the crate.
        #[source]
        source: Box<ModelError>,
    },
    /// A dataset cannot be read, or a record cannot be preprocessed.
    #[error("data {location}: {message}")]
    Data { location: String, message: String },
    /// A collective with a peer failed (it died, stalled or was aborted):
    /// the generation is over on every rank.
    #[error("collective during {context}: {message}")]
    Collective { context: String, message: String },
    /// The checkpoint store could not be read (listing, loading).
    #[error("checkpoint store {url}: {source}")]
    Checkpoint {
        url: String,
        #[source]
        source: Box<CheckpointError>,
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
    #[error("evaluation: {message}")]
    Eval { message: String },
}

impl TrainError {
    /// Whether a new generation, restored from the newest checkpoint, may
    /// succeed where this one failed.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            TrainError::Collective { .. }
                | TrainError::Checkpoint { .. }
                | TrainError::Aborted { .. }
        )
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

    /// A model error met while `context` ran: a failed collective inside the
    /// model is a peer's failure, anything else is the model's.
    pub(crate) fn from_model(path: &str, context: &str, source: ModelError) -> Self {
        match source {
            ModelError::Collective { op, message } => TrainError::Collective {
                context: format!("{context} ({op})"),
                message,
            },
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
    pub(crate) fn collective(context: &str, source: ModelError) -> Self {
        match source {
            ModelError::Collective { op, message } => TrainError::Collective {
                context: format!("{context} ({op})"),
                message,
            },
            other => TrainError::Collective {
                context: context.to_owned(),
                message: other.to_string(),
            },
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The model's tensor-parallel all-reduce cannot return its error from
/// inside the forward pass and panics with this prefix instead
/// (`TensorParallel::reduce_forward`).
pub(crate) const TP_PANIC_PREFIX: &str = "tensor-parallel all-reduce failed";

/// A panic caught around a step: a failed tensor-parallel all-reduce is a
/// peer's failure (retriable), anything else a failure of the step.
pub(crate) fn from_panic(step: u64, panic: &(dyn std::any::Any + Send)) -> TrainError {
    let message = panic_message(panic);
    if message.starts_with(TP_PANIC_PREFIX) {
        TrainError::Collective {
            context: format!("the forward pass of step {step} (tensor parallel)"),
            message,
        }
    } else {
        TrainError::Step {
            step,
            message: format!("panicked: {message}"),
        }
    }
}
