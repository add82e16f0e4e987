//! Tensor parallelism for the decoder, over the `Collective` interface of
//! `samtrain-comm` (the worker's process groups implement it over TCP or
//! NCCL).
//!
//! Megatron-LM's layout: Q, K, V and the MLP's gate and up projections are
//! split by output rows (whole attention heads per rank), `o_proj` and
//! `down_proj` by input columns. Operator `g` (after a row-parallel layer)
//! all-reduces forward and is the identity backward: written as
//! `p + (allreduce(p) - p).detach()`. Operator `f` (before a column-parallel
//! layer) is the identity forward and all-reduces the gradient backward;
//! libtorch's autograd cannot run a collective from Rust inside backward, so
//! [`crate::tape::GradTape`] cuts the graph at each `f` and runs the backward
//! pass segment by segment, all-reducing at the cuts.

use std::sync::Arc;

use samtrain_comm::{Collective, CollectiveFailure};
use tch::Tensor;

/// This rank's place in a tensor-parallel group.
#[derive(Clone)]
pub struct TensorParallel {
    comm: Arc<dyn Collective>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .finish()
    }
}

impl TensorParallel {
    pub fn new(comm: Arc<dyn Collective>) -> Self {
        Self { comm }
    }

    pub fn rank(&self) -> i64 {
        self.comm.rank()
    }

    pub fn world_size(&self) -> i64 {
        self.comm.world_size()
    }

    pub fn comm(&self) -> &Arc<dyn Collective> {
        &self.comm
    }

    /// Megatron's `g`. A failed all-reduce cannot be returned from inside the
    /// forward pass, so it unwinds with the collective's error as a
    /// [`CollectiveFailure`] payload, which the caller's `catch_unwind` turns
    /// back into the typed error.
    pub fn reduce_forward(&self, partial: &Tensor) -> Tensor {
        let detached = partial.detach();
        let summed = self
            .comm
            .all_reduce_sum(&detached)
            .unwrap_or_else(|e| CollectiveFailure::raise(e));
        if partial.requires_grad() {
            partial + (summed - detached)
        } else {
            summed
        }
    }
}
