//! The worker's reports about its generation, kept off the training path:
//! the trainer hands them to a [`Reporter`] without waiting, and a
//! background task sends them to the leader. Progress and failed saves are
//! best effort (a progress report the leader misses is superseded by the
//! next; a failed save is in the worker's log either way); the newest
//! committed checkpoint is retried until acknowledged, since it is where
//! the next generation resumes.

use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::v1;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::generations::Current;
use super::{AgentError, Progress, SaveTiming, Shared};

pub(super) enum Report {
    Progress(Progress),
    Resumed { load_s: f64 },
    Checkpoint(v1::Checkpoint, SaveTiming),
    CheckpointFailed(v1::Checkpoint, String),
}

/// Best-effort reports of the current generation; cheap to clone, never
/// blocks: a report that cannot be sent now is dropped (progress) or kept
/// until it can (the newest checkpoint).
#[derive(Clone)]
pub struct Reporter {
    pub(super) reports: mpsc::Sender<Report>,
}

impl Reporter {
    pub fn progress(&self, progress: Progress) {
        let _ = self.reports.try_send(Report::Progress(progress));
    }

    /// The generation resumed from a checkpoint, which took `load_s`.
    pub fn resumed(&self, load_s: f64) {
        let _ = self.reports.try_send(Report::Resumed { load_s });
    }

    /// A committed checkpoint (its manifest is written), and its save's
    /// timing.
    pub fn checkpoint(&self, committed: v1::Checkpoint, save: SaveTiming) {
        let _ = self.reports.try_send(Report::Checkpoint(committed, save));
    }

    /// A save that failed: `checkpoint` was not committed, for `reason`.
    pub fn checkpoint_failed(&self, checkpoint: v1::Checkpoint, reason: String) {
        let _ = self
            .reports
            .try_send(Report::CheckpointFailed(checkpoint, reason));
    }
}

/// Sends reports to the leader. Progress that fails is dropped; the newest
/// unsent checkpoint is retried every second until acknowledged.
pub(super) async fn send_reports(shared: Arc<Shared>, mut reports: mpsc::Receiver<Report>) {
    let mut pending: Option<(Current, v1::Checkpoint)> = None;
    loop {
        let report = tokio::select! {
            r = reports.recv() => match r {
                Some(r) => Some(r),
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)), if pending.is_some() => None,
        };
        match report {
            Some(Report::Progress(p)) => {
                // Progress between generations belongs to none.
                let Some(current) = shared.generations.current() else {
                    continue;
                };
                shared
                    .metrics
                    .progress(&current.job_id, current.generation, current.rank, &p);
                let span = current.report_span();
                send_progress(&shared, current, p).instrument(span).await;
            }
            Some(Report::Resumed { load_s }) => {
                if let Some(current) = shared.generations.current() {
                    shared.metrics.checkpoint_loaded(&current.job_id, load_s);
                }
            }
            Some(Report::CheckpointFailed(checkpoint, reason)) => {
                if let Some(current) = shared.generations.current() {
                    shared.metrics.checkpoint(&current.job_id, false);
                    let span = current.report_span();
                    send_failed_save(&shared, current, checkpoint, reason)
                        .instrument(span)
                        .await;
                }
            }
            Some(Report::Checkpoint(committed, save)) => {
                if let Some(current) = shared.generations.current() {
                    shared.metrics.checkpoint(&current.job_id, true);
                    shared.metrics.checkpoint_saved(&current.job_id, &save);
                    if pending
                        .as_ref()
                        .is_none_or(|(_, newest)| committed.step >= newest.step)
                    {
                        pending = Some((current, committed));
                    }
                }
            }
            None => {}
        }
        if let Some((current, committed)) = pending.clone() {
            let span = current.report_span();
            if send_checkpoint(&shared, current, committed)
                .instrument(span)
                .await
            {
                pending = None;
            }
        }
    }
}

async fn send_progress(shared: &Shared, current: Current, p: Progress) {
    let report = v1::ProgressReport {
        worker_id: shared.worker_id.clone(),
        job_id: current.job_id,
        generation: current.generation,
        rank: current.rank,
        progress: Some(v1::Progress {
            step: p.step,
            total_steps: p.total_steps,
            loss: p.loss,
            lr: p.lr,
            grad_norm: p.grad_norm,
            samples_per_s: p.samples_per_s,
            tokens_per_s: p.tokens_per_s,
            compute_s: p.compute_s,
            comm_s: p.comm_s,
            data_s: p.data_s,
        }),
    };
    let sent = shared
        .call(|mut c| {
            let report = report.clone();
            async move { c.report_progress(report).await }
        })
        .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, step = p.step, "progress report dropped");
    }
}

/// Whether the checkpoint is settled: acknowledged, or refused for good.
async fn send_checkpoint(shared: &Shared, current: Current, committed: v1::Checkpoint) -> bool {
    let step = committed.step;
    match report_checkpoint(shared, current, committed, String::new()).await {
        Ok(()) | Err(AgentError::Refused { .. }) => true,
        Err(e) => {
            tracing::debug!(error = %e, step, "checkpoint report not sent yet");
            false
        }
    }
}

/// Tells the leader a save failed; once, best effort.
async fn send_failed_save(
    shared: &Shared,
    current: Current,
    checkpoint: v1::Checkpoint,
    reason: String,
) {
    let step = checkpoint.step;
    if let Err(e) = report_checkpoint(shared, current, checkpoint, reason).await {
        tracing::debug!(error = %e, step, "failed-save report dropped");
    }
}

/// A checkpoint of the current generation, committed (`failure` empty) or
/// not saved for `failure`.
async fn report_checkpoint(
    shared: &Shared,
    current: Current,
    checkpoint: v1::Checkpoint,
    failure: String,
) -> Result<(), AgentError> {
    let report = v1::CheckpointReport {
        worker_id: shared.worker_id.clone(),
        job_id: current.job_id,
        generation: current.generation,
        checkpoint: Some(checkpoint),
        failure,
    };
    shared
        .call(|mut c| {
            let report = report.clone();
            async move { c.report_checkpoint(report).await }
        })
        .await
        .map(drop)
}
