//! AdamW written on tensors, so that its whole state (the two moments per
//! parameter and the step count) can be checkpointed and restored bit for
//! bit, and global-norm gradient clipping that sees every tensor-parallel
//! shard.
//!
//! The update is libtorch's fused AdamW kernel (`samtrain_torchext`), the
//! one behind `torch.optim.AdamW(fused=True)`, so the two agree bit for bit:
//! decoupled weight decay `p *= 1 - lr wd`, moments `m = lerp(m, g, 1 - b1)`,
//! `v = b2 v + (1 - b2) g g`, and `p -= lr / (1 - b1^t) * m / (sqrt(v) /
//! sqrt(1 - b2^t) + eps)`, one pass over each tensor's memory instead of the
//! eight of the per-tensor loop. As LAVIS (SAM's training code) does, weight
//! decay applies only to matrices: biases, norms and scalars do not decay,
//! so the parameters form two groups (by dtype and device too, as the kernel
//! takes one of each).
//!
//! Clipping takes the gradients' norms in one `_foreach_norm` call and
//! scales them in one `_foreach_mul_`, as `clip_grad_norm_` does.
//!
//! The optimizer is what writes the trained tensors between two saves, so
//! it holds the loan of a save that reads them in place
//! ([`AdamW::lend`]) and settles it before it writes them.

use std::collections::HashMap;

use samtrain_checkpoint::{Loan, Settled};
use samtrain_comm::{shard_dim, Collective, CollectiveError};
use samtrain_torchext::{fused_adamw_, AdamWHyper, AdamWTensors, TorchExtError};
use tch::{Device, Kind, Tensor};

/// The checkpoint names of a parameter's optimizer state.
pub const EXP_AVG: &str = "exp_avg";
pub const EXP_AVG_SQ: &str = "exp_avg_sq";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// Parameters that one fused kernel call updates: same decay, dtype and
/// device.
struct Group {
    decay: bool,
    members: Vec<usize>,
    /// The step being taken, as the kernel reads it (one fp32 element on the
    /// group's device, listed once per member).
    step: Tensor,
}

/// AdamW over a fixed, named list of parameters.
pub struct AdamW {
    config: AdamWConfig,
    /// Optimizer steps taken.
    step: u64,
    params: Vec<ParamState>,
    groups: Vec<Group>,
    /// A save still reading the parameters and moments in place.
    loan: Option<Loan>,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimStateError {
    #[error("optimizer state `{name}` is missing")]
    Missing { name: String },
    #[error("optimizer state `{name}`: shape {found:?}, the parameter has {expected:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

/// Whether a parameter decays: matrices (and higher) only.
pub fn decays(param: &Tensor) -> bool {
    param.dim() >= 2
}

impl AdamW {
    /// Fresh state (zero moments, step 0) for `params`.
    pub fn new(params: &[(String, Tensor)], config: AdamWConfig) -> Self {
        let params: Vec<ParamState> = params
            .iter()
            .map(|(name, p)| ParamState {
                name: name.clone(),
                param: p.shallow_clone(),
                exp_avg: p.zeros_like().detach(),
                exp_avg_sq: p.zeros_like().detach(),
                decay: decays(p),
            })
            .collect();
        let mut groups: Vec<(bool, Kind, Device, Group)> = Vec::new();
        for (i, s) in params.iter().enumerate() {
            let key = (s.decay, s.param.kind(), s.param.device());
            match groups
                .iter_mut()
                .find(|(d, k, dev, _)| (*d, *k, *dev) == key)
            {
                Some((.., g)) => g.members.push(i),
                None => groups.push((
                    key.0,
                    key.1,
                    key.2,
                    Group {
                        decay: s.decay,
                        members: vec![i],
                        step: Tensor::zeros([1], (Kind::Float, key.2)),
                    },
                )),
            }
        }
        AdamW {
            config,
            step: 0,
            params,
            groups: groups.into_iter().map(|(.., g)| g).collect(),
            loan: None,
        }
    }

    /// Holds `loan`, a save reading the parameters and the moments of
    /// [`AdamW::state`] in place, until the next write of either (settling
    /// the loan held before, if any).
    pub fn lend(&mut self, loan: Loan) {
        self.settle_loan();
        self.loan = Some(loan);
    }

    /// Settles the loan held, if any: from then on the save reads copies.
    /// The update and a restore do it first themselves.
    pub fn settle_loan(&mut self) -> Option<Settled> {
        let settled = self.loan.take()?.settle();
        tracing::debug!(
            copied = settled.copied,
            took_us = settled.took.as_micros() as u64,
            "checkpoint loan settled"
        );
        Some(settled)
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from the parameters' gradients at learning rate `lr`.
    /// Parameters without a gradient are left alone, as torch does.
    pub fn step(&mut self, lr: f64) -> Result<(), TorchExtError> {
        self.settle_loan();
        self.step += 1;
        let c = self.config;
        for group in &mut self.groups {
            let with_grad: Vec<(&ParamState, Tensor)> = group
                .members
                .iter()
                .map(|&i| (&self.params[i], self.params[i].param.grad()))
                .filter(|(_, g)| g.defined())
                .collect();
            if with_grad.is_empty() {
                continue;
            }
            let _ = group.step.fill_(self.step as f64);
            let list = |f: &dyn Fn(&ParamState) -> &Tensor| -> Vec<Tensor> {
                with_grad
                    .iter()
                    .map(|(s, _)| f(s).shallow_clone())
                    .collect()
            };
            let grads: Vec<Tensor> = with_grad.iter().map(|(_, g)| g.shallow_clone()).collect();
            let steps: Vec<Tensor> = with_grad
                .iter()
                .map(|_| group.step.shallow_clone())
                .collect();
            fused_adamw_(
                &AdamWTensors {
                    params: &list(&|s| &s.param),
                    grads: &grads,
                    exp_avgs: &list(&|s| &s.exp_avg),
                    exp_avg_sqs: &list(&|s| &s.exp_avg_sq),
                    steps: &steps,
                },
                &AdamWHyper {
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    weight_decay: if group.decay { c.weight_decay } else { 0.0 },
                    eps: c.eps,
                },
            )?;
        }
        Ok(())
    }

    /// Zeroes every gradient in place (buffers stay allocated), for data
    /// parallelism, whose buckets reduce the same buffers every step.
    pub fn zero_grad(&mut self) {
        for s in &mut self.params {
            s.param.zero_grad();
        }
    }

    /// Drops every gradient (torch's `zero_grad(set_to_none=True)`, its
    /// default): the next backward hands each parameter its gradient as
    /// it comes, where a kept buffer costs a fill now and an addition then.
    pub fn drop_grads(&mut self) -> Result<(), TorchExtError> {
        self.params
            .iter()
            .try_for_each(|s| samtrain_torchext::drop_grad(&s.param))
    }

    /// The state to checkpoint: `exp_avg.<param>` and `exp_avg_sq.<param>`
    /// for every parameter, in parameter order. The step count goes to the
    /// checkpoint's metadata ([`AdamW::steps`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|s| {
                [
                    (format!("{EXP_AVG}.{}", s.name), s.exp_avg.shallow_clone()),
                    (
                        format!("{EXP_AVG_SQ}.{}", s.name),
                        s.exp_avg_sq.shallow_clone(),
                    ),
                ]
            })
            .collect()
    }

    /// Restores the state [`AdamW::state`] gave, and the step count. Every
    /// parameter's moments must be present with its shape.
    pub fn load_state(
        &mut self,
        state: Vec<(String, Tensor)>,
        step: u64,
    ) -> Result<(), OptimStateError> {
        self.settle_loan();
        let mut by_name: HashMap<String, Tensor> = state.into_iter().collect();
        for s in &mut self.params {
            for (prefix, slot) in [(EXP_AVG, &mut s.exp_avg), (EXP_AVG_SQ, &mut s.exp_avg_sq)] {
                let name = format!("{prefix}.{}", s.name);
                let value = by_name
                    .remove(&name)
                    .ok_or_else(|| OptimStateError::Missing { name: name.clone() })?;
                if value.size() != slot.size() {
                    return Err(OptimStateError::Shape {
                        name,
                        expected: slot.size(),
                        found: value.size(),
                    });
                }
                tch::no_grad(|| slot.copy_(&value));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Why clipping failed: the tensor-parallel group's sum (a peer), or a
/// libtorch operation on this rank's gradients.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Torch(#[from] TorchExtError),
}

/// Clips gradients to a global L2 norm of `max_norm` (0: no clipping) and
/// returns the norm before clipping, as torch's `clip_grad_norm_` does.
///
/// Under tensor parallelism the norm is over the whole model: the squared
/// norms of sharded parameters (those `shard_dim` splits) are summed over
/// the tp group, while replicated parameters, whose gradients are already
/// complete and equal on every tp rank, are counted once.
pub fn clip_grad_norm(
    params: &[(String, Tensor)],
    max_norm: f64,
    tp: Option<&dyn Collective>,
) -> Result<f64, ClipError> {
    let tp = tp.filter(|c| c.world_size() > 1);
    let mut grads = Vec::new();
    let mut sharded = Vec::new();
    for (name, p) in params {
        let g = p.grad();
        if g.defined() {
            sharded.push(tp.is_some() && shard_dim(name).is_some());
            grads.push(g);
        }
    }
    let norms = samtrain_torchext::foreach_norm(&grads)?;
    let squares = |want_sharded: bool| -> f64 {
        let picked: Vec<&Tensor> = norms
            .iter()
            .zip(&sharded)
            .filter(|(_, &s)| s == want_sharded)
            .map(|(n, _)| n)
            .collect();
        if picked.is_empty() {
            0.0
        } else {
            Tensor::stack(&picked, 0)
                .square()
                .sum(Kind::Float)
                .double_value(&[])
        }
    };
    let mut sq = squares(false);
    let sharded_sq = squares(true);
    sq += match tp {
        Some(comm) => comm
            .all_reduce_sum(&Tensor::from_slice(&[sharded_sq]))?
            .double_value(&[0]),
        None => sharded_sq,
    };
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            // One call per dtype and device, as the foreach kernels take.
            let mut by_kind: Vec<((Kind, Device), Vec<Tensor>)> = Vec::new();
            for g in grads {
                let key = (g.kind(), g.device());
                match by_kind.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, list)) => list.push(g),
                    None => by_kind.push((key, vec![g])),
                }
            }
            for ((_, device), list) in by_kind {
                let scale = Tensor::scalar_tensor(coef, (Kind::Float, device));
                samtrain_torchext::foreach_mul_(&list, &scale)?;
            }
        }
    }
    Ok(norm)
}
