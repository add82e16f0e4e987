//! The worker's side of the control plane. An [`Agent`] registers the
//! worker, keeps its lease alive (in etcd directly when given endpoints,
//! else by Heartbeat calls to any coordinator), holds a subscription to the
//! leader across failovers (trying each coordinator address; a standby
//! answers UNAVAILABLE) and hands the trainer its assignments. Reports are
//! off the training path: progress and checkpoints are best effort and never
//! block; only the final outcome is retried until a leader acknowledges it.
//!
//! The lease lives in `lease` (a node's shared one in `node`), the subscription and the generations it
//! brings in `generations`, the reports in `reports`; this module ties
//! them to the [`Agent`] the worker holds.

mod generations;
mod lease;
mod node;
mod reports;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use samtrain_proto::spec::JobSpec;
use samtrain_proto::v1;
use samtrain_proto::v1::workers_client::WorkersClient;
use tokio::sync::mpsc;
use tonic::Status;

use crate::auth::Credentials;
use crate::failover::{AuthChannel, Coordinators, Unanswered};
use crate::health::Readiness;
use crate::metrics::{MetricsSource, WorkerMetrics};
use crate::store::StoreError;
use crate::tasks::AbortOnDrop;
use generations::{subscription, Generations, Incoming};
use lease::{LeaseHold, Registration};
pub use node::{NodeAgent, NodeLease, NodeMembership};
pub use reports::Reporter;
use reports::{send_reports, Report};

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
    /// The machine it runs on; empty: the host of `advertise`.
    pub node: String,
    /// etcd endpoints; empty: the lease is kept by Heartbeat calls.
    pub etcd: Vec<String>,
    /// etcd's TLS and user, when it requires them.
    pub etcd_access: crate::store::EtcdAccess,
    /// The store prefix the coordinators use (default `/samtrain`).
    pub etcd_prefix: String,
    /// Local mode: [`Agent::next_assignment`] returns `None` once no job
    /// is pending or running.
    pub exit_when_idle: bool,
    /// The worker's lease TTL; `None` takes the coordinator's (5 s by
    /// default) or 5 s with etcd.
    pub lease_ttl: Option<Duration>,
    /// The worker token every call presents.
    pub credentials: Credentials,
    /// A rank process of a node: its identity and its node's lease, from
    /// the node's agent; `None` for a worker on its own.
    pub node_membership: Option<NodeMembership>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            coordinators: vec!["127.0.0.1:7070".to_owned()],
            name: "worker".to_owned(),
            advertise: String::new(),
            device: "cpu".to_owned(),
            node: String::new(),
            etcd: Vec::new(),
            etcd_access: crate::store::EtcdAccess::default(),
            etcd_prefix: "/samtrain".to_owned(),
            exit_when_idle: false,
            lease_ttl: None,
            credentials: Credentials::none(),
            node_membership: None,
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
    /// The generation's secret: the collectives of its ranks prove they
    /// hold it to each other.
    pub ring_secret: String,
    /// Set by the agent when the coordinator ends this generation (a
    /// failure elsewhere, a cancel).
    pub ended: Arc<AtomicBool>,
}

/// How a generation ended for this worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Training (and, on rank 0, the evaluation) finished.
    Completed {
        /// The scores, when rank 0 evaluated.
        eval: Option<v1::Scores>,
        /// A few of its predictions beside their references.
        examples: Vec<v1::EvalExample>,
        step: u64,
        /// The newest committed checkpoint.
        checkpoint: Option<v1::Checkpoint>,
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
    /// Seconds per step outside and inside the data-parallel collectives,
    /// and of the first the part spent waiting for data.
    pub compute_s: f64,
    pub comm_s: f64,
    pub data_s: f64,
    /// What the generation fetched from object storage so far.
    pub objects: Option<ObjectFetches>,
}

/// A generation's fetches from object storage so far (its image cache's
/// counts since the generation began).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ObjectFetches {
    /// Objects read from the store, and their bytes.
    pub fetched: u64,
    pub bytes: u64,
    /// Objects found in the local cache instead.
    pub hits: u64,
}

/// How long a committed save took, and how much it wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SaveTiming {
    pub bytes: u64,
    /// Training was blocked while the tensors were staged.
    pub blocked_s: f64,
    /// From staging to the commit, in the background.
    pub upload_s: f64,
}

/// What the agent's background tasks share.
struct Shared {
    options: AgentOptions,
    worker_id: String,
    secret_sha256: String,
    generations: Generations,
    coordinators: Coordinators,
    registered: AtomicBool,
    /// Heartbeat calls that succeeded, and the round trip of the last one
    /// in microseconds: what a load test of the control plane reads.
    heartbeats: AtomicU64,
    last_heartbeat_us: AtomicU64,
    metrics: WorkerMetrics,
}

impl Shared {
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, AgentError>
    where
        F: Fn(WorkersClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        call_leader(&self.coordinators, f).await
    }
}

/// Calls the leader; a coordinator silent for 5 s counts as down, so a
/// hung one cannot stall the worker's keep-alive or reports.
async fn call_leader<T, F, Fut>(coordinators: &Coordinators, f: F) -> Result<T, AgentError>
where
    F: Fn(WorkersClient<AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    coordinators
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

impl Assignment {
    /// The span to run this generation in: enter it (in every thread the
    /// generation uses) so its log lines name the job, generation and rank,
    /// and a trace shows the generation as one span of this rank.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "generation",
            job = %self.job_id,
            generation = self.generation,
            rank = self.rank
        )
    }
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

/// Backoff between attempts: 100 ms doubling to 2 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(4)).min(Duration::from_secs(2))
}

impl Agent {
    /// Registers the worker (retrying for up to 30 s while no coordinator
    /// answers) and starts the lease keep-alive and the subscription.
    pub async fn register(options: AgentOptions) -> Result<Agent, AgentError> {
        let Registration {
            lease,
            worker_id,
            ttl,
            secret_sha256,
        } = Registration::new(&options).await?;
        tracing::info!(worker = %worker_id, ttl = ?ttl, etcd = !options.etcd.is_empty(), "worker registered");
        let shared = Arc::new(Shared {
            coordinators: Coordinators::new(
                options.coordinators.clone(),
                options.credentials.clone(),
            ),
            options,
            worker_id,
            secret_sha256,
            generations: Generations::default(),
            registered: AtomicBool::new(true),
            heartbeats: AtomicU64::new(0),
            last_heartbeat_us: AtomicU64::new(0),
            metrics: WorkerMetrics::default(),
        });
        let (incoming_tx, incoming) = mpsc::channel(16);
        let (reports, reports_rx) = mpsc::channel(64);
        let mut tasks = vec![
            AbortOnDrop(tokio::spawn(subscription(shared.clone(), incoming_tx))),
            AbortOnDrop(tokio::spawn(send_reports(shared.clone(), reports_rx))),
        ];
        tasks.extend(lease.keep(shared.clone(), ttl));
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

    /// How many Heartbeat calls have succeeded and the round trip of the
    /// last one; `(0, None)` while none has, and always for a lease the
    /// agent holds in etcd itself.
    pub fn heartbeats(&self) -> (u64, Option<Duration>) {
        let count = self.shared.heartbeats.load(Ordering::Relaxed);
        let last = Duration::from_micros(self.shared.last_heartbeat_us.load(Ordering::Relaxed));
        (count, (count > 0).then_some(last))
    }

    /// `/metrics` of a worker: its lease renewals and its rank's training.
    pub fn metrics(&self) -> MetricsSource {
        let shared = self.shared.clone();
        Arc::new(move || {
            let shared = shared.clone();
            Box::pin(async move { shared.metrics.render() })
        })
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
    ///
    /// Every assignment the worker receives gets exactly one outcome: the
    /// coordinator keeps a worker out of new generations until it has
    /// reported how its last one ended (a dead worker never does, so a
    /// re-formed group never includes it). One that ended before it
    /// started, or that this worker cannot read, is reported here.
    pub async fn next_assignment(&mut self) -> Result<Option<Assignment>, AgentError> {
        loop {
            match self.incoming.recv().await {
                Some(Incoming::Assignment(a)) => {
                    if !a.ended.load(Ordering::SeqCst) {
                        return Ok(Some(*a));
                    }
                    let skipped = Outcome::Failed {
                        retriable: true,
                        message: "the generation ended before this rank started".to_owned(),
                    };
                    self.report(&a.job_id, a.generation, a.rank, skipped)
                        .await?;
                }
                Some(Incoming::Unusable { current, message }) => {
                    let refused = Outcome::Failed {
                        retriable: false,
                        message,
                    };
                    self.report(&current.job_id, current.generation, current.rank, refused)
                        .await?;
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
        self.report(
            &assignment.job_id,
            assignment.generation,
            assignment.rank,
            outcome,
        )
        .await
    }

    async fn report(
        &self,
        job_id: &str,
        generation: u64,
        rank: u32,
        outcome: Outcome,
    ) -> Result<(), AgentError> {
        let report = v1::OutcomeReport {
            worker_id: self.shared.worker_id.clone(),
            job_id: job_id.to_owned(),
            generation,
            rank,
            outcome: Some(match outcome {
                Outcome::Completed {
                    eval,
                    examples,
                    step,
                    checkpoint,
                } => v1::outcome_report::Outcome::Completed(v1::Completed {
                    step,
                    eval,
                    examples,
                    checkpoint,
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
                Err(e @ AgentError::Refused { .. }) => {
                    self.shared.generations.leave(job_id, generation);
                    return Err(e);
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(job = %job_id, error = %e, "outcome not acknowledged yet; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
        self.shared.generations.leave(job_id, generation);
        Ok(())
    }

    /// The clean exit: revokes the lease at once (the worker's key goes)
    /// and stops the background tasks.
    pub async fn shutdown(self) {
        self.tasks.iter().for_each(AbortOnDrop::abort);
        self.lease.release(&self.shared).await;
        tracing::info!(worker = %self.shared.worker_id, "worker deregistered");
    }
}
