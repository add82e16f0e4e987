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

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use samtrain_model::parallel::Collective;
use tch::{Device, Kind, Tensor};

use crate::abort::Abort;
use crate::error::{CollectiveError, Result};

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
    next: Link,
    /// Carries data from the previous rank.
    prev: Link,
}

struct Inner {
    links: Option<Links>,
    seq: u64,
    broken: Option<String>,
    /// Receive buffer of reduce steps: one piece, 8-byte aligned.
    scratch: Vec<u64>,
}

/// A process group over TCP for CPU tensors (see the module docs).
pub struct RingCollective {
    group: &'static str,
    rank: i64,
    world: i64,
    timeout: Duration,
    abort: Abort,
    inner: Mutex<Inner>,
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        [Op::AllReduce, Op::AllGather, Op::Broadcast, Op::Barrier]
            .into_iter()
            .find(|op| *op as u8 == code)
    }
}

/// What the caller asked for; becomes the operation's header.
#[derive(Clone, Copy, Debug)]
struct Call {
    op: Op,
    kind: Kind,
    numel: usize,
    root: i64,
}

/// How a reduce step combines a received piece with the local one.
#[derive(Clone, Copy, Debug)]
enum Sum {
    F32,
    F64,
    I32,
    I64,
}

const HEADER_LEN: usize = 32;
/// Starts the line a failing rank writes back to its previous rank.
const NOTICE_MAGIC: [u8; 4] = *b"SRGX";
const HEADER_MAGIC: [u8; 4] = *b"SRG1";

/// What every rank of an operation must agree on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Header {
    op: u8,
    kind: u8,
    seq: u64,
    numel: u64,
    root: i64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&HEADER_MAGIC);
        b[4] = self.op;
        b[5] = self.kind;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.numel.to_le_bytes());
        b[24..32].copy_from_slice(&self.root.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        if b[..4] != HEADER_MAGIC {
            return None;
        }
        let word = |r: Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        Some(Header {
            op: b[4],
            kind: b[5],
            seq: word(8..16),
            numel: word(16..24),
            root: word(24..32) as i64,
        })
    }

    fn describe(&self) -> String {
        let op = Op::from_code(self.op).map_or("unknown operation", Op::name);
        format!(
            "{op} #{} of {} elements of dtype code {}{}",
            self.seq,
            self.numel,
            self.kind,
            if self.op == Op::Broadcast as u8 {
                format!(" from root {}", self.root)
            } else {
                String::new()
            }
        )
    }
}

/// A stable code per dtype for the header (tch's own numbering is not part
/// of any wire format).
fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Uint8 => 1,
        Kind::Int8 => 2,
        Kind::Int16 => 3,
        Kind::Int => 4,
        Kind::Int64 => 5,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::Bool => 9,
        Kind::BFloat16 => 10,
        _ => 255,
    }
}

/// One receive step of a plan.
#[derive(Debug)]
struct Step {
    chunk: usize,
    /// Add the received piece into the buffer (else copy it there).
    reduce: bool,
    /// Queue the piece for the next rank once it is in the buffer.
    forward: bool,
    /// Data bytes this rank must have sent before the step may write into
    /// its chunk: the last queued send of that chunk must have left.
    wait_sent: usize,
}

/// What one operation sends and receives, over a buffer cut into chunks.
#[derive(Debug)]
struct Plan {
    chunks: Vec<Range<usize>>,
    /// Chunks sent before anything is received.
    initial: Vec<usize>,
    steps: Vec<Step>,
}

impl Plan {
    /// Fills in `wait_sent` by replaying the send order.
    fn new(chunks: Vec<Range<usize>>, initial: Vec<usize>, mut steps: Vec<Step>) -> Plan {
        let mut pos = 0;
        let mut sends: Vec<(usize, usize)> = Vec::new();
        for &c in &initial {
            pos += chunks[c].len();
            sends.push((c, pos));
        }
        for step in &mut steps {
            step.wait_sent = sends
                .iter()
                .rev()
                .find(|(c, _)| *c == step.chunk)
                .map_or(0, |(_, end)| *end);
            if step.forward {
                pos += chunks[step.chunk].len();
                sends.push((step.chunk, pos));
            }
        }
        Plan {
            chunks,
            initial,
            steps,
        }
    }

    /// `n` chunks of whole elements, sizes differing by at most one element.
    fn split(numel: usize, n: usize, elem: usize) -> Vec<Range<usize>> {
        let (base, extra) = (numel / n, numel % n);
        let mut start = 0;
        (0..n)
            .map(|i| {
                let len = (base + usize::from(i < extra)) * elem;
                let r = start..start + len;
                start += len;
                r
            })
            .collect()
    }

    fn all_reduce(n: usize, r: usize, numel: usize, elem: usize) -> Plan {
        let chunk = |back: usize| (r + n - back % n) % n;
        let mut steps = Vec::with_capacity(2 * (n - 1));
        // Reduce-scatter: at step s receive chunk r-s-1 and add to it; after
        // n-1 steps this rank holds the full sum of chunk r+1.
        for s in 0..n - 1 {
            steps.push(Step {
                chunk: chunk(s + 1),
                reduce: true,
                forward: true,
                wait_sent: 0,
            });
        }
        // All-gather: at step t receive the final chunk r-t.
        for t in 0..n - 1 {
            steps.push(Step {
                chunk: chunk(t),
                reduce: false,
                forward: t + 2 < n,
                wait_sent: 0,
            });
        }
        Plan::new(Plan::split(numel, n, elem), vec![r], steps)
    }

    /// Chunk `i` is rank `i`'s contribution, `bytes` long.
    fn all_gather(n: usize, r: usize, bytes: usize) -> Plan {
        let chunks = (0..n).map(|i| i * bytes..(i + 1) * bytes).collect();
        let steps = (0..n - 1)
            .map(|t| Step {
                chunk: (r + n - t - 1) % n,
                reduce: false,
                forward: t + 2 < n,
                wait_sent: 0,
            })
            .collect();
        Plan::new(chunks, vec![r], steps)
    }

    /// A pipelined chain from the root along the ring.
    fn broadcast(n: usize, r: usize, root: usize, bytes: usize) -> Plan {
        // One chunk: the whole buffer (a one-element Vec of a Range is
        // what it looks like, not a mistaken `vec![a..b]` for a list).
        #[allow(clippy::single_range_in_vec_init)]
        let chunks = vec![0..bytes];
        if r == root {
            return Plan::new(chunks, vec![0], Vec::new());
        }
        let step = Step {
            chunk: 0,
            reduce: false,
            forward: (r + 1) % n != root,
            wait_sent: 0,
        };
        Plan::new(chunks, Vec::new(), vec![step])
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
            | ErrorKind::NotConnected
    )
}

/// One operation in flight: the state of both directions.
struct Transfer<'a> {
    op: &'static str,
    group: &'static str,
    links: &'a Links,
    plan: &'a Plan,
    /// Where the result goes: received pieces, sums and forwarded pieces.
    buf: *mut u8,
    /// This rank's input, the same layout as `buf`: the chunks sent first
    /// and the local operand of reduce steps. Equal to `buf` when the
    /// operation works in place; else never written.
    src: *const u8,
    sum: Option<Sum>,
    scratch: &'a mut [u8],
    header_out: [u8; HEADER_LEN],
    header_sent: usize,
    header_in: [u8; HEADER_LEN],
    header_got: usize,
    /// Byte ranges to send, each from `src` (true) or `buf` (false).
    queue: VecDeque<(bool, Range<usize>)>,
    /// Data bytes written to the next rank so far.
    sent: usize,
    step: usize,
    /// Bytes of the current step's chunk received, and reduced/forwarded.
    got: usize,
    done: usize,
    /// The next rank closed its end after this rank had sent it everything:
    /// harmless (it may have finished), unless there is more to send.
    next_closed: Option<String>,
}

impl Transfer<'_> {
    fn peer_error(&self, link: &Link, e: std::io::Error) -> CollectiveError {
        if is_closed(&e) {
            CollectiveError::PeerClosed {
                op: self.op,
                group: self.group,
                peer: link.rank,
                addr: link.addr.clone(),
                detail: e.to_string(),
            }
        } else {
            CollectiveError::Io {
                op: self.op,
                group: self.group,
                peer: link.rank,
                addr: link.addr.clone(),
                source: e,
            }
        }
    }

    fn closed(&self, link: &Link, detail: &str) -> CollectiveError {
        let mut detail = detail.to_string();
        // When the previous rank gives up because the rank after us died,
        // say so: that is the rank the operator is looking for.
        if let (true, Some(next)) = (std::ptr::eq(link, &self.links.prev), &self.next_closed) {
            detail = format!(
                "{detail} (rank {} ({}) had closed its connection too: {next})",
                self.links.next.rank, self.links.next.addr
            );
        }
        CollectiveError::PeerClosed {
            op: self.op,
            group: self.group,
            peer: link.rank,
            addr: link.addr.clone(),
            detail,
        }
    }

    fn enqueue(&mut self, from_src: bool, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self.queue.back_mut() {
            Some((f, last)) if *f == from_src && last.end == r.start => last.end = r.end,
            _ => self.queue.push_back((from_src, r)),
        }
    }

    fn skip_empty_steps(&mut self) {
        while self
            .plan
            .steps
            .get(self.step)
            .is_some_and(|s| self.plan.chunks[s.chunk].is_empty())
        {
            self.step += 1;
        }
    }

    fn sending(&self) -> bool {
        self.header_sent < HEADER_LEN || !self.queue.is_empty()
    }

    fn receiving(&self) -> bool {
        self.header_got < HEADER_LEN || self.step < self.plan.steps.len()
    }

    /// Whether the receive side is held back by this rank's own sends.
    fn held_by_sends(&self) -> bool {
        self.header_got == HEADER_LEN
            && self
                .plan
                .steps
                .get(self.step)
                .is_some_and(|s| self.sent < s.wait_sent)
    }

    /// Writes until the socket is full or nothing is left; true if any byte left.
    fn pump_send(&mut self) -> Result<bool> {
        let mut progress = false;
        if let (true, Some(detail)) = (self.sending(), &self.next_closed) {
            return Err(self.closed(&self.links.next, detail));
        }
        loop {
            let result = if self.header_sent < HEADER_LEN {
                (&self.links.next.stream).write(&self.header_out[self.header_sent..])
            } else if let Some((from_src, r)) = self.queue.front() {
                let base = if *from_src {
                    self.src
                } else {
                    self.buf.cast_const()
                };
                // SAFETY: `src` and `buf` are valid for every chunk range of
                // the plan, and no mutable slice of these bytes is alive.
                let data = unsafe { std::slice::from_raw_parts(base.add(r.start), r.len()) };
                (&self.links.next.stream).write(data)
            } else {
                return Ok(progress);
            };
            match result {
                Ok(0) => {
                    return Err(self.closed(&self.links.next, "the connection accepts no more data"))
                }
                Ok(n) => {
                    progress = true;
                    if self.header_sent < HEADER_LEN {
                        self.header_sent += n;
                    } else {
                        self.sent += n;
                        let (_, front) = self.queue.front_mut().expect("a range was written");
                        front.start += n;
                        if front.start == front.end {
                            self.queue.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(progress),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.send_error(e)),
            }
        }
    }

    /// Reads up to one piece (then lets the sender run); true if any byte came.
    fn pump_recv(&mut self, expected: &Header) -> Result<bool> {
        let mut progress = false;
        loop {
            if self.header_got < HEADER_LEN {
                match (&self.links.prev.stream).read(&mut self.header_in[self.header_got..]) {
                    Ok(0) => return Err(self.closed(&self.links.prev, "end of stream")),
                    Ok(n) => {
                        progress = true;
                        self.header_got += n;
                        if self.header_got == HEADER_LEN {
                            self.check_header(expected)?;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.peer_error(&self.links.prev, e)),
                }
            }
            let Some(step) = self.plan.steps.get(self.step) else {
                return Ok(progress);
            };
            if self.sent < step.wait_sent {
                return Ok(progress);
            }
            let chunk = self.plan.chunks[step.chunk].clone();
            let end = chunk.len().min((self.got / PIECE + 1) * PIECE);
            let want = end - self.got;
            let result = if step.reduce {
                let at = self.got - self.done;
                (&self.links.prev.stream).read(&mut self.scratch[at..at + want])
            } else {
                // SAFETY: the range lies in the buffer, its last queued send
                // has left (`wait_sent`), and no other slice of it is alive.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(self.buf.add(chunk.start + self.got), want)
                };
                (&self.links.prev.stream).read(dst)
            };
            match result {
                Ok(0) => return Err(self.closed(&self.links.prev, "end of stream")),
                Ok(n) => {
                    progress = true;
                    self.got += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(progress),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.peer_error(&self.links.prev, e)),
            }
            if self.got == end {
                let piece = chunk.start + self.done..chunk.start + end;
                if step.reduce {
                    let sum = self.sum.expect("reduce steps come with a sum");
                    // SAFETY: `piece` lies in both buffers and is not queued
                    // for sending (`wait_sent`); scratch holds its bytes.
                    unsafe {
                        add_into(
                            sum,
                            self.buf.add(piece.start),
                            self.src.add(piece.start),
                            &self.scratch[..piece.len()],
                        )
                    };
                }
                if step.forward {
                    self.enqueue(false, piece);
                }
                self.done = end;
                if end == chunk.len() {
                    self.step += 1;
                    self.got = 0;
                    self.done = 0;
                    self.skip_empty_steps();
                }
                // One piece at a time, so forwarding keeps up with receiving.
                return Ok(progress);
            }
        }
    }

    fn check_header(&self, expected: &Header) -> Result<()> {
        let link = &self.links.prev;
        let mismatch = |detail: String| CollectiveError::Mismatch {
            op: self.op,
            group: self.group,
            peer: link.rank,
            addr: link.addr.clone(),
            detail,
        };
        match Header::decode(&self.header_in) {
            None => Err(mismatch(
                "sent bytes that are not an operation header".into(),
            )),
            Some(h) if h != *expected => Err(mismatch(format!(
                "it called {}, this rank called {}",
                h.describe(),
                expected.describe()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The next rank never sends on our outgoing connection except, when
    /// it fails, a [`NOTICE_MAGIC`] line saying why: anything readable there
    /// is that notice or its end, returned as a description.
    fn check_next_alive(&self) -> Result<Option<String>> {
        let mut bytes = [0u8; 4096];
        match (&self.links.next.stream).read(&mut bytes) {
            Ok(0) => Ok(Some("end of stream".into())),
            Ok(n) => match bytes[..n].strip_prefix(&NOTICE_MAGIC[..]) {
                Some(text) => Ok(Some(format!(
                    "it failed: {}",
                    String::from_utf8_lossy(text)
                ))),
                None => Err(CollectiveError::Mismatch {
                    op: self.op,
                    group: self.group,
                    peer: self.links.next.rank,
                    addr: self.links.next.addr.clone(),
                    detail: "sent data on a connection that only receives".into(),
                }),
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(None)
            }
            Err(e) if is_closed(&e) => Ok(Some(e.to_string())),
            Err(e) => Err(self.peer_error(&self.links.next, e)),
        }
    }

    /// A send to the next rank failed: if it left a notice saying why, that
    /// is the better error (it names the rank that really failed).
    fn send_error(&self, e: std::io::Error) -> CollectiveError {
        match self.check_next_alive() {
            Ok(Some(detail)) if detail.starts_with("it failed") => {
                self.closed(&self.links.next, &detail)
            }
            _ => self.peer_error(&self.links.next, e),
        }
    }

    fn run(&mut self, expected: &Header, timeout: Duration, abort: &Abort) -> Result<()> {
        for c in self.plan.initial.clone() {
            self.enqueue(true, self.plan.chunks[c].clone());
        }
        self.skip_empty_steps();
        let mut last_progress = Instant::now();
        loop {
            if abort.is_triggered() {
                return Err(CollectiveError::Aborted {
                    op: self.op,
                    group: self.group,
                });
            }
            let sent = self.pump_send()?;
            let received = self.pump_recv(expected)?;
            if !self.sending() && !self.receiving() {
                return Ok(());
            }
            if sent || received {
                last_progress = Instant::now();
                continue;
            }
            let idle = last_progress.elapsed();
            if idle >= timeout {
                let (link, waiting) = if self.receiving() && !self.held_by_sends() {
                    (&self.links.prev, "receiving from")
                } else {
                    (&self.links.next, "sending to")
                };
                return Err(CollectiveError::Timeout {
                    op: self.op,
                    group: self.group,
                    peer: link.rank,
                    addr: link.addr.clone(),
                    timeout,
                    waiting,
                });
            }
            let wait = POLL_INTERVAL.min(timeout - idle);
            let next_events = libc::POLLIN | if self.sending() { libc::POLLOUT } else { 0 };
            let prev_events = if self.receiving() { libc::POLLIN } else { 0 };
            let mut fds = [
                libc::pollfd {
                    // A closed next rank would report POLLHUP forever.
                    fd: if self.next_closed.is_none() {
                        self.links.next.stream.as_raw_fd()
                    } else {
                        -1
                    },
                    events: next_events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.links.prev.stream.as_raw_fd(),
                    events: prev_events,
                    revents: 0,
                },
            ];
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(self.peer_error(&self.links.next, e));
                }
            }
            if self.next_closed.is_none()
                && fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            {
                if let Some(detail) = self.check_next_alive()? {
                    if self.sending() {
                        return Err(self.closed(&self.links.next, &detail));
                    }
                    self.next_closed = Some(detail);
                }
            }
        }
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

/// `dst = local + received` element-wise, over one piece: `received` is
/// its raw bytes from the wire, `local` this rank's input (which may be
/// `dst` itself), so the input is read and the output written in one pass.
///
/// # Safety
/// `dst` and `local` must be valid for `received.len()` bytes and aligned
/// for the element type; `dst` must be either `local` or disjoint from it,
/// and not aliased by any live reference.
unsafe fn add_into(sum: Sum, dst: *mut u8, local: *const u8, received: &[u8]) {
    unsafe fn typed<T: Copy>(
        dst: *mut u8,
        local: *const u8,
        received: &[u8],
        add: impl Fn(T, T) -> T,
    ) {
        let n = received.len() / std::mem::size_of::<T>();
        // Scratch is 8-byte aligned and pieces start at multiples of 8.
        let r = std::slice::from_raw_parts(received.as_ptr() as *const T, n);
        let d = std::slice::from_raw_parts_mut(dst as *mut T, n);
        if std::ptr::eq(dst.cast_const(), local) {
            for (a, b) in d.iter_mut().zip(r) {
                *a = add(*a, *b);
            }
        } else {
            let l = std::slice::from_raw_parts(local as *const T, n);
            for ((a, x), b) in d.iter_mut().zip(l).zip(r) {
                *a = add(*x, *b);
            }
        }
    }
    match sum {
        Sum::F32 => typed::<f32>(dst, local, received, |a, b| a + b),
        Sum::F64 => typed::<f64>(dst, local, received, |a, b| a + b),
        Sum::I32 => typed::<i32>(dst, local, received, i32::wrapping_add),
        Sum::I64 => typed::<i64>(dst, local, received, i64::wrapping_add),
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
            }),
        }
    }

    /// The group's name in error messages ("world", "dp", "tp").
    pub fn group(&self) -> &'static str {
        self.group
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
        let Call {
            op,
            kind,
            numel,
            root,
        } = call;
        let name = op.name();
        let mut inner = self.inner.lock().map_err(|_| CollectiveError::Broken {
            op: name,
            group: self.group,
            first: "a thread panicked inside an operation".into(),
        })?;
        if let Some(first) = &inner.broken {
            return Err(CollectiveError::Broken {
                op: name,
                group: self.group,
                first: first.clone(),
            });
        }
        inner.seq += 1;
        let header = Header {
            op: op as u8,
            kind: kind_code(kind),
            seq: inner.seq,
            numel: numel as u64,
            root,
        };
        if inner.scratch.len() < PIECE / 8 {
            inner.scratch.resize(PIECE / 8, 0);
        }
        let Inner { links, scratch, .. } = &mut *inner;
        let links = links
            .as_ref()
            .expect("groups of more than one rank have links");
        // SAFETY: reinterpreting an initialised u64 buffer as bytes.
        let scratch = unsafe {
            std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, scratch.len() * 8)
        };
        let mut transfer = Transfer {
            op: name,
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
        let result = transfer.run(&header, self.timeout, &self.abort);
        if let Err(e) = &result {
            tracing::warn!(group = self.group, rank = self.rank, op = name, error = %e, "collective failed; closing the group");
            // Tell the previous rank why (on the direction of its
            // connection that carries nothing else), then end both streams so
            // neighbours blocked on us fail at once.
            let mut notice = NOTICE_MAGIC.to_vec();
            notice.extend_from_slice(e.to_string().as_bytes());
            notice.truncate(4096);
            let _ = (&links.prev.stream).write(&notice);
            let _ = links.next.stream.shutdown(Shutdown::Write);
            let _ = links.prev.stream.shutdown(Shutdown::Write);
            inner.broken = Some(e.to_string());
        }
        result
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
        self.exchange(call, (src, dst), &plan, Some(sum))
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

    fn all_reduce_sum(&self, tensor: &Tensor) -> samtrain_model::Result<Tensor> {
        Ok(self.try_all_reduce_sum(tensor)?)
    }

    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> samtrain_model::Result<()> {
        Ok(self.try_all_reduce_sum_(tensor)?)
    }

    fn all_gather(&self, tensor: &Tensor) -> samtrain_model::Result<Vec<Tensor>> {
        Ok(self.try_all_gather(tensor)?)
    }

    fn broadcast(&self, tensor: &Tensor, root: i64) -> samtrain_model::Result<Tensor> {
        Ok(self.try_broadcast(tensor, root)?)
    }

    fn barrier(&self) -> samtrain_model::Result<()> {
        Ok(self.try_barrier()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_plan_ends_with_every_chunk() {
        for n in 2..6 {
            for r in 0..n {
                let plan = Plan::all_reduce(n, r, 10, 4);
                let mut have: Vec<usize> = plan.steps[n - 1..].iter().map(|s| s.chunk).collect();
                // The owned chunk (r+1) arrives by reduction, the rest by copy.
                have.push(plan.steps[n - 2].chunk);
                have.sort();
                assert_eq!(have, (0..n).collect::<Vec<_>>());
                assert_eq!(plan.steps[n - 2].chunk, (r + 1) % n);
            }
        }
    }

    #[test]
    fn all_gather_steps_wait_for_nothing_and_reduce_waits_are_reached() {
        let plan = Plan::all_gather(4, 1, 8);
        assert!(plan.steps.iter().all(|s| s.wait_sent == 0));
        // In an all-reduce each all-gather step overwrites a chunk this rank
        // sent during the reduce-scatter, never one still to be forwarded.
        let plan = Plan::all_reduce(3, 0, 9, 4);
        let waits: Vec<usize> = plan.steps.iter().map(|s| s.wait_sent).collect();
        assert_eq!(waits, vec![0, 0, 12, 24]);
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            op: Op::Broadcast as u8,
            kind: kind_code(Kind::BFloat16),
            seq: 7,
            numel: 1 << 40,
            root: 3,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
    }
}
