//! Leader election through a lease on one key (`<prefix>/leader`): the
//! coordinator that creates the key under its own lease leads while it
//! keeps the lease alive; a standby polls the key and takes over once the
//! leader's lease expires (after its TTL, 5 s by default) or is revoked by a
//! clean shutdown. With the in-memory store the only coordinator wins at
//! once. Every job write of the leader is guarded by [`Election::guard`],
//! so a deposed leader that has not noticed yet cannot overwrite its
//! successor's state.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{Compare, LeaseId, Op, SharedStore, StoreError};

/// Who leads, as stored in the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub node_id: String,
    /// The leader's gRPC address, as clients should dial it.
    pub address: String,
}

/// What this node knows about the election.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderState {
    /// This node leads.
    pub is_leader: bool,
    /// The current leader, when known (this node when it leads).
    pub leader: Option<LeaderInfo>,
    /// The last store call of the election succeeded.
    pub store_ok: bool,
}

/// This node's part in the election; the campaign runs in the background.
pub struct Election {
    state: watch::Receiver<LeaderState>,
    tx: Arc<watch::Sender<LeaderState>>,
    key: String,
    me: Vec<u8>,
    lease: Arc<std::sync::Mutex<Option<LeaseId>>>,
    store: SharedStore,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Starts campaigning for `<prefix>/leader` with leases of `ttl`.
    pub fn start(store: SharedStore, prefix: &str, me: LeaderInfo, ttl: Duration) -> Election {
        let key = format!("{prefix}/leader");
        let value = serde_json::to_vec(&me).expect("leader info serialises");
        let (tx, state) = watch::channel(LeaderState::default());
        let tx = Arc::new(tx);
        let lease = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(campaign(
            store.clone(),
            key.clone(),
            value.clone(),
            me,
            ttl,
            tx.clone(),
            lease.clone(),
        ));
        Election {
            state,
            tx,
            key,
            me: value,
            lease,
            store,
            task,
        }
    }

    pub fn state(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change of [`LeaderState`].
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    /// The compare that holds only while this node leads.
    pub fn guard(&self) -> Compare {
        Compare::ValueEquals(self.key.clone(), self.me.clone())
    }

    /// Stops campaigning and, when leading, hands the leadership over at
    /// once by revoking the lease (a standby need not wait for the TTL).
    pub async fn resign(&self) {
        self.task.abort();
        self.tx.send_modify(|s| {
            s.is_leader = false;
            s.leader = None;
        });
        let lease = self.lease.lock().expect("election lease lock").take();
        if let Some(lease) = lease {
            let _ = self
                .store
                .txn(
                    vec![Compare::ValueEquals(self.key.clone(), self.me.clone())],
                    vec![Op::Delete {
                        key: self.key.clone(),
                    }],
                )
                .await;
            let _ = self.store.revoke(lease).await;
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn campaign(
    store: SharedStore,
    key: String,
    value: Vec<u8>,
    me: LeaderInfo,
    ttl: Duration,
    tx: Arc<watch::Sender<LeaderState>>,
    lease_slot: Arc<std::sync::Mutex<Option<LeaseId>>>,
) {
    // A standby checks often enough to take over well within a second of
    // the old lease's expiry; the leader renews at a third of the TTL.
    let poll = (ttl / 20).clamp(Duration::from_millis(50), Duration::from_millis(250));
    let set = |state: LeaderState| {
        tx.send_if_modified(|s| {
            if *s != state {
                *s = state;
                true
            } else {
                false
            }
        });
    };
    loop {
        match try_lead(&store, &key, &value, ttl).await {
            Ok(Ok(lease)) => {
                *lease_slot.lock().expect("election lease lock") = Some(lease);
                tracing::info!(node = %me.node_id, store = %store.describe(), "leading");
                set(LeaderState {
                    is_leader: true,
                    leader: Some(me.clone()),
                    store_ok: true,
                });
                let reason = hold(&store, &key, &value, lease, ttl, &tx).await;
                tracing::warn!(node = %me.node_id, %reason, "lost the leadership");
                *lease_slot.lock().expect("election lease lock") = None;
                set(LeaderState {
                    is_leader: false,
                    leader: None,
                    store_ok: false,
                });
            }
            Ok(Err(leader)) => set(LeaderState {
                is_leader: false,
                leader,
                store_ok: true,
            }),
            Err(e) => {
                tracing::warn!(node = %me.node_id, error = %e, "election: store unavailable");
                set(LeaderState {
                    is_leader: false,
                    leader: None,
                    store_ok: false,
                });
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Ok(Ok(lease)) when this node now leads, Ok(Err(leader)) when another
/// does (or the key just vanished).
async fn try_lead(
    store: &SharedStore,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<Result<LeaseId, Option<LeaderInfo>>, StoreError> {
    if let Some(kv) = store.get(key).await? {
        return Ok(Err(serde_json::from_slice(&kv.value).ok()));
    }
    let lease = store.grant(ttl).await?;
    let won = store
        .txn(
            vec![Compare::Absent(key.to_owned())],
            vec![Op::Put {
                key: key.to_owned(),
                value: value.to_vec(),
                lease: Some(lease),
            }],
        )
        .await;
    match won {
        Ok(true) => Ok(Ok(lease)),
        Ok(false) => {
            let _ = store.revoke(lease).await;
            Ok(Err(None))
        }
        Err(e) => {
            let _ = store.revoke(lease).await;
            Err(e)
        }
    }
}

/// Keeps the leadership until the lease is lost or the key changes hands;
/// returns why it ended. Transient store errors are retried within the TTL.
async fn hold(
    store: &SharedStore,
    key: &str,
    value: &[u8],
    lease: LeaseId,
    ttl: Duration,
    tx: &watch::Sender<LeaderState>,
) -> String {
    let period = ttl / 3;
    let retry = (ttl / 10).max(Duration::from_millis(50));
    let mut last_ok = tokio::time::Instant::now();
    let mut next = period;
    loop {
        tokio::time::sleep(next).await;
        let renewed = async {
            store.keep_alive(lease).await?;
            store.get(key).await
        };
        match renewed.await {
            Ok(Some(kv)) if kv.value == value => {
                last_ok = tokio::time::Instant::now();
                next = period;
                tx.send_if_modified(|s| !std::mem::replace(&mut s.store_ok, true));
            }
            Ok(_) => return "the leader key now names another node".to_owned(),
            Err(e @ StoreError::LeaseNotFound { .. }) => return e.to_string(),
            Err(e) => {
                tx.send_if_modified(|s| std::mem::replace(&mut s.store_ok, false));
                if last_ok.elapsed() >= ttl {
                    return format!("lease not renewed within its TTL of {ttl:?}: {e}");
                }
                tracing::warn!(error = %e, "leader lease renewal failed; retrying within the TTL");
                next = retry;
            }
        }
    }
}
