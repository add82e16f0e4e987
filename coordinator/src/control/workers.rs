//! The worker registry: registration, the leases the coordinator keeps for
//! workers that do not hold their own, deregistration, and the
//! subscriptions through which the leader hands out assignments. Any
//! coordinator, standby or leader, can register a worker and renew its
//! lease (they only touch the store); only the leader takes subscriptions.

use std::time::Duration;

use samtrain_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use super::{store_status, worker_event, Control, Subscriber, View, WorkerFeed};
use crate::jobs::JobState;
use crate::records::{new_worker_id, now_ms, WorkerRecord};
use crate::store::{LeaseId, StoreError};

/// What the leader sends one subscribed worker.
pub(crate) type WorkerEvents = mpsc::Receiver<Result<v1::WorkerEvent, Status>>;

/// Whether peers can dial an advertised collective address.
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

impl Control {
    /// Stores a worker's record under its lease: the worker's own lease
    /// when it names one, else a new one this coordinator keeps alive on
    /// its Heartbeat calls.
    pub(crate) async fn register_worker(
        &self,
        r: v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, Status> {
        if !is_host_port(&r.advertise) {
            return Err(Status::invalid_argument(format!(
                "advertise address `{}` must be host:port (where peers reach this worker's collectives)",
                r.advertise
            )));
        }
        let worker_id = if r.worker_id.is_empty() {
            new_worker_id(&r.name)
        } else {
            r.worker_id.clone()
        };
        let ttl_s = if r.lease_ttl_s == 0 {
            self.lease_ttl.as_secs().max(1) as u32
        } else {
            r.lease_ttl_s
        };
        let own_lease = r.lease_id != 0;
        let lease = if own_lease {
            r.lease_id
        } else {
            self.store
                .grant(Duration::from_secs(ttl_s as u64))
                .await
                .map_err(store_status)?
        };
        let record = WorkerRecord {
            worker_id: worker_id.clone(),
            name: r.name.clone(),
            advertise: r.advertise.clone(),
            device: r.device.clone(),
            registered_unix_ms: now_ms(),
            own_lease,
        };
        self.store
            .put(&self.keys.worker(&worker_id), record.to_json(), Some(lease))
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound { .. } => {
                    Status::failed_precondition(format!("cannot register worker {worker_id}: {e}"))
                }
                e => store_status(e),
            })?;
        tracing::info!(worker = %worker_id, advertise = %r.advertise, device = %r.device, own_lease, "worker registered");
        self.wake.notify_one();
        Ok(v1::RegisterResponse {
            worker_id,
            lease_id: lease,
            lease_ttl_s: ttl_s,
        })
    }

    /// Renews the lease of a heartbeat worker; its TTL.
    pub(crate) async fn heartbeat(&self, worker_id: &str) -> Result<Duration, Status> {
        let (_, lease) = self.worker(worker_id).await?;
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
    pub(crate) async fn deregister(&self, worker_id: &str) -> Result<bool, Status> {
        let Ok((_, lease)) = self.worker(worker_id).await else {
            return Ok(false);
        };
        let result = match lease {
            Some(lease) => self.store.revoke(lease).await,
            None => self
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
        current: Option<v1::CurrentGeneration>,
    ) -> Result<WorkerEvents, Status> {
        // A standby says so before the store is asked about the worker.
        self.ensure_leader()?;
        let (record, _) = self.worker(worker_id).await?;
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
/// (busy, the returned generation) while that generation runs with it, and
/// is told the generation ended otherwise, unless it completed.
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
        }
        None => {
            let _ = feed.try_send(ended(format!("no job {}", cur.job_id)));
        }
    }
    None
}
