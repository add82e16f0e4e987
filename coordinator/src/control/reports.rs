//! What workers report about the generations they train in: progress,
//! committed checkpoints and how a generation ended. Every report comes
//! from a worker that proved its identity (its secret) and speaks only for
//! itself: its rank is the one the coordinator gave it, not the one the
//! report names. A report about a generation that is over, or from a worker
//! not in it, is acknowledged as stale and changes nothing, so a worker that
//! missed a restart cannot disturb the next generation.

use samtrain_proto::v1;
use tonic::Status;

use super::{event, Control, Ending, JobAtHand};
use samtrain_proto::spec::JobSpec;

use crate::jobs::{CheckpointFailure, JobRecord, MemberRecord};
use crate::records::now_ms;

/// The answer to a report.
fn ack(stale: bool) -> v1::Ack {
    v1::Ack { stale }
}

impl Control {
    /// Rank 0's progress becomes the job's; the others' is acknowledged.
    pub(crate) async fn report_progress(
        &self,
        r: v1::ProgressReport,
        presented: Option<&str>,
    ) -> Result<v1::Ack, Status> {
        self.authenticated_worker(&r.worker_id, presented).await?;
        let mut at = self.lead_job(&r.job_id).await?;
        let Some(member) = at.member(&r.worker_id, r.generation).cloned() else {
            return Ok(ack(true));
        };
        let rank = member.rank;
        if let Some(p) = r.progress.as_ref().filter(|p| p.step <= at.job.total_steps) {
            if let Some(straggler) = at.view.hear(&at.job, &member, p) {
                tracing::warn!(job = %r.job_id, rank, worker = %member.worker_id, compute_s = straggler.compute_s, median_compute_s = straggler.median_compute_s, steps = straggler.steps, "a straggler");
                let _ = self
                    .events
                    .send(event(&r.job_id, v1::job_event::Event::Straggler(straggler)));
            }
        }
        // Rank 0 speaks for the job; the other ranks' figures would repeat it.
        let (Some(p), 0) = (r.progress, rank) else {
            return Ok(ack(false));
        };
        if p.step > at.job.total_steps || p.total_steps > at.job.total_steps {
            return Err(Status::invalid_argument(format!(
                "progress of job {}: step {} of {} where the spec has {} steps",
                r.job_id, p.step, p.total_steps, at.job.total_steps
            )));
        }
        let job = &mut at.job;
        job.step = p.step;
        job.loss = Some(p.loss);
        job.updated_unix_ms = now_ms();
        self.save(job).await?;
        at.view.jobs.insert(at.job.id.clone(), at.job);
        let _ = self
            .events
            .send(event(&r.job_id, v1::job_event::Event::Progress(p)));
        Ok(ack(false))
    }

    /// A newer committed checkpoint becomes the job's resume hint; a
    /// failed save is kept on the job (until a later commit) and announced.
    pub(crate) async fn report_checkpoint(
        &self,
        r: v1::CheckpointReport,
        presented: Option<&str>,
    ) -> Result<v1::Ack, Status> {
        self.authenticated_worker(&r.worker_id, presented).await?;
        let mut at = self.lead_job(&r.job_id).await?;
        let Some(ck) = r.checkpoint else {
            return Err(Status::invalid_argument(
                "a checkpoint report needs its checkpoint",
            ));
        };
        // Only a member of the running generation commits checkpoints; a
        // late report from an earlier one is stale (the checkpoint itself
        // stays in storage, where the next generation finds it).
        if at.member(&r.worker_id, r.generation).is_none() {
            return Ok(ack(true));
        }
        check_checkpoint(&at.job, &ck)?;
        if !r.failure.is_empty() {
            let failure = CheckpointFailure {
                checkpoint: ck,
                reason: bounded_text(&r.failure, MAX_REASON_BYTES),
            };
            tracing::warn!(job = %r.job_id, step = failure.checkpoint.step, reason = %failure.reason, "checkpoint not saved");
            let _ = self.events.send(event(
                &r.job_id,
                v1::job_event::Event::CheckpointFailed(failure.to_proto()),
            ));
            at.job.checkpoint_failure = Some(failure);
            at.job.updated_unix_ms = now_ms();
            self.save(&at.job).await?;
            at.view.jobs.insert(at.job.id.clone(), at.job);
            return Ok(ack(false));
        }
        // Only a newer checkpoint replaces the hint.
        if at
            .job
            .checkpoint
            .as_ref()
            .is_some_and(|old| old.step >= ck.step)
        {
            return Ok(ack(true));
        }
        if at
            .job
            .checkpoint_failure
            .as_ref()
            .is_some_and(|f| f.checkpoint.step <= ck.step)
        {
            at.job.checkpoint_failure = None;
        }
        at.job.checkpoint = Some(ck.clone());
        at.job.updated_unix_ms = now_ms();
        self.save(&at.job).await?;
        at.view.jobs.insert(at.job.id.clone(), at.job);
        tracing::info!(job = %r.job_id, step = ck.step, url = %ck.url, "checkpoint committed");
        let _ = self.events.send(event(
            &r.job_id,
            v1::job_event::Event::CheckpointCommitted(ck),
        ));
        // A checkpoint boundary: where the generation may change size, at
        // the cost of the steps trained since the checkpoint's step.
        let resize = at
            .view
            .jobs
            .get(&r.job_id)
            .and_then(|j| at.view.resize_reason(j));
        if let Some(resize) = resize {
            if let Some(worker_id) = &resize.drain {
                self.mark_drained(&mut at.view, worker_id).await?;
            }
            self.end(&mut at.view, &r.job_id, Ending::Resize(resize.reason))
                .await?;
        }
        Ok(ack(false))
    }

    /// Rank 0's completion ends the job well; any member's failure ends
    /// the generation (a retriable one restarts it).
    pub(crate) async fn report_outcome(
        &self,
        r: v1::OutcomeReport,
        presented: Option<&str>,
    ) -> Result<v1::Ack, Status> {
        self.authenticated_worker(&r.worker_id, presented).await?;
        let mut at = self.lead_job(&r.job_id).await?;
        at.view.finished(&r.worker_id, &r.job_id, r.generation);
        let Some(member) = at.member(&r.worker_id, r.generation).cloned() else {
            return Ok(ack(true));
        };
        match r.outcome {
            Some(v1::outcome_report::Outcome::Completed(done)) => {
                // Rank 0 evaluates and holds the final step; the other
                // ranks' completions add nothing.
                if member.rank == 0 {
                    if let Some(ck) = &done.checkpoint {
                        check_checkpoint(&at.job, ck)?;
                    }
                    if done.step > at.job.total_steps {
                        return Err(Status::invalid_argument(format!(
                            "job {} completed at step {} of {}",
                            at.job.id, done.step, at.job.total_steps
                        )));
                    }
                    self.succeed(at, done).await?;
                }
            }
            Some(v1::outcome_report::Outcome::Failed(failed)) => {
                let how = failure(&member, &failed);
                self.end(&mut at.view, &r.job_id, how).await?;
            }
            None => {
                return Err(Status::invalid_argument(
                    "an outcome report needs completed or failed",
                ))
            }
        }
        Ok(ack(false))
    }

    /// The job succeeded: it keeps the scores and the newest checkpoint,
    /// and its members go back to waiting.
    async fn succeed(&self, at: JobAtHand<'_>, done: v1::Completed) -> Result<(), Status> {
        let JobAtHand { mut view, mut job } = at;
        if let Some(ck) = done.checkpoint {
            if job.checkpoint.as_ref().is_none_or(|old| old.step < ck.step) {
                job.checkpoint = Some(ck);
            }
        }
        job.eval_examples = bounded_examples(done.examples);
        let members = job.succeed(done.step, done.eval, now_ms());
        self.save(&job).await?;
        tracing::info!(job = %job.id, step = job.step, eval = ?job.eval, "job succeeded");
        view.jobs.insert(job.id.clone(), job.clone());
        view.release(&members);
        self.announce_state(&job);
        self.wake.notify_one();
        Ok(())
    }
}

/// The longest reason a worker's report may put in a job's record (which
/// etcd keeps as one value, and every `Get` returns).
const MAX_REASON_BYTES: usize = 4096;

/// Examples a job's record keeps, and the longest text of each.
const MAX_EXAMPLES: usize = 5;
const MAX_EXAMPLE_BYTES: usize = 512;

/// The first few examples of a report, each text bounded: the record is
/// one etcd value that every `Get` returns.
fn bounded_examples(examples: Vec<v1::EvalExample>) -> Vec<v1::EvalExample> {
    examples
        .into_iter()
        .take(MAX_EXAMPLES)
        .map(|e| v1::EvalExample {
            sample_id: bounded_text(&e.sample_id, MAX_EXAMPLE_BYTES),
            prediction: bounded_text(&e.prediction, MAX_EXAMPLE_BYTES),
            reference: bounded_text(&e.reference, MAX_EXAMPLE_BYTES),
        })
        .collect()
}

/// `text` cut to at most `max` bytes, at a character boundary, marked.
fn bounded_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [cut at {max} bytes]", &text[..end])
}

/// How a member's failure ends its generation.
fn failure(member: &MemberRecord, failed: &v1::Failed) -> Ending {
    let who = format!(
        "rank {} ({} at {})",
        member.rank, member.worker_id, member.advertise
    );
    let message = bounded_text(&failed.message, MAX_REASON_BYTES);
    if failed.retriable {
        Ending::Retriable(format!("{who} failed: {message}"))
    } else {
        Ending::Permanent(format!("{who} failed permanently: {message}"))
    }
}

/// A reported checkpoint must be the step folder of a step the job can
/// reach, under the job's own checkpoint URL: a worker cannot point the job
/// (and its next resume) at another location or at a step from the future.
/// The folder's name is the checkpoint crate's `step_folder`.
fn check_checkpoint(job: &JobRecord, ck: &v1::Checkpoint) -> Result<(), Status> {
    let spec = JobSpec::from_toml(&job.spec_toml, None)
        .map_err(|e| Status::internal(format!("the stored spec of job {}: {e}", job.id)))?;
    let expected = format!(
        "{}/step-{:08}",
        spec.checkpoint.url.trim_end_matches('/'),
        ck.step
    );
    if ck.step > spec.training.steps || ck.url != expected {
        return Err(Status::invalid_argument(format!(
            "job {}: checkpoint `{}` at step {} is not a step folder under the job's checkpoint URL `{}` (steps 0 to {})",
            job.id, ck.url, ck.step, spec.checkpoint.url, spec.training.steps
        )));
    }
    Ok(())
}
