//! A node's agent (`samtrain worker --slots N`) and the one lease its rank
//! processes share. The agent registers the node as a worker record with
//! `slots = N` that never trains, keeps that record's lease alive (in etcd
//! itself, or by Heartbeat calls), and gives each slot an identity of its
//! own. Each rank process writes its record under the node's lease (in
//! etcd, or through a coordinator that checks the agent's secret and
//! slots), so:
//!
//! - a node that dies takes every rank with it at once (its lease expires);
//! - a rank process that dies is removed at once by the agent (its key is
//!   deleted, so its generation ends on the leader's next tick), and the
//!   process started again registers under the same identity;
//! - a lost node lease stops the node's rank processes at once (the
//!   leader gives their work to others, so they must not train on), and
//!   once the node is registered again they start under the new lease
//!   ([`NodeAgent::lease_lost`], [`NodeAgent::epoch`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use samtrain_proto::v1;

use super::lease::{
    deregister, heartbeat_until_lost, own_record, put_record, register_request, register_rpc,
    ETCD_LEASE_TTL,
};
use super::{backoff, AgentError, AgentOptions};
use crate::auth::secret_digest;
use crate::failover::Coordinators;
use crate::records::{new_worker_identity, Keys};
use crate::store::{etcd::EtcdStore, LeaseId, LeaseKeeper, SharedStore};

/// The environment through which a node's agent tells a rank process who
/// it is and where its lease is (internal to `samtrain worker --slots`).
const ENV_AGENT: &str = "SAMTRAIN_NODE_AGENT";
const ENV_AGENT_SECRET: &str = "SAMTRAIN_NODE_AGENT_SECRET";
const ENV_LEASE: &str = "SAMTRAIN_NODE_LEASE";
const ENV_WORKER_ID: &str = "SAMTRAIN_RANK_WORKER_ID";
const ENV_WORKER_SECRET: &str = "SAMTRAIN_RANK_WORKER_SECRET";

/// What a rank process of a node is given by the node's agent: its
/// identity and the lease its record lives under.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeMembership {
    pub agent_id: String,
    pub worker_id: String,
    pub worker_secret: String,
    pub lease: NodeLease,
}

impl std::fmt::Debug for NodeMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeMembership({} of {})", self.worker_id, self.agent_id)
    }
}

/// Where the node's lease is.
#[derive(Clone, PartialEq, Eq)]
pub enum NodeLease {
    /// In etcd: the rank writes its record under it.
    Etcd { lease: LeaseId },
    /// Held by the coordinators: the rank registers through one, proving
    /// with the agent's secret that it is one of the agent's.
    Coordinator { agent_secret: String },
}

impl NodeMembership {
    /// The environment variables that carry it to a rank process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (ENV_AGENT, self.agent_id.clone()),
            (ENV_WORKER_ID, self.worker_id.clone()),
            (ENV_WORKER_SECRET, self.worker_secret.clone()),
        ];
        match &self.lease {
            NodeLease::Etcd { lease } => env.push((ENV_LEASE, lease.to_string())),
            NodeLease::Coordinator { agent_secret } => {
                env.push((ENV_AGENT_SECRET, agent_secret.clone()))
            }
        }
        env
    }

    /// This process's membership, when a node's agent started it; an
    /// error names the variable that is missing or malformed.
    pub fn from_env() -> Result<Option<NodeMembership>, String> {
        NodeMembership::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<NodeMembership>, String> {
        let Some(agent_id) = var(ENV_AGENT) else {
            return Ok(None);
        };
        let required =
            |name: &str| var(name).ok_or_else(|| format!("{ENV_AGENT} is set but {name} is not"));
        let lease = match var(ENV_LEASE) {
            Some(lease) => NodeLease::Etcd {
                lease: lease
                    .parse()
                    .map_err(|_| format!("{ENV_LEASE} must be an etcd lease id, not `{lease}`"))?,
            },
            None => NodeLease::Coordinator {
                agent_secret: required(ENV_AGENT_SECRET)?,
            },
        };
        Ok(Some(NodeMembership {
            agent_id,
            worker_id: required(ENV_WORKER_ID)?,
            worker_secret: required(ENV_WORKER_SECRET)?,
            lease,
        }))
    }
}

/// How the node's lease is held.
enum Hold {
    /// In etcd, by this agent (the lease changes when it is granted anew).
    Etcd {
        store: SharedStore,
        lease: Mutex<LeaseId>,
    },
    /// By Heartbeat calls to the coordinators.
    Coordinator { coordinators: Coordinators },
}

/// A node's agent: the node's lease and its slots' identities.
pub struct NodeAgent {
    options: AgentOptions,
    slots: u32,
    agent_id: String,
    agent_secret: String,
    ttl: Duration,
    hold: Hold,
    /// Each slot's (worker id, secret): the same across its restarts.
    ranks: Vec<(String, String)>,
    /// How many times the lease was lost and registered again.
    epoch: AtomicU64,
    /// Set from the lease's loss until the node is registered again.
    lost: AtomicBool,
}

impl NodeAgent {
    /// Registers the node (retrying for up to 30 s while no coordinator
    /// answers). `options.name` names the node's agent and, with `-slot<s>`,
    /// its ranks.
    pub async fn register(options: AgentOptions, slots: u32) -> Result<NodeAgent, AgentError> {
        let ranks = (0..slots)
            .map(|s| new_worker_identity(&format!("{}-slot{s}", options.name)))
            .collect();
        let (agent_id, agent_secret, ttl, hold) = if options.etcd.is_empty() {
            let r = register_rpc(&options, node_request(&options, slots, "")).await?;
            options.credentials.set_worker_secret(&r.worker_secret);
            let coordinators =
                Coordinators::new(options.coordinators.clone(), options.credentials.clone());
            (
                r.worker_id,
                r.worker_secret,
                Duration::from_secs(r.lease_ttl_s.max(1) as u64),
                Hold::Coordinator { coordinators },
            )
        } else {
            let store: SharedStore =
                Arc::new(EtcdStore::connect(&options.etcd, &options.etcd_access).await?);
            let (agent_id, agent_secret) = new_worker_identity(&options.name);
            let ttl = options.lease_ttl.unwrap_or(ETCD_LEASE_TTL);
            let lease =
                grant_node_lease(&store, &options, &agent_id, &agent_secret, slots, ttl).await?;
            let hold = Hold::Etcd {
                store,
                lease: Mutex::new(lease),
            };
            (agent_id, agent_secret, ttl, hold)
        };
        tracing::info!(agent = %agent_id, slots, ttl = ?ttl, etcd = !options.etcd.is_empty(), "node registered");
        Ok(NodeAgent {
            options,
            slots,
            agent_id,
            agent_secret,
            ttl,
            hold,
            ranks,
            epoch: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// What slot `slot`'s rank process is given.
    pub fn membership(&self, slot: u32) -> NodeMembership {
        let (worker_id, worker_secret) = self.ranks[slot as usize].clone();
        let lease = match &self.hold {
            Hold::Etcd { lease, .. } => NodeLease::Etcd {
                lease: *lease.lock().expect("node lease lock"),
            },
            Hold::Coordinator { .. } => NodeLease::Coordinator {
                agent_secret: self.agent_secret.clone(),
            },
        };
        NodeMembership {
            agent_id: self.agent_id.clone(),
            worker_id,
            worker_secret,
            lease,
        }
    }

    /// Rises each time the node's lease was lost and registered again:
    /// the rank processes stopped then start again under the new one.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether the node's lease is lost and not yet registered again: the
    /// node is out of the cluster, and its rank processes must not run.
    pub fn lease_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Keeps the node's lease alive for as long as the future runs; a lease
    /// truly lost (the node was declared dead, and its ranks with it) is
    /// registered again and the epoch rises.
    pub async fn keep(&self) {
        loop {
            let reason = match &self.hold {
                Hold::Etcd { store, lease } => {
                    let id = *lease.lock().expect("node lease lock");
                    LeaseKeeper::start(store.clone(), id, self.ttl).lost().await
                }
                Hold::Coordinator { coordinators } => {
                    heartbeat_until_lost(coordinators, &self.agent_id, self.ttl, |_| {}).await
                }
            };
            self.lost.store(true, Ordering::SeqCst);
            tracing::error!(agent = %self.agent_id, %reason, "the node's lease was lost; registering the node again");
            let mut attempt = 0;
            while let Err(e) = self.register_again().await {
                tracing::warn!(error = %e, "registering the node again failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.lost.store(false, Ordering::SeqCst);
        }
    }

    async fn register_again(&self) -> Result<(), AgentError> {
        match &self.hold {
            Hold::Etcd { store, lease } => {
                let new = grant_node_lease(
                    store,
                    &self.options,
                    &self.agent_id,
                    &self.agent_secret,
                    self.slots,
                    self.ttl,
                )
                .await?;
                *lease.lock().expect("node lease lock") = new;
            }
            Hold::Coordinator { .. } => {
                let request = node_request(&self.options, self.slots, &self.agent_id);
                register_rpc(&self.options, request).await?;
            }
        }
        Ok(())
    }

    /// Removes slot `slot`'s record at once (its process died), so its
    /// generation ends now rather than when the others notice.
    pub async fn remove_rank(&self, slot: u32) -> Result<(), AgentError> {
        let (worker_id, secret) = &self.ranks[slot as usize];
        match &self.hold {
            Hold::Etcd { store, .. } => {
                store
                    .delete(&Keys::new(&self.options.etcd_prefix).worker(worker_id))
                    .await?;
            }
            Hold::Coordinator { .. } => {
                // As the rank itself: with its secret.
                let credentials = self.options.credentials.for_another_worker();
                credentials.set_worker_secret(secret);
                let coordinators =
                    Coordinators::new(self.options.coordinators.clone(), credentials);
                deregister(&coordinators, worker_id).await?;
            }
        }
        tracing::info!(slot, worker = %worker_id, "dead rank process removed");
        Ok(())
    }

    /// Ends the node's lease now: its record and every rank's go at once.
    pub async fn release(&self) {
        let result = match &self.hold {
            Hold::Etcd { store, lease } => {
                let id = *lease.lock().expect("node lease lock");
                store.revoke(id).await.map_err(AgentError::from)
            }
            Hold::Coordinator { coordinators } => deregister(coordinators, &self.agent_id).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not end the node's lease; it will expire");
        }
    }
}

/// The request that registers a node's agent (`worker_id` empty the first
/// time; its own id when registering again).
fn node_request(options: &AgentOptions, slots: u32, worker_id: &str) -> v1::RegisterRequest {
    v1::RegisterRequest {
        worker_id: worker_id.to_owned(),
        slots,
        lease_ttl_s: options
            .lease_ttl
            .map(|t| t.as_secs().max(1) as u32)
            .unwrap_or(0),
        ..register_request(options)
    }
}

/// Grants the node's lease in etcd and writes the agent's record under it.
async fn grant_node_lease(
    store: &SharedStore,
    options: &AgentOptions,
    agent_id: &str,
    agent_secret: &str,
    slots: u32,
    ttl: Duration,
) -> Result<LeaseId, AgentError> {
    let lease = store.grant(ttl).await?;
    let mut record = own_record(options, agent_id, &secret_digest(agent_secret));
    record.slots = slots;
    put_record(store, options, &record, lease).await?;
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_membership_travels_through_the_environment() {
        for lease in [
            NodeLease::Etcd { lease: 0x7f3a },
            NodeLease::Coordinator {
                agent_secret: "s3cret".to_owned(),
            },
        ] {
            let membership = NodeMembership {
                agent_id: "node-a-0123".to_owned(),
                worker_id: "node-a-slot1-4567".to_owned(),
                worker_secret: "abc".to_owned(),
                lease,
            };
            let env: HashMap<_, _> = membership.env().into_iter().collect();
            let read = NodeMembership::from_vars(|name| env.get(name).cloned());
            assert_eq!(read, Ok(Some(membership)));
        }
    }

    #[test]
    fn a_missing_or_malformed_variable_is_named() {
        let vars = |pairs: &[(&'static str, &str)]| -> HashMap<&'static str, String> {
            pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        let read =
            |env: HashMap<&str, String>| NodeMembership::from_vars(|name| env.get(name).cloned());
        assert_eq!(read(vars(&[])), Ok(None));
        let partial = vars(&[(ENV_AGENT, "a"), (ENV_LEASE, "12")]);
        assert!(read(partial).unwrap_err().contains(ENV_WORKER_ID));
        let bad = vars(&[
            (ENV_AGENT, "a"),
            (ENV_LEASE, "twelve"),
            (ENV_WORKER_ID, "w"),
            (ENV_WORKER_SECRET, "s"),
        ]);
        assert!(read(bad).unwrap_err().contains("`twelve`"));
    }
}
