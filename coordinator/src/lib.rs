//! The control plane: the job state machine, the store (etcd or in-memory)
//! behind one trait, leases, leader election, rendezvous, the restart policy,
//! the gRPC server, the health probes, the client the command line uses and
//! the agent each worker runs. It never depends on libtorch.

pub mod agent;
pub mod client;
mod control;
pub mod election;
mod failover;
pub mod health;
pub mod jobs;
pub mod records;
pub mod rendezvous;
pub mod server;
pub mod store;
mod tasks;

pub use records::WorkerRecord;
pub use server::{run, CoordinatorError, CoordinatorOptions, RunningCoordinator};
