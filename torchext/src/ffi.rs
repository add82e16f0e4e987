//! The C functions of `csrc/torchext.cpp` and the conversions to and from
//! tch's tensor pointers.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

use crate::TorchExtError;

/// An `at::Tensor` as the C side sees it: tch's `Tensor` points at one.
pub type RawTensor = c_void;

extern "C" {
    pub fn torchext_free_error(message: *mut c_char);
    pub fn torchext_load_cuda(loaded: *mut c_int) -> *mut c_char;
    pub fn torchext_pinned_bytes(len: i64, out: *mut *mut RawTensor) -> *mut c_char;
    pub fn torchext_fused_adamw(
        params: *const *const RawTensor,
        grads: *const *const RawTensor,
        exp_avgs: *const *const RawTensor,
        exp_avg_sqs: *const *const RawTensor,
        steps: *const *const RawTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    pub fn torchext_foreach_norm(
        inputs: *const *const RawTensor,
        n: usize,
        out: *mut *mut RawTensor,
    ) -> *mut c_char;
    pub fn torchext_foreach_mul_(
        inputs: *const *const RawTensor,
        n: usize,
        scale: *const RawTensor,
    ) -> *mut c_char;
    pub fn torchext_set_grad_ready_hook(
        leaf: *const RawTensor,
        call: extern "C" fn(*mut c_void),
        drop: extern "C" fn(*mut c_void),
        data: *mut c_void,
    ) -> *mut c_char;
    pub fn torchext_clear_grad_ready_hook(leaf: *const RawTensor) -> *mut c_char;
    pub fn torchext_drop_grad(leaf: *const RawTensor) -> *mut c_char;
    pub fn torchext_autocast_enter(
        cuda: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
    ) -> *mut c_char;
    pub fn torchext_autocast_exit(
        cuda: c_int,
        prev_enabled: c_int,
        prev_dtype: c_int,
    ) -> *mut c_char;
}

/// The pointers the C side reads a tensor list from.
pub fn raw(tensors: &[Tensor]) -> Vec<*const RawTensor> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *const RawTensor)
        .collect()
}

/// Turns a C call's returned message into a result, freeing the message.
pub fn check(op: &'static str, message: *mut c_char) -> Result<(), TorchExtError> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string the C side
    // allocated with malloc; it is read once and freed by its allocator.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { torchext_free_error(message) };
    Err(TorchExtError::Torch { op, message: text })
}
