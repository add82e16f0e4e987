//! The leader's reconcile loop: a tick (every 100 ms, or sooner when
//! woken) ends the generations whose members lost their lease, forms
//! generations from the waiting workers and tells idle workers there is
//! nothing to do. On a standby it only drops what a former leadership
//! left behind.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::v1;
use tokio::time::Instant;
use tonic::Status;

use super::{store_status, worker_event, Control, Ending, View};
use crate::auth;
use crate::jobs::{JobState, MemberRecord, WAITING_FOR_WORKERS};
use crate::records::{now_ms, WorkerRecord};
use crate::rendezvous::{self, Candidate, Decision};
use crate::store::{Op, StoreError};
use crate::tasks::AbortOnDrop;

/// How often the history is looked at for jobs to delete.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

impl Control {
    /// Live workers: those whose key (and so lease) exists.
    pub(super) async fn live_workers(&self) -> Result<HashMap<String, WorkerRecord>, StoreError> {
        Ok(self
            .store
            .range(&self.keys.workers())
            .await?
            .into_iter()
            .filter_map(|kv| serde_json::from_slice::<WorkerRecord>(&kv.value).ok())
            .map(|w| (w.worker_id.clone(), w))
            .collect())
    }

    /// One pass of the leader's duties.
    async fn reconcile(&self) -> Result<(), Status> {
        if !self.election.state().is_leader {
            let mut view = self.view.lock().await;
            if view.loaded {
                // Dropping the feeds ends the workers' streams, so their
                // agents look for the new leader.
                *view = View::default();
            }
            return Ok(());
        }
        let mut view = self.lead().await?;
        let live = self.live_workers().await.map_err(store_status)?;

        // Members whose lease is gone end their generation.
        let lost: Vec<(String, String)> = view
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .filter_map(|j| {
                j.members
                    .iter()
                    .find(|m| !live.contains_key(&m.worker_id))
                    .map(|m| {
                        (
                            j.id.clone(),
                            format!(
                                "worker {} (rank {} at {}) lost its lease",
                                m.worker_id, m.rank, m.advertise
                            ),
                        )
                    })
            })
            .collect();
        for (job_id, reason) in lost {
            self.end(&mut view, &job_id, Ending::Retriable(reason))
                .await?;
        }

        // Forget streams that closed and workers whose lease is gone, and
        // the drain marks of workers that left.
        view.subscribers
            .retain(|id, s| !s.feed.is_closed() && live.contains_key(id));
        let left: Vec<String> = view
            .drained
            .iter()
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in left {
            self.store
                .txn(
                    vec![self.election.guard()],
                    vec![Op::Delete {
                        key: self.keys.drained_worker(&id),
                    }],
                )
                .await
                .map_err(store_status)?;
            view.drained.remove(&id);
        }
        view.heard.retain(|id, _| live.contains_key(id));

        self.form_generations(&mut view).await?;
        self.prune_history(&mut view).await?;

        let active = view.jobs.values().any(|j| !j.state.is_terminal());
        if !active {
            for s in view.subscribers.values_mut() {
                if s.busy.is_none() && !s.idle_sent {
                    s.idle_sent = true;
                    let _ =
                        s.feed
                            .try_send(worker_event(v1::worker_event::Event::Idle(v1::Idle {
                                reason: "no job is pending or running".to_owned(),
                            })));
                }
            }
        }
        Ok(())
    }

    /// Deletes finished jobs beyond the history's count or age, oldest
    /// first; looked at every [`PRUNE_EVERY`].
    async fn prune_history(&self, view: &mut View) -> Result<(), Status> {
        {
            let mut last = self.last_prune.lock().expect("prune lock");
            if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let mut finished: Vec<(i64, String)> = view
            .jobs
            .values()
            .filter(|j| j.state.is_terminal())
            .map(|j| {
                (
                    j.finished_unix_ms.unwrap_or(j.updated_unix_ms),
                    j.id.clone(),
                )
            })
            .collect();
        finished.sort();
        let oldest_kept = now_ms().saturating_sub(self.history.max_age.as_millis() as i64);
        let over = finished.len().saturating_sub(self.history.max_jobs);
        let doomed: Vec<String> = finished
            .into_iter()
            .enumerate()
            .filter(|(i, (at, _))| *i < over || *at < oldest_kept)
            .map(|(_, (_, id))| id)
            .collect();
        for id in doomed {
            let deleted = self
                .store
                .txn(
                    vec![self.election.guard()],
                    vec![Op::Delete {
                        key: self.keys.job(&id),
                    }],
                )
                .await
                .map_err(store_status)?;
            if !deleted {
                return Ok(());
            }
            view.jobs.remove(&id);
            tracing::info!(job = %id, "finished job deleted from the history");
        }
        Ok(())
    }

    /// Gives waiting workers to the jobs that need them, oldest job first.
    async fn form_generations(&self, view: &mut View) -> Result<(), Status> {
        let mut pool: Vec<Candidate> = view
            .subscribers
            .values()
            .filter(|s| s.busy.is_none() && !view.is_drained(&s.record))
            .map(|s| s.candidate())
            .collect();
        rendezvous::rank_order(&mut pool);
        let mut order: Vec<(i64, String)> = view
            .jobs
            .values()
            .filter(|j| j.state.needs_workers())
            .map(|j| (j.created_unix_ms, j.id.clone()))
            .collect();
        order.sort();
        let now = Instant::now();
        view.waiting_since
            .retain(|id, _| order.iter().any(|(_, waiting)| waiting == id));
        for (_, id) in &order {
            let generation = view.jobs[id].generation;
            view.waiting_since.entry(id.clone()).or_insert_with(|| {
                let span = tracing::info_span!(
                    parent: None,
                    "rendezvous",
                    job = %id,
                    generation,
                    workers = tracing::field::Empty
                );
                (now, span)
            });
        }
        for (_, job_id) in order {
            let job = &view.jobs[&job_id];
            let decision = rendezvous::decide(
                &job.policy,
                &pool,
                view.last_call.get(&job_id).copied(),
                now,
            );
            // An older job keeps from younger ones the workers it would
            // take, or while too few wait, the first `max_workers`; a job
            // whose workers cannot all be placed keeps those that can.
            let kept: Vec<Candidate> = match &decision {
                Decision::Form(chosen) => chosen.clone(),
                Decision::LastCall(_) => rendezvous::placed(&job.policy, &pool),
                Decision::Wait(None) => pool
                    .iter()
                    .take(job.policy.max_workers as usize)
                    .cloned()
                    .collect(),
                Decision::Wait(Some(_)) => rendezvous::usable(&job.policy, &pool),
            };
            pool.retain(|c| !kept.iter().any(|k| k.worker_id == c.worker_id));
            match decision {
                Decision::Wait(why) => {
                    view.last_call.remove(&job_id);
                    if let Some(message) = wait_message(&job.message, why) {
                        if rendezvous::is_unplaceable_reason(&message) {
                            tracing::warn!(job = %job_id, "{message}");
                        }
                        let mut job = job.clone();
                        job.message = message;
                        job.updated_unix_ms = now_ms();
                        self.save(&job).await?;
                        self.announce_state(&job);
                        view.jobs.insert(job_id.clone(), job);
                    }
                }
                Decision::LastCall(since) => {
                    view.last_call.insert(job_id.clone(), since);
                    if job.state != JobState::Rendezvous {
                        let mut job = job.clone();
                        job.state = JobState::Rendezvous;
                        job.message = format!(
                            "{} workers wait; last call for up to {}",
                            kept.len(),
                            job.policy.max_workers
                        );
                        job.updated_unix_ms = now_ms();
                        self.save(&job).await?;
                        self.announce_state(&job);
                        view.jobs.insert(job_id.clone(), job);
                    }
                }
                Decision::Form(chosen) => {
                    self.form(view, &job_id, chosen).await?;
                }
            }
        }
        Ok(())
    }

    async fn form(
        &self,
        view: &mut View,
        job_id: &str,
        chosen: Vec<Candidate>,
    ) -> Result<(), Status> {
        let mut job = view.jobs[job_id].clone();
        let members: Vec<MemberRecord> = chosen
            .iter()
            .enumerate()
            .map(|(rank, c)| MemberRecord {
                worker_id: c.worker_id.clone(),
                name: c.name.clone(),
                advertise: c.advertise.clone(),
                rank: rank as u32,
                node: c.node.clone(),
            })
            .collect();
        job.form(members.clone(), auth::new_secret(), now_ms());
        self.save(&job).await?;
        view.last_call.remove(job_id);
        if let Some((since, span)) = view.waiting_since.remove(job_id) {
            span.record("workers", members.len());
            self.metrics
                .observe_rendezvous(since.elapsed().as_secs_f64());
        }
        tracing::info!(job = %job_id, generation = job.generation, workers = members.len(), "generation formed");
        let peers: Vec<String> = members.iter().map(|m| m.advertise.clone()).collect();
        let mut gone = HashSet::new();
        for m in &members {
            let assignment = v1::Assignment {
                job_id: job_id.to_owned(),
                generation: job.generation,
                rank: m.rank,
                world_size: members.len() as u32,
                tp: job.policy.tp,
                peers: peers.clone(),
                spec_toml: job.spec_toml.clone(),
                resume_checkpoint: job.checkpoint.clone(),
                ring_secret: job.ring_secret.clone(),
            };
            let s = view
                .subscribers
                .get_mut(&m.worker_id)
                .expect("chosen workers are subscribed");
            s.busy = Some((job_id.to_owned(), job.generation));
            s.idle_sent = false;
            if s.feed
                .try_send(worker_event(v1::worker_event::Event::Assignment(
                    assignment,
                )))
                .is_err()
            {
                gone.insert(m.worker_id.clone());
            }
        }
        view.jobs.insert(job_id.to_owned(), job.clone());
        self.announce_state(&job);
        if let Some(w) = gone.into_iter().next() {
            self.end(
                view,
                job_id,
                Ending::Retriable(format!("worker {w} disconnected before its assignment")),
            )
            .await?;
        }
        Ok(())
    }

    /// Runs the reconcile loop until the task is aborted: every 100 ms
    /// (torchft's quorum tick) or when woken. A prefix watch on the workers
    /// wakes it as soon as a lease ends.
    pub(crate) async fn run_loop(self: Arc<Self>) {
        let watcher = {
            let this = self.clone();
            tokio::spawn(async move { this.watch_workers().await })
        };
        let _stop_watcher = AbortOnDrop(watcher);
        loop {
            // Each pass runs as its own task, so a panic in it (a bug, or a
            // record no check foresaw) is logged and the next pass runs:
            // one bad job must not stop the scheduling of every other.
            let this = self.clone();
            match tokio::spawn(async move { this.reconcile().await }).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e.message(), "reconcile failed; retrying"),
                Err(e) => {
                    tracing::error!(error = %e, "a reconcile pass panicked; the loop goes on")
                }
            }
            self.loop_beat.store(now_ms(), Ordering::Relaxed);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn watch_workers(&self) {
        let prefix = self.keys.workers();
        loop {
            match self.store.watch_prefix(&prefix).await {
                Ok(mut changes) => {
                    while changes.recv().await.is_some() {
                        self.wake.notify_one();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching the workers failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The message a waiting job should show instead of `current`, if it
/// should change: the reason its workers cannot be placed (`why`), or,
/// once that reason no longer holds, the plain wait again, so that the
/// job does not keep blaming a placement that is no longer the problem.
fn wait_message(current: &str, why: Option<String>) -> Option<String> {
    let next = match why {
        Some(why) => why,
        None if rendezvous::is_unplaceable_reason(current) => WAITING_FOR_WORKERS.to_owned(),
        None => return None,
    };
    (next != current).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_reason_is_shown_while_it_holds_and_then_cleared() {
        let reason = "the waiting workers cannot be placed: 3 workers wait on 3 nodes".to_owned();
        assert!(rendezvous::is_unplaceable_reason(&reason));
        // Set once, not rewritten while unchanged.
        assert_eq!(
            wait_message(WAITING_FOR_WORKERS, Some(reason.clone())).as_deref(),
            Some(reason.as_str())
        );
        assert_eq!(wait_message(&reason, Some(reason.clone())), None);
        // Too few workers now: the plain wait again.
        assert_eq!(
            wait_message(&reason, None).as_deref(),
            Some(WAITING_FOR_WORKERS)
        );
        // Other messages (a restart's reason, say) stay while the job waits.
        let restart = "generation 3 failed: rank 1 lost its lease; restarting";
        assert_eq!(wait_message(restart, None), None);
        assert_eq!(wait_message(WAITING_FOR_WORKERS, None), None);
    }
}
