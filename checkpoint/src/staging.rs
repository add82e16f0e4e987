//! Staging: the copy of a rank's tensors into CPU memory the checkpoint
//! owns, the one part of a save training waits for.
//!
//! Five things keep it short. The memory is kept between saves
//! ([`StagingPool`]): a save of the same tensors copies into buffers whose
//! pages are already mapped, where a fresh allocation of this size is
//! mapped by the kernel and faulted in page by page on first touch (most
//! of a save's time before the pool). A large CPU tensor is copied with
//! non-temporal stores ([`copy_streaming`]), which write whole cache lines
//! to memory without first reading them in; its CRC-32 is left to the
//! upload, which computes it piece by piece as it writes the piece, while
//! training goes on. A small one is copied as usual and checksummed piece
//! by piece right after the piece is copied, while it is still in the
//! cache: it costs little and saves the upload the pass. A GPU tensor is
//! copied straight into page-locked ("pinned") memory, which the GPU fills
//! by DMA at the bus's speed, where pageable memory goes through the
//! driver's bounce buffer at a fraction of it; its checksum too is left to
//! the upload. And a large save is staged by several threads: training
//! waits for staging, so every core may copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use crate::error::CheckpointError;
use crate::format::{dtype_of, TensorEntry};
use crate::loan::Lent;

/// Bytes copied and checksummed at a time: small enough to stay in a
/// core's cache between the copy and the checksum.
const PIECE: usize = 1 << 20;

/// A save of at least this many bytes stages its CPU tensors with
/// non-temporal stores and leaves their checksums to the upload: it is
/// larger than the caches, so the upload reads it from memory anyway, and
/// the copy alone is what training waits for. A smaller save stays in the
/// cache for the upload, so it is checksummed while hot.
const STREAM_SAVES_FROM: usize = 64 << 20;
/// Tensors smaller than this are checksummed while staged in any save: a
/// few cache lines, where the upload's per-piece work would cost more.
const STREAM_TENSORS_FROM: usize = 64 << 10;

/// Below this many bytes a save stages on the calling thread: starting
/// threads would cost more than they save.
const PARALLEL_FROM: usize = 16 << 20;
/// The most threads one save stages with.
const MAX_STAGING_THREADS: usize = 8;

/// A tensor staged for the upload.
pub(crate) struct Staged {
    pub entry: TensorEntry,
    pub data: Data,
    /// CRC-32 of `data`, when staging computed it (small CPU tensors);
    /// else the upload computes it as it writes the bytes.
    pub crc: Option<crc32fast::Hasher>,
}

/// A staged tensor's bytes (or, in a file, its header's).
#[derive(Clone)]
pub(crate) enum Data {
    /// In memory the checkpoint owns.
    Owned(Bytes),
    /// In the trainer's memory, until the trainer settles the loan.
    Lent(Arc<Lent>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Owned(b) => b.len(),
            Data::Lent(l) => l.len(),
        }
    }

    /// Shows the bytes to `f` in order, at most `piece` at a time.
    pub fn pieces(
        &self,
        piece: usize,
        f: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match self {
            Data::Owned(b) => b.chunks(piece).try_for_each(f),
            Data::Lent(l) => l.pieces(piece, f),
        }
    }

    /// The bytes as one [`Bytes`]: shared when owned, copied when lent (a
    /// save lends tensors only to a local folder, which writes them in
    /// place; a remote store's upload holds on to its bytes).
    pub fn to_bytes(&self) -> std::io::Result<Bytes> {
        match self {
            Data::Owned(b) => Ok(b.clone()),
            Data::Lent(l) => {
                let mut bytes = Vec::with_capacity(l.len());
                l.pieces(PIECE, |piece| {
                    bytes.extend_from_slice(piece);
                    Ok(())
                })?;
                Ok(Bytes::from(bytes))
            }
        }
    }

    /// The bytes of an owned tensor.
    #[cfg(test)]
    pub fn bytes(&self) -> &Bytes {
        match self {
            Data::Owned(b) => b,
            Data::Lent(_) => panic!("a lent tensor has no bytes of its own"),
        }
    }
}

/// Memory a tensor is staged in.
enum Buffer {
    Heap(Vec<u8>),
    /// A CPU uint8 tensor in page-locked memory.
    Pinned(Tensor),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Heap(v) => v.len(),
            Buffer::Pinned(t) => t.numel(),
        }
    }

    fn is_pinned(&self) -> bool {
        matches!(self, Buffer::Pinned(_))
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        match self {
            Buffer::Heap(v) => v,
            // SAFETY: a contiguous CPU uint8 tensor of numel() bytes that
            // this buffer owns and nothing writes while it is shared.
            Buffer::Pinned(t) => unsafe {
                std::slice::from_raw_parts(t.data_ptr() as *const u8, t.numel())
            },
        }
    }
}

/// Staging buffers of finished saves, by length and kind, for the next
/// save of the same tensors. It keeps at most as many bytes as the largest
/// save staged so far: the memory of one save stays mapped between saves,
/// no more.
#[derive(Default)]
pub(crate) struct StagingPool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Kept buffers by (length, pinned).
    free: HashMap<(usize, bool), Vec<Buffer>>,
    kept: usize,
    limit: usize,
}

impl StagingPool {
    fn kept_buffer(&self, len: usize, pinned: bool) -> Option<Buffer> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let buf = state.free.get_mut(&(len, pinned)).and_then(Vec::pop)?;
        state.kept -= len;
        Some(buf)
    }

    /// A buffer of `len` bytes: a kept one if there is one of that length,
    /// else a new one (zeroed by the allocator, lazily for large ones).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        match self.kept_buffer(len, false) {
            Some(Buffer::Heap(v)) => v,
            _ => vec![0u8; len],
        }
    }

    /// A page-locked buffer of `len` bytes: a kept one, else a new one;
    /// `None` when page-locked memory can't be had.
    fn take_pinned(&self, len: usize) -> Option<Tensor> {
        if let Some(Buffer::Pinned(t)) = self.kept_buffer(len, true) {
            return Some(t);
        }
        samtrain_torchext::cuda::pinned_bytes(len).ok()
    }

    /// Takes `buf` back when the pool has room for it.
    fn give(&self, buf: Buffer) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let len = buf.len();
        if len == 0 || state.kept + len > state.limit {
            return;
        }
        state.kept += len;
        state
            .free
            .entry((len, buf.is_pinned()))
            .or_default()
            .push(buf);
    }

    /// Takes back a buffer of [`StagingPool::take`] when the pool has room.
    pub(crate) fn give_heap(&self, buf: Vec<u8>) {
        self.give(Buffer::Heap(buf));
    }

    /// Lets the pool keep a save of `bytes`.
    pub(crate) fn allow(&self, bytes: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.limit = state.limit.max(bytes);
    }

    /// Bytes kept for the next save.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.state.lock().unwrap().kept
    }
}

/// A staging buffer that goes back to its pool when the last [`Bytes`]
/// made from it is dropped (once its file is in the store).
struct Pooled {
    buf: Option<Buffer>,
    pool: Arc<StagingPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], Buffer::as_ref)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give(buf);
        }
    }
}

/// Copies every tensor of `tensors` (name, tensor, split dimension) into
/// memory of `pool`, checksumming CPU tensors as it goes; with `lend`, the
/// large contiguous CPU tensors are not copied but lent ([`Lent`]), to be
/// read in place by the upload.
pub(crate) fn stage_all(
    pool: &Arc<StagingPool>,
    tensors: &[(&str, &Tensor, Option<i64>)],
    lend: bool,
) -> Result<Vec<Staged>, CheckpointError> {
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|(_, t, _)| t.numel() * t.kind().elt_size_in_bytes())
        .collect();
    let bytes: usize = sizes.iter().sum();
    pool.allow(bytes);
    let streaming = bytes >= STREAM_SAVES_FROM;
    // A handle per item: tch's tensors move between threads but are not
    // shared by them. A tensor lent costs nothing to stage.
    let items = tensors
        .iter()
        .zip(&sizes)
        .map(|(&(name, t, dim), &size)| {
            let cost = if lend && lendable(t, size) { 0 } else { size };
            (cost, (name, t.shallow_clone(), dim))
        })
        .collect();
    in_parallel(items, |(name, t, dim)| {
        stage(pool, name, &t, dim, streaming, lend)
    })
    .into_iter()
    .collect()
}

/// `f` of every item (its size in bytes, and itself), in the items' order.
/// Items of [`PARALLEL_FROM`] bytes or more in all are worked on by up to
/// one thread per core, as training waits for them: dealt, largest first,
/// to the thread with the fewest bytes so far.
pub(crate) fn in_parallel<T: Send, R: Send>(
    items: Vec<(usize, T)>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let bytes: usize = items.iter().map(|(size, _)| size).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_STAGING_THREADS)
        .min(items.len());
    if threads <= 1 || bytes < PARALLEL_FROM {
        return items.into_iter().map(|(_, item)| f(item)).collect();
    }
    let count = items.len();
    let mut items: Vec<(usize, usize, T)> = items
        .into_iter()
        .enumerate()
        .map(|(i, (size, item))| (size, i, item))
        .collect();
    items.sort_by_key(|&(size, i, _)| (std::cmp::Reverse(size), i));
    let mut shares: Vec<(usize, Vec<(usize, T)>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for (size, i, item) in items {
        let share = shares
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least one thread");
        share.0 += size;
        share.1.push((i, item));
    }
    let mut done: Vec<Option<R>> = (0..count).map(|_| None).collect();
    let f = &f;
    std::thread::scope(|scope| {
        let running: Vec<_> = shares
            .into_iter()
            .map(|(_, share)| {
                scope.spawn(move || {
                    share
                        .into_iter()
                        .map(|(i, item)| (i, f(item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for thread in running {
            let results = thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (i, r) in results {
                done[i] = Some(r);
            }
        }
    });
    done.into_iter()
        .map(|r| r.expect("every item was dealt to a thread"))
        .collect()
}

fn stage(
    pool: &Arc<StagingPool>,
    name: &str,
    t: &Tensor,
    shard_dim: Option<i64>,
    streaming: bool,
    lend: bool,
) -> Result<Staged, CheckpointError> {
    let fail = |message: String| CheckpointError::Tensor {
        name: name.to_owned(),
        message,
    };
    let kind = t.f_kind().map_err(|e| fail(e.to_string()))?;
    let dtype = dtype_of(kind).ok_or_else(|| fail(format!("{kind:?} has no safetensors dtype")))?;
    let entry = TensorEntry {
        name: name.to_owned(),
        dtype,
        shape: t.size(),
        shard_dim,
    };
    let t = t.detach();
    let len = t.numel() * kind.elt_size_in_bytes();
    let device = t.device();
    if device != Device::Cpu && len > 0 {
        if let Some(pinned) = pool.take_pinned(len) {
            // The tensor's bytes, as one flat uint8 tensor on its device.
            let bytes = t
                .f_contiguous()
                .and_then(|c| c.f_reshape([-1]))
                .and_then(|c| c.f_view_dtype(Kind::Uint8))
                .map_err(|e| fail(e.to_string()))?;
            // A blocking copy: the bytes are in place when it returns.
            let mut pinned = pinned;
            pinned.f_copy_(&bytes).map_err(|e| fail(e.to_string()))?;
            return Ok(Staged {
                entry,
                data: Data::Owned(Bytes::from_owner(Pooled {
                    buf: Some(Buffer::Pinned(pinned)),
                    pool: pool.clone(),
                })),
                crc: None,
            });
        }
    }
    // From an accelerator without page-locked memory, the bytes go through
    // one CPU temporary.
    let t = if device == Device::Cpu {
        t
    } else {
        t.f_to_device(Device::Cpu)
            .map_err(|e| fail(e.to_string()))?
    };
    if lend && lendable(&t, len) {
        return Ok(Staged {
            entry,
            data: Data::Lent(Lent::new(&t, len, pool.clone())),
            crc: None,
        });
    }
    let t = t.f_contiguous().map_err(|e| fail(e.to_string()))?;
    let mut buf = pool.take(len);
    let mut crc = crc32fast::Hasher::new();
    let mut streamed = false;
    if len > 0 {
        // SAFETY: `t` is a contiguous CPU tensor of `len` bytes that lives,
        // unchanged, until the end of this function: the caller holds the
        // original and training waits for the save to return.
        let src = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
        streamed = streaming && len >= STREAM_TENSORS_FROM;
        if streamed {
            copy_streaming(&mut buf, src);
        } else {
            for (dst, src) in buf.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
                dst.copy_from_slice(src);
                crc.update(dst);
            }
        }
    }
    Ok(Staged {
        entry,
        data: Data::Owned(Bytes::from_owner(Pooled {
            buf: Some(Buffer::Heap(buf)),
            pool: pool.clone(),
        })),
        crc: (!streamed).then_some(crc),
    })
}

/// Whether a tensor of `len` bytes can be lent to the upload: a CPU tensor
/// whose bytes are in order, large enough that a copy would cost training
/// more than lending it costs the upload.
fn lendable(t: &Tensor, len: usize) -> bool {
    t.device() == Device::Cpu && t.is_contiguous() && len >= STREAM_TENSORS_FROM
}

/// Copies `src` into `dst` (the same length) with non-temporal stores:
/// each destination cache line is written to memory whole, where an
/// ordinary store first reads the line in and later writes it back, and
/// the copy does not push training's working set out of the cache. On a
/// 2-core Xeon VM, 358 MiB in two threads took 27 ms this way against 33
/// ms copied as usual and 42 ms copied and checksummed
/// (docs/PERFORMANCE.md, "Checkpoints vs torch.save").
pub(crate) fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "a staging buffer fits its tensor");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Streaming stores need 16-byte aligned destinations; the bytes
        // before the first such address, and the tail shorter than a cache
        // line, are copied as usual.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let lines = (dst.len() - head) / 64;
        // SAFETY: SSE2 is part of x86_64. Every load reads within `src` and
        // every store writes within `dst` (both `head + 64 * lines` bytes
        // or longer), and the stores are 16-byte aligned.
        unsafe {
            let d = dst.as_mut_ptr().add(head);
            let s = src.as_ptr().add(head);
            for line in 0..lines {
                let at = line * 64;
                for lane in (0..64).step_by(16) {
                    let v = _mm_loadu_si128(s.add(at + lane) as *const __m128i);
                    _mm_stream_si128(d.add(at + lane) as *mut __m128i, v);
                }
            }
            // Streaming stores are weakly ordered: make them visible before
            // the buffer is handed to the thread that uploads it.
            _mm_sfence();
        }
        let done = head + lines * 64;
        dst[done..].copy_from_slice(&src[done..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn buffers_of_a_finished_save_are_reused_by_the_next() {
        let pool = Arc::new(StagingPool::default());
        let a = Tensor::arange(1000, (Kind::Float, Device::Cpu));
        let b = Tensor::arange(10, (Kind::Int64, Device::Cpu)).reshape([2, 5]);
        let first = stage_all(&pool, &[("a", &a, None), ("b", &b, Some(1))], false).unwrap();
        let addr = first[0].data.bytes().as_ptr();
        assert_eq!(pool.kept(), 0);
        drop(first);
        assert_eq!(pool.kept(), 4080);
        let second = stage_all(&pool, &[("a", &a, None), ("b", &b, Some(1))], false).unwrap();
        assert_eq!(
            second[0].data.bytes().as_ptr(),
            addr,
            "the same memory again"
        );
        assert_eq!(pool.kept(), 0);
        assert_eq!(second[1].entry.shape, [2, 5]);
        assert_eq!(second[1].entry.shard_dim, Some(1));
        let expected: Vec<u8> = (0..10i64).flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(&second[1].data.bytes()[..], &expected[..]);
        let crc = second[1]
            .crc
            .clone()
            .expect("a small tensor is checksummed");
        assert_eq!(crc.finalize(), crc32fast::hash(&expected));
    }

    #[test]
    fn the_pool_keeps_no_more_than_one_save() {
        let pool = Arc::new(StagingPool::default());
        let a = Tensor::zeros([256], (Kind::Float, Device::Cpu));
        let one = stage_all(&pool, &[("a", &a, None)], false).unwrap();
        let two = stage_all(&pool, &[("a", &a, None)], false).unwrap();
        drop(one);
        drop(two);
        assert_eq!(pool.kept(), 1024);
    }

    #[test]
    fn strided_tensors_are_staged_in_their_logical_order() {
        let pool = Arc::new(StagingPool::default());
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu))
            .reshape([2, 3])
            .transpose(0, 1);
        let staged = stage_all(&pool, &[("t", &t, None)], false).unwrap();
        let values: Vec<f32> = staged[0]
            .data
            .bytes()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(staged[0].entry.shape, [3, 2]);
    }

    /// Above [`PARALLEL_FROM`] the tensors are staged by several threads:
    /// each comes back in its place, with its bytes (a strided one in its
    /// logical order), its checksum and its record, whatever thread took it.
    #[test]
    fn a_large_save_staged_by_several_threads_keeps_every_tensor_in_place() {
        let pool = Arc::new(StagingPool::default());
        let sizes = [3_000_000i64, 17, 0, 1_500_000, 2_500_001, 64];
        let mut tensors: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::arange(n, (Kind::Float, Device::Cpu)) * (i as f64 + 1.0))
            .collect();
        tensors.push(
            Tensor::arange(600_000, (Kind::Int64, Device::Cpu))
                .reshape([1000, 600])
                .transpose(0, 1),
        );
        let names: Vec<String> = (0..tensors.len()).map(|i| format!("t{i}")).collect();
        let list: Vec<(&str, &Tensor, Option<i64>)> = names
            .iter()
            .zip(&tensors)
            .enumerate()
            .map(|(i, (n, t))| (n.as_str(), t, (i % 2 == 0).then_some(0)))
            .collect();
        let total: usize = tensors
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        assert!(total > PARALLEL_FROM, "{total} bytes");
        let staged = stage_all(&pool, &list, false).unwrap();
        assert_eq!(staged.len(), tensors.len());
        for (i, (s, t)) in staged.iter().zip(&tensors).enumerate() {
            assert_eq!(s.entry.name, names[i]);
            assert_eq!(s.entry.shape, t.size());
            assert_eq!(s.entry.shard_dim, (i % 2 == 0).then_some(0));
            let c = t.contiguous();
            let len = c.numel() * c.kind().elt_size_in_bytes();
            let mut expected = vec![0u8; len];
            c.copy_data_u8(&mut expected, c.numel());
            assert!(s.data.bytes()[..] == expected[..], "{} differs", names[i]);
            let crc = s
                .crc
                .clone()
                .expect("a save below the caches' size is checksummed");
            assert_eq!(crc.finalize(), crc32fast::hash(&expected), "{}", names[i]);
        }
    }

    /// A save larger than the caches is copied with streaming stores and
    /// its checksums left to the upload, except for tiny tensors, which
    /// are checksummed as they are staged.
    #[test]
    fn a_save_larger_than_the_caches_leaves_its_checksums_to_the_upload() {
        let pool = Arc::new(StagingPool::default());
        let big = Tensor::arange(STREAM_SAVES_FROM as i64 / 4 + 5, (Kind::Float, Device::Cpu));
        let tiny = Tensor::arange(100, (Kind::Float, Device::Cpu));
        let small = Tensor::arange(STREAM_TENSORS_FROM as i64 / 8, (Kind::Int64, Device::Cpu));
        let list = [
            ("big", &big, None),
            ("tiny", &tiny, None),
            ("small", &small, None),
        ];
        let staged = stage_all(&pool, &list, false).unwrap();
        for (s, (name, t, _)) in staged.iter().zip(&list) {
            let mut expected = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut expected, t.numel());
            assert!(s.data.bytes()[..] == expected[..], "{name} differs");
            match *name {
                "tiny" => assert_eq!(
                    s.crc.clone().map(|c| c.finalize()),
                    Some(crc32fast::hash(&expected))
                ),
                _ => assert!(s.crc.is_none(), "{name} was checksummed while staged"),
            }
        }
    }

    /// The streaming copy is exact whatever the alignment of its ends: the
    /// head before the first aligned address, whole lines, and the tail.
    #[test]
    fn streaming_copies_are_exact_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for offset in 0..17 {
            for len in [0, 1, 15, 16, 63, 64, 65, 127, 1000, 4096 + 7] {
                let mut dst = vec![0u8; len + offset + 3];
                copy_streaming(&mut dst[offset..offset + len], &src[5..5 + len]);
                assert!(
                    dst[..offset].iter().all(|&b| b == 0),
                    "before, at {offset}+{len}"
                );
                assert_eq!(
                    &dst[offset..offset + len],
                    &src[5..5 + len],
                    "at {offset}+{len}"
                );
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0),
                    "after, at {offset}+{len}"
                );
            }
        }
    }

    /// A lending save lends its large contiguous CPU tensors and copies the
    /// rest: the small ones (checksummed as they are staged) and the
    /// strided ones, which have no bytes in order to lend.
    #[test]
    fn a_lending_save_lends_only_large_contiguous_cpu_tensors() {
        let pool = Arc::new(StagingPool::default());
        let large = Tensor::arange(STREAM_TENSORS_FROM as i64, (Kind::Float, Device::Cpu));
        let small = Tensor::arange(100, (Kind::Float, Device::Cpu));
        let strided = large.reshape([-1, 64]).transpose(0, 1);
        let list = [
            ("large", &large, None),
            ("small", &small, None),
            ("strided", &strided, None),
        ];
        let staged = stage_all(&pool, &list, true).unwrap();
        assert!(matches!(&staged[0].data, Data::Lent(l) if l.len() == 4 * STREAM_TENSORS_FROM));
        assert!(matches!(staged[1].data, Data::Owned(_)));
        assert!(matches!(staged[2].data, Data::Owned(_)));
        for (s, (name, t, _)) in staged.iter().zip(&list) {
            let c = t.contiguous();
            let mut expected = vec![0u8; c.numel() * c.kind().elt_size_in_bytes()];
            c.copy_data_u8(&mut expected, c.numel());
            let mut got = Vec::new();
            s.data
                .pieces(PIECE, |p| {
                    got.extend_from_slice(p);
                    Ok(())
                })
                .unwrap();
            assert!(got == expected, "{name} differs");
        }
    }
}
