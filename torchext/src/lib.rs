//! libtorch operations that tch's C API does not expose, compiled against the
//! same libtorch (`csrc/torchext.cpp`, built by `build.rs`) behind a safe
//! Rust API:
//!
//! - [`fused_adamw_`]: the multi-tensor AdamW kernel behind
//!   `torch.optim.AdamW(fused=True)`, on CPU and CUDA;
//! - [`foreach_norm`] and [`foreach_mul_`]: one call over a list of tensors
//!   where tch would loop, as `clip_grad_norm_` does;
//! - [`autocast`]: mixed precision in a chosen dtype (bf16 or fp16) on CUDA
//!   or the CPU, where tch's `autocast` has CUDA's default, fp16, only;
//! - [`set_grad_ready_hook`]: a Rust closure run as autograd accumulates a
//!   leaf's gradient, so that data parallelism can start a bucket's
//!   all-reduce while backward goes on, and [`drop_grad`], which unsets a
//!   leaf's gradient as torch's `zero_grad()` does;
//! - [`cuda`]: libtorch's CUDA backend, loaded at run time, and the GPUs it
//!   sees.
//!
//! C++ exceptions never cross into Rust: each call returns libtorch's message
//! as a [`TorchExtError`].

mod autocast;
pub mod cuda;
mod ffi;
mod foreach;
mod fused_adamw;
mod hooks;

pub use autocast::autocast;
pub use foreach::{foreach_mul_, foreach_norm};
pub use fused_adamw::{fused_adamw_, AdamWHyper, AdamWTensors};
pub use hooks::{clear_grad_ready_hook, drop_grad, set_grad_ready_hook};

/// A libtorch operation failed, or its arguments did not fit together.
#[derive(Debug, thiserror::Error)]
pub enum TorchExtError {
    #[error("{op}: {message}")]
    Torch { op: &'static str, message: String },
    #[error("{op}: {message}")]
    Arguments { op: &'static str, message: String },
}
