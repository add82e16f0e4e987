//! What the leader and the workers' agents agree on in the store: where
//! each kind of record lives under the prefix, the record of a registered
//! worker, and how ids and timestamps are made. Both sides write worker
//! keys (the leader for heartbeat workers, the agent for workers that hold
//! their own etcd lease), so this layout is shared rather than owned by
//! either.

use serde::{Deserialize, Serialize};

use crate::auth;

/// A registered worker, stored under `<prefix>/workers/<id>` with the
/// worker's lease: the key exists exactly as long as the worker is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub worker_id: String,
    pub name: String,
    pub advertise: String,
    pub device: String,
    pub registered_unix_ms: i64,
    /// The machine it runs on: workers with the same node share fast links
    /// (NVLink, shared memory), and a tensor-parallel group stays inside
    /// one. Empty in records from before nodes (see [`WorkerRecord::node`]).
    #[serde(default)]
    pub node: String,
    /// The worker keeps its lease alive in etcd itself (else Heartbeat).
    pub own_lease: bool,
    /// SHA-256 (hex) of the secret the worker presents on every call; a
    /// record without one (written by an older samtrain) admits no call.
    #[serde(default)]
    pub secret_sha256: String,
    /// A node's agent (`samtrain worker --slots N`): the rank processes it
    /// runs, whose records live under this record's lease. Never trains
    /// itself. 0 for a worker that trains.
    #[serde(default)]
    pub slots: u32,
    /// A rank process of a node: the id of the node's agent, whose lease
    /// its record lives under (the node's ranks go together when the node
    /// does). Empty for a worker with a lease of its own.
    #[serde(default)]
    pub node_agent: String,
}

impl WorkerRecord {
    /// The node: as registered, else the host of the advertised address
    /// (workers on one host are one machine).
    pub fn node(&self) -> &str {
        node_or_host(&self.node, &self.advertise)
    }

    /// Whether this is a node's agent rather than a worker that trains.
    pub fn is_node_agent(&self) -> bool {
        self.slots > 0
    }

    /// The stored form.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("worker record serialises")
    }
}

/// The key layout under one store prefix: `<prefix>/jobs/<id>` holds a
/// [`crate::jobs::JobRecord`], `<prefix>/workers/<id>` a [`WorkerRecord`],
/// `<prefix>/drained/<id>` marks a drained worker (when, Unix ms),
/// `<prefix>/node-ranks/<agent id>` the rank process a node's agent
/// admitted last (its revision orders the agent's admissions).
/// (The election's `<prefix>/leader` is the election's own business.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` with or without a trailing `/`.
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    pub(crate) fn job(&self, id: &str) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }

    /// The range of every job record.
    pub(crate) fn jobs(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    pub(crate) fn worker(&self, id: &str) -> String {
        format!("{}/workers/{id}", self.prefix)
    }

    /// The range of every live worker's record.
    pub(crate) fn workers(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// Rewritten with each rank process of node agent `agent_id` that the
    /// coordinator admits, in the same transaction as its record: an
    /// admission counted against an older revision of it fails.
    pub(crate) fn node_ranks(&self, agent_id: &str) -> String {
        format!("{}/node-ranks/{agent_id}", self.prefix)
    }

    pub(crate) fn drained_worker(&self, id: &str) -> String {
        format!("{}/drained/{id}", self.prefix)
    }

    /// The range of every drained worker's mark.
    pub(crate) fn drained(&self) -> String {
        format!("{}/drained/", self.prefix)
    }
}

/// Hex digits of the secret's digest that end a worker id.
const ID_DIGEST_DIGITS: usize = 16;

/// A fresh worker identity: its id and the secret that proves it. The id is
/// the readable name, made safe for keys and host names (lower-case ASCII
/// letters, digits and `-`), and the first 64 bits of the secret's SHA-256,
/// so a worker that lost its lease, and with it its record, can still prove
/// the id is its own when it registers again.
pub fn new_worker_identity(name: &str) -> (String, String) {
    let secret = auth::new_secret();
    (worker_id_for(name, &secret), secret)
}

/// The id of the worker named `name` holding `secret`.
fn worker_id_for(name: &str, secret: &str) -> String {
    let stem: String = name
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '-' {
                ch.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let stem = if stem.is_empty() { "worker" } else { &stem };
    let digest = auth::secret_digest(secret);
    format!("{stem}-{}", &digest[..ID_DIGEST_DIGITS])
}

/// Whether `worker_id` is the id of a holder of `secret`.
pub(crate) fn id_belongs_to(worker_id: &str, secret: &str) -> bool {
    let digest = auth::secret_digest(secret);
    worker_id
        .rsplit_once('-')
        .is_some_and(|(_, tail)| tail == &digest[..ID_DIGEST_DIGITS])
}

/// A short random suffix for ids (`<name>-<6 hex digits>`).
pub(crate) fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_i64(now_ms());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `node`, or when empty (a worker that named none, a record from before
/// nodes) the host of `advertise`.
pub(crate) fn node_or_host<'a>(node: &'a str, advertise: &'a str) -> &'a str {
    if node.is_empty() {
        host_of(advertise)
    } else {
        node
    }
}

/// The host of `host:port` (an IPv6 address keeps its brackets): the node
/// of a worker that names none.
pub fn host_of(advertise: &str) -> &str {
    advertise
        .rsplit_once(':')
        .map_or(advertise, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_a_trailing_slash_of_the_prefix() {
        let keys = Keys::new("/samtrain/");
        assert_eq!(keys.job("a-1"), "/samtrain/jobs/a-1");
        assert_eq!(keys.worker("w-1"), "/samtrain/workers/w-1");
        assert!(keys.worker("w-1").starts_with(&keys.workers()));
        assert!(keys.job("a-1").starts_with(&keys.jobs()));
    }

    #[test]
    fn worker_ids_start_with_the_name_made_safe() {
        let (id, secret) = new_worker_identity("Node_7.local");
        assert!(id.starts_with("node-7-local-"), "{id}");
        assert!(new_worker_identity("").0.starts_with("worker-"));
        assert!(id_belongs_to(&id, &secret));
        let (_, other) = new_worker_identity("Node_7.local");
        assert!(!id_belongs_to(&id, &other));
    }
}
