//! Joining one generation's process groups, as every launcher does it
//! (`samtrain train` with a fixed world, `samtrain worker` with the
//! coordinator's assignment): this rank, every rank's address, the job's
//! parallel settings, and the flag that ends the generation.
//!
//! The TCP ring is always connected: it carries CPU tensors (the small
//! control values the trainer shares, and all of CPU training). On CUDA,
//! the spec's backend decides whether the groups also route CUDA tensors
//! through NCCL ([`ProcessGroups::route_cuda`]).
//!
//! Every generation's groups are watched ([`Watchdog`]): a collective
//! pending longer than the job's `parallel.collective_timeout_s` (plus a
//! quarter, so that the ring's own timeout, which names the stuck peer,
//! fails first where it can), or the end of the generation, aborts them
//! all, NCCL's communicators included.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use samtrain_collective::{Abort, CollectiveError, GroupOptions, ProcessGroups, Secret, Watchdog};

use crate::fault;
use samtrain_proto::spec::{Backend, JobSpec};
use tch::Device;

/// This rank's place in one generation.
pub struct Membership<'a> {
    pub rank: u32,
    /// Every rank's collective address, in rank order.
    pub peers: &'a [String],
    pub generation: u64,
    /// The generation's secret, which every rank proves it holds.
    pub secret: Secret,
    /// Set when the generation ends: any wait (connecting included) then
    /// fails promptly.
    pub ended: Arc<AtomicBool>,
}

/// Connects this rank to the world's data- and tensor-parallel groups
/// and starts their watchdog (keep it while training: dropping it stops
/// the watching); `listener` is bound to this rank's entry of `peers`, and
/// `device` is where this rank trains.
pub fn join_groups(
    member: Membership<'_>,
    spec: &JobSpec,
    device: Device,
    listener: TcpListener,
) -> Result<(ProcessGroups, Watchdog), CollectiveError> {
    let ended = Abort::from(member.ended.clone());
    let timeout = Duration::from_secs_f64(spec.parallel.collective_timeout_s);
    let groups = connect(member, spec, device, listener)?;
    Watchdog::start(fault::inject(groups), ended, timeout + timeout / 4).map_err(|e| {
        CollectiveError::Invalid {
            op: "connect",
            message: format!("cannot start the collective watchdog: {e}"),
        }
    })
}

fn connect(
    member: Membership<'_>,
    spec: &JobSpec,
    device: Device,
    listener: TcpListener,
) -> Result<ProcessGroups, CollectiveError> {
    let generation = member.generation;
    let groups = ProcessGroups::connect(
        GroupOptions {
            rank: i64::from(member.rank),
            peers: member.peers.to_vec(),
            tp: i64::from(spec.parallel.tp),
            generation,
            timeout: Duration::from_secs_f64(spec.parallel.collective_timeout_s),
            abort: Abort::from(member.ended),
            secret: member.secret,
            shared_memory: true,
        },
        listener,
    )?;
    tracing::info!(layout = ?groups.layout, generation, "process groups connected");
    match (spec.parallel.backend, device) {
        (Backend::Ring, _) | (Backend::Auto, Device::Cpu) => Ok(groups),
        (Backend::Nccl, Device::Cpu) => Err(invalid(
            "parallel.backend is `nccl` but this rank trains on the CPU",
        )),
        (_, Device::Cuda(index)) => groups.route_cuda(index),
        (_, other) => Err(invalid(&format!("no collective backend for {other:?}"))),
    }
}

fn invalid(message: &str) -> CollectiveError {
    CollectiveError::Invalid {
        op: "connect",
        message: message.to_owned(),
    }
}
