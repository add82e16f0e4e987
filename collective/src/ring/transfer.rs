//! The transfer engine: one operation in flight over both sockets of a
//! rank, driven by one thread with `poll(2)` in non-blocking mode, so that
//! sending and receiving overlap and nothing deadlocks on full socket
//! buffers. Received pieces are reduced (or copied) into the output and
//! queued for the next rank as the plan says.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::plan::Plan;
use super::wire::{Header, Sum, HEADER_LEN, NOTICE_MAGIC};
use super::{Link, Links, PIECE, POLL_INTERVAL};
use crate::abort::Abort;
use crate::error::{CollectiveError, Result};

pub(super) fn is_closed(e: &std::io::Error) -> bool {
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
pub(super) struct Transfer<'a> {
    pub(super) op: &'static str,
    pub(super) group: &'static str,
    pub(super) links: &'a Links,
    pub(super) plan: &'a Plan,
    /// Where the result goes: received pieces, sums and forwarded pieces.
    pub(super) buf: *mut u8,
    /// This rank's input, the same layout as `buf`: the chunks sent first
    /// and the local operand of reduce steps. Equal to `buf` when the
    /// operation works in place; else never written.
    pub(super) src: *const u8,
    pub(super) sum: Option<Sum>,
    pub(super) scratch: &'a mut [u8],
    pub(super) header_out: [u8; HEADER_LEN],
    pub(super) header_sent: usize,
    pub(super) header_in: [u8; HEADER_LEN],
    pub(super) header_got: usize,
    /// Byte ranges to send, each from `src` (true) or `buf` (false).
    pub(super) queue: VecDeque<(bool, Range<usize>)>,
    /// Data bytes written to the next rank so far.
    pub(super) sent: usize,
    pub(super) step: usize,
    /// Bytes of the current step's chunk received, and reduced/forwarded.
    pub(super) got: usize,
    pub(super) done: usize,
    /// The next rank closed its end after this rank had sent it everything:
    /// harmless (it may have finished), unless there is more to send.
    pub(super) next_closed: Option<String>,
}

impl Transfer<'_> {
    pub(super) fn peer_error(&self, link: &Link, e: std::io::Error) -> CollectiveError {
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

    pub(super) fn closed(&self, link: &Link, detail: &str) -> CollectiveError {
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

    pub(super) fn enqueue(&mut self, from_src: bool, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self.queue.back_mut() {
            Some((f, last)) if *f == from_src && last.end == r.start => last.end = r.end,
            _ => self.queue.push_back((from_src, r)),
        }
    }

    pub(super) fn skip_empty_steps(&mut self) {
        while self
            .plan
            .steps
            .get(self.step)
            .is_some_and(|s| self.plan.chunks[s.chunk].is_empty())
        {
            self.step += 1;
        }
    }

    pub(super) fn sending(&self) -> bool {
        self.header_sent < HEADER_LEN || !self.queue.is_empty()
    }

    pub(super) fn receiving(&self) -> bool {
        self.header_got < HEADER_LEN || self.step < self.plan.steps.len()
    }

    /// Whether the receive side is held back by this rank's own sends.
    pub(super) fn held_by_sends(&self) -> bool {
        self.header_got == HEADER_LEN
            && self
                .plan
                .steps
                .get(self.step)
                .is_some_and(|s| self.sent < s.wait_sent)
    }

    /// Writes until the socket is full or nothing is left; true if any byte left.
    pub(super) fn pump_send(&mut self) -> Result<bool> {
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
    pub(super) fn pump_recv(&mut self, expected: &Header) -> Result<bool> {
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

    pub(super) fn check_header(&self, expected: &Header) -> Result<()> {
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
    pub(super) fn check_next_alive(&self) -> Result<Option<String>> {
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
    pub(super) fn send_error(&self, e: std::io::Error) -> CollectiveError {
        match self.check_next_alive() {
            Ok(Some(detail)) if detail.starts_with("it failed") => {
                self.closed(&self.links.next, &detail)
            }
            _ => self.peer_error(&self.links.next, e),
        }
    }

    pub(super) fn run(
        &mut self,
        expected: &Header,
        timeout: Duration,
        abort: &Abort,
    ) -> Result<()> {
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

/// `dst = local + received` element-wise, over one piece: `received` is
/// its raw bytes from the wire, `local` this rank's input (which may be
/// `dst` itself), so the input is read and the output written in one pass.
///
/// # Safety
/// `dst` and `local` must be valid for `received.len()` bytes and aligned
/// for the element type; `dst` must be either `local` or disjoint from it,
/// and not aliased by any live reference.
pub(super) unsafe fn add_into(sum: Sum, dst: *mut u8, local: *const u8, received: &[u8]) {
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
