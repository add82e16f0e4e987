//! Keeping the worker alive in the control plane. A worker given etcd
//! endpoints holds its own lease there (its key survives any coordinator
//! failover); otherwise the coordinators hold it and the agent renews it
//! by Heartbeat calls. Either way a lease that is truly lost means the
//! worker was declared dead, so the agent registers again. A rank process
//! of a node holds no lease: its record lives under its node agent's (see
//! `node`), which keeps it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samtrain_proto::v1;
use tonic::Code;

use super::node::{NodeLease, NodeMembership};
use super::{backoff, call_leader, AgentError, AgentOptions, Shared};
use crate::auth::secret_digest;
use crate::failover::Coordinators;
use crate::records::{new_worker_identity, now_ms, Keys, WorkerRecord};
use crate::store::{etcd::EtcdStore, LeaseId, LeaseKeeper, SharedStore, StoreError};
use crate::tasks::AbortOnDrop;

/// The TTL of a lease a worker (or node agent) holds in etcd, unless its
/// options say otherwise.
pub(super) const ETCD_LEASE_TTL: Duration = Duration::from_secs(5);

/// How the worker's lease is kept.
pub(super) enum LeaseHold {
    /// In etcd, by the agent.
    Etcd {
        store: SharedStore,
        lease: Arc<Mutex<LeaseId>>,
    },
    /// By Heartbeat calls; the coordinator holds the store lease.
    Heartbeat,
    /// By the node's agent: the record lives under its lease (written in
    /// etcd by this agent when it has a store, else by the coordinator).
    Node { store: Option<SharedStore> },
}

/// A registered worker: how its lease is held, its id and the lease TTL.
pub(super) struct Registration {
    pub(super) lease: LeaseHold,
    pub(super) worker_id: String,
    pub(super) ttl: Duration,
    /// What the worker's record holds of its secret (etcd-held leases
    /// write the record again when the lease is replaced).
    pub(super) secret_sha256: String,
}

impl Registration {
    /// Registers the worker: in etcd under its own lease when given
    /// endpoints, else through a coordinator (retrying for up to 30 s
    /// while none answers).
    pub(super) async fn new(options: &AgentOptions) -> Result<Registration, AgentError> {
        if let Some(membership) = &options.node_membership {
            return Registration::under_node(options, membership).await;
        }
        if options.etcd.is_empty() {
            let ttl_s = options
                .lease_ttl
                .map(|t| t.as_secs().max(1) as u32)
                .unwrap_or(0);
            let r = register_rpc(
                options,
                v1::RegisterRequest {
                    lease_ttl_s: ttl_s,
                    ..register_request(options)
                },
            )
            .await?;
            // Every later call (heartbeats, reports) proves the id with it.
            options.credentials.set_worker_secret(&r.worker_secret);
            return Ok(Registration {
                lease: LeaseHold::Heartbeat,
                worker_id: r.worker_id,
                ttl: Duration::from_secs(r.lease_ttl_s.max(1) as u64),
                secret_sha256: secret_digest(&r.worker_secret),
            });
        }
        let store: SharedStore =
            Arc::new(EtcdStore::connect(&options.etcd, &options.etcd_access).await?);
        let ttl = options.lease_ttl.unwrap_or(ETCD_LEASE_TTL);
        let (worker_id, secret) = new_worker_identity(&options.name);
        options.credentials.set_worker_secret(&secret);
        let digest = secret_digest(&secret);
        let lease = put_own_key(&store, options, &worker_id, &digest, ttl).await?;
        Ok(Registration {
            lease: LeaseHold::Etcd {
                store,
                lease: Arc::new(Mutex::new(lease)),
            },
            worker_id,
            ttl,
            secret_sha256: digest,
        })
    }

    /// Registers a rank process of a node under the node's lease, with the
    /// identity its node's agent gave it.
    async fn under_node(
        options: &AgentOptions,
        membership: &NodeMembership,
    ) -> Result<Registration, AgentError> {
        options
            .credentials
            .set_worker_secret(&membership.worker_secret);
        let digest = secret_digest(&membership.worker_secret);
        let (store, ttl) = match &membership.lease {
            NodeLease::Etcd { lease } => {
                let store: SharedStore =
                    Arc::new(EtcdStore::connect(&options.etcd, &options.etcd_access).await?);
                let mut record = own_record(options, &membership.worker_id, &digest);
                record.node_agent = membership.agent_id.clone();
                put_record(&store, options, &record, *lease).await?;
                // The node's agent runs with the same options, so its TTL.
                (Some(store), options.lease_ttl.unwrap_or(ETCD_LEASE_TTL))
            }
            NodeLease::Coordinator { agent_secret } => {
                let mut request = register_request(options);
                request.worker_id = membership.worker_id.clone();
                request.node_agent = membership.agent_id.clone();
                request.node_agent_secret = agent_secret.clone();
                let r = register_rpc(options, request).await?;
                (None, Duration::from_secs(r.lease_ttl_s.max(1) as u64))
            }
        };
        Ok(Registration {
            lease: LeaseHold::Node { store },
            worker_id: membership.worker_id.clone(),
            ttl,
            secret_sha256: digest,
        })
    }
}

impl LeaseHold {
    /// Starts keeping the lease alive for as long as the task lives.
    /// (None for a node's rank: its agent keeps the lease.)
    pub(super) fn keep(&self, shared: Arc<Shared>, ttl: Duration) -> Option<AbortOnDrop<()>> {
        let task = match self {
            LeaseHold::Etcd { store, lease } => {
                tokio::spawn(keep_etcd_lease(shared, store.clone(), lease.clone(), ttl))
            }
            LeaseHold::Heartbeat => tokio::spawn(heartbeat(shared, ttl)),
            LeaseHold::Node { .. } => return None,
        };
        Some(AbortOnDrop(task))
    }

    /// Ends the lease now, so the worker's key goes at once instead of at
    /// the end of the TTL; a failure only costs that wait.
    pub(super) async fn release(&self, shared: &Shared) {
        match self {
            LeaseHold::Etcd { store, lease } => {
                let lease = *lease.lock().expect("agent lock");
                if let Err(e) = store.revoke(lease).await {
                    tracing::warn!(error = %e, "could not revoke the worker's lease; it will expire");
                }
            }
            // Only this rank's key goes: the lease is its node's.
            LeaseHold::Node { store: Some(store) } => {
                let key = Keys::new(&shared.options.etcd_prefix).worker(&shared.worker_id);
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(error = %e, "could not remove this rank's record; its node's agent will");
                }
            }
            LeaseHold::Heartbeat | LeaseHold::Node { store: None } => {
                if let Err(e) = deregister(&shared.coordinators, &shared.worker_id).await {
                    tracing::warn!(error = %e, "could not deregister; the lease will expire");
                }
            }
        }
    }
}

/// Removes a worker through a coordinator (the caller presents its secret).
pub(super) async fn deregister(
    coordinators: &Coordinators,
    worker_id: &str,
) -> Result<(), AgentError> {
    call_leader(coordinators, |mut c| {
        let worker_id = worker_id.to_owned();
        async move { c.deregister(v1::DeregisterRequest { worker_id }).await }
    })
    .await
    .map(|_| ())
}

/// A registration's request, as far as the agent's options say.
pub(super) fn register_request(options: &AgentOptions) -> v1::RegisterRequest {
    v1::RegisterRequest {
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        node: options.node.clone(),
        ..Default::default()
    }
}

/// Registers through a coordinator; a fresh address list each time, so a
/// registration starts from the first coordinator as a new worker would.
pub(super) async fn register_rpc(
    options: &AgentOptions,
    request: v1::RegisterRequest,
) -> Result<v1::RegisterResponse, AgentError> {
    let coordinators = Coordinators::new(options.coordinators.clone(), options.credentials.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        let result = call_leader(&coordinators, |mut c| {
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

/// The record a worker holding its lease in etcd writes of itself.
pub(super) fn own_record(
    options: &AgentOptions,
    worker_id: &str,
    secret_sha256: &str,
) -> WorkerRecord {
    WorkerRecord {
        worker_id: worker_id.to_owned(),
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        registered_unix_ms: now_ms(),
        node: options.node.clone(),
        own_lease: true,
        secret_sha256: secret_sha256.to_owned(),
        slots: 0,
        node_agent: String::new(),
    }
}

/// Writes a worker's record under `lease`.
pub(super) async fn put_record(
    store: &SharedStore,
    options: &AgentOptions,
    record: &WorkerRecord,
    lease: LeaseId,
) -> Result<(), StoreError> {
    let key = Keys::new(&options.etcd_prefix).worker(&record.worker_id);
    store.put(&key, record.to_json(), Some(lease)).await
}

/// Grants a lease in etcd and writes the worker's key under it.
async fn put_own_key(
    store: &SharedStore,
    options: &AgentOptions,
    worker_id: &str,
    secret_sha256: &str,
    ttl: Duration,
) -> Result<LeaseId, StoreError> {
    let lease = store.grant(ttl).await?;
    put_record(
        store,
        options,
        &own_record(options, worker_id, secret_sha256),
        lease,
    )
    .await?;
    Ok(lease)
}

/// What a truly lost lease means to the worker: it was declared dead, so
/// it is out of its generation and not ready until it registers again.
fn lease_lost(shared: &Shared, reason: &str) {
    shared.metrics.lease_lost();
    shared.registered.store(false, Ordering::Relaxed);
    tracing::error!(worker = %shared.worker_id, %reason, "worker lease lost; registering again");
    shared
        .generations
        .end_current("this worker's lease was lost");
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
        lease_lost(&shared, &reason);
        let mut attempt = 0;
        loop {
            match put_own_key(
                &store,
                &shared.options,
                &shared.worker_id,
                &shared.secret_sha256,
                ttl,
            )
            .await
            {
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

/// Renews the coordinator-held lease every third of the TTL; a lease the
/// coordinator reports expired is replaced by registering again under the
/// same id.
async fn heartbeat(shared: Arc<Shared>, ttl: Duration) {
    loop {
        let reason = heartbeat_until_lost(&shared.coordinators, &shared.worker_id, ttl, |beat| {
            shared.metrics.heartbeat(beat.is_some());
            if let Some(rtt) = beat {
                let rtt = rtt.as_micros().min(u64::MAX as u128) as u64;
                shared.last_heartbeat_us.store(rtt, Ordering::Relaxed);
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                shared.registered.store(true, Ordering::Relaxed);
            }
        })
        .await;
        lease_lost(&shared, &reason);
        let request = v1::RegisterRequest {
            worker_id: shared.worker_id.clone(),
            lease_ttl_s: ttl.as_secs().max(1) as u32,
            ..register_request(&shared.options)
        };
        let mut attempt = 0;
        while let Err(e) = register_rpc(&shared.options, request.clone()).await {
            tracing::warn!(error = %e, "registering again failed; retrying");
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
        shared.registered.store(true, Ordering::Relaxed);
    }
}

/// Renews `worker_id`'s coordinator-held lease every third of the TTL
/// (transient failures are retried quickly within the TTL) until the
/// coordinator reports it expired; why. `beat` hears each renewal's round
/// trip, or `None` for a failed one.
pub(super) async fn heartbeat_until_lost(
    coordinators: &Coordinators,
    worker_id: &str,
    ttl: Duration,
    beat: impl Fn(Option<Duration>),
) -> String {
    let period = ttl / 3;
    let retry = (ttl / 10).max(Duration::from_millis(100));
    let mut next = period;
    loop {
        tokio::time::sleep(next).await;
        let sent = std::time::Instant::now();
        let result = call_leader(coordinators, |mut c| {
            let worker_id = worker_id.to_owned();
            async move { c.heartbeat(v1::HeartbeatRequest { worker_id }).await }
        })
        .await;
        match result {
            Ok(_) => {
                beat(Some(sent.elapsed()));
                next = period;
            }
            Err(AgentError::Refused { status, .. }) if status.code() == Code::NotFound => {
                beat(None);
                return status.message().to_owned();
            }
            Err(e) => {
                beat(None);
                tracing::warn!(error = %e, "heartbeat failed; retrying within the TTL");
                next = retry;
            }
        }
    }
}
