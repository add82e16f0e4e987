//! The TCP ring backend for CPU tensors.
//!
//! Each rank of a group holds two connections: one it sends on (to the next
//! rank) and one it receives on (from the previous rank). All-reduce is the
//! bandwidth-optimal ring: a reduce-scatter then an all-gather over `n`
//! chunks, so every rank sends and receives `2 (n-1)/n` times the tensor.
//! Chunks are streamed in pieces of [`PIECE`] bytes: as soon as a piece is
//! received (and reduced) it is queued for the next rank, and one thread
//! drives both sockets in non-blocking mode with `poll(2)`, so sending and
//! receiving overlap and nothing can deadlock on full socket buffers.
//!
//! Determinism: chunk `c` is summed along the ring starting at rank `c`
//! (`x_c + x_{c+1} + ...`, left to right), and the owner's final chunk is
//! what every rank receives, so all ranks get bit-identical results and the
//! same inputs always give the same result for a given world size.
//! bf16 and f16 are summed in f32 (converted before, rounded once after),
//! which costs twice the bytes on the wire but rounds only once.
//!
//! Every operation starts with a small header (operation, sequence number,
//! element count, dtype, root) that the receiver checks against its own, so
//! ranks calling different operations fail with a clear error instead of
//! exchanging garbage. A dead peer (end of stream, reset) fails the
//! operation at once; no progress for the timeout fails it too; a triggered
//! [`Abort`] fails it within [`POLL_INTERVAL`]. After any failure the group
//! shuts its sockets, so its neighbours fail promptly too, and every later
//! call returns [`CollectiveError::Broken`].

mod plan;
mod shm;
mod transfer;
mod wire;

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use samtrain_comm::Collective;
use tch::{Device, Kind, Tensor};

use crate::abort::Abort;
use crate::error::{CollectiveError, Result};
use plan::Plan;
use transfer::Transfer;
use wire::{kind_code, Call, Header, Op, Sum, HEADER_LEN, NOTICE_MAGIC};

/// Granularity of the pipeline: a received piece is reduced and forwarded
/// before the next is read. Big enough that syscalls are few, small enough
/// that the next rank starts early on rings of more than two ranks.
pub const PIECE: usize = 512 * 1024;

/// How often a waiting operation looks at the abort flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// One end of a ring connection: the stream and who is on the other side.
#[derive(Debug)]
pub(crate) struct Link {
    pub stream: TcpStream,
    /// The peer's rank in the world (what error messages name).
    pub rank: i64,
    pub addr: String,
}

#[derive(Debug)]
struct Links {
    /// Carries data to the next rank; never read except to notice its end.
    pub(super) next: Link,
    /// Carries data from the previous rank.
    pub(super) prev: Link,
}

struct Inner {
    links: Option<Links>,
    seq: u64,
    broken: Option<String>,
    /// Receive buffer of reduce steps: one piece, 8-byte aligned.
    scratch: Vec<u64>,
    /// The group's shared memory, when every rank is on this host.
    shm: Option<shm::Shm>,
}

/// A process group over TCP for CPU tensors (see the module docs).
pub struct RingCollective {
    group: &'static str,
    rank: i64,
    world: i64,
    timeout: Duration,
    abort: Abort,
    inner: Mutex<Inner>,
    /// Whether all-reduces go through shared memory (set once, at setup).
    shared: AtomicBool,
}

impl std::fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCollective")
            .field("group", &self.group)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl RingCollective {
    /// A group of one: every operation is local.
    pub fn single(group: &'static str) -> Self {
        Self::new(group, 0, 1, None, Duration::from_secs(1), Abort::new())
    }

    /// `links` is `(next, prev)`; `None` only for a group of one.
    pub(crate) fn new(
        group: &'static str,
        rank: i64,
        world: i64,
        links: Option<(Link, Link)>,
        timeout: Duration,
        abort: Abort,
    ) -> Self {
        Self {
            group,
            rank,
            world,
            timeout,
            abort,
            inner: Mutex::new(Inner {
                links: links.map(|(next, prev)| Links { next, prev }),
                seq: 0,
                broken: None,
                scratch: Vec::new(),
                shm: None,
            }),
            shared: AtomicBool::new(false),
        }
    }

    /// The group's name in error messages ("world", "dp", "tp").
    pub fn group(&self) -> &'static str {
        self.group
    }

    /// Runs `work` under the group's lock with the operation's sequence
    /// number, unless the group is broken; a failure breaks the group.
    fn locked<T>(
        &self,
        op: &'static str,
        work: impl FnOnce(&mut Inner, u64) -> Result<T>,
    ) -> Result<T> {
        let mut inner = self.inner.lock().map_err(|_| CollectiveError::Broken {
            op,
            group: self.group,
            first: "a thread panicked inside an operation".into(),
        })?;
        if let Some(first) = &inner.broken {
            return Err(CollectiveError::Broken {
                op,
                group: self.group,
                first: first.clone(),
            });
        }
        inner.seq += 1;
        let seq = inner.seq;
        let result = work(&mut inner, seq);
        if let Err(e) = &result {
            tracing::warn!(group = self.group, rank = self.rank, op, error = %e, "collective failed; closing the group");
            if let Some(links) = &inner.links {
                // Tell the previous rank why (on the direction of its
                // connection that carries nothing else), then end both
                // streams so neighbours blocked on us fail at once.
                let mut notice = NOTICE_MAGIC.to_vec();
                notice.extend_from_slice(e.to_string().as_bytes());
                notice.truncate(4096);
                let _ = (&links.prev.stream).write(&notice);
                let _ = links.next.stream.shutdown(Shutdown::Write);
                let _ = links.prev.stream.shutdown(Shutdown::Write);
            }
            inner.broken = Some(e.to_string());
        }
        result
    }

    /// Runs `plan` over the buffer at `buf` (with `src` as this rank's
    /// input, `buf` itself unless the operation writes elsewhere), under the
    /// group's lock.
    fn exchange(
        &self,
        call: Call,
        (src, buf): (*const u8, *mut u8),
        plan: &Plan,
        sum: Option<Sum>,
    ) -> Result<()> {
        self.locked(call.op.name(), |inner, seq| {
            self.transfer(inner, seq, call, (src, buf), plan, sum)
        })
    }

    /// One operation over the TCP links (see `transfer`).
    fn transfer(
        &self,
        inner: &mut Inner,
        seq: u64,
        call: Call,
        (src, buf): (*const u8, *mut u8),
        plan: &Plan,
        sum: Option<Sum>,
    ) -> Result<()> {
        let Call {
            op,
            kind,
            numel,
            root,
        } = call;
        let header = Header {
            op: op as u8,
            kind: kind_code(kind),
            seq,
            numel: numel as u64,
            root,
        };
        if inner.scratch.len() < PIECE / 8 {
            inner.scratch.resize(PIECE / 8, 0);
        }
        let Inner { links, scratch, .. } = inner;
        let links = links
            .as_ref()
            .expect("groups of more than one rank have links");
        // SAFETY: reinterpreting an initialised u64 buffer as bytes.
        let scratch = unsafe {
            std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, scratch.len() * 8)
        };
        let mut transfer = Transfer {
            op: op.name(),
            group: self.group,
            links,
            plan,
            buf,
            src,
            sum,
            scratch,
            header_out: header.encode(),
            header_sent: 0,
            header_in: [0; HEADER_LEN],
            header_got: 0,
            queue: VecDeque::new(),
            sent: 0,
            step: 0,
            got: 0,
            done: 0,
            next_closed: None,
        };
        transfer.run(&header, self.timeout, &self.abort)
    }

    /// Sets the group up to all-reduce through shared memory when every
    /// rank is on this host (see `shm`); otherwise it stays on TCP. Every
    /// rank of the group calls it, right after connecting; `peers` are the
    /// members' world ranks and addresses, in group order.
    pub(crate) fn attach_shared_memory(&self, peers: Vec<(i64, String)>) -> Result<()> {
        if self.world < 2 {
            return Ok(());
        }
        let mut token = [0u8; 8];
        if self.rank == 0 {
            getrandom::fill(&mut token).map_err(|e| CollectiveError::Invalid {
                op: "connect",
                message: format!("drawing a shared-memory name: {e}"),
            })?;
        }
        let token = self.try_broadcast(&Tensor::from_slice(&token), 0)?;
        let token: String = Vec::<u8>::try_from(&token)
            .map_err(|source| CollectiveError::Torch {
                op: "connect",
                source,
            })?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (rank, world) = (self.rank as usize, self.world as usize);
        let pending = shm::Pending::create(&token, rank, peers);
        self.try_barrier()?;
        let opened = pending
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|p| p.open().map_err(|e| e.to_string()));
        let failed = i64::from(opened.is_err());
        let failed = self
            .try_all_reduce_sum(&Tensor::from_slice(&[failed]))?
            .int64_value(&[0]);
        if let Ok(p) = &pending {
            p.unlink();
        }
        match opened {
            Ok(shm) if failed == 0 => {
                tracing::debug!(
                    group = self.group,
                    rank,
                    world,
                    "all-reduce through shared memory"
                );
                self.shared.store(true, Ordering::Relaxed);
                self.locked("connect", |inner, _| {
                    inner.shm = Some(shm);
                    Ok(())
                })
            }
            Ok(_) => {
                tracing::debug!(
                    group = self.group,
                    rank,
                    failed,
                    "ranks on other hosts; all-reduce over TCP"
                );
                Ok(())
            }
            Err(e) => {
                tracing::debug!(group = self.group, rank, error = %e, "no shared memory with the group; all-reduce over TCP");
                Ok(())
            }
        }
    }

    fn cpu_copy(&self, op: Op, tensor: &Tensor, kind: Kind) -> Result<Tensor> {
        Self::check_cpu(op, tensor)?;
        let mut out = Tensor::empty(tensor.size(), (kind, Device::Cpu));
        advise_huge_pages(&out);
        out.f_copy_(tensor)
            .map_err(|source| CollectiveError::Torch {
                op: op.name(),
                source,
            })?;
        Ok(out)
    }

    fn check_root(&self, root: i64) -> Result<()> {
        if (0..self.world).contains(&root) {
            Ok(())
        } else {
            Err(CollectiveError::Invalid {
                op: "broadcast",
                message: format!("root {root} is not a rank of a group of {}", self.world),
            })
        }
    }

    /// The dtype a sum runs in and how, for a tensor of `kind`.
    fn sum_kind(kind: Kind) -> Result<(Kind, Sum)> {
        match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => Ok((Kind::Float, Sum::F32)),
            Kind::Double => Ok((Kind::Double, Sum::F64)),
            Kind::Int => Ok((Kind::Int, Sum::I32)),
            Kind::Int64 => Ok((Kind::Int64, Sum::I64)),
            other => Err(CollectiveError::Invalid {
                op: Op::AllReduce.name(),
                message: format!("cannot sum dtype {other:?} (f32, f64, bf16, f16, i32, i64)"),
            }),
        }
    }

    fn check_cpu(op: Op, tensor: &Tensor) -> Result<()> {
        if tensor.device() == Device::Cpu {
            Ok(())
        } else {
            Err(CollectiveError::Invalid {
                op: op.name(),
                message: format!(
                    "the TCP ring takes CPU tensors, this one is on {:?}",
                    tensor.device()
                ),
            })
        }
    }

    /// Whether the ring can work directly on `tensor`'s memory: contiguous
    /// and already in the dtype the sum runs in.
    fn direct(tensor: &Tensor, work: Kind) -> bool {
        tensor.kind() == work && tensor.is_contiguous()
    }

    /// Sums `numel` elements of `call.kind` over the group: this rank's
    /// input at `src`, the result written to `dst` (which may be `src`).
    fn all_reduce_raw(&self, call: Call, sum: Sum, src: *const u8, dst: *mut u8) -> Result<()> {
        let elem = match sum {
            Sum::F32 | Sum::I32 => 4,
            Sum::F64 | Sum::I64 => 8,
        };
        let plan = Plan::all_reduce(self.world as usize, self.rank as usize, call.numel, elem);
        self.locked(call.op.name(), |inner, seq| {
            if let (Some(shm), Some(links)) = (inner.shm.as_mut(), inner.links.as_ref()) {
                let watch = shm::Watch {
                    op: call.op.name(),
                    group: self.group,
                    timeout: self.timeout,
                    abort: &self.abort,
                    links,
                };
                // SAFETY: the callers pass buffers of `numel` elements of
                // the sum's type, `dst` either `src` or disjoint from it.
                let done = unsafe {
                    shm.all_reduce(
                        (seq, kind_code(call.kind)),
                        sum,
                        elem,
                        call.numel,
                        src,
                        dst,
                        &watch,
                    )
                }?;
                if done {
                    return Ok(());
                }
            }
            self.transfer(inner, seq, call, (src, dst), &plan, Some(sum))
        })
    }

    fn call(tensor: &Tensor) -> Call {
        Call {
            op: Op::AllReduce,
            kind: tensor.kind(),
            numel: tensor.numel(),
            root: 0,
        }
    }

    /// Element-wise sum over the group (see the module docs for dtypes).
    pub fn try_all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = Op::AllReduce;
        let torch = |source| CollectiveError::Torch {
            op: op.name(),
            source,
        };
        Self::check_cpu(op, tensor)?;
        let (work, sum) = Self::sum_kind(tensor.kind())?;
        if !Self::direct(tensor, work) {
            // Converted (or made contiguous) into a fresh buffer anyway:
            // sum in that one.
            let mut out = self.cpu_copy(op, tensor, work)?;
            self.reduce_in_place(Self::call(tensor), &mut out, sum)?;
            return if work == tensor.kind() {
                Ok(out)
            } else {
                out.f_to_kind(tensor.kind()).map_err(torch)
            };
        }
        let mut out = Tensor::empty(tensor.size(), (work, Device::Cpu));
        advise_huge_pages(&out);
        if self.world == 1 {
            out.f_copy_(tensor).map_err(torch)?;
            return Ok(out);
        }
        // The input is read where it lies, by the first sends and the reduce
        // steps, and every byte of `out` is written once by the ring: no
        // separate first copy.
        self.all_reduce_raw(
            Self::call(tensor),
            sum,
            tensor.data_ptr() as *const u8,
            out.data_ptr() as *mut u8,
        )?;
        Ok(out)
    }

    /// Sums `buf` (contiguous, of the dtype `sum` works in) in place;
    /// `call` describes the caller's tensor for the header.
    fn reduce_in_place(&self, call: Call, buf: &mut Tensor, sum: Sum) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let ptr = buf.data_ptr() as *mut u8;
        self.all_reduce_raw(call, sum, ptr, ptr)
    }

    /// [`RingCollective::try_all_reduce_sum`] into `tensor` itself, with
    /// the same values bit for bit. A contiguous f32, f64, i32 or i64
    /// tensor is reduced in its own memory, with no allocation or copy.
    pub fn try_all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
        let op = Op::AllReduce;
        Self::check_cpu(op, tensor)?;
        let (work, sum) = Self::sum_kind(tensor.kind())?;
        if Self::direct(tensor, work) {
            return self.reduce_in_place(Self::call(tensor), tensor, sum);
        }
        let summed = self.try_all_reduce_sum(tensor)?;
        tensor
            .f_copy_(&summed)
            .map_err(|source| CollectiveError::Torch {
                op: op.name(),
                source,
            })
    }

    /// Every rank's tensor in rank order; all must have the same size and dtype.
    pub fn try_all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let op = Op::AllGather;
        let kind = tensor.kind();
        let numel = tensor.numel();
        let n = self.world as usize;
        if n == 1 {
            return Ok(vec![self.cpu_copy(op, tensor, kind)?]);
        }
        let mine = self.cpu_copy(op, tensor, kind)?;
        let all = Tensor::empty([(n * numel) as i64], (kind, Device::Cpu));
        advise_huge_pages(&all);
        let torch = |source| CollectiveError::Torch {
            op: op.name(),
            source,
        };
        let shape = tensor.size();
        let slot = |i: usize| {
            all.narrow(0, (i * numel) as i64, numel as i64)
                .view(shape.as_slice())
        };
        slot(self.rank as usize).f_copy_(&mine).map_err(torch)?;
        let bytes = numel * kind.elt_size_in_bytes();
        let plan = Plan::all_gather(n, self.rank as usize, bytes);
        let call = Call {
            op,
            kind,
            numel,
            root: 0,
        };
        let ptr = all.data_ptr() as *mut u8;
        self.exchange(call, (ptr, ptr), &plan, None)?;
        Ok((0..n).map(slot).collect())
    }

    /// Rank `root`'s tensor on every rank; the others pass a tensor of the
    /// same size and dtype (its values are ignored).
    pub fn try_broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        let op = Op::Broadcast;
        self.check_root(root)?;
        let out = self.cpu_copy(op, tensor, tensor.kind())?;
        if self.world > 1 {
            let bytes = out.numel() * tensor.kind().elt_size_in_bytes();
            let plan = Plan::broadcast(
                self.world as usize,
                self.rank as usize,
                root as usize,
                bytes,
            );
            let call = Call {
                op,
                kind: tensor.kind(),
                numel: out.numel(),
                root,
            };
            let ptr = out.data_ptr() as *mut u8;
            self.exchange(call, (ptr, ptr), &plan, None)?;
        }
        Ok(out)
    }

    /// Returns once every rank of the group has called it: a ring all-gather
    /// of one byte, so each rank hears from every other.
    pub fn try_barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let n = self.world as usize;
        let mut flags = vec![0u8; n];
        let plan = Plan::all_gather(n, self.rank as usize, 1);
        let call = Call {
            op: Op::Barrier,
            kind: Kind::Uint8,
            numel: 1,
            root: 0,
        };
        let ptr = flags.as_mut_ptr();
        self.exchange(call, (ptr, ptr), &plan, None)
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> i64 {
        self.rank
    }

    fn world_size(&self) -> i64 {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> samtrain_comm::Result<Tensor> {
        self.try_all_reduce_sum(tensor)
    }

    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> samtrain_comm::Result<()> {
        self.try_all_reduce_sum_(tensor)
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

    fn transport(&self) -> &'static str {
        if self.world == 1 {
            "in-process"
        } else if self.shared.load(Ordering::Relaxed) {
            "shared memory"
        } else {
            "tcp"
        }
    }

    /// Triggers the ring's abort flag; waiting operations notice it within
    /// tens of milliseconds. The flag is the generation's, shared by its
    /// groups, so they all end.
    fn abort(&self) {
        self.abort.trigger();
    }
}

/// Asks for transparent huge pages on a fresh output buffer. Tensors over
/// 32 MiB come straight from mmap, and faulting in 4 KiB pages costs more
/// than the transfer itself on some VMs (about 50 ms for 64 MiB against 20
/// ms with huge pages, measured on the benchmark machine). Advisory only:
/// a kernel without THP in `madvise` or `always` mode ignores it.
fn advise_huge_pages(t: &Tensor) {
    const HUGE: usize = 2 << 20;
    let bytes = t.numel() * t.kind().elt_size_in_bytes();
    if bytes < 2 * HUGE {
        return;
    }
    let start = t.data_ptr() as usize;
    let first = start.div_ceil(HUGE) * HUGE;
    let last = (start + bytes) / HUGE * HUGE;
    if last > first {
        // SAFETY: the range lies inside the tensor's own allocation and
        // MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}
