//! Tensor parallelism for the decoder, and the small `Collective` interface
//! it needs (the worker's process groups implement it over TCP or NCCL).
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

use std::sync::{Arc, Barrier, Mutex};

use tch::Tensor;

use crate::error::{ModelError, Result};

/// The collective operations the model needs from a process group. All
/// ranks of the group call the same operations in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> i64;
    fn world_size(&self) -> i64;
    /// Element-wise sum over the group; every rank gets the result.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;
    /// [`Collective::all_reduce_sum`] into `tensor` itself, bit for bit the
    /// same values. Backends that can reduce in the caller's buffer override
    /// it to save the allocation and copy of a fresh result; by default it
    /// copies the allocating result back.
    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
        let summed = self.all_reduce_sum(tensor)?;
        tensor.f_copy_(&summed)?;
        Ok(())
    }
    /// Every rank's tensor, in rank order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>>;
    /// Rank `root`'s tensor, on every rank.
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
}

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
    /// forward pass, so it panics with the collective's error; the worker's
    /// process groups turn dead peers into errors before that (timeouts).
    pub fn reduce_forward(&self, partial: &Tensor) -> Tensor {
        let detached = partial.detach();
        let summed = self
            .comm
            .all_reduce_sum(&detached)
            .unwrap_or_else(|e| panic!("tensor-parallel all-reduce failed: {e}"));
        if partial.requires_grad() {
            partial + (summed - detached)
        } else {
            summed
        }
    }
}

/// Which dimension of a checkpoint tensor is split across tensor-parallel
/// ranks, by its name; `None` means every rank holds all of it.
pub fn shard_dim(name: &str) -> Option<i64> {
    if !name.starts_with("language_model.model.layers.") {
        return None;
    }
    const COLUMN: [&str; 5] = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
    const ROW: [&str; 2] = ["o_proj", "down_proj"];
    let mut parts = name.rsplit('.');
    let leaf = parts.next()?;
    let second = parts.next()?;
    let (module, tensor) = if second == "lora_A" || second == "lora_B" {
        (parts.next()?, second)
    } else {
        (second, leaf)
    };
    let column = COLUMN.contains(&module);
    let row = ROW.contains(&module);
    match tensor {
        "weight" if column => Some(0),
        "weight" if row => Some(1),
        "bias" if column => Some(0),
        // LoRA on a column-parallel layer: A replicated (its gradient reduced
        // by the tape), B split by rows; on a row-parallel layer: A split by
        // columns, B replicated (applied after the all-reduce of A x).
        "lora_B" if column => Some(0),
        "lora_A" if row => Some(1),
        _ => None,
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
    pub fn backward(self, loss: &Tensor, comm: Option<&dyn Collective>) -> Result<()> {
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

/// Shared state of an in-process group: one slot per rank.
struct LocalShared {
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// A collective over threads of one process: for tests and for single-host
/// runs that need no network. Results are summed in rank order, so every
/// rank gets bit-identical values.
#[derive(Clone)]
pub struct LocalCollective {
    rank: i64,
    world: i64,
    shared: Arc<LocalShared>,
}

impl LocalCollective {
    /// One handle per rank of a new group of `world` ranks.
    pub fn group(world: i64) -> Vec<LocalCollective> {
        let shared = Arc::new(LocalShared {
            slots: Mutex::new((0..world).map(|_| None).collect()),
            barrier: Barrier::new(world as usize),
        });
        (0..world)
            .map(|rank| LocalCollective {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes this rank's tensor, waits for all, reads every slot.
    fn exchange(&self, tensor: &Tensor, op: &'static str) -> Result<Vec<Tensor>> {
        let poisoned = |_| ModelError::Collective {
            op,
            message: "a rank panicked while holding the group".into(),
        };
        self.shared.slots.lock().map_err(poisoned)?[self.rank as usize] = Some(tensor.copy());
        self.shared.barrier.wait();
        let all = self
            .shared
            .slots
            .lock()
            .map_err(poisoned)?
            .iter()
            .map(|t| t.as_ref().map(Tensor::copy).expect("every rank published"))
            .collect();
        // Nobody may overwrite a slot before everybody has read it.
        self.shared.barrier.wait();
        Ok(all)
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> i64 {
        self.rank
    }

    fn world_size(&self) -> i64 {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let all = self.exchange(tensor, "all_reduce")?;
        let mut sum = all[0].copy();
        for t in &all[1..] {
            sum += t;
        }
        Ok(sum)
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange(tensor, "all_gather")
    }

    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        let mut all = self.exchange(tensor, "broadcast")?;
        Ok(all.swap_remove(root as usize))
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_dims_follow_megatron() {
        let l = "language_model.model.layers.3";
        assert_eq!(shard_dim(&format!("{l}.self_attn.q_proj.weight")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.self_attn.v_proj.bias")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.self_attn.o_proj.weight")), Some(1));
        assert_eq!(shard_dim(&format!("{l}.self_attn.o_proj.bias")), None);
        assert_eq!(shard_dim(&format!("{l}.mlp.up_proj.weight")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.mlp.down_proj.weight")), Some(1));
        assert_eq!(shard_dim(&format!("{l}.mlp.gate_proj.lora_A.weight")), None);
        assert_eq!(
            shard_dim(&format!("{l}.mlp.gate_proj.lora_B.weight")),
            Some(0)
        );
        assert_eq!(
            shard_dim(&format!("{l}.mlp.down_proj.lora_A.weight")),
            Some(1)
        );
        assert_eq!(shard_dim(&format!("{l}.mlp.down_proj.lora_B.weight")), None);
        assert_eq!(shard_dim(&format!("{l}.input_layernorm.weight")), None);
        assert_eq!(shard_dim("language_model.lm_head.weight"), None);
    }

    #[test]
    fn local_group_sums_in_rank_order() {
        let handles: Vec<_> = LocalCollective::group(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let t = Tensor::from_slice(&[c.rank() as f32, 1.0]);
                    let sum = c.all_reduce_sum(&t).unwrap();
                    let gathered = c.all_gather(&t).unwrap();
                    let root = c.broadcast(&t, 2).unwrap();
                    (
                        Vec::<f32>::try_from(sum).unwrap(),
                        gathered.len(),
                        Vec::<f32>::try_from(root).unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (sum, n, root) = h.join().unwrap();
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(n, 3);
            assert_eq!(root, vec![2.0, 1.0]);
        }
    }
}
