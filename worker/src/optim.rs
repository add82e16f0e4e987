//! AdamW written on tensors, so that its whole state (the two moments per
//! parameter and the step count) can be checkpointed and restored bit for
//! bit, and global-norm gradient clipping that sees every tensor-parallel
//! shard.
//!
//! The update is torch.optim.AdamW's (single-tensor path, `amsgrad=False`),
//! operation for operation, so the two agree to float rounding: decoupled
//! weight decay `p *= 1 - lr wd`, moments `m = lerp(m, g, 1 - b1)`,
//! `v = b2 v + (1 - b2) g g`, and `p -= lr / (1 - b1^t) * m / (sqrt(v) /
//! sqrt(1 - b2^t) + eps)`. As LAVIS (SAM's training code) does, weight decay
//! applies only to matrices: biases, norms and scalars do not decay.

use std::collections::HashMap;

use samtrain_comm::{shard_dim, Collective};
use tch::{Kind, Tensor};

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

/// AdamW over a fixed, named list of parameters.
pub struct AdamW {
    config: AdamWConfig,
    /// Optimizer steps taken.
    step: u64,
    params: Vec<ParamState>,
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
        let params = params
            .iter()
            .map(|(name, p)| ParamState {
                name: name.clone(),
                param: p.shallow_clone(),
                exp_avg: p.zeros_like().detach(),
                exp_avg_sq: p.zeros_like().detach(),
                decay: decays(p),
            })
            .collect();
        AdamW {
            config,
            step: 0,
            params,
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from the parameters' gradients at learning rate `lr`.
    /// Parameters without a gradient are left alone, as torch does.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for s in &mut self.params {
                let grad = s.param.grad();
                if !grad.defined() {
                    continue;
                }
                if s.decay && c.weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = s.exp_avg.lerp_(&grad, 1.0 - c.beta1);
                let _ = s
                    .exp_avg_sq
                    .g_mul_scalar_(c.beta2)
                    .addcmul_(&(&grad * (1.0 - c.beta2)), &grad);
                let denom = (s.exp_avg_sq.sqrt() / bias_correction2_sqrt) + c.eps;
                let _ = s.param.addcdiv_(&(&s.exp_avg * -step_size), &denom);
            }
        });
    }

    /// Zeroes every gradient in place (buffers stay allocated).
    pub fn zero_grad(&mut self) {
        for s in &mut self.params {
            s.param.zero_grad();
        }
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
) -> Result<f64, samtrain_comm::CollectiveError> {
    let tp = tp.filter(|c| c.world_size() > 1);
    let mut replicated = Vec::new();
    let mut sharded = Vec::new();
    for (name, p) in params {
        let g = p.grad();
        if !g.defined() {
            continue;
        }
        let sq = g.to_kind(Kind::Float).square().sum(Kind::Float);
        if tp.is_some() && shard_dim(name).is_some() {
            sharded.push(sq);
        } else {
            replicated.push(sq);
        }
    }
    let total = |v: &[Tensor]| -> f64 {
        if v.is_empty() {
            0.0
        } else {
            Tensor::stack(v, 0).sum(Kind::Float).double_value(&[])
        }
    };
    let mut sq = total(&replicated);
    let sharded_sq = total(&sharded);
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
            tch::no_grad(|| {
                for (_, p) in params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            });
        }
    }
    Ok(norm)
}
