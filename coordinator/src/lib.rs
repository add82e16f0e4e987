//! The control plane: the job state machine, the store (etcd or in-memory)
//! behind one trait, leases, leader election, rendezvous, the restart policy,
//! the gRPC server and its transport security, the health probes, the
//! client the command line uses and the agent each worker runs. It never depends on libtorch.
//!
//! [`run`] starts a coordinator process ([`process`]); its gRPC handlers
//! (`server`) are thin over the leader's state (`control`), which owns every
//! job-state transition. The agent ([`agent`]) and the leader share only the
//! store's layout ([`records`]) and the failover loop.

pub mod agent;
pub mod auth;
pub mod client;
mod control;
mod dashboard;
pub mod election;
mod failover;
mod grpc_timing;
pub mod health;
pub mod jobs;
pub mod json;
pub mod metrics;
pub mod process;
pub mod records;
pub mod rendezvous;
mod server;
pub mod store;
mod tasks;
pub mod tls;

pub use control::{History, MAX_SLOTS};
pub use process::{run, CoordinatorError, CoordinatorOptions, RunningCoordinator};
pub use records::WorkerRecord;
