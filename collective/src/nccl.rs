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
//! rank, the world size, its CUDA device and the id.
//!
//! A peer that dies mid-operation leaves this rank's NCCL kernel spinning
//! on the device and its host thread blocked at the next synchronising
//! call, which nothing on the host can interrupt. So each operation records
//! a CUDA event after its kernel: [`Collective::pending`] says which is the
//! oldest not yet complete (a watchdog times it), and also looks at NCCL's
//! asynchronous error (a peer's closed socket), aborting at once when there
//! is one. [`Collective::abort`] calls `ncclCommAbort`, which ends the
//! spinning kernel, from any thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{result as cuda, sys as cuda_sys, CudaContext};
use cudarc::nccl::{result, sys};
use samtrain_comm::{Collective, Pending};
use tch::{Device, Kind, Tensor};

use crate::error::{CollectiveError, Result};

/// Length of NCCL's unique id.
pub const NCCL_ID_LEN: usize = 128;

/// Whether libcuda and libnccl can be loaded and a CUDA device is visible.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the libraries.
    let libs =
        unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() };
    libs && samtrain_torchext::cuda::device_count() > 0
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

/// One operation's completion marker on the device.
struct InFlight {
    op: &'static str,
    since: Instant,
    done: cuda_sys::CUevent,
}

// SAFETY: a CUDA event handle may be queried and destroyed from any thread
// once the device's context is bound there (see `NcclCollective::bind`).
unsafe impl Send for InFlight {}

/// A process group over NCCL for CUDA tensors on one device.
pub struct NcclCollective {
    /// The communicator; null once aborted. Read under `enqueue`, swapped
    /// out by [`NcclCollective::abort`].
    comm: AtomicPtr<sys::ncclComm>,
    /// Held while an operation is enqueued: NCCL calls on one
    /// communicator must not be concurrent.
    enqueue: Mutex<()>,
    /// Operations enqueued and not yet seen complete, oldest first.
    in_flight: Mutex<VecDeque<InFlight>>,
    /// Why the communicator was aborted, for the errors that follow.
    aborted: Mutex<Option<String>>,
    rank: i64,
    world: i64,
    device: usize,
    /// Keeps the device's primary context (the one PyTorch uses) alive.
    context: Arc<CudaContext>,
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
            comm: AtomicPtr::new(comm),
            enqueue: Mutex::new(()),
            in_flight: Mutex::new(VecDeque::new()),
            aborted: Mutex::new(None),
            rank,
            world,
            device,
            context,
        })
    }

    /// Aborts the communicator from any thread, saying why: kernels
    /// waiting on peers end, and every later operation fails naming
    /// `reason`. Only the first call does anything.
    pub fn abort_because(&self, reason: &str) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if comm.is_null() {
            return;
        }
        if let Ok(mut why) = self.aborted.lock() {
            why.get_or_insert_with(|| reason.to_owned());
        }
        // An operation being enqueued holds the communicator; give it a
        // moment to return so the abort does not pull the communicator
        // from under a call about to start. One blocked inside NCCL (a
        // connection to a dead peer) is what ncclCommAbort is for.
        let deadline = Instant::now() + Duration::from_secs(1);
        let _quiet = loop {
            match self.enqueue.try_lock() {
                Ok(guard) => break Some(guard),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        // SAFETY: a live communicator, taken out of `comm` above, so it is
        // aborted once and Drop skips it.
        let result = unsafe { result::comm_abort(comm) };
        tracing::warn!(rank = self.rank, device = self.device, %reason, ok = result.is_ok(), "NCCL communicator aborted");
    }

    /// The communicator, unless aborted; hold `enqueue` while using it.
    fn live(&self, op: &'static str) -> Result<(std::sync::MutexGuard<'_, ()>, sys::ncclComm_t)> {
        let guard = self.enqueue.lock().map_err(|_| CollectiveError::Broken {
            op,
            group: "nccl",
            first: "a thread panicked inside an operation".into(),
        })?;
        let comm = self.comm.load(Ordering::SeqCst);
        if comm.is_null() {
            let why = self
                .aborted
                .lock()
                .ok()
                .and_then(|w| w.clone())
                .unwrap_or_else(|| "aborted".to_owned());
            return Err(CollectiveError::Broken {
                op,
                group: "nccl",
                first: format!("the communicator was aborted: {why}"),
            });
        }
        Ok((guard, comm))
    }

    /// Makes the device's context current on this thread (the watchdog's
    /// thread never touched CUDA otherwise).
    fn bind(&self) -> bool {
        self.context.bind_to_thread().is_ok()
    }

    /// Marks the end of the operation just enqueued on the default stream.
    fn track(&self, op: &'static str) {
        if !self.bind() {
            return;
        }
        let flags = cuda_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let Ok(done) = cuda::event::create(flags) else {
            return;
        };
        // SAFETY: a fresh event; the null stream is the legacy default
        // stream, the one the operation was enqueued on.
        if unsafe { cuda::event::record(done, std::ptr::null_mut()) }.is_err() {
            // SAFETY: created above, never recorded.
            let _ = unsafe { cuda::event::destroy(done) };
            return;
        }
        if let Ok(mut queue) = self.in_flight.lock() {
            queue.push_back(InFlight {
                op,
                since: Instant::now(),
                done,
            });
        }
    }

    /// NCCL's asynchronous error on a live communicator, if it has one.
    fn async_error(&self) -> Option<String> {
        let _enqueue = self.enqueue.try_lock().ok()?;
        let comm = self.comm.load(Ordering::SeqCst);
        if comm.is_null() {
            return None;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (not aborted while `enqueue` is held).
        let called = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        match (called, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => None,
            (sys::ncclResult_t::ncclSuccess, _) if state.result().is_ok() => None,
            (sys::ncclResult_t::ncclSuccess, error) => Some(format!("{error:?}")),
            (failed, _) => Some(format!("ncclCommGetAsyncError: {failed:?}")),
        }
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

    pub fn try_all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = "all_reduce";
        let input = self.prepare(op, tensor)?;
        let dtype = nccl_kind(op, input.kind())?;
        let out = input.empty_like();
        let (_enqueue, comm) = self.live(op)?;
        // SAFETY: both buffers hold numel elements on this device; the
        // default stream orders the kernel with PyTorch's work.
        unsafe {
            result::all_reduce(
                input.data_ptr() as *const _,
                out.data_ptr(),
                input.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        self.track(op);
        Ok(out)
    }

    pub fn try_all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let op = "all_gather";
        let input = self.prepare(op, tensor)?;
        let dtype = nccl_kind(op, input.kind())?;
        let numel = input.numel() as i64;
        let all = Tensor::empty([self.world * numel], (input.kind(), input.device()));
        let (_enqueue, comm) = self.live(op)?;
        // SAFETY: `all` holds world * numel elements on this device.
        unsafe {
            result::all_gather(
                input.data_ptr() as *const _,
                all.data_ptr(),
                numel as usize,
                dtype,
                comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        self.track(op);
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
        let (_enqueue, comm) = self.live(op)?;
        // SAFETY: both buffers hold numel elements on this device.
        unsafe {
            result::broadcast(
                input.data_ptr() as *const _,
                out.data_ptr(),
                input.numel(),
                dtype,
                root as i32,
                comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error(op, e))?;
        self.track(op);
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
        let bound = self.bind();
        if let Ok(queue) = self.in_flight.get_mut() {
            for f in queue.drain(..) {
                if bound {
                    // SAFETY: recorded by `track`, destroyed once; CUDA
                    // frees it when its work completes.
                    let _ = unsafe { cuda::event::destroy(f.done) };
                }
            }
        }
        let comm = *self.comm.get_mut();
        if !comm.is_null() {
            // SAFETY: a live communicator, destroyed once.
            let _ = unsafe { result::comm_destroy(comm) };
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> i64 {
        self.rank
    }

    fn transport(&self) -> &'static str {
        "nccl"
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

    /// Forgets the operations the device finished; the oldest left is
    /// pending. An asynchronous NCCL error aborts the communicator here.
    fn pending(&self) -> Option<Pending> {
        if let Some(error) = self.async_error() {
            self.abort_because(&format!("NCCL reported an error: {error}"));
        }
        if !self.bind() {
            return None;
        }
        let mut queue = self.in_flight.lock().ok()?;
        while let Some(front) = queue.front() {
            // SAFETY: recorded by `track` and not destroyed yet.
            match unsafe { cuda::event::query(front.done) } {
                Err(cuda::DriverError(cuda_sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => {
                    return Some(Pending {
                        op: front.op,
                        since: front.since,
                    })
                }
                // Complete, or the device cannot say (it failed): either
                // way nothing is left to wait for.
                _ => {
                    let done = queue.pop_front().expect("a front entry").done;
                    // SAFETY: popped, so destroyed once.
                    let _ = unsafe { cuda::event::destroy(done) };
                }
            }
        }
        None
    }

    fn abort(&self) {
        self.abort_because("the watchdog aborted the generation's groups");
    }
}
