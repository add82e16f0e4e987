//! One optimizer step's forward, backward and gradient reduction, given its
//! micro-batches:
//!
//! 1. the answer tokens of the global batch are counted (an all-reduce of
//!    one number over the dp group) and each micro-batch's mean loss is
//!    scaled by its share of them, so that the summed gradients are those of
//!    the mean loss over the whole global batch whatever the split: dp = 2
//!    equals one process with twice the batch, `grad_accum = 2` equals a
//!    batch twice as large;
//! 2. forward and backward (through a [`GradTape`] when tp > 1 or with
//!    activation checkpointing),
//!    inside `catch_unwind`: the model's tensor-parallel all-reduce unwinds
//!    with a typed payload when a peer fails, which becomes a retriable
//!    [`TrainError::Collective`];
//! 3. gradients summed over the dp group in buckets ([`crate::ddp`]), during
//!    the last micro-batch's backward or after it, and clipped by their
//!    global norm ([`crate::optim::clip_grad_norm`]).
//!
//! The optimizer update itself is the trainer's.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use samtrain_comm::Collective;
use samtrain_model::tape::GradTape;
use samtrain_model::{SamInputs, SamModel};
use tch::{Device, Kind, Tensor};

use crate::ddp::GradBuckets;
use crate::error::TrainError;
use crate::optim::{clip_grad_norm, ClipError};

/// What one optimizer step needs besides its data.
pub(crate) struct StepContext<'a> {
    pub model: &'a SamModel,
    pub params: &'a [(String, Tensor)],
    pub dp: &'a dyn Collective,
    /// The tensor-parallel group, when tp > 1.
    pub tp: Option<&'a dyn Collective>,
    pub buckets: &'a GradBuckets,
    pub max_grad_norm: f64,
    /// bf16 autocast on this device (`[training] bf16` on CUDA).
    pub autocast: Option<Device>,
    /// Recompute each layer in backward (see `samtrain_model::tape`).
    pub activation_checkpointing: bool,
    /// Reduce the dp buckets while the last micro-batch's backward runs
    /// (`[parallel] overlap_grad_reduce`; not with a tape, see `ddp`).
    pub overlap: bool,
}

/// A reduction that overlapped backward: the wait after it, and its result.
type Reduced = (Duration, Result<(), samtrain_comm::CollectiveError>);

pub(crate) struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    /// Answer tokens in the global batch.
    pub tokens: i64,
    /// Time in the data-parallel collectives (waiting for slower ranks
    /// included).
    pub comm: Duration,
}

impl StepContext<'_> {
    /// Forward, backward, dp reduction and clipping of one optimizer step;
    /// leaves the final gradients in the parameters.
    pub fn run(&self, step: u64, micro: &[(SamInputs, Tensor)]) -> Result<StepStats, TrainError> {
        let dp = self.dp;
        let mut comm = Duration::ZERO;
        let local_tokens: i64 = micro
            .iter()
            .map(|(_, labels)| labels.ne(-100).sum(Kind::Int64).int64_value(&[]))
            .sum();
        let tokens = if dp.world_size() > 1 {
            timed(&mut comm, || {
                dp.all_reduce_sum(&Tensor::from_slice(&[local_tokens]))
            })
            .map_err(|e| TrainError::collective(&format!("step {step}: counting tokens"), e))?
            .int64_value(&[0])
        } else {
            local_tokens
        };
        if tokens == 0 {
            return Err(TrainError::Step {
                step,
                message: "the global batch has no answer tokens to learn from".into(),
            });
        }
        let (loss_sum, overlapped) =
            catch_unwind(AssertUnwindSafe(|| self.backward(step, micro, tokens)))
                .map_err(|p| TrainError::from_panic(step, p))??;
        crate::fault::in_step(step);
        let reduced = match overlapped {
            // Only the wait after backward counts as communication: the rest
            // of the reduction hid behind backward.
            Some((tail, reduced)) => {
                comm += tail;
                reduced
            }
            None => timed(&mut comm, || self.buckets.all_reduce(self.params, dp)),
        };
        reduced
            .map_err(|e| TrainError::collective(&format!("step {step}: gradient all-reduce"), e))?;
        let loss_sum = if dp.world_size() > 1 {
            timed(&mut comm, || {
                dp.all_reduce_sum(&Tensor::from_slice(&[loss_sum]))
            })
            .map_err(|e| TrainError::collective(&format!("step {step}: loss all-reduce"), e))?
            .double_value(&[0])
        } else {
            loss_sum
        };
        let grad_norm =
            clip_grad_norm(self.params, self.max_grad_norm, self.tp).map_err(|e| match e {
                ClipError::Collective(e) => {
                    TrainError::collective(&format!("step {step}: gradient norm"), e)
                }
                ClipError::Torch(e) => TrainError::Step {
                    step,
                    message: format!("clipping the gradients: {e}"),
                },
            })?;
        Ok(StepStats {
            loss: loss_sum / tokens as f64,
            grad_norm,
            tokens,
            comm,
        })
    }

    /// Accumulates the gradients of every micro-batch, each loss weighted by
    /// its share of the global batch's `tokens`; returns this rank's summed
    /// token loss, and, when the dp reduction overlapped the last
    /// micro-batch's backward, its wait after backward and its result.
    fn backward(
        &self,
        step: u64,
        micro: &[(SamInputs, Tensor)],
        tokens: i64,
    ) -> Result<(f64, Option<Reduced>), TrainError> {
        let mut loss_sum = 0.0;
        let mut overlapped = None;
        for (at, (inputs, labels)) in micro.iter().enumerate() {
            let mut tape = (self.tp.is_some() || self.activation_checkpointing)
                .then(|| GradTape::with_checkpointing(self.activation_checkpointing));
            let losses = self
                .mixed(step, || self.model.loss(inputs, labels, tape.as_mut()))?
                .map_err(|e| {
                    TrainError::from_model("", &format!("the forward pass of step {step}"), e)
                })?;
            if losses.tokens == 0 {
                continue;
            }
            let scaled = &losses.total * (losses.tokens as f64 / tokens as f64);
            match tape {
                // Checkpointed layers run forward again in backward, under
                // the same autocast as the first time.
                Some(tape) => self
                    .mixed(step, || tape.backward(&scaled, self.tp))?
                    .map_err(|e| {
                        TrainError::collective(&format!("the backward pass of step {step}"), e)
                    })?,
                None if self.overlap && at + 1 == micro.len() && self.dp.world_size() > 1 => {
                    let done = self
                        .buckets
                        .reduce_during(self.params, self.dp, || scaled.backward());
                    overlapped = Some((done.tail, done.reduced));
                }
                None => scaled.backward(),
            }
            loss_sum += losses.total.double_value(&[]) * losses.tokens as f64;
        }
        Ok((loss_sum, overlapped))
    }

    /// Runs `f` under bf16 autocast when the step asks for it.
    fn mixed<T>(&self, step: u64, f: impl FnOnce() -> T) -> Result<T, TrainError> {
        match self.autocast {
            None => Ok(f()),
            Some(device) => samtrain_torchext::autocast(device, Kind::BFloat16, f).map_err(|e| {
                TrainError::Step {
                    step,
                    message: format!("bf16 autocast: {e}"),
                }
            }),
        }
    }
}

/// Runs `f`, adding its time to `total`.
fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *total += started.elapsed();
    out
}
