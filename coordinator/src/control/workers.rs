//! The worker registry: registration, the leases the coordinator keeps for
//! workers that do not hold their own, deregistration, and the
//! subscriptions through which the leader hands out assignments. Any
//! coordinator, standby or leader, can register a worker and renew its
//! lease (they only touch the store); only the leader takes subscriptions.
//!
//! The coordinator issues each worker its id and a secret; every later
//! call as that worker presents the secret, checked against the digest in
//! the worker's record, so one worker (or anyone holding only a worker
//! token) cannot act as another.

use std::time::Duration;

use samtrain_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use super::{store_status, worker_event, Control, Subscriber, View, WorkerFeed};
use crate::auth::{secret_digest, secret_matches, WORKER_SECRET_HEADER};
use crate::jobs::JobState;
use crate::records::{id_belongs_to, new_worker_identity, now_ms, WorkerRecord};
use crate::store::{Compare, LeaseId, Op, StoreError};

/// What the leader sends one subscribed worker.
pub(crate) type WorkerEvents = mpsc::Receiver<Result<v1::WorkerEvent, Status>>;

/// Whether peers can dial an advertised collective address.
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// The longest lease a worker may ask for: a dead worker's key outlives
/// it by at most this long.
pub(crate) const MAX_WORKER_LEASE_TTL: Duration = Duration::from_secs(60);

/// The most rank processes one node's agent may run: far above any
/// machine's GPUs.
pub const MAX_SLOTS: u32 = 64;

/// The longest node name a worker may give (a DNS name's length).
const MAX_NODE_LEN: usize = 253;

impl Control {
    /// Registers a worker under a lease this coordinator keeps alive on its
    /// Heartbeat calls. A new worker gets its id and secret from the
    /// coordinator; a worker registering again (its lease expired) names
    /// its id and presents the secret it was given. The lease's TTL is the
    /// coordinator's, or shorter when the worker asks.
    pub(crate) async fn register_worker(
        &self,
        r: v1::RegisterRequest,
        presented: Option<&str>,
    ) -> Result<v1::RegisterResponse, Status> {
        if !is_host_port(&r.advertise) {
            return Err(Status::invalid_argument(format!(
                "advertise address `{}` must be host:port (where peers reach this worker's collectives)",
                r.advertise
            )));
        }
        if r.node.len() > MAX_NODE_LEN
            || r.node.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Status::invalid_argument(format!(
                "node name `{}` must be at most {MAX_NODE_LEN} bytes, without spaces or control characters",
                r.node.escape_debug()
            )));
        }
        if r.slots > MAX_SLOTS {
            return Err(Status::invalid_argument(format!(
                "a node runs at most {MAX_SLOTS} slots, not {}",
                r.slots
            )));
        }
        if r.slots > 0 && !r.node_agent.is_empty() {
            return Err(Status::invalid_argument(
                "a node's agent holds a lease of its own; only its rank processes name a node agent",
            ));
        }
        if r.lease_id != 0 {
            return Err(Status::invalid_argument(
                "a worker that holds its own lease writes its record in etcd; through the coordinator the lease is the coordinator's",
            ));
        }
        let (worker_id, secret) = if r.worker_id.is_empty() {
            new_worker_identity(&r.name)
        } else {
            (
                r.worker_id.clone(),
                self.reclaim(&r.worker_id, presented).await?,
            )
        };
        let record = |node: String| WorkerRecord {
            worker_id: worker_id.clone(),
            name: r.name.clone(),
            advertise: r.advertise.clone(),
            device: r.device.clone(),
            registered_unix_ms: now_ms(),
            node,
            own_lease: false,
            secret_sha256: secret_digest(&secret),
            slots: r.slots,
            node_agent: r.node_agent.clone(),
        };
        let (lease, ttl) = if r.node_agent.is_empty() {
            let ttl = self.worker_lease_ttl(r.lease_ttl_s);
            let lease = self.store.grant(ttl).await.map_err(store_status)?;
            self.store
                .put(
                    &self.keys.worker(&worker_id),
                    record(r.node.clone()).to_json(),
                    Some(lease),
                )
                .await
                .map_err(store_status)?;
            (lease, ttl)
        } else {
            self.admit_rank(&r, &worker_id, record).await?
        };
        tracing::info!(worker = %worker_id, advertise = %r.advertise, device = %r.device, ttl_s = ttl.as_secs(), slots = r.slots, node_agent = %r.node_agent, "worker registered");
        self.wake.notify_one();
        Ok(v1::RegisterResponse {
            worker_id,
            lease_id: lease,
            lease_ttl_s: ttl.as_secs() as u32,
            worker_secret: secret,
        })
    }

    /// Writes the record of a rank process of a node's agent under the
    /// agent's lease, once [`node_lease`](Self::node_lease) admits it; the
    /// lease and its TTL. Ranks registering at once, through any
    /// coordinator, would each count the same free slot: the count is
    /// taken after reading the agent's [`node_ranks`](crate::records::Keys::node_ranks)
    /// key, and the record is written in one transaction with that key,
    /// on the condition that it has not changed since. A rank that loses
    /// the race counts again.
    async fn admit_rank(
        &self,
        r: &v1::RegisterRequest,
        worker_id: &str,
        record: impl Fn(String) -> WorkerRecord,
    ) -> Result<(LeaseId, Duration), Status> {
        let guard = self.keys.node_ranks(&r.node_agent);
        // Each lost race is another rank of the agent admitted (or one
        // admitted again): past this many, the agent's slots are full.
        for _ in 0..=2 * MAX_SLOTS {
            let seen = self
                .store
                .get(&guard)
                .await
                .map_err(store_status)?
                .map_or(0, |kv| kv.mod_revision);
            let (lease, ttl, node) = self.node_lease(r, worker_id).await?;
            let admitted = self
                .store
                .txn(
                    vec![Compare::ModRevision(guard.clone(), seen)],
                    vec![
                        Op::Put {
                            key: guard.clone(),
                            value: worker_id.as_bytes().to_vec(),
                            lease: Some(lease),
                        },
                        Op::Put {
                            key: self.keys.worker(worker_id),
                            value: record(node).to_json(),
                            lease: Some(lease),
                        },
                    ],
                )
                .await
                .map_err(store_status)?;
            if admitted {
                return Ok((lease, ttl));
            }
        }
        Err(Status::aborted(format!(
            "rank processes of node agent {} kept registering at the same time as this one; register again",
            r.node_agent
        )))
    }

    /// The lease, its TTL and the node of the node agent a rank process
    /// registers under, once the rank proved it is one of the agent's: it
    /// holds the agent's secret, names the agent's node (or none) and the
    /// agent has a slot left for it.
    async fn node_lease(
        &self,
        r: &v1::RegisterRequest,
        worker_id: &str,
    ) -> Result<(LeaseId, Duration, String), Status> {
        let agent_id = &r.node_agent;
        let (agent, lease) = self.worker(agent_id).await?;
        if !agent.is_node_agent() {
            return Err(Status::invalid_argument(format!(
                "worker {agent_id} is not a node's agent"
            )));
        }
        if !secret_matches(&r.node_agent_secret, &agent.secret_sha256) {
            return Err(Status::permission_denied(format!(
                "the secret presented is not node agent {agent_id}'s"
            )));
        }
        if !r.node.is_empty() && r.node != agent.node {
            return Err(Status::invalid_argument(format!(
                "a rank process of node agent {agent_id} runs on its node `{}`, not `{}`",
                agent.node, r.node
            )));
        }
        let lease = lease.ok_or_else(|| {
            Status::failed_precondition(format!("node agent {agent_id} has no lease"))
        })?;
        let ranks = self
            .live_workers()
            .await
            .map_err(store_status)?
            .into_values()
            .filter(|w| w.node_agent == *agent_id && w.worker_id != worker_id)
            .count();
        if ranks >= agent.slots as usize {
            return Err(Status::resource_exhausted(format!(
                "node agent {agent_id} runs {} slots, and each has a registered rank process",
                agent.slots
            )));
        }
        // Renewing it here also says the lease is alive, and for how long.
        let ttl = self.store.keep_alive(lease).await.map_err(|e| match e {
            StoreError::LeaseNotFound { .. } => Status::not_found(format!(
                "the lease of node agent {agent_id} expired; its rank processes start again"
            )),
            e => store_status(e),
        })?;
        Ok((lease, ttl, agent.node))
    }

    /// The TTL of a heartbeat worker's lease: the coordinator's, or what
    /// the worker asks within 1 s and [`MAX_WORKER_LEASE_TTL`].
    fn worker_lease_ttl(&self, requested_s: u32) -> Duration {
        let ours = self.lease_ttl.max(Duration::from_secs(1));
        if requested_s == 0 {
            return ours.min(MAX_WORKER_LEASE_TTL);
        }
        Duration::from_secs(requested_s as u64).clamp(Duration::from_secs(1), MAX_WORKER_LEASE_TTL)
    }

    /// The secret of a worker registering again under `worker_id`: it must
    /// be the one the id was made from, and the one its record holds if
    /// the record is still there.
    async fn reclaim(&self, worker_id: &str, presented: Option<&str>) -> Result<String, Status> {
        let secret = presented.ok_or_else(|| {
            Status::unauthenticated(format!(
                "registering again as {worker_id} needs that worker's secret"
            ))
        })?;
        if !id_belongs_to(worker_id, secret) {
            return Err(Status::permission_denied(format!(
                "the secret presented is not worker {worker_id}'s"
            )));
        }
        if let Ok((record, _)) = self.worker(worker_id).await {
            if !secret_matches(secret, &record.secret_sha256) {
                return Err(Status::permission_denied(format!(
                    "the secret presented is not worker {worker_id}'s"
                )));
            }
        }
        Ok(secret.to_owned())
    }

    /// The record of the registered worker `worker_id`, once the caller
    /// proved with its secret that it is that worker.
    pub(crate) async fn authenticated_worker(
        &self,
        worker_id: &str,
        presented: Option<&str>,
    ) -> Result<(WorkerRecord, Option<LeaseId>), Status> {
        let (record, lease) = self.worker(worker_id).await?;
        match presented {
            Some(secret) if secret_matches(secret, &record.secret_sha256) => Ok((record, lease)),
            Some(_) => Err(Status::permission_denied(format!(
                "the secret presented is not worker {worker_id}'s"
            ))),
            None => Err(Status::unauthenticated(format!(
                "calls as worker {worker_id} need its secret ({WORKER_SECRET_HEADER})"
            ))),
        }
    }

    /// Renews the lease of a heartbeat worker; its TTL.
    pub(crate) async fn heartbeat(
        &self,
        worker_id: &str,
        presented: Option<&str>,
    ) -> Result<Duration, Status> {
        let (_, lease) = self.authenticated_worker(worker_id, presented).await?;
        let lease = lease.ok_or_else(|| {
            Status::failed_precondition(format!("worker {worker_id} has no lease"))
        })?;
        self.store.keep_alive(lease).await.map_err(|e| match e {
            StoreError::LeaseNotFound { .. } => Status::not_found(format!(
                "the lease of worker {worker_id} expired; register again"
            )),
            e => store_status(e),
        })
    }

    /// Removes a worker at once (its generation ends on the next tick);
    /// false when it was not registered.
    pub(crate) async fn deregister(
        &self,
        worker_id: &str,
        presented: Option<&str>,
    ) -> Result<bool, Status> {
        let (record, lease) = match self.authenticated_worker(worker_id, presented).await {
            Ok(found) => found,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(false),
            Err(status) => return Err(status),
        };
        // A node's rank shares its agent's lease: only its key goes. An
        // agent's lease going takes its ranks with it.
        let result = match lease {
            Some(lease) if record.node_agent.is_empty() => self.store.revoke(lease).await,
            _ => self
                .store
                .delete(&self.keys.worker(worker_id))
                .await
                .map(|_| ()),
        };
        result.map_err(store_status)?;
        tracing::info!(worker = %worker_id, "worker deregistered");
        self.wake.notify_one();
        Ok(true)
    }

    /// A registered worker and the lease its key lives by.
    async fn worker(&self, worker_id: &str) -> Result<(WorkerRecord, Option<LeaseId>), Status> {
        let kv = self
            .store
            .get(&self.keys.worker(worker_id))
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "worker {worker_id} is not registered (or its lease expired); register again"
                ))
            })?;
        let record = serde_json::from_slice(&kv.value).map_err(|e| {
            Status::internal(format!("unreadable record of worker {worker_id}: {e}"))
        })?;
        Ok((record, kv.lease))
    }

    /// A registered worker subscribes, naming the generation it believes
    /// it is in; returns its feed's receiving end.
    pub(crate) async fn subscribe(
        &self,
        worker_id: &str,
        presented: Option<&str>,
        current: Option<v1::CurrentGeneration>,
    ) -> Result<WorkerEvents, Status> {
        // A standby says so before the store is asked about the worker.
        self.ensure_leader()?;
        let (record, _) = self.authenticated_worker(worker_id, presented).await?;
        if record.is_node_agent() {
            return Err(Status::failed_precondition(format!(
                "worker {worker_id} is a node's agent: its rank processes subscribe, not it"
            )));
        }
        let mut view = self.lead().await?;
        let (feed, rx) = mpsc::channel(64);
        let busy = current.and_then(|cur| rejoin(&view, &record.worker_id, cur, &feed));
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
}

/// A reconnecting worker names the generation it was in: it stays in it
/// (busy, the returned generation) while that generation runs with it.
/// Otherwise it is told the generation ended, unless it completed, and
/// stays busy finishing it until it reports its outcome.
fn rejoin(
    view: &View,
    worker_id: &str,
    cur: v1::CurrentGeneration,
    feed: &WorkerFeed,
) -> Option<(String, u64)> {
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
                && job.member(worker_id).is_some() =>
        {
            return Some((cur.job_id.clone(), cur.generation));
        }
        // A completed generation ends by itself; nothing to say.
        Some(job) if job.state == JobState::Succeeded && job.generation == cur.generation => {}
        Some(job) => {
            let _ = feed.try_send(ended(format!(
                "job {} is {} at generation {}",
                job.id,
                job.state.name(),
                job.generation
            )));
            return Some((cur.job_id.clone(), cur.generation));
        }
        None => {
            let _ = feed.try_send(ended(format!("no job {}", cur.job_id)));
        }
    }
    None
}
