//! The store behind the control plane: one trait with the few etcd v3
//! operations the coordinator needs (keys, prefix ranges, a compare-and-put
//! transaction, leases, prefix watches), implemented on etcd ([`etcd`]) and
//! in process ([`memory`], embedded mode) with the same semantics, so every
//! other module runs unchanged on either.

pub mod etcd;

pub use etcd::EtcdAccess;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

/// An etcd lease id (memory leases use the same numbering space).
pub type LeaseId = i64;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The lease the key lives by, if any.
    pub lease: Option<LeaseId>,
    /// The store revision of the key's last change.
    pub mod_revision: i64,
}

/// A condition of [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists and holds exactly this value.
    ValueEquals(String, Vec<u8>),
    /// The key does not exist.
    Absent(String),
    /// The key's last change was at this revision (0: it does not exist).
    ModRevision(String, i64),
}

/// A write of [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A change seen by [`Store::watch_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// A delete, explicit or by the expiry or revocation of the key's lease.
    Delete {
        key: String,
    },
}

/// Changes under a prefix, in order. The channel closes when the watch
/// breaks (the store went away); watch again to go on.
pub type WatchStream = mpsc::Receiver<WatchEvent>;

/// What went wrong talking to the store. Every message names the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd at {endpoints} unreachable: {message}")]
    Unreachable { endpoints: String, message: String },
    #[error("{store}: {operation} failed: {message}")]
    Operation {
        store: String,
        operation: String,
        message: String,
    },
    #[error("{store}: {operation} timed out after {timeout:?}")]
    Timeout {
        store: String,
        operation: String,
        timeout: Duration,
    },
    /// The lease expired or was revoked: only this counts as a lost lease.
    #[error("lease {lease:x} not found in {store} (expired or revoked)")]
    LeaseNotFound { store: String, lease: LeaseId },
}

/// The store operations of the control plane.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for messages: `etcd [http://...]` or `memory`.
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError>;
    /// True when the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Applies every op when every compare holds; true when applied.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError>;
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease; its remaining TTL, or [`StoreError::LeaseNotFound`].
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    /// Ends a lease now, deleting its keys (no error when already gone).
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream, StoreError>;
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// Opens etcd at `endpoints` with `access`, or the in-memory store when
/// there are none. An unreachable etcd fails within a few seconds, naming
/// the endpoints.
pub async fn open(endpoints: &[String], access: &EtcdAccess) -> Result<SharedStore, StoreError> {
    if endpoints.is_empty() {
        Ok(Arc::new(memory::MemoryStore::new()))
    } else {
        Ok(Arc::new(etcd::EtcdStore::connect(endpoints, access).await?))
    }
}

/// Keeps a lease alive in the background: renews every third of its TTL
/// and, when a renewal fails for a transient reason, retries until the TTL
/// since the last success has run out. Only [`StoreError::LeaseNotFound`]
/// (or the TTL passing without one success) counts as lost, which a
/// transient etcd error alone must never cause.
pub struct LeaseKeeper {
    task: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<Option<String>>,
}

impl LeaseKeeper {
    pub fn start(store: SharedStore, lease: LeaseId, ttl: Duration) -> LeaseKeeper {
        let (tx, lost) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            let period = ttl / 3;
            let retry = (ttl / 10).max(Duration::from_millis(50));
            let mut last_ok = tokio::time::Instant::now();
            let mut next = period;
            loop {
                tokio::time::sleep(next).await;
                match store.keep_alive(lease).await {
                    Ok(_) => {
                        last_ok = tokio::time::Instant::now();
                        next = period;
                    }
                    Err(e @ StoreError::LeaseNotFound { .. }) => {
                        let _ = tx.send(Some(e.to_string()));
                        return;
                    }
                    Err(e) => {
                        if last_ok.elapsed() >= ttl {
                            let _ = tx.send(Some(format!(
                                "lease {lease:x} not renewed within its TTL of {ttl:?}: {e}"
                            )));
                            return;
                        }
                        tracing::warn!(lease = format!("{lease:x}"), error = %e, "lease renewal failed; retrying within the TTL");
                        next = retry;
                    }
                }
            }
        });
        LeaseKeeper { task, lost }
    }

    /// Waits until the lease is lost; the reason.
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(reason) = self.lost.borrow_and_update().clone() {
                return reason;
            }
            if self.lost.changed().await.is_err() {
                return "lease keeper stopped".to_owned();
            }
        }
    }

    /// Whether the lease was lost.
    pub fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
