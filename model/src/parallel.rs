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
//! [`GradTape`] cuts the graph at each `f` and runs the backward pass segment
//! by segment, all-reducing at the cuts. Each segment is walked once, so the
//! backward pass costs what an uncut one does, plus the all-reduces.

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

enum CutKind {
    /// The residual stream: its gradient is complete on every rank.
    Residual,
    /// The input of a column-parallel branch: its gradient is a partial sum.
    Branch,
}

struct Cut {
    kind: CutKind,
    attached: Tensor,
    leaf: Tensor,
}

/// The tensor-parallel backward pass, segment by segment (see module docs).
#[derive(Default)]
pub struct GradTape {
    cuts: Vec<Cut>,
    /// Replicated parameters whose gradient is a partial sum over the ranks.
    partial: Vec<Tensor>,
}

impl GradTape {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the residual stream; returns the leaf the forward pass goes on with.
    pub fn cut(&mut self, h: Tensor) -> Tensor {
        self.record(CutKind::Residual, h)
    }

    /// Cuts at Megatron's `f`, before a column-parallel branch.
    pub fn branch(&mut self, x: Tensor) -> Tensor {
        self.record(CutKind::Branch, x)
    }

    /// Marks a replicated parameter whose gradient each rank sees only in
    /// part; the backward pass all-reduces it (once, however often marked).
    pub fn reduce_grad_of(&mut self, param: &Tensor) {
        if param.requires_grad()
            && !self
                .partial
                .iter()
                .any(|p| p.data_ptr() == param.data_ptr())
        {
            self.partial.push(param.shallow_clone());
        }
    }

    fn record(&mut self, kind: CutKind, attached: Tensor) -> Tensor {
        if !attached.requires_grad() {
            return attached;
        }
        let leaf = attached.detach().set_requires_grad(true);
        self.cuts.push(Cut {
            kind,
            attached,
            leaf: leaf.shallow_clone(),
        });
        leaf
    }

    /// Backward from `loss`, all-reducing branch gradients over `comm`.
    pub fn backward(
        self,
        loss: &Tensor,
        comm: Option<&dyn Collective>,
    ) -> samtrain_comm::Result<()> {
        loss.backward();
        for cut in self.cuts.into_iter().rev() {
            let grad = cut.leaf.grad();
            if !grad.defined() || !cut.attached.requires_grad() {
                continue;
            }
            let grad = match (cut.kind, comm) {
                (CutKind::Branch, Some(comm)) => comm.all_reduce_sum(&grad)?,
                _ => grad,
            };
            (&cut.attached * grad).sum(cut.attached.kind()).backward();
        }
        if let Some(comm) = comm {
            for p in &self.partial {
                let mut grad = p.grad();
                if grad.defined() {
                    let summed = comm.all_reduce_sum(&grad)?;
                    tch::no_grad(|| grad.copy_(&summed));
                }
            }
        }
        Ok(())
    }
}
