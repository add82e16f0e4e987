//! Keeping the worker alive in the control plane. A worker given etcd
//! endpoints holds its own lease there (its key survives any coordinator
//! failover); otherwise the coordinators hold it and the agent renews it
//! by Heartbeat calls. Either way a lease that is truly lost means the
//! worker was declared dead, so the agent registers again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samtrain_proto::v1;
use tonic::Code;

use super::{backoff, call_leader, AgentError, AgentOptions, Shared};
use crate::auth::secret_digest;
use crate::failover::Coordinators;
use crate::records::{new_worker_identity, now_ms, Keys, WorkerRecord};
use crate::store::{etcd::EtcdStore, LeaseId, LeaseKeeper, SharedStore, StoreError};
use crate::tasks::AbortOnDrop;

/// How the worker's lease is kept.
pub(super) enum LeaseHold {
    /// In etcd, by the agent.
    Etcd {
        store: SharedStore,
        lease: Arc<Mutex<LeaseId>>,
    },
    /// By Heartbeat calls; the coordinator holds the store lease.
    Heartbeat,
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
        if options.etcd.is_empty() {
            let ttl_s = options
                .lease_ttl
                .map(|t| t.as_secs().max(1) as u32)
                .unwrap_or(0);
            let r = register_rpc(options, String::new(), ttl_s).await?;
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
        let ttl = options.lease_ttl.unwrap_or(Duration::from_secs(5));
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
}

impl LeaseHold {
    /// Starts keeping the lease alive for as long as the task lives.
    pub(super) fn keep(&self, shared: Arc<Shared>, ttl: Duration) -> AbortOnDrop<()> {
        AbortOnDrop(match self {
            LeaseHold::Etcd { store, lease } => {
                tokio::spawn(keep_etcd_lease(shared, store.clone(), lease.clone(), ttl))
            }
            LeaseHold::Heartbeat => tokio::spawn(heartbeat(shared, ttl)),
        })
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
            LeaseHold::Heartbeat => {
                let worker_id = shared.worker_id.clone();
                let result = shared
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
    }
}

/// Registers through a coordinator; a fresh address list each time, so a
/// registration starts from the first coordinator as a new worker would.
async fn register_rpc(
    options: &AgentOptions,
    worker_id: String,
    lease_ttl_s: u32,
) -> Result<v1::RegisterResponse, AgentError> {
    let coordinators = Coordinators::new(options.coordinators.clone(), options.credentials.clone());
    let request = v1::RegisterRequest {
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        worker_id,
        lease_id: 0,
        lease_ttl_s,
        node: options.node.clone(),
    };
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

/// Grants a lease in etcd and writes the worker's key under it.
async fn put_own_key(
    store: &SharedStore,
    options: &AgentOptions,
    worker_id: &str,
    secret_sha256: &str,
    ttl: Duration,
) -> Result<LeaseId, StoreError> {
    let lease = store.grant(ttl).await?;
    let record = WorkerRecord {
        worker_id: worker_id.to_owned(),
        name: options.name.clone(),
        advertise: options.advertise.clone(),
        device: options.device.clone(),
        registered_unix_ms: now_ms(),
        node: options.node.clone(),
        own_lease: true,
        secret_sha256: secret_sha256.to_owned(),
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
        shared.metrics.lease_lost();
        shared.registered.store(false, Ordering::Relaxed);
        tracing::error!(worker = %shared.worker_id, %reason, "worker lease lost; registering again");
        shared
            .generations
            .end_current("this worker's lease was lost");
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
        let sent = std::time::Instant::now();
        let result = shared
            .call(|mut c| {
                let worker_id = worker_id.clone();
                async move { c.heartbeat(v1::HeartbeatRequest { worker_id }).await }
            })
            .await;
        match result {
            Ok(_) => {
                let rtt = sent.elapsed().as_micros().min(u64::MAX as u128) as u64;
                shared.last_heartbeat_us.store(rtt, Ordering::Relaxed);
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                shared.metrics.heartbeat(true);
                shared.registered.store(true, Ordering::Relaxed);
                next = period;
            }
            Err(AgentError::Refused { status, .. }) if status.code() == Code::NotFound => {
                shared.metrics.heartbeat(false);
                shared.metrics.lease_lost();
                shared.registered.store(false, Ordering::Relaxed);
                tracing::error!(worker = %shared.worker_id, reason = status.message(), "worker lease lost; registering again");
                shared
                    .generations
                    .end_current("this worker's lease was lost");
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
                shared.metrics.heartbeat(false);
                tracing::warn!(error = %e, "heartbeat failed; retrying within the TTL");
                next = retry;
            }
        }
    }
}
