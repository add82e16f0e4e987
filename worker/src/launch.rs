//! Joining one generation's process groups, as every launcher does it
//! (`samtrain train` with a fixed world, `samtrain worker` with the
//! coordinator's assignment): this rank, every rank's address, the job's
//! parallel settings, and the flag that ends the generation.
//!
//! The TCP ring is always connected: it carries CPU tensors (the small
//! control values the trainer shares, and all of CPU training). On CUDA,
//! with the `nccl` feature, each group also gets an NCCL communicator (its
//! id made by the group's first rank and broadcast over the ring), and
//! every CUDA tensor goes through NCCL instead.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use samtrain_collective::{Abort, CollectiveError, GroupOptions, ProcessGroups};
use samtrain_proto::spec::{Backend, JobSpec};
use tch::Device;

use crate::trainer::Groups;

/// Connects this rank to the world's data- and tensor-parallel groups;
/// `listener` is bound to this rank's entry of `peers`, and `device` is
/// where this rank trains. Setting `ended` makes any wait (connecting
/// included) fail promptly.
pub fn join_groups(
    rank: u32,
    peers: &[String],
    spec: &JobSpec,
    device: Device,
    generation: u64,
    ended: Arc<AtomicBool>,
    listener: TcpListener,
) -> Result<Groups, CollectiveError> {
    let groups = ProcessGroups::connect(
        GroupOptions {
            rank: i64::from(rank),
            peers: peers.to_vec(),
            tp: i64::from(spec.parallel.tp),
            generation,
            timeout: Duration::from_secs_f64(spec.parallel.collective_timeout_s),
            abort: Abort::from(ended),
        },
        listener,
    )?;
    tracing::info!(layout = ?groups.layout, generation, "process groups connected");
    let (dp, tp) = match (spec.parallel.backend, device) {
        (Backend::Ring, _) | (Backend::Auto, Device::Cpu) => (groups.dp, groups.tp),
        (Backend::Nccl, Device::Cpu) => {
            return Err(invalid(
                "parallel.backend is `nccl` but this rank trains on the CPU",
            ))
        }
        (_, Device::Cuda(index)) => (
            nccl::route(groups.dp, index)?,
            nccl::route(groups.tp, index)?,
        ),
        (_, other) => return Err(invalid(&format!("no collective backend for {other:?}"))),
    };
    Ok(Groups {
        dp,
        tp: (spec.parallel.tp > 1).then_some(tp),
    })
}

fn invalid(message: &str) -> CollectiveError {
    CollectiveError::Invalid {
        op: "connect",
        message: message.to_owned(),
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Arc;

    use samtrain_collective::nccl::{NcclCollective, NcclId, NCCL_ID_LEN};
    use samtrain_collective::CollectiveError;
    use samtrain_model::parallel::Collective;
    use samtrain_model::Result;
    use tch::{Device, Kind, Tensor};

    /// One group as two communicators: CUDA tensors over NCCL, the rest
    /// (and barriers) over the ring.
    struct Routed {
        ring: Arc<dyn Collective>,
        nccl: NcclCollective,
    }

    impl Routed {
        fn pick(&self, tensor: &Tensor) -> &dyn Collective {
            match tensor.device() {
                Device::Cuda(_) => &self.nccl,
                _ => self.ring.as_ref(),
            }
        }
    }

    impl Collective for Routed {
        fn rank(&self) -> i64 {
            self.ring.rank()
        }
        fn world_size(&self) -> i64 {
            self.ring.world_size()
        }
        fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
            self.pick(tensor).all_reduce_sum(tensor)
        }
        fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
            self.pick(tensor).all_gather(tensor)
        }
        fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
            self.pick(tensor).broadcast(tensor, root)
        }
        fn barrier(&self) -> Result<()> {
            self.ring.barrier()
        }
    }

    /// The ring group plus an NCCL communicator of the same ranks on CUDA
    /// device `index`; the group's rank 0 makes the id.
    pub fn route(
        ring: Arc<dyn Collective>,
        index: usize,
    ) -> std::result::Result<Arc<dyn Collective>, CollectiveError> {
        let id = if ring.rank() == 0 {
            NcclId::new()?
        } else {
            NcclId::from_bytes(&[0u8; NCCL_ID_LEN])?
        };
        let shared = ring
            .broadcast(&Tensor::from_slice(id.as_bytes()).to_kind(Kind::Uint8), 0)
            .map_err(|e| CollectiveError::Invalid {
                op: "nccl_id",
                message: e.to_string(),
            })?;
        let bytes = Vec::<u8>::try_from(&shared).map_err(|e| CollectiveError::Invalid {
            op: "nccl_id",
            message: e.to_string(),
        })?;
        let nccl = NcclCollective::new(
            ring.rank(),
            ring.world_size(),
            index,
            &NcclId::from_bytes(&bytes)?,
        )?;
        Ok(Arc::new(Routed { ring, nccl }))
    }
}

#[cfg(not(feature = "nccl"))]
mod nccl {
    use std::sync::Arc;

    use samtrain_collective::CollectiveError;
    use samtrain_model::parallel::Collective;

    /// Without NCCL only a one-rank group can train on CUDA (the ring takes
    /// CPU tensors).
    pub fn route(
        ring: Arc<dyn Collective>,
        _index: usize,
    ) -> Result<Arc<dyn Collective>, CollectiveError> {
        if ring.world_size() == 1 {
            return Ok(ring);
        }
        Err(super::invalid(
            "training on CUDA across ranks needs NCCL: build samtrain with `--features nccl`",
        ))
    }
}
