//! The seam between the SAM network and the process groups that carry its
//! collectives. The model calls a [`Collective`]; `samtrain-collective`
//! implements it over TCP and NCCL; the checkpoint crate splits tensors as
//! [`shard_dim`] says. None of them needs to link another: they all meet
//! here.
//!
//! - [`Collective`]: the operations a process group offers, and how a
//!   watchdog sees and aborts them ([`Pending`]);
//! - [`CollectiveError`]: why one failed, naming the peer, group and operation;
//! - [`CollectiveFailure`]: the typed panic payload for a collective that
//!   fails where no `Result` can be returned (inside a forward pass);
//! - [`shard_dim`]: Megatron's tensor-parallel split, by checkpoint name;
//! - [`LocalCollective`]: a group of threads in one process, for tests and
//!   one-process runs.

mod collective;
mod error;
mod local;
mod shard;

pub use collective::{Collective, Pending};
pub use error::{CollectiveError, CollectiveFailure, Result};
pub use local::LocalCollective;
pub use shard::shard_dim;
