//! Process groups for samtrain: implementations of the model's
//! [`Collective`](samtrain_comm::Collective) interface across
//! processes.
//!
//! - [`ring`]: a TCP ring for CPU tensors (all-reduce, all-gather,
//!   broadcast, barrier), deterministic, bounded by a timeout and an
//!   [`Abort`] flag.
//! - [`groups`]: the data-parallel x tensor-parallel layout and the
//!   connections of its world, dp and tp groups ([`ProcessGroups::connect`]).
//! - `nccl` (cargo feature `nccl`): NCCL communicators for CUDA tensors,
//!   loading libnccl at run time;
//! - [`routed`]: groups that send CUDA tensors through NCCL and the rest
//!   through the ring ([`ProcessGroups::route_cuda`]).
//! - [`watchdog`]: a thread per generation that aborts every group when a
//!   collective is pending too long or the generation ends from outside.

pub mod abort;
pub mod error;
pub mod groups;
mod handshake;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ring;
pub mod routed;
pub mod watchdog;

pub use abort::Abort;
pub use error::{CollectiveError, Result};
pub use groups::{GroupOptions, Layout, ProcessGroups};
pub use handshake::Secret;
pub use ring::RingCollective;
pub use watchdog::{Fired, Watchdog};
