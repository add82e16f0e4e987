//! `at::_fused_adamw_`: AdamW over many tensors in one kernel per device and
//! dtype, the update `torch.optim.AdamW(fused=True)` makes, bit for bit.

use tch::Tensor;

use crate::ffi::{self, raw};
use crate::TorchExtError;

/// AdamW's numbers for one call (one parameter group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The tensors of one call, index for index: parameters, their gradients,
/// their first and second moments, and their step counts (one-element fp32
/// tensors holding the step being taken, as torch increments them first).
/// All on one device, parameters and their state of one dtype.
pub struct AdamWTensors<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
    pub steps: &'a [Tensor],
}

/// One AdamW step over `t`, in place.
pub fn fused_adamw_(t: &AdamWTensors<'_>, h: &AdamWHyper) -> Result<(), TorchExtError> {
    let n = t.params.len();
    let lens = [
        t.grads.len(),
        t.exp_avgs.len(),
        t.exp_avg_sqs.len(),
        t.steps.len(),
    ];
    if lens.iter().any(|&len| len != n) {
        return Err(TorchExtError::Arguments {
            op: "fused_adamw_",
            message: format!(
                "{n} parameters but {} gradients, {} exp_avgs, {} exp_avg_sqs, {} steps",
                lens[0], lens[1], lens[2], lens[3]
            ),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v, s) = (
        raw(t.params),
        raw(t.grads),
        raw(t.exp_avgs),
        raw(t.exp_avg_sqs),
        raw(t.steps),
    );
    // SAFETY: five arrays of n live tensor pointers, borrowed for the call.
    let message = unsafe {
        ffi::torchext_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    };
    ffi::check("fused_adamw_", message)
}
