//! `_foreach_` operations: one libtorch call over a list of tensors (one
//! kernel launch per chunk of tensors on CUDA) instead of one per tensor.

use tch::Tensor;

use crate::ffi::{self, raw, RawTensor};
use crate::TorchExtError;

/// The L2 norm of each tensor, in fp32 (`torch._foreach_norm(t, 2, float32)`).
pub fn foreach_norm(tensors: &[Tensor]) -> Result<Vec<Tensor>, TorchExtError> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let inputs = raw(tensors);
    let mut out: Vec<*mut RawTensor> = vec![std::ptr::null_mut(); tensors.len()];
    // SAFETY: n live tensor pointers in, n slots out, both of length n.
    let message =
        unsafe { ffi::torchext_foreach_norm(inputs.as_ptr(), inputs.len(), out.as_mut_ptr()) };
    ffi::check("foreach_norm", message)?;
    Ok(out
        .into_iter()
        // SAFETY: on success each slot holds a fresh heap at::Tensor that
        // nothing else owns; the tch Tensor takes it over.
        .map(|p| unsafe { Tensor::from_ptr(p as *mut _) })
        .collect())
}

/// Multiplies every tensor by `scale` (a zero-dimension tensor, so that a
/// scale computed on a device stays there), in place.
pub fn foreach_mul_(tensors: &[Tensor], scale: &Tensor) -> Result<(), TorchExtError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let inputs = raw(tensors);
    // SAFETY: n live tensor pointers and one live scale, borrowed for the call.
    let message = unsafe {
        ffi::torchext_foreach_mul_(
            inputs.as_ptr(),
            inputs.len(),
            scale.as_ptr() as *const RawTensor,
        )
    };
    ffi::check("foreach_mul_", message)
}
