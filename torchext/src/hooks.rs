//! Gradient-ready hooks: a Rust closure that autograd runs right after it
//! accumulates a leaf tensor's gradient into `.grad` (libtorch's
//! post-accumulate-grad hook, `register_post_accumulate_grad_hook` in
//! Python). Data parallelism uses it to start reducing a bucket as soon as
//! its last gradient is complete, while backward computes the rest. And
//! the other end of a gradient's life: [`drop_grad`] unsets it.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use tch::Tensor;

use crate::ffi::{self, RawTensor};
use crate::TorchExtError;

/// Runs `on_ready` each time autograd has accumulated `leaf`'s gradient,
/// on the thread that runs backward (the caller's for CPU tensors, a device
/// thread for CUDA ones). Replaces the hook set before, if any; the closure
/// lives as long as the tensor or until [`clear_grad_ready_hook`].
///
/// The closure runs under a lock (autograd may call it from more than one
/// thread over its life), so it needs only be `Send`. A panic in `on_ready`
/// aborts the process: it cannot unwind through libtorch's C++ frames.
pub fn set_grad_ready_hook<F>(leaf: &Tensor, on_ready: F) -> Result<(), TorchExtError>
where
    F: Fn() + Send + 'static,
{
    extern "C" fn call<F: Fn()>(data: *mut c_void) {
        // SAFETY: `data` is the Box<Mutex<F>> set below, alive until `drop`
        // runs.
        let f = unsafe { &*(data as *const Mutex<F>) };
        let run = || f.lock().unwrap_or_else(|e| e.into_inner())();
        if catch_unwind(AssertUnwindSafe(run)).is_err() {
            tracing::error!("a gradient-ready hook panicked; aborting");
            std::process::abort();
        }
    }
    extern "C" fn drop<F>(data: *mut c_void) {
        // SAFETY: called once, by the hook's destructor or a failed set.
        unsafe { std::mem::drop(Box::from_raw(data as *mut Mutex<F>)) };
    }
    let data = Box::into_raw(Box::new(Mutex::new(on_ready))) as *mut c_void;
    // SAFETY: a live tensor; the C side owns `data` from here and frees it
    // through `drop::<F>`, also on failure.
    let message = unsafe {
        ffi::torchext_set_grad_ready_hook(
            leaf.as_ptr() as *const RawTensor,
            call::<F>,
            drop::<F>,
            data,
        )
    };
    ffi::check("set_grad_ready_hook", message)
}

/// Removes `leaf`'s gradient-ready hook (dropping its closure), if any.
pub fn clear_grad_ready_hook(leaf: &Tensor) -> Result<(), TorchExtError> {
    // SAFETY: a live tensor, borrowed for the call.
    let message = unsafe { ffi::torchext_clear_grad_ready_hook(leaf.as_ptr() as *const RawTensor) };
    ffi::check("clear_grad_ready_hook", message)
}

/// Drops `leaf`'s gradient (torch's `zero_grad(set_to_none=True)`): the
/// next backward gives the leaf its incoming gradient as it is, where a
/// zeroed buffer costs a fill and an addition.
pub fn drop_grad(leaf: &Tensor) -> Result<(), TorchExtError> {
    // SAFETY: a live tensor, borrowed for the call.
    let message = unsafe { ffi::torchext_drop_grad(leaf.as_ptr() as *const RawTensor) };
    ffi::check("drop_grad", message)
}
