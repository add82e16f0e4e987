//! All-reduce through shared memory when every rank of a group is on one
//! host (several ranks per node, or the tests' and benchmarks' local
//! processes), where TCP over loopback would copy every byte through the
//! kernel twice.
//!
//! Each rank owns a slot, a file in `/dev/shm` that every rank of the group
//! maps; a small control file holds one record per rank (its barrier
//! counter and the operation it is in). An all-reduce is three barriers:
//! each rank copies its input into its slot (the chunks others reduce);
//! rank `c` sums chunk `c` over every slot, starting at its own input and
//! in ring order, exactly the additions the TCP ring makes, so the two give
//! the same bits; then each rank copies every chunk's sum out of its owner's
//! slot. Barriers spin briefly, then sleep on a futex in the shared page.
//!
//! The files are unlinked as soon as every rank has opened them, so a
//! crashed process leaves nothing behind; slots grow (with `fallocate`, so
//! a full `/dev/shm` is an error here rather than a SIGBUS later) to the
//! largest tensor reduced. When the group spans hosts (a rank cannot open
//! the others' files), or a slot cannot grow, the ring goes over TCP.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::plan::Plan;
use super::transfer::add_into;
use super::wire::{Sum, NOTICE_MAGIC};
use super::{Link, Links};
use crate::abort::Abort;
use crate::error::{CollectiveError, Result};

/// Where slots live: tmpfs on Linux, what `shm_open` uses.
pub(super) const SHM_DIR: &str = "/dev/shm";
/// Two cache lines per rank in the control file.
const RECORD: usize = 128;
/// How long a barrier spins before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// The longest a sleeping barrier goes without looking at the abort flag
/// and its neighbours' sockets.
const NAP: Duration = Duration::from_millis(10);

/// A rank's record in the control file.
#[repr(C)]
struct Record {
    /// Barriers this rank has reached (wrapping); a futex word.
    arrived: AtomicU32,
    /// The operations it is in, by sequence number's parity: a rank that
    /// finished an operation early may announce the next one before a
    /// slower rank has read its announcement of this one, never the one
    /// after (that takes everyone's arrival at the next barrier).
    calls: [Announced; 2],
}

const _: () = assert!(std::mem::size_of::<Record>() <= RECORD);

#[repr(C)]
struct Announced {
    /// Whether its slot holds this operation (0: it could not grow).
    ok: AtomicU32,
    /// The operation: sequence number, element count, dtype.
    seq: AtomicU64,
    numel: AtomicU64,
    kind: AtomicU64,
}

/// A shared, writable mapping of a whole file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; who writes which part when is
// ordered by the barriers.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh shared mapping of an open file, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the range mmap returned.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

struct Slot {
    file: File,
    map: Mapping,
}

impl Slot {
    /// Maps at least `len` bytes of the file, remapping if it has grown.
    fn map_at_least(&mut self, len: usize) -> io::Result<()> {
        if self.map.len < len {
            let size = self.file.metadata()?.len() as usize;
            if size < len {
                return Err(io::Error::other(format!(
                    "the slot holds {size} bytes, {len} are needed"
                )));
            }
            self.map = Mapping::new(&self.file, size)?;
        }
        Ok(())
    }
}

/// The shared memory of one group (see the module docs).
pub(super) struct Shm {
    rank: usize,
    world: usize,
    /// Each rank's world rank and address, for error messages.
    peers: Vec<(i64, String)>,
    control: Mapping,
    slots: Vec<Slot>,
    /// Barriers this rank has passed (wrapping).
    barriers: u32,
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

/// What a barrier watches while it waits.
pub(super) struct Watch<'a> {
    pub(super) op: &'static str,
    pub(super) group: &'static str,
    pub(super) timeout: Duration,
    pub(super) abort: &'a Abort,
    pub(super) links: &'a Links,
}

/// The files of a group whose rank 0 drew `token`.
fn path(token: &str, who: &str) -> String {
    format!("{SHM_DIR}/samtrain-{token}-{who}")
}

/// The setup steps each rank takes, between which the ring agrees.
pub(super) struct Pending {
    token: String,
    rank: usize,
    world: usize,
    peers: Vec<(i64, String)>,
}

impl Pending {
    /// Step 1: creates this rank's slot (and, on rank 0, the control file
    /// with the token in its last record, which proves to the others that
    /// they see the same `/dev/shm`).
    pub(super) fn create(
        token: &str,
        rank: usize,
        peers: Vec<(i64, String)>,
    ) -> io::Result<Pending> {
        let world = peers.len();
        let create = |who: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path(token, who))
        };
        create(&rank.to_string())?;
        let pending = Pending {
            token: token.to_owned(),
            rank,
            world,
            peers,
        };
        if rank == 0 {
            let control = || -> io::Result<()> {
                let control = create("ctl")?;
                control.set_len(((world + 1) * RECORD) as u64)?;
                let map = Mapping::new(&control, (world + 1) * RECORD)?;
                // SAFETY: the token fits the last record of a fresh mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        token.as_ptr(),
                        map.ptr.add(world * RECORD),
                        token.len().min(RECORD),
                    )
                };
                Ok(())
            };
            if let Err(e) = control() {
                pending.unlink();
                return Err(e);
            }
        }
        Ok(pending)
    }

    /// Step 2, once every rank has created its files: opens them all.
    pub(super) fn open(&self) -> io::Result<Shm> {
        let open = |who: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path(&self.token, who))
        };
        let control_file = open("ctl")?;
        let control = Mapping::new(&control_file, (self.world + 1) * RECORD)?;
        let token = self.token.as_bytes();
        // SAFETY: reading the token rank 0 wrote before the ring's barrier.
        let found = unsafe {
            std::slice::from_raw_parts(control.ptr.add(self.world * RECORD), token.len())
        };
        if found != token {
            return Err(io::Error::other("another host's /dev/shm"));
        }
        let slots = (0..self.world)
            .map(|r| {
                Ok(Slot {
                    file: open(&r.to_string())?,
                    map: Mapping::new(&control_file, 0)?,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Shm {
            rank: self.rank,
            world: self.world,
            peers: self.peers.clone(),
            control,
            slots,
            barriers: 0,
        })
    }

    /// Step 3, once every rank has opened them (or failed to): removes this
    /// rank's names (the files it created); the open files live on until the
    /// group drops them.
    pub(super) fn unlink(&self) {
        let _ = std::fs::remove_file(path(&self.token, &self.rank.to_string()));
        if self.rank == 0 {
            let _ = std::fs::remove_file(path(&self.token, "ctl"));
        }
    }
}

impl Shm {
    fn record(&self, rank: usize) -> &Record {
        // SAFETY: the control mapping holds `world + 1` records, 64-byte
        // aligned (page-aligned mapping), and lives as long as `self`.
        unsafe { &*(self.control.ptr.add(rank * RECORD) as *const Record) }
    }

    /// Grows this rank's slot to hold `bytes` (reserving the memory, so that
    /// writing it cannot fault later); false if `/dev/shm` has no room.
    fn grow(&mut self, bytes: usize) -> bool {
        let slot = &mut self.slots[self.rank];
        if slot.map.len >= bytes {
            return true;
        }
        // SAFETY: fallocate on an open file descriptor.
        let err = unsafe { libc::posix_fallocate(slot.file.as_raw_fd(), 0, bytes as libc::off_t) };
        if err != 0 {
            tracing::warn!(
                bytes,
                error = %io::Error::from_raw_os_error(err),
                "no room in {SHM_DIR} for this all-reduce; it goes over TCP"
            );
            return false;
        }
        slot.map_at_least(bytes).is_ok()
    }

    /// Sums `numel` elements over the group: this rank's input at `src`,
    /// the result written to `dst` (which may be `src`). Returns false,
    /// having changed nothing, when some rank's slot could not hold them:
    /// every rank then returns false and the caller goes over TCP.
    ///
    /// # Safety
    /// `src` and `dst` must be valid for `numel * elem` bytes, aligned for
    /// the elements, and `dst` either `src` or disjoint from it.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn all_reduce(
        &mut self,
        (seq, kind): (u64, u8),
        sum: Sum,
        elem: usize,
        numel: usize,
        src: *const u8,
        dst: *mut u8,
        watch: &Watch<'_>,
    ) -> Result<bool> {
        let bytes = numel * elem;
        let ok = self.grow(bytes);
        let call = (seq % 2) as usize;
        let mine = &self.record(self.rank).calls[call];
        mine.ok.store(u32::from(ok), Ordering::Relaxed);
        mine.seq.store(seq, Ordering::Relaxed);
        mine.numel.store(numel as u64, Ordering::Relaxed);
        mine.kind.store(u64::from(kind), Ordering::Relaxed);
        self.barrier(watch)?;
        let mut all_ok = true;
        for p in (0..self.world).filter(|&p| p != self.rank) {
            let theirs = &self.record(p).calls[call];
            let (s, n, k) = (
                theirs.seq.load(Ordering::Relaxed),
                theirs.numel.load(Ordering::Relaxed),
                theirs.kind.load(Ordering::Relaxed),
            );
            if (s, n, k) != (seq, numel as u64, u64::from(kind)) {
                return Err(CollectiveError::Mismatch {
                    op: watch.op,
                    group: watch.group,
                    peer: self.peers[p].0,
                    addr: self.peers[p].1.clone(),
                    detail: format!(
                        "it is in operation #{s} of {n} elements (dtype code {k}), this rank in #{seq} of {numel} (dtype code {kind})"
                    ),
                });
            }
            all_ok &= theirs.ok.load(Ordering::Relaxed) == 1;
        }
        if !(ok && all_ok) || bytes == 0 {
            return Ok(false);
        }
        for p in 0..self.world {
            self.slots[p]
                .map_at_least(bytes)
                .map_err(|source| CollectiveError::Io {
                    op: watch.op,
                    group: watch.group,
                    peer: p as i64,
                    addr: "shared memory".into(),
                    source,
                })?;
        }
        let chunks = Plan::split(numel, self.world, elem);
        let slots: Vec<*mut u8> = self.slots.iter().map(|s| s.map.ptr).collect();
        let slot = |p: usize| slots[p];
        let (r, n) = (self.rank, self.world);
        // The chunks the others sum, into this rank's slot.
        for (_, range) in chunks.iter().enumerate().filter(|(c, _)| *c != r) {
            std::ptr::copy_nonoverlapping(
                src.add(range.start),
                slot(r).add(range.start),
                range.len(),
            );
        }
        self.barrier(watch)?;
        // Chunk r, summed from this rank's input on, in ring order.
        let own = &chunks[r];
        let acc = slot(r).add(own.start);
        let piece = |p: usize| std::slice::from_raw_parts(slot(p).add(own.start), own.len());
        add_into(sum, acc, src.add(own.start), piece((r + 1) % n));
        for k in 2..n {
            add_into(sum, acc, acc, piece((r + k) % n));
        }
        self.barrier(watch)?;
        for (c, range) in chunks.iter().enumerate() {
            std::ptr::copy_nonoverlapping(
                slot(c).add(range.start),
                dst.add(range.start),
                range.len(),
            );
        }
        Ok(true)
    }

    /// Waits until every rank has reached this barrier.
    fn barrier(&mut self, watch: &Watch<'_>) -> Result<()> {
        self.barriers = self.barriers.wrapping_add(1);
        let target = self.barriers;
        let mine = &self.record(self.rank).arrived;
        mine.store(target, Ordering::Release);
        futex_wake(mine);
        let started = Instant::now();
        for p in (0..self.world).filter(|&p| p != self.rank) {
            let theirs = &self.record(p).arrived;
            loop {
                let seen = theirs.load(Ordering::Acquire);
                // Reached, counting with wrap-around.
                if (seen.wrapping_sub(target) as i32) >= 0 {
                    break;
                }
                if started.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                if watch.abort.is_triggered() {
                    return Err(CollectiveError::Aborted {
                        op: watch.op,
                        group: watch.group,
                    });
                }
                if let Some(e) = watch.dead_neighbour() {
                    // A neighbour sends only after passing the barrier, which
                    // takes every rank's arrival: bytes that come once the
                    // awaited rank has arrived are the next operation's.
                    if (theirs.load(Ordering::Acquire).wrapping_sub(target) as i32) >= 0 {
                        break;
                    }
                    return Err(e);
                }
                if started.elapsed() > watch.timeout {
                    return Err(CollectiveError::Timeout {
                        op: watch.op,
                        group: watch.group,
                        peer: self.peers[p].0,
                        addr: self.peers[p].1.clone(),
                        timeout: watch.timeout,
                        waiting: "waiting in shared memory for",
                    });
                }
                futex_wait(theirs, seen, NAP);
            }
        }
        Ok(())
    }
}

impl Watch<'_> {
    /// A neighbour whose socket ended (it died) or carries a failure
    /// notice (it gave up), preferring the next rank's, as the ring does.
    /// The sockets carry nothing while the group works in shared memory.
    fn dead_neighbour(&self) -> Option<CollectiveError> {
        let (next, prev) = (&self.links.next, &self.links.prev);
        let (on_next, on_prev) = (ended(next), ended(prev));
        let (link, mut detail) = match (on_next, &on_prev) {
            (Some(d), _) => (next, d),
            (None, Some(d)) => (prev, d.clone()),
            (None, None) => return None,
        };
        if let (true, Some(other)) = (std::ptr::eq(link, next), on_prev) {
            detail = format!("{detail} (rank {} ({}) too: {other})", prev.rank, prev.addr);
        }
        Some(CollectiveError::PeerClosed {
            op: self.op,
            group: self.group,
            peer: link.rank,
            addr: link.addr.clone(),
            detail,
        })
    }
}

/// Why `link` is over, if it is: its end, an error, or the notice a
/// failing neighbour sends.
fn ended(link: &Link) -> Option<String> {
    let mut buf = [0u8; 4096];
    // SAFETY: a peek into a local buffer of that length.
    let got = unsafe {
        libc::recv(
            link.stream.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match got {
        0 => Some("it closed its connection".into()),
        n if n > 0 => {
            let bytes = &buf[..n as usize];
            Some(match bytes.strip_prefix(&NOTICE_MAGIC) {
                Some(text) => format!("it gave up: {}", String::from_utf8_lossy(text)),
                None => "it sent data outside an operation".into(),
            })
        }
        _ => {
            let e = io::Error::last_os_error();
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
            .then_some(())
            .map_or(Some(e.to_string()), |()| None)
        }
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a word of a shared mapping; wakes every waiter.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

/// Sleeps while `word` still holds `seen`, at most `nap`.
fn futex_wait(word: &AtomicU32, seen: u32, nap: Duration) {
    let ts = libc::timespec {
        tv_sec: nap.as_secs() as libc::time_t,
        tv_nsec: nap.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a word of a shared mapping with a relative
    // timeout; it returns at once if the word changed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
        )
    };
}
