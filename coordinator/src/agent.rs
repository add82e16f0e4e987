//! The worker's side of the control plane. An [`Agent`] registers the
//! worker, keeps its lease alive (in etcd directly when given endpoints,
//! else by Heartbeat calls to any coordinator), holds a subscription to the
//! leader across failovers (trying each coordinator address; a standby
//! answers UNAVAILABLE) and hands the trainer its assignments. Reports are
//! off the training path: progress and checkpoints are best effort and never
//! block; only the final outcome is retried until a leader acknowledges it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1;
use samtrain_proto::v1::workers_client::WorkersClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::failover::{Coordinators, Unanswered};
use crate::health::Readiness;
use crate::records::{new_worker_id, now_ms, Keys, WorkerRecord};
use crate::store::{etcd::EtcdStore, LeaseId, LeaseKeeper, SharedStore, StoreError};
use crate::tasks::AbortOnDrop;

/// How the agent reaches the control plane.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Coordinator addresses (`host:port` or `http://host:port`).
    pub coordinators: Vec<String>,
    /// A readable name (host or pod name); worker ids start with it.
    pub name: String,
    /// host:port where this worker's collectives accept peers.
    pub advertise: String,
    /// What the worker computes on (`cpu`, `cuda:0`).
    pub device: String,
    /// etcd endpoints; empty: the lease is kept by Heartbeat calls.
    pub etcd: Vec<String>,
    /// The store prefix the coordinators use (default `/samtrain`).
    pub etcd_prefix: String,
    /// Local mode: [`Agent::next_assignment`] returns `None` once no job
    /// is pending or running.
    pub exit_when_idle: bool,
    /// The worker's lease TTL; `None` takes the coordinator's (5 s by
    /// default) or 5 s with etcd.
    pub lease_ttl: Option<Duration>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            coordinators: vec!["127.0.0.1:7070".to_owned()],
            name: "worker".to_owned(),
            advertise: String::new(),
            device: "cpu".to_owned(),
            etcd: Vec::new(),
            etcd_prefix: "/samtrain".to_owned(),
            exit_when_idle: false,
            lease_ttl: None,
        }
    }
}

/// What the agent could not do.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no coordinator reachable among {}: {}", .addresses.join(", "), .last_error)]
    NoCoordinator {
        addresses: Vec<String>,
        last_error: String,
    },
    #[error("coordinator {address} refused: {}", .status.message())]
    Refused { address: String, status: Status },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("assignment for job {job_id} carries an invalid spec: {message}")]
    InvalidAssignment { job_id: String, message: String },
    #[error("the agent stopped")]
    Stopped,
}

/// One generation's assignment of this worker.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub tp: u32,
    /// Collective addresses of every rank, in rank order.
    pub peers: Vec<String>,
    pub spec: JobSpec,
    /// The newest committed checkpoint the coordinator knew of (a hint).
    pub resume_checkpoint: Option<String>,
    /// Set by the agent when the coordinator ends this generation (a
    /// failure elsewhere, a cancel).
    pub ended: Arc<AtomicBool>,
}

/// How a generation ended for this worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Training (and, on rank 0, the evaluation) finished.
    Completed {
        /// `cider`, `bleu4`, `rouge` when evaluated.
        eval: Option<BTreeMap<String, f64>>,
        step: u64,
        /// The newest committed checkpoint, `(step, url)`.
        checkpoint: Option<(u64, String)>,
    },
    /// `retriable`: a peer died or timed out, the generation restarts;
    /// otherwise (bad data, bad config) the job fails.
    Failed { retriable: bool, message: String },
}

/// A training progress report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
}

enum Incoming {
    Assignment(Box<Assignment>),
    Idle,
}

enum Report {
    Progress(Progress),
    Checkpoint { step: u64, url: String },
}

/// The generation the worker is in, as the coordinator should know it.
#[derive(Debug, Clone, PartialEq)]
struct Current {
    job_id: String,
    generation: u64,
    rank: u32,
}

struct Shared {
    options: AgentOptions,
    worker_id: String,
    current: Mutex<Option<Current>>,
    ended: Mutex<HashMap<(String, u64), Arc<AtomicBool>>>,
    coordinators: Coordinators,
    registered: AtomicBool,
}

impl Shared {
    /// Calls the leader; a coordinator silent for 5 s counts as down, so
    /// a hung one cannot stall the worker's keep-alive or reports.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, AgentError>
    where
        F: Fn(WorkersClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.coordinators
            .call(Some(Duration::from_secs(5)), |channel| {
                f(WorkersClient::new(channel))
            })
            .await
            .map_err(|e| match e {
                Unanswered::Refused { address, status } => AgentError::Refused { address, status },
                Unanswered::NoLeader {
                    addresses,
                    last_error,
                } => AgentError::NoCoordinator {
                    addresses,
                    last_error,
                },
            })
    }

    fn current(&self) -> Option<Current> {
        self.current.lock().expect("agent lock").clone()
    }

    fn set_current(&self, current: Option<Current>) {
        *self.current.lock().expect("agent lock") = current;
    }
}

/// How the worker's lease is kept.
enum LeaseHold {
    /// In etcd, by the agent.
    Etcd {
        store: SharedStore,
        lease: Arc<Mutex<LeaseId>>,
    },
    /// By Heartbeat calls; the coordinator holds the store lease.
    Heartbeat,
}

/// The worker's agent. Dropping it stops everything without deregistering
/// (the lease then expires); [`Agent::shutdown`] is the clean exit.
pub struct Agent {
    shared: Arc<Shared>,
    incoming: mpsc::Receiver<Incoming>,
    reports: mpsc::Sender<Report>,
    lease: LeaseHold,
    tasks: Vec<AbortOnDrop<()>>,
}

/// Best-effort reports of the current generation; cheap to clone, never
/// blocks: a report that cannot be sent now is dropped (progress) or kept
/// until it can (the newest checkpoint).
#[derive(Clone)]
pub struct Reporter {
    reports: mpsc::Sender<Report>,
}

impl Reporter {
    pub fn progress(&self, progress: Progress) {
        let _ = self.reports.try_send(Report::Progress(progress));
    }

    /// A committed checkpoint (its manifest is written).
    pub fn checkpoint(&self, step: u64, url: impl Into<String>) {
        let _ = self.reports.try_send(Report::Checkpoint {
            step,
            url: url.into(),
        });
    }
}

/// Backoff between attempts: 100 ms doubling to 2 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(4)).min(Duration::from_secs(2))
}

impl Agent {
    /// Registers the worker (retrying for up to 30 s while no coordinator
    /// answers) and starts the lease keep-alive and the subscription.
    pub async fn register(options: AgentOptions) -> Result<Agent, AgentError> {
        let (lease, worker_id, ttl) = if options.etcd.is_empty() {
            let ttl_s = options
                .lease_ttl
                .map(|t| t.as_secs().max(1) as u32)
                .unwrap_or(0);
            let r = register_rpc(&options, String::new(), ttl_s).await?;
            (
                LeaseHold::Heartbeat,
                r.worker_id,
                Duration::from_secs(r.lease_ttl_s.max(1) as u64),
            )
        } else {
            let store: SharedStore = Arc::new(EtcdStore::connect(&options.etcd).await?);
            let ttl = options.lease_ttl.unwrap_or(Duration::from_secs(5));
            let worker_id = new_worker_id(&options.name);
            let lease = put_own_key(&store, &options, &worker_id, ttl).await?;
            (
                LeaseHold::Etcd {
                    store,
                    lease: Arc::new(Mutex::new(lease)),
                },
                worker_id,
                ttl,
            )
        };
        tracing::info!(worker = %worker_id, ttl = ?ttl, etcd = !options.etcd.is_empty(), "worker registered");
        let shared = Arc::new(Shared {
            coordinators: Coordinators::new(options.coordinators.clone()),
            options,
            worker_id,
            current: Mutex::new(None),
            ended: Mutex::new(HashMap::new()),
            registered: AtomicBool::new(true),
        });
        let (incoming_tx, incoming) = mpsc::channel(16);
        let (reports, reports_rx) = mpsc::channel(64);
        let mut tasks = vec![
            AbortOnDrop(tokio::spawn(subscription(shared.clone(), incoming_tx))),
            AbortOnDrop(tokio::spawn(send_reports(shared.clone(), reports_rx))),
        ];
        tasks.push(AbortOnDrop(match &lease {
            LeaseHold::Etcd { store, lease } => tokio::spawn(keep_etcd_lease(
                shared.clone(),
                store.clone(),
                lease.clone(),
                ttl,
            )),
            LeaseHold::Heartbeat => tokio::spawn(heartbeat(shared.clone(), ttl)),
        }));
        Ok(Agent {
            shared,
            incoming,
            reports,
            lease,
            tasks,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.shared.worker_id
    }

    /// `/readyz` of a worker: ready once registered, while its lease lives.
    pub fn readiness(&self) -> Readiness {
        let shared = self.shared.clone();
        Arc::new(move || {
            if shared.registered.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(format!("worker {} is not registered", shared.worker_id))
            }
        })
    }

    /// Waits (across coordinator failovers) for the next generation that
    /// includes this worker. `None` in local mode once no job needs it.
    pub async fn next_assignment(&mut self) -> Result<Option<Assignment>, AgentError> {
        loop {
            match self.incoming.recv().await {
                Some(Incoming::Assignment(a)) => {
                    if !a.ended.load(Ordering::SeqCst) {
                        return Ok(Some(*a));
                    }
                }
                Some(Incoming::Idle) => {
                    if self.shared.options.exit_when_idle && self.incoming.is_empty() {
                        return Ok(None);
                    }
                }
                None => return Err(AgentError::Stopped),
            }
        }
    }

    pub fn reporter(&self) -> Reporter {
        Reporter {
            reports: self.reports.clone(),
        }
    }

    /// Reports how the generation ended, retried with backoff (across
    /// failovers) until a coordinator acknowledges; gives up after 5 minutes.
    pub async fn report_outcome(
        &self,
        assignment: &Assignment,
        outcome: Outcome,
    ) -> Result<(), AgentError> {
        let report = v1::OutcomeReport {
            worker_id: self.shared.worker_id.clone(),
            job_id: assignment.job_id.clone(),
            generation: assignment.generation,
            rank: assignment.rank,
            outcome: Some(match outcome {
                Outcome::Completed {
                    eval,
                    step,
                    checkpoint,
                } => v1::outcome_report::Outcome::Completed(v1::Completed {
                    step,
                    eval: eval.unwrap_or_default().into_iter().collect(),
                    checkpoint: checkpoint.map(|(step, url)| v1::Checkpoint { step, url }),
                }),
                Outcome::Failed { retriable, message } => {
                    v1::outcome_report::Outcome::Failed(v1::Failed { retriable, message })
                }
            }),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        let mut attempt = 0;
        loop {
            let result = self
                .shared
                .call(|mut c| {
                    let report = report.clone();
                    async move { c.report_outcome(report).await }
                })
                .await;
            match result {
                Ok(_) => break,
                Err(e @ AgentError::Refused { .. }) => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(job = %assignment.job_id, error = %e, "outcome not acknowledged yet; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
        let mut current = self.shared.current.lock().expect("agent lock");
        if current
            .as_ref()
            .is_some_and(|c| c.job_id == assignment.job_id && c.generation == assignment.generation)
        {
            *current = None;
        }
        Ok(())
    }

    /// The clean exit: revokes the lease at once (the worker's key goes)
    /// and stops the background tasks.
    pub async fn shutdown(self) {
        self.tasks.iter().for_each(AbortOnDrop::abort);
        match &self.lease {
            LeaseHold::Etcd { store, lease } => {
                let lease = *lease.lock().expect("agent lock");
                if let Err(e) = store.revoke(lease).await {
                    tracing::warn!(error = %e, "could not revoke the worker's lease; it will expire");
                }
            }
            LeaseHold::Heartbeat => {
                let worker_id = self.shared.worker_id.clone();
                let result = self
                    .shared
                    .call(|mut c| {
                        let worker_id = worker_id.clone();
                        async move { c.deregister(v1::DeregisterRequest { worker_id }).await }
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not deregister; the lease will expire");
                }
            }
        }
        tracing::info!(worker = %self.shared.worker_id, "worker deregistered");
    }
}

async fn register_rpc(
    options: &AgentOptions,
    worker_id: String,
    lease_ttl_s: u32,
) -> Result<v1::RegisterResponse, AgentError> {
    let shared = Shared {
        options: options.clone(),
        worker_id: worker_id.clone(),
        current: Mutex::new(None),
        ended: Mutex::new(HashMap::new()),
        coordinators: Coordinators::new(options.coordinators.clone()),
        registered: AtomicBool::new(false),
    };
    let request = v1::RegisterRequest {
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        worker_id,
        lease_id: 0,
        lease_ttl_s,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        let result = shared
            .call(|mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await;
        match result {
            Ok(r) => return Ok(r),
            Err(e @ AgentError::NoCoordinator { .. }) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "registration not answered yet; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Grants a lease in etcd and writes the worker's key under it.
async fn put_own_key(
    store: &SharedStore,
    options: &AgentOptions,
    worker_id: &str,
    ttl: Duration,
) -> Result<LeaseId, StoreError> {
    let lease = store.grant(ttl).await?;
    let record = WorkerRecord {
        worker_id: worker_id.to_owned(),
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        registered_unix_ms: now_ms(),
        own_lease: true,
    };
    let key = Keys::new(&options.etcd_prefix).worker(worker_id);
    store.put(&key, record.to_json(), Some(lease)).await?;
    Ok(lease)
}

/// Keeps the etcd lease; when it is truly lost (expired), the worker has
/// been declared dead, so it registers afresh under a new lease.
async fn keep_etcd_lease(
    shared: Arc<Shared>,
    store: SharedStore,
    lease: Arc<Mutex<LeaseId>>,
    ttl: Duration,
) {
    loop {
        let id = *lease.lock().expect("agent lock");
        let mut keeper = LeaseKeeper::start(store.clone(), id, ttl);
        let reason = keeper.lost().await;
        shared.registered.store(false, Ordering::Relaxed);
        tracing::error!(worker = %shared.worker_id, %reason, "worker lease lost; registering again");
        let mut attempt = 0;
        loop {
            match put_own_key(&store, &shared.options, &shared.worker_id, ttl).await {
                Ok(new) => {
                    *lease.lock().expect("agent lock") = new;
                    shared.registered.store(true, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registering again failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Renews the coordinator-held lease every third of the TTL; transient
/// failures are retried quickly within the TTL; a lease the coordinator
/// reports expired is replaced by registering again under the same id.
async fn heartbeat(shared: Arc<Shared>, ttl: Duration) {
    let period = ttl / 3;
    let retry = (ttl / 10).max(Duration::from_millis(100));
    let mut next = period;
    loop {
        tokio::time::sleep(next).await;
        let worker_id = shared.worker_id.clone();
        let result = shared
            .call(|mut c| {
                let worker_id = worker_id.clone();
                async move { c.heartbeat(v1::HeartbeatRequest { worker_id }).await }
            })
            .await;
        match result {
            Ok(_) => {
                shared.registered.store(true, Ordering::Relaxed);
                next = period;
            }
            Err(AgentError::Refused { status, .. }) if status.code() == Code::NotFound => {
                shared.registered.store(false, Ordering::Relaxed);
                tracing::error!(worker = %shared.worker_id, reason = status.message(), "worker lease lost; registering again");
                let ttl_s = ttl.as_secs().max(1) as u32;
                match register_rpc(&shared.options, shared.worker_id.clone(), ttl_s).await {
                    Ok(_) => {
                        shared.registered.store(true, Ordering::Relaxed);
                        next = period;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registering again failed; retrying");
                        next = retry;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; retrying within the TTL");
                next = retry;
            }
        }
    }
}

/// Holds the subscription: connects to the leader, names the generation
/// the worker is in, and forwards what arrives. Reconnects on any break.
async fn subscription(shared: Arc<Shared>, incoming: mpsc::Sender<Incoming>) {
    let mut attempt = 0;
    loop {
        let request = v1::SubscribeRequest {
            worker_id: shared.worker_id.clone(),
            current: shared.current().map(|c| v1::CurrentGeneration {
                job_id: c.job_id,
                generation: c.generation,
            }),
        };
        let opened = shared
            .call(|mut c| {
                let request = request.clone();
                async move { c.subscribe(request).await }
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                // NOT_FOUND: the lease lapsed; the keep-alive registers again.
                tracing::debug!(error = %e, "subscription not open yet; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = (attempt + 1).min(3);
                continue;
            }
        };
        attempt = 0;
        tracing::info!(worker = %shared.worker_id, "subscribed to the leader");
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    if !handle(&shared, &incoming, event).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(
                        reason = status.message(),
                        "subscription broke; looking for the leader"
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Handles one event; false once the agent is gone.
async fn handle(
    shared: &Shared,
    incoming: &mpsc::Sender<Incoming>,
    event: v1::WorkerEvent,
) -> bool {
    match event.event {
        Some(v1::worker_event::Event::Assignment(a)) => {
            let spec = match JobSpec::from_toml(&a.spec_toml, None) {
                Ok(s) => s,
                Err(e) => {
                    let e = AgentError::InvalidAssignment {
                        job_id: a.job_id.clone(),
                        message: e.to_string(),
                    };
                    tracing::error!(error = %e, "assignment ignored");
                    return true;
                }
            };
            let ended = Arc::new(AtomicBool::new(false));
            shared
                .ended
                .lock()
                .expect("agent lock")
                .insert((a.job_id.clone(), a.generation), ended.clone());
            shared.set_current(Some(Current {
                job_id: a.job_id.clone(),
                generation: a.generation,
                rank: a.rank,
            }));
            tracing::info!(job = %a.job_id, generation = a.generation, rank = a.rank, world = a.world_size, "assigned");
            incoming
                .send(Incoming::Assignment(Box::new(Assignment {
                    job_id: a.job_id,
                    generation: a.generation,
                    rank: a.rank,
                    world_size: a.world_size,
                    tp: a.tp,
                    peers: a.peers,
                    spec,
                    resume_checkpoint: a.resume_checkpoint.map(|c| c.url),
                    ended,
                })))
                .await
                .is_ok()
        }
        Some(v1::worker_event::Event::GenerationEnded(g)) => {
            tracing::info!(job = %g.job_id, generation = g.generation, reason = %g.reason, "generation ended");
            if let Some(flag) = shared
                .ended
                .lock()
                .expect("agent lock")
                .remove(&(g.job_id.clone(), g.generation))
            {
                flag.store(true, Ordering::SeqCst);
            }
            let mut current = shared.current.lock().expect("agent lock");
            if current
                .as_ref()
                .is_some_and(|c| c.job_id == g.job_id && c.generation == g.generation)
            {
                *current = None;
            }
            true
        }
        Some(v1::worker_event::Event::Idle(_)) => incoming.send(Incoming::Idle).await.is_ok(),
        None => true,
    }
}

/// Sends reports to the leader. Progress that fails is dropped; the newest
/// unsent checkpoint is retried every second until acknowledged.
async fn send_reports(shared: Arc<Shared>, mut reports: mpsc::Receiver<Report>) {
    let mut pending: Option<(Current, u64, String)> = None;
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
                let Some(current) = shared.current() else {
                    continue;
                };
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
            Some(Report::Checkpoint { step, url }) => {
                if let Some(current) = shared.current() {
                    if pending.as_ref().is_none_or(|(_, s, _)| step >= *s) {
                        pending = Some((current, step, url));
                    }
                }
            }
            None => {}
        }
        if let Some((current, step, url)) = pending.clone() {
            let report = v1::CheckpointReport {
                worker_id: shared.worker_id.clone(),
                job_id: current.job_id,
                generation: current.generation,
                checkpoint: Some(v1::Checkpoint { step, url }),
            };
            let sent = shared
                .call(|mut c| {
                    let report = report.clone();
                    async move { c.report_checkpoint(report).await }
                })
                .await;
            match sent {
                Ok(_) | Err(AgentError::Refused { .. }) => pending = None,
                Err(e) => tracing::debug!(error = %e, step, "checkpoint report not sent yet"),
            }
        }
    }
}
