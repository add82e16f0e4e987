//! What users ask of jobs: submit, look up, list, cancel, watch and scale;
//! and of workers: drain.

use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use super::{event, store_status, Control, Ending};
use crate::election::LeaderState;
use crate::jobs::{JobRecord, JobState};
use crate::records::{now_ms, random_suffix};
use crate::store::{Compare, Op};

/// The events of one watched job, as the `Watch` stream sends them.
pub(crate) type JobEvents = mpsc::Receiver<Result<v1::JobEvent, Status>>;

/// The largest spec accepted: a job's record (its spec inside) is one
/// value in the store, and etcd refuses requests over 1.5 MiB.
const MAX_SPEC_BYTES: usize = 256 * 1024;

/// The jobs of a `List` page when the caller names no size, and the most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The most workers `Scale` accepts: the spec's own bound on `max_workers`.
const MAX_SCALE: u32 = samtrain_proto::spec::MAX_WORKERS;

impl Control {
    /// Checks a spec and stores it as a new pending job; its id.
    pub(crate) async fn submit(
        &self,
        spec_toml: String,
        source_name: &str,
    ) -> Result<String, Status> {
        if spec_toml.len() > MAX_SPEC_BYTES {
            return Err(Status::invalid_argument(format!(
                "the spec is {} bytes; at most {MAX_SPEC_BYTES} are accepted (a job's record is one value in the store, and etcd refuses requests over 1.5 MiB)",
                spec_toml.len()
            )));
        }
        let source = (!source_name.is_empty()).then_some(source_name);
        let spec = JobSpec::from_toml(&spec_toml, source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut view = self.lead().await?;
        let id = loop {
            let id = format!("{}-{}", spec.name, random_suffix());
            if !view.jobs.contains_key(&id) {
                break id;
            }
        };
        let job = JobRecord::new(id.clone(), &spec, spec_toml, now_ms());
        // Unlike `save`, creating must not overwrite: the id is new only
        // as far as this leader's view knows.
        let created = self
            .store
            .txn(
                vec![self.election.guard(), Compare::Absent(self.keys.job(&id))],
                vec![Op::Put {
                    key: self.keys.job(&id),
                    value: serde_json::to_vec(&job).expect("job record serialises"),
                    lease: None,
                }],
            )
            .await
            .map_err(store_status)?;
        if !created {
            return Err(Status::unavailable(
                "not the leader any more; submit again to the new leader",
            ));
        }
        tracing::info!(job = %id, "job submitted");
        view.jobs.insert(id.clone(), job);
        drop(view);
        self.wake.notify_one();
        Ok(id)
    }

    /// The job as users see it (each member's last reported step).
    pub(crate) async fn job(&self, job_id: &str) -> Result<v1::Job, Status> {
        let at = self.lead_job(job_id).await?;
        Ok(at.view.job_proto(&at.job))
    }

    /// One page of the jobs, oldest first, and the token of the next page
    /// (empty after the last). The token is the last job's place in that
    /// order, so a page never repeats or skips a job that stays.
    pub(crate) async fn jobs(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<v1::Job>, String), Status> {
        let size = match page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let (ms, id) = page_token
                .split_once(':')
                .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "page token `{page_token}` is not one this coordinator made"
                    ))
                })?;
            Some((ms, id))
        };
        let view = self.lead().await?;
        let mut jobs: Vec<&JobRecord> = view
            .jobs
            .values()
            .filter(|j| {
                after
                    .as_ref()
                    .is_none_or(|(ms, id)| (j.created_unix_ms, &j.id) > (*ms, id))
            })
            .collect();
        jobs.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        let next = match jobs.get(size) {
            Some(_) => {
                let last = jobs[size - 1];
                format!("{}:{}", last.created_unix_ms, last.id)
            }
            None => String::new(),
        };
        Ok((
            jobs.into_iter()
                .take(size)
                .map(|j| view.job_proto(j))
                .collect(),
            next,
        ))
    }

    /// The newest `n` jobs, newest first, under one look at the view (the
    /// dashboard's list, polled every second).
    pub(crate) async fn newest_jobs(&self, n: usize) -> Result<Vec<v1::Job>, Status> {
        let view = self.lead().await?;
        let mut jobs: Vec<&JobRecord> = view.jobs.values().collect();
        jobs.sort_by(|a, b| (b.created_unix_ms, &b.id).cmp(&(a.created_unix_ms, &a.id)));
        Ok(jobs
            .into_iter()
            .take(n)
            .map(|j| view.job_proto(j))
            .collect())
    }

    /// Cancels a job that has not ended; the job as cancelled.
    pub(crate) async fn cancel(&self, job_id: &str) -> Result<JobRecord, Status> {
        let mut at = self.lead_job(job_id).await?;
        if at.job.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {job_id} already {}",
                at.job.state.name()
            )));
        }
        self.end(&mut at.view, job_id, Ending::Cancel).await
    }

    /// Sets the most workers `job_id` runs on; a running generation of
    /// another size changes at its next committed checkpoint.
    pub(crate) async fn scale(&self, job_id: &str, workers: u32) -> Result<v1::Job, Status> {
        let mut at = self.lead_job(job_id).await?;
        if at.job.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {job_id} already {}",
                at.job.state.name()
            )));
        }
        let tp = at.job.policy.tp.max(1);
        if workers == 0 || workers % tp != 0 || workers > MAX_SCALE {
            return Err(Status::invalid_argument(format!(
                "job {job_id}: --workers {workers} must be a multiple of its tensor-parallel degree {tp}, from {tp} to {MAX_SCALE}"
            )));
        }
        at.job.scale(workers, now_ms());
        self.save(&at.job).await?;
        tracing::info!(job = %job_id, workers, "job scaled");
        let job = at.job.clone();
        at.view.jobs.insert(job.id.clone(), job.clone());
        self.announce_state(&job);
        self.wake.notify_one();
        Ok(at.view.job_proto(&job))
    }

    /// Takes a live worker out of service (a node's agent: every rank
    /// process of its node, now and started again later, for as long as
    /// the agent's lease lives); the job it trains in, if any.
    pub(crate) async fn drain(&self, worker_id: &str) -> Result<Option<String>, Status> {
        let live = self.live_workers().await.map_err(store_status)?;
        let Some(record) = live.get(worker_id) else {
            return Err(Status::not_found(format!("no live worker {worker_id}")));
        };
        let mut drained = vec![worker_id];
        if record.is_node_agent() {
            drained.extend(
                live.values()
                    .filter(|w| w.node_agent == worker_id)
                    .map(|w| w.worker_id.as_str()),
            );
        }
        let mut view = self.lead().await?;
        for id in &drained {
            self.mark_drained(&mut view, id).await?;
            tracing::info!(worker = %id, "worker drained");
        }
        let job = view
            .jobs
            .values()
            .find(|j| {
                j.state == JobState::Running && drained.iter().any(|id| j.member(id).is_some())
            })
            .map(|j| j.id.clone());
        Ok(job)
    }

    /// A snapshot of the job, then its events until it ends, or until
    /// this node stops leading (the stream then ends with UNAVAILABLE, so
    /// the watcher watches again on the new leader).
    pub(crate) async fn watch(&self, job_id: &str) -> Result<JobEvents, Status> {
        // Subscribe before the snapshot so no change falls in between.
        let events = self.events.subscribe();
        let at = self.lead_job(job_id).await?;
        let snapshot = at.view.job_proto(&at.job);
        let job = at.job.clone();
        drop(at);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(forward_events(job, snapshot, events, self.leadership(), tx));
        Ok(rx)
    }
}

/// Sends a watcher the job's snapshot and then its events.
async fn forward_events(
    job: JobRecord,
    snapshot: v1::Job,
    mut events: broadcast::Receiver<v1::JobEvent>,
    mut leadership: watch::Receiver<LeaderState>,
    tx: mpsc::Sender<Result<v1::JobEvent, Status>>,
) {
    let id = job.id.clone();
    let terminal = job.state.is_terminal();
    let snapshot = event(&id, v1::job_event::Event::Snapshot(snapshot));
    if tx.send(Ok(snapshot)).await.is_err() || terminal {
        return;
    }
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) if e.job_id == id => {
                    let last = matches!(e.event, Some(v1::job_event::Event::Finished(_)));
                    if tx.send(Ok(e)).await.is_err() || last {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(job = %id, skipped = n, "a watcher fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = leadership.changed() => {
                if changed.is_err() || !leadership.borrow().is_leader {
                    let _ = tx.send(Err(Status::unavailable("the coordinator lost the leadership; watch again"))).await;
                    return;
                }
            }
        }
    }
}
