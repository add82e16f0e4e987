//! The in-process [`Store`] of embedded mode, with etcd's semantics: one
//! revision counter, leases whose expiry deletes their keys (a background
//! reaper checks every 25 ms), and prefix watches that see those deletes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Compare, KeyValue, LeaseId, Op, Store, StoreError, WatchEvent, WatchStream};

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    revision: i64,
    next_lease: LeaseId,
    keys: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<(String, mpsc::Sender<WatchEvent>)>,
}

impl State {
    fn notify(&mut self, event: WatchEvent) {
        let key = match &event {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key } => key,
        };
        let key = key.clone();
        // A watcher that cannot keep up is dropped, as etcd cancels a slow
        // watch; the owner sees its channel close and watches again.
        self.watchers.retain(|(prefix, tx)| {
            !key.starts_with(prefix.as_str()) || tx.try_send(event.clone()).is_ok()
        });
    }

    fn put(&mut self, key: String, value: Vec<u8>, lease: Option<LeaseId>) {
        self.revision += 1;
        let kv = KeyValue {
            key: key.clone(),
            value,
            lease,
            mod_revision: self.revision,
        };
        self.keys.insert(key, kv.clone());
        self.notify(WatchEvent::Put(kv));
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.keys.remove(key).is_some() {
            self.revision += 1;
            self.notify(WatchEvent::Delete {
                key: key.to_owned(),
            });
            true
        } else {
            false
        }
    }

    fn end_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let doomed: Vec<String> = self
            .keys
            .values()
            .filter(|kv| kv.lease == Some(lease))
            .map(|kv| kv.key.clone())
            .collect();
        for key in doomed {
            self.delete(&key);
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            self.end_lease(lease);
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::ValueEquals(k, v) => self.keys.get(k).is_some_and(|kv| &kv.value == v),
            Compare::Absent(k) => !self.keys.contains_key(k),
            Compare::ModRevision(k, r) => {
                self.keys.get(k).map(|kv| kv.mod_revision).unwrap_or(0) == *r
            }
        }
    }
}

/// The in-memory store. Cheap to share: clones see the same keys.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// A new, empty store; starts its lease reaper on the current tokio
    /// runtime (it stops when the store is dropped).
    pub fn new() -> MemoryStore {
        let state = Arc::new(Mutex::new(State {
            next_lease: 0x5a00_0000,
            ..State::default()
        }));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let mut s = state.lock().expect("memory store lock");
                s.expire(Instant::now());
            }
        });
        MemoryStore { state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().expect("memory store lock");
        // Expire on every access too, so no caller sees a dead lease's key
        // between two reaper ticks.
        s.expire(Instant::now());
        s
    }

    fn check_lease(s: &State, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(l) if !s.leases.contains_key(&l) => Err(StoreError::LeaseNotFound {
                store: "memory".to_owned(),
                lease: l,
            }),
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".to_owned()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().keys.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let s = self.lock();
        Ok(s.keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let mut s = self.lock();
        Self::check_lease(&s, lease)?;
        s.put(key.to_owned(), value, lease);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().delete(key))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let mut s = self.lock();
        if !compares.iter().all(|c| s.holds(c)) {
            return Ok(false);
        }
        for op in &ops {
            if let Op::Put { lease, .. } = op {
                Self::check_lease(&s, *lease)?;
            }
        }
        for op in ops {
            match op {
                Op::Put { key, value, lease } => s.put(key, value, lease),
                Op::Delete { key } => {
                    s.delete(&key);
                }
            }
        }
        Ok(true)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut s = self.lock();
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut s = self.lock();
        match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(l.ttl)
            }
            None => Err(StoreError::LeaseNotFound {
                store: "memory".to_owned(),
                lease,
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lock().end_lease(lease);
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        self.lock().watchers.push((prefix.to_owned(), tx));
        Ok(rx)
    }
}
