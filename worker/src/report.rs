//! What a training rank tells its launcher: events as they happen
//! ([`TrainEvent`]) and how the generation ended ([`TrainOutcome`]). The
//! launcher forwards them (to the coordinator, a progress bar, a test).

use samtrain_data::eval::Summary;
use samtrain_data::remote::CacheStats;
use samtrain_proto::Checkpoint;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum TrainEvent {
    /// Training starts after `step` steps (0, or a resumed checkpoint's).
    Started {
        step: u64,
        samples_consumed: u64,
        resumed_from: Option<Checkpoint>,
        /// Seconds the resume from it took (reading and checking it).
        load_s: Option<f64>,
    },
    /// Every `training.log_every` steps and at the last step.
    Progress(StepMetrics),
    /// A checkpoint this rank committed (tp rank 0 of dp rank 0 commits).
    Checkpoint {
        checkpoint: Checkpoint,
        save: SaveTiming,
    },
    /// A save of this rank that failed: the checkpoint was not committed.
    /// Training goes on; the last step's save failing fails the run.
    CheckpointFailed {
        checkpoint: Checkpoint,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    /// Mean LM loss over the answer tokens of the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    /// Samples trained on by all ranks since the job began.
    pub samples_consumed: u64,
    /// This rank's seconds per step outside the data-parallel collectives
    /// (data, forward, backward, update) and inside them (waiting for
    /// slower ranks included); means since the last report.
    pub compute_s: f64,
    pub comm_s: f64,
    /// Of `compute_s`, the seconds spent waiting for the step's batches
    /// (the loader's queue and the copy to the device).
    pub data_s: f64,
    /// What this generation fetched from object storage so far (none
    /// while its data is local).
    pub objects: Option<CacheStats>,
}

/// How long a committed save took, and how much it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SaveTiming {
    pub bytes: u64,
    /// Training was blocked while the tensors were staged.
    pub blocked_s: f64,
    /// From staging to the commit, in the background.
    pub upload_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOutcome {
    pub final_step: u64,
    pub samples_consumed: u64,
    /// The newest committed checkpoint the job knows of (the same on every rank).
    pub checkpoint: Option<Checkpoint>,
    /// The step training resumed from, if any.
    pub resumed_from: Option<u64>,
    /// Training records left out under the `skip` bad-record policy.
    pub skipped_records: usize,
    /// Scores on `data.eval` (world rank 0 only).
    pub eval: Option<Summary>,
    /// The first few of its predictions (world rank 0 only).
    pub examples: Vec<EvalExample>,
}

/// One held-out sample's predicted answer beside its reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalExample {
    /// As `pred.json` writes it.
    pub sample_id: String,
    pub prediction: String,
    pub reference: String,
}

/// Examples a generation's outcome carries.
pub(crate) const EXAMPLES: usize = 5;

/// Where progress and committed checkpoints go, as they happen.
pub type EventSink = Box<dyn FnMut(TrainEvent) + Send>;
