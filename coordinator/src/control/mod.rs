//! The leader's working state and every change to it. While this node
//! leads it holds every job (loaded from the store when it took over) and
//! the streams of the workers subscribed to it. Requests change it through
//! the methods here (jobs submitted, cancelled and watched in
//! [`job_requests`], workers' reports in [`reports`], registration and
//! subscriptions in [`workers`]); the reconcile loop ([`reconcile`]) checks
//! the members' leases and forms generations. All job writes go through
//! [`Control::save`], guarded by the election, so a deposed leader cannot
//! write.

mod job_requests;
mod reconcile;
mod reports;
mod workers;

pub use workers::MAX_SLOTS;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use samtrain_proto::v1;
use tokio::sync::{broadcast, mpsc, watch, Mutex, MutexGuard, Notify};
use tokio::time::Instant;
use tonic::Status;

use crate::election::{Election, LeaderState};
use crate::jobs::{GenerationEnd, JobRecord, JobState, MemberRecord};
use crate::metrics::{ControlMetrics, ControlSample, JobSample};
use crate::records::{now_ms, Keys, WorkerRecord};
use crate::store::{Op, SharedStore, StoreError};
use samtrain_proto::spec::StragglerPolicy;

/// The feed of one subscribed worker.
type WorkerFeed = mpsc::Sender<Result<v1::WorkerEvent, Status>>;

struct Subscriber {
    feed: WorkerFeed,
    record: WorkerRecord,
    /// The generation it trains in, if any.
    busy: Option<(String, u64)>,
    idle_sent: bool,
}

impl Subscriber {
    /// The worker as the rendezvous sees it.
    fn candidate(&self) -> crate::rendezvous::Candidate {
        crate::rendezvous::Candidate {
            worker_id: self.record.worker_id.clone(),
            name: self.record.name.clone(),
            advertise: self.record.advertise.clone(),
            node: self.record.node().to_owned(),
            registered_unix_ms: self.record.registered_unix_ms,
        }
    }
}

/// What the leader holds in memory; empty (not `loaded`) on a standby.
#[derive(Default)]
struct View {
    loaded: bool,
    jobs: BTreeMap<String, JobRecord>,
    subscribers: HashMap<String, Subscriber>,
    last_call: HashMap<String, Instant>,
    /// When the reconcile loop first saw each job waiting for a generation
    /// (its rendezvous time runs from there to the generation's forming),
    /// and the rendezvous span open meanwhile (in the generation's trace).
    waiting_since: HashMap<String, (Instant, tracing::Span)>,
    /// Workers taken out of service (also in the store).
    drained: HashSet<String>,
    /// Each member's last report on the training path: not stored (it
    /// changes every few steps on every rank), so empty after a failover
    /// until the ranks report again.
    heard: HashMap<String, Heard>,
}

/// A member's last progress report, and what the straggler check made of
/// its reports so far.
#[derive(Debug, Clone, Copy, Default)]
struct Heard {
    generation: u64,
    step: u64,
    unix_ms: i64,
    compute_s: f64,
    comm_s: f64,
    data_s: f64,
    /// Steps in a row its compute time has been over the limit.
    slow_steps: u64,
    straggler: bool,
}

impl View {
    /// The job as users see it: the stored record and, for its members,
    /// what each last reported.
    fn job_proto(&self, job: &JobRecord) -> v1::Job {
        let mut proto = job.to_proto();
        for m in &mut proto.members {
            if let Some(h) = self.heard_in(&m.worker_id, job.generation) {
                m.step = h.step;
                m.last_report_unix_ms = Some(h.unix_ms);
                m.compute_s = h.compute_s;
                m.comm_s = h.comm_s;
                m.data_s = h.data_s;
                m.straggler = h.straggler;
            }
        }
        proto
    }

    fn heard_in(&self, worker_id: &str, generation: u64) -> Option<&Heard> {
        self.heard
            .get(worker_id)
            .filter(|h| h.generation == generation)
    }

    /// Records `member`'s progress report; the straggler event when the
    /// report makes it one. A rank is slow while its compute time per step
    /// exceeds `straggler_factor` times the median of the other ranks',
    /// and a straggler once slow for `straggler_steps` steps in a row.
    /// Compute time, not step time: in synchronous data parallelism every
    /// rank's step lasts as long as the slowest's, but only the slowest
    /// spends it computing; the others wait inside the all-reduce.
    fn hear(
        &mut self,
        job: &JobRecord,
        member: &MemberRecord,
        p: &v1::Progress,
    ) -> Option<v1::Straggler> {
        let before = self
            .heard_in(&member.worker_id, job.generation)
            .copied()
            .unwrap_or_default();
        let mut others: Vec<f64> = job
            .members
            .iter()
            .filter(|m| m.worker_id != member.worker_id)
            .filter_map(|m| self.heard_in(&m.worker_id, job.generation))
            .map(|h| h.compute_s)
            .filter(|c| *c > 0.0)
            .collect();
        others.sort_by(f64::total_cmp);
        let median = match others.len() {
            0 => None,
            n if n % 2 == 1 => Some(others[n / 2]),
            n => Some((others[n / 2 - 1] + others[n / 2]) / 2.0),
        };
        let seconds = |s: f64| if s.is_finite() { s.max(0.0) } else { 0.0 };
        let compute_s = seconds(p.compute_s);
        let slow = median.is_some_and(|m| compute_s > job.policy.straggler_factor * m);
        let slow_steps = if slow {
            before.slow_steps + p.step.saturating_sub(before.step)
        } else {
            0
        };
        let straggler = slow && slow_steps >= job.policy.straggler_steps;
        self.heard.insert(
            member.worker_id.clone(),
            Heard {
                generation: job.generation,
                step: p.step,
                unix_ms: now_ms(),
                compute_s,
                comm_s: seconds(p.comm_s),
                data_s: seconds(p.data_s),
                slow_steps,
                straggler,
            },
        );
        (straggler && !before.straggler).then(|| v1::Straggler {
            rank: member.rank,
            worker_id: member.worker_id.clone(),
            compute_s,
            median_compute_s: median.unwrap_or_default(),
            steps: slow_steps,
            replace: job.policy.straggler_policy == StragglerPolicy::Replace,
        })
    }

    /// Why the running generation of `job` should end at this committed
    /// checkpoint to change size, if it should: one of its members is
    /// drained, it is above its (scaled) `max_workers`, or free workers
    /// would make it larger while no other job waits for workers.
    /// Whether `record`'s worker is drained, or belongs to a drained
    /// node (its agent's id is marked, so a rank process started again
    /// under the node stays out too).
    fn is_drained(&self, record: &WorkerRecord) -> bool {
        self.drained.contains(&record.worker_id)
            || (!record.node_agent.is_empty() && self.drained.contains(&record.node_agent))
    }

    fn resize_reason(&self, job: &JobRecord) -> Option<Resize> {
        if job.state != JobState::Running {
            return None;
        }
        if let Some(m) = job
            .members
            .iter()
            .find(|m| self.drained.contains(&m.worker_id))
        {
            return Some(Resize::because(format!(
                "worker {} (rank {}) is drained",
                m.worker_id, m.rank
            )));
        }
        if job.policy.straggler_policy == StragglerPolicy::Replace {
            let straggler = job.members.iter().find(|m| {
                self.heard_in(&m.worker_id, job.generation)
                    .is_some_and(|h| h.straggler)
            });
            if let Some(m) = straggler {
                return Some(Resize {
                    reason: format!(
                        "worker {} (rank {}) is a straggler; replacing it",
                        m.worker_id, m.rank
                    ),
                    drain: Some(m.worker_id.clone()),
                });
            }
        }
        let size = job.members.len() as u32;
        if size > job.policy.max_workers {
            return Some(Resize::because(format!(
                "scaled to {} workers from {size}",
                job.policy.max_workers
            )));
        }
        if self.jobs.values().any(|j| j.state.needs_workers()) {
            return None;
        }
        // The members and the free workers, placed as a new generation
        // would place them (a node's odd worker does not make it grow).
        let generation = Some((job.id.clone(), job.generation));
        let offered: Vec<_> = self
            .subscribers
            .values()
            .filter(|s| s.busy == generation || (s.busy.is_none() && !self.is_drained(&s.record)))
            .map(Subscriber::candidate)
            .collect();
        let grown = crate::rendezvous::size(&job.policy, &offered)?;
        (grown > size).then(|| {
            Resize::because(format!(
                "{} more workers wait; growing to {grown}",
                grown - size
            ))
        })
    }
}

/// Why a generation ends to change size, and the worker to drain first
/// (a straggler being replaced).
struct Resize {
    reason: String,
    drain: Option<String>,
}

impl Resize {
    fn because(reason: String) -> Resize {
        Resize {
            reason,
            drain: None,
        }
    }
}

impl View {
    /// A worker reported how its part in `generation` of `job_id` ended:
    /// it is free for the next generation.
    fn finished(&mut self, worker_id: &str, job_id: &str, generation: u64) {
        if let Some(s) = self.subscribers.get_mut(worker_id) {
            if s.busy
                .as_ref()
                .is_some_and(|(j, g)| j == job_id && *g == generation)
            {
                s.busy = None;
            }
        }
    }

    /// Members of a generation that ended well go back to waiting.
    fn release(&mut self, members: &[MemberRecord]) {
        for m in members {
            if let Some(s) = self.subscribers.get_mut(&m.worker_id) {
                s.busy = None;
            }
        }
    }
}

/// A leader whose reconcile loop has not finished a pass for this long is
/// not ready (a pass takes milliseconds; store calls time out sooner).
const LOOP_STALL_MS: i64 = 10_000;

/// How a generation ends.
enum Ending {
    /// A retriable failure or a lost member: restart (or fail at max_restarts).
    Retriable(String),
    /// To change size, at a committed checkpoint: no restart counted.
    Resize(String),
    /// A permanent failure: the job fails.
    Permanent(String),
    Cancel,
}

/// What a request about one job works on: the leader's view, locked for
/// the whole request so requests apply one at a time, and the job as it
/// is now.
struct JobAtHand<'c> {
    view: MutexGuard<'c, View>,
    job: JobRecord,
}

impl JobAtHand<'_> {
    /// The reporter's place in the job's running generation; `None` when
    /// a report about `generation` is stale (the generation is over, or
    /// the worker is not in it).
    fn member(&self, worker_id: &str, generation: u64) -> Option<&MemberRecord> {
        if self.job.state == JobState::Running && self.job.generation == generation {
            self.job.member(worker_id)
        } else {
            None
        }
    }
}

/// The leader's state, shared by the gRPC services and the reconcile loop.
pub(crate) struct Control {
    store: SharedStore,
    keys: Keys,
    /// The TTL of the leases the coordinator keeps for heartbeat workers.
    lease_ttl: Duration,
    election: Election,
    view: Mutex<View>,
    events: broadcast::Sender<v1::JobEvent>,
    /// Wakes the reconcile loop before its next tick.
    wake: Notify,
    /// When (Unix ms) the reconcile loop last finished a pass, panicked or
    /// not: `/readyz` fails on a leader whose loop stopped.
    loop_beat: AtomicI64,
    /// How many finished jobs, and for how long, stay listed.
    history: History,
    last_prune: std::sync::Mutex<Option<Instant>>,
    metrics: ControlMetrics,
}

/// Finished jobs are kept until there are more than `max_jobs` of them or
/// they are older than `max_age`, then deleted, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub max_jobs: usize,
    pub max_age: Duration,
}

impl Default for History {
    fn default() -> Self {
        History {
            max_jobs: 1000,
            max_age: Duration::from_secs(30 * 86_400),
        }
    }
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

fn not_found(job_id: &str) -> Status {
    Status::not_found(format!("no job {job_id}"))
}

fn event(job_id: &str, e: v1::job_event::Event) -> v1::JobEvent {
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
    pub(crate) fn new(
        store: SharedStore,
        keys: Keys,
        lease_ttl: Duration,
        election: Election,
        history: History,
    ) -> Control {
        Control {
            store,
            keys,
            lease_ttl,
            election,
            view: Mutex::new(View::default()),
            events: broadcast::channel(1024).0,
            wake: Notify::new(),
            loop_beat: AtomicI64::new(now_ms()),
            history,
            last_prune: std::sync::Mutex::new(None),
            metrics: ControlMetrics::default(),
        }
    }

    /// Every job's events from now on, as the leader announces them.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<v1::JobEvent> {
        self.events.subscribe()
    }

    /// Records one gRPC call's latency (see `grpc_timing`).
    pub(crate) fn observe_grpc(&self, path: &str, seconds: f64) {
        self.metrics.observe_grpc(path, seconds);
    }

    /// `/metrics` of a coordinator: its view of the jobs and workers now
    /// (empty on a standby).
    pub(crate) async fn render_metrics(&self) -> String {
        let view = self.view.lock().await;
        let sample = ControlSample {
            leader: self.is_leader(),
            jobs: view
                .jobs
                .values()
                .map(|j| JobSample {
                    id: j.id.clone(),
                    state: j.state,
                    generation: j.generation,
                    restarts: j.restarts,
                    step: j.step,
                    loss: j.loss,
                })
                .collect(),
            workers_subscribed: view.subscribers.len(),
            workers_drained: view.drained.len(),
        };
        // Under the view's lock, so that concurrent scrapes do not mix.
        self.metrics.render(&sample)
    }

    /// The store, as operators should recognise it in logs and probes.
    pub(crate) fn store_description(&self) -> String {
        self.store.describe()
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.election.state().is_leader
    }

    /// Every change of this node's part in the election.
    pub(crate) fn leadership(&self) -> watch::Receiver<LeaderState> {
        self.election.subscribe()
    }

    /// `/readyz` of a coordinator: only the leader takes requests.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        let s = self.election.state();
        if !s.store_ok {
            Err(format!("store {} unreachable", self.store.describe()))
        } else if !s.is_leader {
            Err("standby (not the leader)".to_owned())
        } else {
            let silent_ms = now_ms() - self.loop_beat.load(Ordering::Relaxed);
            if silent_ms > LOOP_STALL_MS {
                Err(format!(
                    "the scheduling loop has not finished a pass for {:.1} s",
                    silent_ms as f64 / 1000.0
                ))
            } else {
                Ok(())
            }
        }
    }

    /// Hands the leadership over at once and forgets the view; dropping
    /// the workers' feeds ends their streams now, so their agents move to
    /// the new leader without waiting for a tick.
    pub(crate) async fn step_down(&self) {
        self.election.resign().await;
        *self.view.lock().await = View::default();
    }

    /// UNAVAILABLE naming the leader, unless this node leads.
    fn ensure_leader(&self) -> Result<(), Status> {
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
    async fn lead(&self) -> Result<MutexGuard<'_, View>, Status> {
        self.ensure_leader()?;
        let mut view = self.view.lock().await;
        if !view.loaded {
            *view = View {
                loaded: true,
                jobs: self.load_jobs().await?,
                drained: self.load_drained().await?,
                ..View::default()
            };
        }
        Ok(view)
    }

    /// The prologue of every request about one job: this node leads and
    /// the job exists. Reports check their sender with
    /// [`JobAtHand::member`].
    async fn lead_job(&self, job_id: &str) -> Result<JobAtHand<'_>, Status> {
        let view = self.lead().await?;
        let job = view.jobs.get(job_id).ok_or_else(|| not_found(job_id))?;
        let job = job.clone();
        Ok(JobAtHand { view, job })
    }

    /// Every readable job in the store; an unreadable record is logged and
    /// left alone rather than blocking the takeover.
    async fn load_jobs(&self) -> Result<BTreeMap<String, JobRecord>, Status> {
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
        Ok(jobs)
    }

    /// The workers drained so far.
    async fn load_drained(&self) -> Result<HashSet<String>, Status> {
        let prefix = self.keys.drained();
        Ok(self
            .store
            .range(&prefix)
            .await
            .map_err(store_status)?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    /// Takes a worker out of service, in the store (only while this node
    /// leads) and in the view.
    async fn mark_drained(&self, view: &mut View, worker_id: &str) -> Result<(), Status> {
        let written = self
            .store
            .txn(
                vec![self.election.guard()],
                vec![Op::Put {
                    key: self.keys.drained_worker(worker_id),
                    value: now_ms().to_string().into_bytes(),
                    lease: None,
                }],
            )
            .await
            .map_err(store_status)?;
        if !written {
            return Err(Status::unavailable(
                "not the leader any more; drain again on the new leader",
            ));
        }
        view.drained.insert(worker_id.to_owned());
        Ok(())
    }

    /// Writes a job, only while this node leads.
    async fn save(&self, job: &JobRecord) -> Result<(), Status> {
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

    /// Ends the running generation of `job_id` (or fails/cancels a job
    /// that has none), saves it and tells the members.
    async fn end(&self, view: &mut View, job_id: &str, how: Ending) -> Result<JobRecord, Status> {
        let Some(job) = view.jobs.get(job_id) else {
            return Err(not_found(job_id));
        };
        let mut job = job.clone();
        let now = now_ms();
        let (end, reason): (GenerationEnd, String) = match &how {
            Ending::Retriable(r) => (job.end_generation(r, now), r.clone()),
            Ending::Resize(r) => (job.resize(r, now), r.clone()),
            Ending::Permanent(r) => (job.fail(r, now), r.clone()),
            Ending::Cancel => (job.cancel(now), "cancelled".to_owned()),
        };
        self.save(&job).await?;
        view.jobs.insert(job.id.clone(), job.clone());
        view.last_call.remove(job_id);
        tracing::info!(job = %job_id, generation = end.ended_generation, state = job.state.name(), %reason, "generation ended");
        tell_generation_ended(view, job_id, &end, &reason);
        if matches!(how, Ending::Retriable(_) | Ending::Resize(_)) && !end.failed {
            let _ = self.events.send(event(
                job_id,
                v1::job_event::Event::Restarted(v1::Restarted {
                    ended_generation: end.ended_generation,
                    next_generation: job.generation,
                    restarts: job.restarts,
                    reason: reason.clone(),
                    resize: matches!(how, Ending::Resize(_)),
                }),
            ));
        }
        self.announce_state(&job);
        self.wake.notify_one();
        Ok(job)
    }

    /// Publishes a state change, and the final event of an ended job.
    fn announce_state(&self, job: &JobRecord) {
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
                    eval: job.eval,
                    step: job.step,
                }),
            ));
        }
    }
}

/// Tells the subscribed members of an ended generation. They stay busy
/// with it until each reports its outcome ([`View::finished`]): one that
/// died never does, so the next generation cannot pick it while its
/// stream and lease have not yet run out, which would cost a second
/// restart for one failure.
fn tell_generation_ended(view: &mut View, job_id: &str, end: &GenerationEnd, reason: &str) {
    for m in &end.members {
        if let Some(s) = view.subscribers.get_mut(&m.worker_id) {
            let _ = s
                .feed
                .try_send(worker_event(v1::worker_event::Event::GenerationEnded(
                    v1::GenerationEnded {
                        job_id: job_id.to_owned(),
                        generation: end.ended_generation,
                        reason: reason.to_owned(),
                    },
                )));
        }
    }
}
