//! The collective operations the model and the trainer need from a process
//! group.

use std::time::Instant;

use tch::Tensor;

use crate::error::Result;

/// An operation a group started and has not finished, as a watchdog sees
/// it: which one, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub op: &'static str,
    pub since: Instant,
}

/// A process group. All ranks of the group call the same operations in the
/// same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> i64;
    fn world_size(&self) -> i64;
    /// Element-wise sum over the group; every rank gets the result.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;
    /// [`Collective::all_reduce_sum`] into `tensor` itself, bit for bit the
    /// same values. Backends that can reduce in the caller's buffer override
    /// it to save the allocation and copy of a fresh result; by default it
    /// copies the allocating result back.
    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
        let summed = self.all_reduce_sum(tensor)?;
        tensor
            .f_copy_(&summed)
            .map_err(|source| crate::CollectiveError::Torch {
                op: "all_reduce",
                source,
            })?;
        Ok(())
    }
    /// Every rank's tensor, in rank order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>>;
    /// Rank `root`'s tensor, on every rank.
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;

    /// The oldest operation still running on the device after its call
    /// returned (NCCL enqueues kernels and returns at once). Backends whose
    /// calls finish their work before returning have none: a watchdog
    /// times those calls from outside.
    fn pending(&self) -> Option<Pending> {
        None
    }

    /// How this group's CPU tensors travel, for logs and status: "tcp",
    /// "shared memory", "nccl" (CUDA only), or within one process.
    fn transport(&self) -> &'static str {
        "in-process"
    }

    /// Tears the group down, from any thread: an operation blocked in it
    /// (on the host or on the device) ends with an error, and so does
    /// every later one. Calling it again does nothing.
    fn abort(&self) {}
}
