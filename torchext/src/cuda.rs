//! Whether this process can use a GPU. tch links `libtorch_cuda.so`, but
//! nothing in a Rust binary references its symbols, so the linker's
//! `--as-needed` drops it and libtorch registers no CUDA backend: every
//! `tch::Cuda` question answers "no GPU" on a machine full of them. The C
//! side loads it at run time instead, from the folder of the libtorch this
//! process runs; ask here, not `tch::Cuda`, before the first question.

use std::ffi::c_int;
use std::path::Path;
use std::sync::OnceLock;

use tch::Tensor;

use crate::{ffi, TorchExtError};

/// The outcome of the one attempt to load the backend.
static LOADED: OnceLock<Result<bool, String>> = OnceLock::new();

/// Loads libtorch's CUDA backend, once per process: `Ok(true)` once it is
/// loaded, `Ok(false)` for a libtorch built without CUDA, an error naming
/// what the loader could not find otherwise (a CUDA runtime library, say).
/// Costs about a tenth of a second the first time; call it only when a GPU
/// is wanted ([`is_available`] does so only where an NVIDIA driver is).
pub fn load() -> Result<bool, TorchExtError> {
    LOADED
        .get_or_init(|| {
            let mut loaded: c_int = 0;
            // SAFETY: one out-parameter that lives across the call.
            ffi::check("load libtorch_cuda", unsafe {
                ffi::torchext_load_cuda(&mut loaded)
            })
            .map(|()| loaded != 0)
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|message| TorchExtError::Torch {
            op: "load libtorch_cuda",
            message,
        })
}

/// Whether this machine has an NVIDIA driver: its control device or its
/// kernel module's file. Machines without one never pay for loading CUDA.
fn nvidia_driver_present() -> bool {
    Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia/version").exists()
}

/// GPUs libtorch can use here: 0 without a driver (unless [`load`] was
/// called already), without a CUDA build of libtorch, or when its CUDA
/// backend does not load (logged).
pub fn device_count() -> i64 {
    if !nvidia_driver_present() && LOADED.get().is_none() {
        return 0;
    }
    match load() {
        Ok(true) => tch::Cuda::device_count(),
        Ok(false) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "an NVIDIA driver is present but libtorch's CUDA backend did not load");
            0
        }
    }
}

/// Whether libtorch can use a GPU here (see [`device_count`]).
pub fn is_available() -> bool {
    device_count() > 0
}

/// For a caller asked for a GPU by name: the GPUs libtorch sees, or an
/// error saying why it sees none.
pub fn require() -> Result<i64, TorchExtError> {
    let unavailable = |message: &str| TorchExtError::Arguments {
        op: "cuda",
        message: message.to_owned(),
    };
    if !load()? {
        return Err(unavailable("this libtorch is built without CUDA"));
    }
    match tch::Cuda::device_count() {
        0 => Err(unavailable("libtorch sees no CUDA device here")),
        n => Ok(n),
    }
}

/// A CPU uint8 tensor of `len` bytes in page-locked memory, which a GPU
/// copies into by DMA at the bus's speed (pageable memory goes through the
/// driver's bounce buffer at a fraction of it). Needs the CUDA backend.
pub fn pinned_bytes(len: usize) -> Result<Tensor, TorchExtError> {
    let len = i64::try_from(len).map_err(|_| TorchExtError::Arguments {
        op: "pinned_bytes",
        message: format!("{len} bytes is too many"),
    })?;
    let mut out = std::ptr::null_mut();
    // SAFETY: one out-slot that lives across the call.
    ffi::check("pinned_bytes", unsafe {
        ffi::torchext_pinned_bytes(len, &mut out)
    })?;
    // SAFETY: on success the slot holds a fresh heap at::Tensor that nothing
    // else owns; the tch Tensor takes it over.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}
