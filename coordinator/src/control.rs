//! The leader's working state and its reconcile loop. While this node
//! leads it holds every job (loaded from the store when it took over) and
//! the streams of the workers subscribed to it; a tick (every 100 ms, or
//! sooner when woken) checks the members' leases, forms generations from
//! the waiting workers and tells idle workers there is nothing to do. All
//! job writes go through [`Control::save`], guarded by the election, so a
//! deposed leader cannot write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::v1;
use tokio::sync::{broadcast, mpsc, Mutex, Notify};
use tokio::time::Instant;
use tonic::Status;

use crate::election::Election;
use crate::jobs::{GenerationEnd, JobRecord, JobState, MemberRecord};
use crate::records::{now_ms, Keys, WorkerRecord};
use crate::rendezvous::{self, Candidate, Decision};
use crate::store::{Op, SharedStore, StoreError};
use crate::tasks::AbortOnDrop;

/// The feed of one subscribed worker.
pub(crate) type WorkerFeed = mpsc::Sender<Result<v1::WorkerEvent, Status>>;

struct Subscriber {
    feed: WorkerFeed,
    record: WorkerRecord,
    /// The generation it trains in, if any.
    busy: Option<(String, u64)>,
    idle_sent: bool,
}

#[derive(Default)]
pub(crate) struct View {
    loaded: bool,
    pub(crate) jobs: BTreeMap<String, JobRecord>,
    subscribers: HashMap<String, Subscriber>,
    last_call: HashMap<String, Instant>,
}

impl View {
    /// Members of a generation that ended well go back to waiting.
    pub(crate) fn release(&mut self, members: &[MemberRecord]) {
        for m in members {
            if let Some(s) = self.subscribers.get_mut(&m.worker_id) {
                s.busy = None;
            }
        }
    }
}

/// How a generation ends.
pub(crate) enum Ending {
    /// A retriable failure or a lost member: restart (or fail at max_restarts).
    Retriable(String),
    /// A permanent failure: the job fails.
    Permanent(String),
    Cancel,
}

/// Everything the services and the loop share.
pub(crate) struct Control {
    pub(crate) store: SharedStore,
    pub(crate) keys: Keys,
    pub(crate) lease_ttl: Duration,
    pub(crate) election: Election,
    pub(crate) view: Mutex<View>,
    pub(crate) events: broadcast::Sender<v1::JobEvent>,
    pub(crate) wake: Notify,
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

pub(crate) fn event(job_id: &str, e: v1::job_event::Event) -> v1::JobEvent {
    v1::JobEvent {
        job_id: job_id.to_owned(),
        unix_ms: now_ms(),
        event: Some(e),
    }
}

fn worker_event(e: v1::worker_event::Event) -> Result<v1::WorkerEvent, Status> {
    Ok(v1::WorkerEvent { event: Some(e) })
}

impl Control {
    /// UNAVAILABLE naming the leader, unless this node leads.
    pub(crate) fn ensure_leader(&self) -> Result<(), Status> {
        let state = self.election.state();
        if state.is_leader {
            return Ok(());
        }
        Err(Status::unavailable(match state.leader {
            Some(l) => format!("not the leader; leader is {} at {}", l.node_id, l.address),
            None if !state.store_ok => format!(
                "not the leader; the store ({}) is unreachable",
                self.store.describe()
            ),
            None => "not the leader; no leader is elected yet".to_owned(),
        }))
    }

    /// The view, loaded from the store if this node just took over.
    pub(crate) async fn lead(&self) -> Result<tokio::sync::MutexGuard<'_, View>, Status> {
        self.ensure_leader()?;
        let mut view = self.view.lock().await;
        if !view.loaded {
            let mut jobs = BTreeMap::new();
            for kv in self
                .store
                .range(&self.keys.jobs())
                .await
                .map_err(store_status)?
            {
                match serde_json::from_slice::<JobRecord>(&kv.value) {
                    Ok(job) => {
                        jobs.insert(job.id.clone(), job);
                    }
                    Err(e) => {
                        tracing::error!(key = %kv.key, error = %e, "unreadable job record left alone")
                    }
                }
            }
            tracing::info!(jobs = jobs.len(), "took over the jobs from the store");
            *view = View {
                loaded: true,
                jobs,
                ..View::default()
            };
        }
        Ok(view)
    }

    /// Writes a job, only while this node leads.
    pub(crate) async fn save(&self, job: &JobRecord) -> Result<(), Status> {
        let value = serde_json::to_vec(job).expect("job record serialises");
        let written = self
            .store
            .txn(
                vec![self.election.guard()],
                vec![Op::Put {
                    key: self.keys.job(&job.id),
                    value,
                    lease: None,
                }],
            )
            .await
            .map_err(store_status)?;
        if written {
            Ok(())
        } else {
            Err(Status::unavailable(
                "not the leader any more; retry on the new leader",
            ))
        }
    }

    /// Live workers: those whose key (and so lease) exists.
    async fn live_workers(&self) -> Result<HashMap<String, WorkerRecord>, StoreError> {
        Ok(self
            .store
            .range(&self.keys.workers())
            .await?
            .into_iter()
            .filter_map(|kv| serde_json::from_slice::<WorkerRecord>(&kv.value).ok())
            .map(|w| (w.worker_id.clone(), w))
            .collect())
    }

    /// Ends the running generation of `job_id` (or fails/cancels a job
    /// that has none), saves it and tells the members.
    pub(crate) async fn end(
        &self,
        view: &mut View,
        job_id: &str,
        how: Ending,
    ) -> Result<JobRecord, Status> {
        let Some(job) = view.jobs.get(job_id) else {
            return Err(Status::not_found(format!("no job {job_id}")));
        };
        let mut job = job.clone();
        let now = now_ms();
        let (end, reason): (GenerationEnd, String) = match &how {
            Ending::Retriable(r) => (job.end_generation(r, now), r.clone()),
            Ending::Permanent(r) => (job.fail(r, now), r.clone()),
            Ending::Cancel => (job.cancel(now), "cancelled".to_owned()),
        };
        self.save(&job).await?;
        view.jobs.insert(job.id.clone(), job.clone());
        view.last_call.remove(job_id);
        tracing::info!(job = %job_id, generation = end.ended_generation, state = job.state.name(), %reason, "generation ended");
        for m in &end.members {
            if let Some(s) = view.subscribers.get_mut(&m.worker_id) {
                if s.busy.as_ref().is_some_and(|(j, _)| j == job_id) {
                    s.busy = None;
                }
                let _ = s
                    .feed
                    .try_send(worker_event(v1::worker_event::Event::GenerationEnded(
                        v1::GenerationEnded {
                            job_id: job_id.to_owned(),
                            generation: end.ended_generation,
                            reason: reason.clone(),
                        },
                    )));
            }
        }
        if matches!(how, Ending::Retriable(_)) && !end.failed {
            let _ = self.events.send(event(
                job_id,
                v1::job_event::Event::Restarted(v1::Restarted {
                    ended_generation: end.ended_generation,
                    next_generation: job.generation,
                    restarts: job.restarts,
                    reason: reason.clone(),
                }),
            ));
        }
        self.announce_state(&job);
        self.wake.notify_one();
        Ok(job)
    }

    /// Publishes a state change, and the final event of an ended job.
    pub(crate) fn announce_state(&self, job: &JobRecord) {
        let _ = self.events.send(event(
            &job.id,
            v1::job_event::Event::StateChanged(v1::StateChanged {
                state: job.state.to_proto() as i32,
                generation: job.generation,
                members: job.members.iter().map(MemberRecord::to_proto).collect(),
                message: job.message.clone(),
            }),
        ));
        if job.state.is_terminal() {
            let _ = self.events.send(event(
                &job.id,
                v1::job_event::Event::Finished(v1::Finished {
                    state: job.state.to_proto() as i32,
                    message: job.message.clone(),
                    eval: job.eval.clone().into_iter().collect(),
                    step: job.step,
                }),
            ));
        }
    }

    /// A worker subscribes; returns its feed's receiving end.
    pub(crate) async fn subscribe(
        &self,
        record: WorkerRecord,
        current: Option<v1::CurrentGeneration>,
    ) -> Result<mpsc::Receiver<Result<v1::WorkerEvent, Status>>, Status> {
        let mut view = self.lead().await?;
        let (feed, rx) = mpsc::channel(64);
        let mut busy = None;
        if let Some(cur) = current {
            let ended = |reason: String| {
                worker_event(v1::worker_event::Event::GenerationEnded(
                    v1::GenerationEnded {
                        job_id: cur.job_id.clone(),
                        generation: cur.generation,
                        reason,
                    },
                ))
            };
            match view.jobs.get(&cur.job_id) {
                Some(job)
                    if job.state == JobState::Running
                        && job.generation == cur.generation
                        && job.member(&record.worker_id).is_some() =>
                {
                    busy = Some((cur.job_id.clone(), cur.generation));
                }
                // A completed generation ends by itself; nothing to say.
                Some(job)
                    if job.state == JobState::Succeeded && job.generation == cur.generation => {}
                Some(job) => {
                    let _ = feed.try_send(ended(format!(
                        "job {} is {} at generation {}",
                        job.id,
                        job.state.name(),
                        job.generation
                    )));
                }
                None => {
                    let _ = feed.try_send(ended(format!("no job {}", cur.job_id)));
                }
            }
        }
        tracing::info!(worker = %record.worker_id, busy = ?busy, "worker subscribed");
        view.subscribers.insert(
            record.worker_id.clone(),
            Subscriber {
                feed,
                record,
                busy,
                idle_sent: false,
            },
        );
        drop(view);
        self.wake.notify_one();
        Ok(rx)
    }

    /// One pass of the leader's duties.
    pub(crate) async fn reconcile(&self) -> Result<(), Status> {
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

        // Forget streams that closed and workers whose lease is gone.
        view.subscribers
            .retain(|id, s| !s.feed.is_closed() && live.contains_key(id));

        self.form_generations(&mut view).await?;

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

    /// Gives waiting workers to the jobs that need them, oldest job first.
    async fn form_generations(&self, view: &mut View) -> Result<(), Status> {
        let mut pool: Vec<Candidate> = view
            .subscribers
            .values()
            .filter(|s| s.busy.is_none())
            .map(|s| Candidate {
                worker_id: s.record.worker_id.clone(),
                name: s.record.name.clone(),
                advertise: s.record.advertise.clone(),
                registered_unix_ms: s.record.registered_unix_ms,
            })
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
        for (_, job_id) in order {
            let job = &view.jobs[&job_id];
            let take = pool.len().min(job.policy.max_workers as usize);
            let offered: Vec<Candidate> = pool.drain(..take).collect();
            match rendezvous::decide(
                &job.policy,
                &offered,
                view.last_call.get(&job_id).copied(),
                now,
            ) {
                Decision::Wait => {
                    view.last_call.remove(&job_id);
                }
                Decision::LastCall(since) => {
                    view.last_call.insert(job_id.clone(), since);
                    if job.state != JobState::Rendezvous {
                        let mut job = job.clone();
                        job.state = JobState::Rendezvous;
                        job.message = format!(
                            "{} workers wait; last call for up to {}",
                            offered.len(),
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
            })
            .collect();
        job.form(members.clone(), now_ms());
        self.save(&job).await?;
        view.last_call.remove(job_id);
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
                resume_checkpoint: job.checkpoint.as_ref().map(|c| c.to_proto()),
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
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e.message(), "reconcile failed; retrying");
            }
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
