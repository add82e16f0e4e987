//! NCCL communicators for CUDA tensors (cargo feature `nccl`).
//!
//! libnccl and libcuda are loaded at run time (cudarc's dynamic loading), so
//! this builds and links on machines without CUDA; [`nccl_available`] says
//! whether they can be loaded here. Operations are enqueued on the legacy
//! default CUDA stream, which is PyTorch's (and so tch's) default stream:
//! they are ordered after the kernels that produced their input and before
//! the ones that use their output, without host synchronisation. Only
//! [`Collective::barrier`] waits on the host.
//!
//! Setup: rank 0 makes an [`NcclId`] and the coordinator carries its bytes
//! ([`NcclId::as_bytes`], [`NcclId::from_bytes`]) to every rank in its
//! rendezvous data; each rank then calls [`NcclCollective::new`] with its
//! rank, the world size, its CUDA device and the id. A stuck NCCL operation
//! cannot be interrupted from the host; [`NcclCollective::abort`] tears the
//! communicator down so the process can leave.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use cudarc::nccl::{result, sys};
use samtrain_comm::Collective;
use tch::{Device, Kind, Tensor};

use crate::error::{CollectiveError, Result};

/// Length of NCCL's unique id.
pub const NCCL_ID_LEN: usize = 128;

/// Whether libcuda and libnccl can be loaded and a CUDA device is visible.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the libraries.
    let libs =
        unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() };
    libs && tch::Cuda::device_count() > 0
}

fn nccl_error(op: &'static str, e: result::NcclError) -> CollectiveError {
    CollectiveError::Nccl {
        op,
        message: format!("{:?}", e.0),
    }
}

fn ensure_loaded(op: &'static str) -> Result<()> {
    if nccl_available() {
        Ok(())
    } else {
        Err(CollectiveError::Nccl {
            op,
            message: "libcuda or libnccl cannot be loaded, or no CUDA device is visible \
                      (put libnccl.so.2, e.g. from the nvidia-nccl wheel, on LD_LIBRARY_PATH)"
                .into(),
        })
    }
}

/// The rendezvous token of one NCCL communicator.
#[derive(Clone)]
pub struct NcclId([u8; NCCL_ID_LEN]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id; made once, on rank 0.
    pub fn new() -> Result<NcclId> {
        ensure_loaded("nccl_id")?;
        let id = result::get_uniqueid().map_err(|e| nccl_error("nccl_id", e))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    pub fn as_bytes(&self) -> &[u8; NCCL_ID_LEN] {
        &self.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let id: [u8; NCCL_ID_LEN] = bytes.try_into().map_err(|_| CollectiveError::Invalid {
            op: "nccl_id",
            message: format!("an NCCL id is {NCCL_ID_LEN} bytes, not {}", bytes.len()),
        })?;
        Ok(NcclId(id))
    }
}

struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; every use goes through the Mutex below.
unsafe impl Send for Comm {}

/// A process group over NCCL for CUDA tensors on one device.
pub struct NcclCollective {
    comm: Mutex<Comm>,
    rank: i64,
    world: i64,
    device: usize,
    /// Keeps the device's primary context (the one PyTorch uses) alive.
    _context: Arc<CudaContext>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .finish()
    }
}

fn nccl_kind(op: &'static str, kind: Kind) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t::*;
    Ok(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Int => ncclInt32,
        Kind::Int64 => ncclInt64,
        Kind::Int8 => ncclInt8,
        Kind::Uint8 | Kind::Bool => ncclUint8,
        other => {
            return Err(CollectiveError::Invalid {
                op,
                message: format!("NCCL has no dtype {other:?}"),
            })
        }
    })
}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world`, on CUDA device
    /// `device`. Blocks until every rank has joined.
    pub fn new(rank: i64, world: i64, device: usize, id: &NcclId) -> Result<NcclCollective> {
        let op = "nccl_init";
        ensure_loaded(op)?;
        if !(0..world).contains(&rank) {
            return Err(CollectiveError::Invalid {
                op,
                message: format!("rank {rank} is not in a world of {world}"),
            });
        }
        let context = CudaContext::new(device).map_err(|e| CollectiveError::Nccl {
            op,
            message: format!("CUDA device {device}: {e:?}"),
        })?;
        let unique = sys::ncclUniqueId {
            internal: id.0.map(|b| b as ::core::ffi::c_char),
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; the context is current.
        unsafe { result::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }
            .map_err(|e| nccl_error(op, e))?;
        tracing::info!(rank, world, device, "NCCL communicator ready");
        Ok(NcclCollective {
            comm: Mutex::new(Comm(comm)),
            rank,
            world,
            device,
            _context: context,
        })
    }

    /// Aborts the communicator: pending and later operations fail.
    pub fn abort(&self) -> Result<()> {
        let comm = self.lock("abort")?;
        if comm.0.is_null() {
            return Ok(());
        }
        // SAFETY: a live communicator; nulled below so Drop skips it.
        let r = unsafe { result::comm_abort(comm.0) };
        drop(comm);
        self.lock("abort")?.0 = std::ptr::null_mut();
        r.map(|_| ()).map_err(|e| nccl_error("abort", e))
    }

    fn lock(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, Comm>> {
        self.comm.lock().map_err(|_| CollectiveError::Broken {
            op,
            group: "nccl",
            first: "a thread panicked inside an operation".into(),
        })
    }

    /// A contiguous copy's source and a fresh output, both on this device.
    fn prepare(&self, op: &'static str, tensor: &Tensor) -> Result<Tensor> {
        if tensor.device() != Device::Cuda(self.device) {
            return Err(CollectiveError::Invalid {
                op,
                message: format!(
                    "this communicator is on cuda:{}, the tensor on {:?}",
                    self.device,
                    tensor.device()
                ),
            });
        }
        tensor
            .f_contiguous()
            .map_err(|source| CollectiveError::Torch { op, source })
    }

    fn live(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, Comm>> {
        let comm = self.lock(op)?;
        if comm.0.is_null() {
            return Err(CollectiveError::Broken {
                op,
                group: "nccl",
                first: "the communicator was aborted".into(),
            });
        }
        Ok(comm)
    }

    pub fn try_all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = "all_reduce";
        let input = self.prepare(op, tensor)?;
        let dtype = nccl_kind(op, input.kind())?;
        let out = input.empty_like();
        let comm = self.live(op)?;
        // SAFETY: both buffers hold numel elements on this device; the
        // default stream orders the kernel with PyTorch's work.
        unsafe {
            result::all_reduce(
                input.data_ptr() as *const _,
                out.data_ptr(),
                input.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm.0,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        Ok(out)
    }

    pub fn try_all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let op = "all_gather";
        let input = self.prepare(op, tensor)?;
        let dtype = nccl_kind(op, input.kind())?;
        let numel = input.numel() as i64;
        let all = Tensor::empty([self.world * numel], (input.kind(), input.device()));
        let comm = self.live(op)?;
        // SAFETY: `all` holds world * numel elements on this device.
        unsafe {
            result::all_gather(
                input.data_ptr() as *const _,
                all.data_ptr(),
                numel as usize,
                dtype,
                comm.0,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        let shape = tensor.size();
        Ok((0..self.world)
            .map(|i| all.narrow(0, i * numel, numel).view(shape.as_slice()))
            .collect())
    }

    pub fn try_broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        let op = "broadcast";
        if !(0..self.world).contains(&root) {
            return Err(CollectiveError::Invalid {
                op,
                message: format!("root {root} is not a rank of a group of {}", self.world),
            });
        }
        let input = self.prepare(op, tensor)?;
        let dtype = nccl_kind(op, input.kind())?;
        let out = input.empty_like();
        let comm = self.live(op)?;
        // SAFETY: both buffers hold numel elements on this device.
        unsafe {
            result::broadcast(
                input.data_ptr() as *const _,
                out.data_ptr(),
                input.numel(),
                dtype,
                root as i32,
                comm.0,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        Ok(out)
    }

    /// An all-reduce of one element, waited for on the host.
    pub fn try_barrier(&self) -> Result<()> {
        let one = Tensor::ones([1], (Kind::Float, Device::Cuda(self.device)));
        // Held until the device has finished with it.
        let summed = self.try_all_reduce_sum(&one)?;
        tch::Cuda::synchronize(self.device as i64);
        drop(summed);
        Ok(())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if let Ok(comm) = self.comm.get_mut() {
            if !comm.0.is_null() {
                // SAFETY: a live communicator, destroyed once.
                let _ = unsafe { result::comm_destroy(comm.0) };
            }
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> i64 {
        self.rank
    }

    fn world_size(&self) -> i64 {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> samtrain_comm::Result<Tensor> {
        self.try_all_reduce_sum(tensor)
    }

    fn all_gather(&self, tensor: &Tensor) -> samtrain_comm::Result<Vec<Tensor>> {
        self.try_all_gather(tensor)
    }

    fn broadcast(&self, tensor: &Tensor, root: i64) -> samtrain_comm::Result<Tensor> {
        self.try_broadcast(tensor, root)
    }

    fn barrier(&self) -> samtrain_comm::Result<()> {
        self.try_barrier()
    }
}
