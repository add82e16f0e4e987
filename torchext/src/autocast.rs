//! Autocast in a chosen dtype: inside the region, libtorch runs matrix
//! products and convolutions of fp32 tensors in bf16 or fp16 and keeps
//! precision-sensitive operations (softmax, norms, losses) in fp32.

use std::ffi::c_int;

use tch::{Device, Kind};

use crate::{ffi, TorchExtError};

/// Runs `f` with autocast on `device`'s type (CUDA or the CPU) in `kind`
/// (`BFloat16` or `Half`), restoring the previous state afterwards, also
/// when `f` panics. Regions nest.
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> Result<T, TorchExtError> {
    let dtype = match kind {
        Kind::Half => 0,
        Kind::BFloat16 => 1,
        other => {
            return Err(TorchExtError::Arguments {
                op: "autocast",
                message: format!("{other:?} is not a reduced precision (BFloat16 or Half)"),
            })
        }
    };
    let cuda = c_int::from(device.is_cuda());
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: two out-parameters that live across the call.
    ffi::check("autocast", unsafe {
        ffi::torchext_autocast_enter(cuda, dtype, &mut prev_enabled, &mut prev_dtype)
    })?;
    let _restore = Restore {
        cuda,
        prev_enabled,
        prev_dtype,
    };
    Ok(f())
}

/// Leaves an autocast region when dropped.
struct Restore {
    cuda: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: plain values saved by the matching enter.
        let message =
            unsafe { ffi::torchext_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) };
        if let Err(e) = ffi::check("autocast", message) {
            tracing::error!(error = %e, "leaving an autocast region failed");
        }
    }
}
