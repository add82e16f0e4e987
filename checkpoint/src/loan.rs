//! Lent tensors: a save that reads the trainer's CPU tensors where they are,
//! instead of copying them while training waits.
//!
//! Between one optimizer step and the next, forward and backward only read
//! the parameters and the optimizer's moments. A save made right after a
//! step can therefore write them to a local file straight from the
//! trainer's memory while the next step's forward and backward run, and
//! training needs them back only when the next update is about to write
//! them. At that point the trainer settles the [`Loan`]: whatever part of
//! each tensor the upload has not read yet is copied (into the staging
//! pool's memory) and the upload goes on from the copy. Training waits for
//! that remainder only, not for the whole state.
//!
//! The protocol is one lock per tensor. The upload reads a tensor piece by
//! piece, in order, each piece under the tensor's lock; settling takes the
//! same lock, copies from the first byte not yet read, and from then on
//! the upload reads the copy. So no byte is read after the trainer got the
//! tensor back, and none is read twice from two different states: a read
//! of a byte before the copy's start once settled (a second pass over the
//! tensor) is an error, never a silent mix of two steps' values.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::staging::{copy_streaming, in_parallel, StagingPool};

/// A contiguous CPU tensor's bytes, read in place by the upload until its
/// loan is settled.
pub(crate) struct Lent {
    /// A handle on the trainer's storage: keeps the memory alive for as long
    /// as the upload may read it. Never used from two threads at once (it is
    /// only held, and dropped by whichever holder goes last).
    _tensor: Tensor,
    ptr: *const u8,
    len: usize,
    progress: Mutex<Progress>,
    pool: Arc<StagingPool>,
}

// SAFETY: the raw pointer is only dereferenced under `progress`'s lock and
// before the loan is settled, while the trainer leaves the memory unchanged
// (its promise in taking the loan); `_tensor` is never touched after
// construction, and a tch tensor may be dropped on any thread.
unsafe impl Send for Lent {}
unsafe impl Sync for Lent {}

struct Progress {
    /// Bytes the upload has read, from the start.
    read: usize,
    /// Once settled: where the copy starts, and a buffer of the tensor's
    /// length whose bytes from there on are the tensor's as lent.
    copy: Option<(usize, Vec<u8>)>,
}

impl Lent {
    /// Lends `t`, a contiguous CPU tensor of `len` bytes.
    pub fn new(t: &Tensor, len: usize, pool: Arc<StagingPool>) -> Arc<Self> {
        debug_assert!(t.is_contiguous() && t.device() == tch::Device::Cpu);
        Arc::new(Self {
            _tensor: t.shallow_clone(),
            ptr: t.data_ptr() as *const u8,
            len,
            progress: Mutex::new(Progress {
                read: 0,
                copy: None,
            }),
            pool,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shows the bytes to `f` in order, at most `piece` at a time: from the
    /// trainer's memory while the loan runs, then from the copy.
    pub fn pieces(
        &self,
        piece: usize,
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut at = 0;
        while at < self.len {
            let end = (at + piece).min(self.len);
            self.read(at, end, &mut f)?;
            at = end;
        }
        Ok(())
    }

    /// Shows bytes `at..end` to `f`, under the tensor's lock.
    fn read(
        &self,
        at: usize,
        end: usize,
        f: impl FnOnce(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut progress = self.progress();
        match &progress.copy {
            None => {
                // SAFETY: `ptr` points at `len` bytes that the trainer
                // leaves unchanged until it settles, which waits for this
                // lock.
                let live = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
                f(&live[at..end])?;
                progress.read = progress.read.max(end);
                Ok(())
            }
            Some((from, copy)) if at >= *from => f(&copy[at..end]),
            Some((from, _)) => Err(io::Error::other(format!(
                "bytes {at}..{from} of a lent tensor were read again after training took it \
                 back; this save is abandoned"
            ))),
        }
    }

    /// Bytes the upload has not read yet.
    fn unread(&self) -> usize {
        self.len - self.progress().read
    }

    /// Copies what the upload has not read yet; bytes copied.
    fn settle(&self) -> usize {
        let mut progress = self.progress();
        if progress.copy.is_some() {
            return 0;
        }
        let from = progress.read;
        let rest = self.len - from;
        let copy = if rest == 0 {
            Vec::new()
        } else {
            // The tensor's whole length, so that the pool hands the same
            // (already mapped) buffer to the next save of this tensor.
            let mut copy = self.pool.take(self.len);
            // SAFETY: as in `read`; the trainer waits for this copy.
            let live = unsafe { std::slice::from_raw_parts(self.ptr.add(from), rest) };
            copy_streaming(&mut copy[from..], live);
            copy
        };
        progress.copy = Some((from, copy));
        rest
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let progress = self.progress.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((_, copy)) = progress.copy.take() {
            self.pool.give_heap(copy);
        }
    }
}

/// What a save borrowed from the trainer: settle it before any of the saved
/// tensors changes (the next optimizer step, a restore). Dropping it
/// settles it too.
#[must_use = "a loan must be settled before the lent tensors change"]
pub struct Loan {
    lent: Vec<Arc<Lent>>,
    /// Time spent settling, shared with the save's report of what it
    /// blocked.
    blocked: Arc<AtomicU64>,
}

/// What settling a loan took (nothing, by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Bytes the upload had not read yet, copied while training waited.
    pub copied: u64,
    pub took: Duration,
}

impl Loan {
    pub(crate) fn new(lent: Vec<Arc<Lent>>, blocked: Arc<AtomicU64>) -> Self {
        Self { lent, blocked }
    }

    /// A loan of nothing: the save copied every tensor.
    pub fn none() -> Self {
        Self::new(Vec::new(), Arc::default())
    }

    /// Bytes lent, read in place by the upload until settled.
    pub fn bytes(&self) -> u64 {
        self.lent.iter().map(|l| l.len() as u64).sum()
    }

    /// Gives the tensors back: copies what the upload has not read yet and
    /// returns; from then on the trainer may change them.
    pub fn settle(mut self) -> Settled {
        self.settle_now()
    }

    fn settle_now(&mut self) -> Settled {
        let lent = std::mem::take(&mut self.lent);
        if lent.is_empty() {
            return Settled::default();
        }
        let start = Instant::now();
        // Dealt to threads by what is left to copy (the upload may read on
        // meanwhile, so this is a guess, as dealing needs no more).
        let sized = lent.into_iter().map(|l| (l.unread(), l)).collect();
        let copied: usize = in_parallel(sized, |l| l.settle()).into_iter().sum();
        let took = start.elapsed();
        self.blocked
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        Settled {
            copied: copied as u64,
            took,
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.settle_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn bytes_of(t: &Tensor) -> Vec<u8> {
        let mut v = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut v, t.numel());
        v
    }

    fn read_all(lent: &Lent, piece: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        lent.pieces(piece, |p| {
            out.extend_from_slice(p);
            Ok(())
        })?;
        Ok(out)
    }

    /// The upload sees the tensor as it was lent, though the trainer
    /// changes it once the loan is settled, wherever the upload was.
    #[test]
    fn bytes_read_after_settling_are_those_of_the_lent_tensor() {
        let pool = Arc::new(StagingPool::default());
        let mut t = Tensor::arange(10_000, (Kind::Float, Device::Cpu));
        let lent_bytes = bytes_of(&t);
        let len = lent_bytes.len();
        let piece = 4096;
        let lent = Lent::new(&t, len, pool.clone());
        let blocked = Arc::new(AtomicU64::new(0));
        let loan = Loan::new(vec![lent.clone()], blocked.clone());
        assert_eq!(loan.bytes(), len as u64);
        // The upload reads five pieces from the trainer's memory...
        let mut seen = Vec::new();
        for at in (0..5 * piece).step_by(piece) {
            lent.read(at, at + piece, |p| {
                seen.extend_from_slice(p);
                Ok(())
            })
            .unwrap();
        }
        // ...then training takes the tensor back and writes it...
        let settled = loan.settle();
        assert_eq!(settled.copied, (len - 5 * piece) as u64);
        assert_eq!(
            blocked.load(Ordering::Relaxed),
            settled.took.as_nanos() as u64
        );
        let _ = t.fill_(-1.0);
        assert_ne!(bytes_of(&t), lent_bytes);
        // ...and the upload goes on from the copy.
        for at in (5 * piece..len).step_by(piece) {
            lent.read(at, (at + piece).min(len), |p| {
                seen.extend_from_slice(p);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(seen, lent_bytes);
        // Read again from the start, the bytes before the copy are gone: an
        // error, not a mix of two states.
        let again = read_all(&lent, piece).unwrap_err();
        assert!(again.to_string().contains("read again"), "{again}");
    }

    /// A loan dropped unsettled settles; one the upload had read whole
    /// copies nothing; the copies go back to the pool with the tensors.
    #[test]
    fn dropping_a_loan_settles_it() {
        let pool = Arc::new(StagingPool::default());
        // The save that lent them lets the pool keep its size.
        pool.allow(16_000);
        let t = Tensor::arange(1000, (Kind::Int64, Device::Cpu));
        let lent_bytes = bytes_of(&t);
        let (unread, read) = (
            Lent::new(&t, lent_bytes.len(), pool.clone()),
            Lent::new(&t, lent_bytes.len(), pool.clone()),
        );
        assert_eq!(read_all(&read, 1000).unwrap(), lent_bytes);
        let blocked = Arc::new(AtomicU64::new(0));
        drop(Loan::new(
            vec![unread.clone(), read.clone()],
            blocked.clone(),
        ));
        assert!(blocked.load(Ordering::Relaxed) > 0);
        let _ = t.shallow_clone().fill_(7);
        assert_eq!(read_all(&unread, 333).unwrap(), lent_bytes);
        assert!(read_all(&read, 1000).is_err(), "read whole, then again");
        assert_eq!(pool.kept(), 0);
        drop((unread, read));
        assert_eq!(pool.kept(), 8000, "the copy of the unread tensor");
        assert_eq!(Loan::none().settle().copied, 0);
    }
}
