//! Routing by tensor device: one process group as two communicators, CUDA
//! tensors over NCCL and everything else (the small CPU values a trainer
//! shares, barriers) over the TCP ring. The ring is always connected first;
//! it also carries the NCCL unique id from the group's rank 0 to the others.

use std::sync::Arc;

use samtrain_comm::Collective;

use crate::error::{CollectiveError, Result};
use crate::groups::ProcessGroups;

impl ProcessGroups {
    /// These groups with their dp and tp groups routing CUDA tensors through
    /// NCCL on CUDA device `cuda_index`. The world group stays on the ring:
    /// it carries only CPU control values (agreeing on a checkpoint, an
    /// attempt id). Without the `nccl` feature only a world of one rank can
    /// train on CUDA, and larger worlds are refused with a message that
    /// says how to build samtrain.
    pub fn route_cuda(self, cuda_index: usize) -> Result<ProcessGroups> {
        Ok(ProcessGroups {
            dp: route(self.dp, cuda_index)?,
            tp: route(self.tp, cuda_index)?,
            ..self
        })
    }
}

#[cfg(feature = "nccl")]
fn route(ring: Arc<dyn Collective>, cuda_index: usize) -> Result<Arc<dyn Collective>> {
    use tch::{Device, Kind, Tensor};

    use crate::nccl::{NcclCollective, NcclId, NCCL_ID_LEN};

    /// One group as two communicators, picked per call by the tensor's device.
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
        fn all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
            self.pick(tensor).all_reduce_sum_(tensor)
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
        fn pending(&self) -> Option<samtrain_comm::Pending> {
            self.nccl.pending()
        }
        /// The CPU side's: CUDA tensors always go through NCCL.
        fn transport(&self) -> &'static str {
            self.ring.transport()
        }
        fn abort(&self) {
            self.nccl.abort();
            self.ring.abort();
        }
    }

    let id = if ring.rank() == 0 {
        NcclId::new()?
    } else {
        NcclId::from_bytes(&[0u8; NCCL_ID_LEN])?
    };
    let shared = ring.broadcast(&Tensor::from_slice(id.as_bytes()).to_kind(Kind::Uint8), 0)?;
    let bytes = Vec::<u8>::try_from(&shared).map_err(|source| CollectiveError::Torch {
        op: "nccl_id",
        source,
    })?;
    let nccl = NcclCollective::new(
        ring.rank(),
        ring.world_size(),
        cuda_index,
        &NcclId::from_bytes(&bytes)?,
    )?;
    Ok(Arc::new(Routed { ring, nccl }))
}

#[cfg(not(feature = "nccl"))]
fn route(ring: Arc<dyn Collective>, _cuda_index: usize) -> Result<Arc<dyn Collective>> {
    if ring.world_size() == 1 {
        return Ok(ring);
    }
    Err(CollectiveError::Invalid {
        op: "connect",
        message: "training on CUDA across ranks needs NCCL: build samtrain with `--features nccl`"
            .into(),
    })
}
