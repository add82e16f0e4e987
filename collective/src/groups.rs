//! The data-parallel x tensor-parallel layout of a training generation, and
//! the TCP connections that make its process groups.
//!
//! World = dp * tp ranks; `tp_rank = rank % tp`, `dp_rank = rank / tp`, so a
//! tensor-parallel group (the ranks sharing a `dp_rank`) is `tp` consecutive
//! ranks, which the launcher keeps on one node. A data-parallel group is the
//! ranks sharing a `tp_rank`.
//!
//! Every rank listens on one address (the caller binds it, possibly on port
//! 0, and advertises it) that serves all its groups. For each group of more
//! than one rank, a rank connects to the next member and accepts the
//! previous one. Each connection opens with an authenticated handshake
//! (`crate::handshake`) carrying (generation, group, sender rank, receiver
//! rank); the listener refuses a connection without the generation's
//! secret, from another generation, for another rank or from a rank that is
//! not its ring neighbour, with a reason the connecting rank reports. Each
//! handshake runs on a thread of its own, so a stranger that connects and
//! says nothing delays nobody.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use samtrain_comm::{Collective, LocalCollective};

use crate::abort::Abort;
use crate::error::{CollectiveError, Result};
use crate::handshake::{self, Claimed, ConnectFailure, Hello, Secret};
use crate::ring::{Link, RingCollective};

/// How to join a generation's process groups.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// This process's rank in the world.
    pub rank: i64,
    /// `host:port` of every rank's listener, in rank order.
    pub peers: Vec<String>,
    /// Tensor-parallel degree; must divide the world size.
    pub tp: i64,
    /// The training generation: connections from any other are refused.
    pub generation: u64,
    /// Bound on connecting, and on any operation making no progress.
    pub timeout: Duration,
    /// Ends connection setup and every later operation promptly.
    pub abort: Abort,
    /// The generation's secret, the same on every rank: only holders join.
    pub secret: Secret,
    /// Groups whose ranks are all on this host all-reduce through shared
    /// memory (`/dev/shm`) instead of TCP; same results, bit for bit.
    pub shared_memory: bool,
}

/// Where a rank sits in the dp x tp grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world_size: i64,
    pub dp: i64,
    pub tp: i64,
    pub rank: i64,
    pub dp_rank: i64,
    pub tp_rank: i64,
}

impl Layout {
    pub fn new(world_size: i64, tp: i64, rank: i64) -> Result<Layout> {
        let invalid = |message: String| CollectiveError::Invalid {
            op: "connect",
            message,
        };
        if world_size < 1 || tp < 1 || world_size % tp != 0 {
            return Err(invalid(format!(
                "tensor-parallel degree {tp} does not divide the world size {world_size}"
            )));
        }
        if !(0..world_size).contains(&rank) {
            return Err(invalid(format!(
                "rank {rank} is not in a world of {world_size}"
            )));
        }
        Ok(Layout {
            world_size,
            dp: world_size / tp,
            tp,
            rank,
            dp_rank: rank / tp,
            tp_rank: rank % tp,
        })
    }

    /// World ranks of this rank's tensor-parallel group, in group-rank order.
    pub fn tp_group(&self) -> Vec<i64> {
        (0..self.tp).map(|t| self.dp_rank * self.tp + t).collect()
    }

    /// World ranks of this rank's data-parallel group, in group-rank order.
    pub fn dp_group(&self) -> Vec<i64> {
        (0..self.dp).map(|d| d * self.tp + self.tp_rank).collect()
    }

    fn members(&self, kind: GroupKind) -> Vec<i64> {
        match kind {
            GroupKind::World => (0..self.world_size).collect(),
            GroupKind::Dp => self.dp_group(),
            GroupKind::Tp => self.tp_group(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupKind {
    World = 0,
    Dp = 1,
    Tp = 2,
}

const KINDS: [GroupKind; 3] = [GroupKind::World, GroupKind::Dp, GroupKind::Tp];

impl GroupKind {
    fn name(self) -> &'static str {
        match self {
            GroupKind::World => "world",
            GroupKind::Dp => "dp",
            GroupKind::Tp => "tp",
        }
    }
}

/// A rank's process groups for one generation.
pub struct ProcessGroups {
    pub world: Arc<dyn Collective>,
    pub dp: Arc<dyn Collective>,
    pub tp: Arc<dyn Collective>,
    pub layout: Layout,
}

impl std::fmt::Debug for ProcessGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroups")
            .field("layout", &self.layout)
            .finish()
    }
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    })
}

/// One ring connection to make (outgoing) or to wait for (incoming).
#[derive(Clone, Copy, Debug)]
struct Wanted {
    kind: GroupKind,
    peer: i64,
}

fn ring_neighbours(layout: &Layout, kind: GroupKind) -> Option<(i64, i64)> {
    let members = layout.members(kind);
    let n = members.len();
    if n < 2 {
        return None;
    }
    let i = members
        .iter()
        .position(|&r| r == layout.rank)
        .expect("a rank belongs to its own groups");
    Some((members[(i + 1) % n], members[(i + n - 1) % n]))
}

struct Setup<'a> {
    options: &'a GroupOptions,
    deadline: Instant,
    /// Set when this rank's own connecting failed: the acceptor then
    /// refuses everyone, with this reason, for [`STOP_GRACE`] and stops.
    stop: Mutex<Option<(Instant, String)>>,
}

/// How long a rank that failed to join keeps answering (refusing) peers.
const STOP_GRACE: Duration = Duration::from_millis(500);

impl Setup<'_> {
    fn stopping(&self) -> Option<(Instant, String)> {
        self.stop.lock().ok().and_then(|s| s.clone())
    }

    fn aborted(&self, group: &'static str) -> Result<()> {
        if self.options.abort.is_triggered() {
            Err(CollectiveError::Aborted {
                op: "connect",
                group,
            })
        } else {
            Ok(())
        }
    }

    fn addr(&self, rank: i64) -> String {
        self.options.peers[rank as usize].clone()
    }

    /// Connects to `want.peer`, retrying until the deadline, and shakes hands.
    fn connect(&self, want: Wanted) -> Result<Link> {
        let group = want.kind.name();
        let addr = self.addr(want.peer);
        let mut last = String::from("no attempt");
        loop {
            self.aborted(group)?;
            let now = Instant::now();
            if now >= self.deadline {
                return Err(CollectiveError::Unreachable {
                    group,
                    peer: want.peer,
                    addr,
                    timeout: self.options.timeout,
                    last,
                });
            }
            let attempt = resolve(&addr).and_then(|sa| {
                TcpStream::connect_timeout(&sa, (self.deadline - now).min(Duration::from_secs(1)))
            });
            match attempt {
                Ok(stream) => return self.hello(stream, want, &addr),
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
    }

    fn hello(&self, mut stream: TcpStream, want: Wanted, addr: &str) -> Result<Link> {
        let group = want.kind.name();
        let io = |source| CollectiveError::Io {
            op: "connect",
            group,
            peer: want.peer,
            addr: addr.to_string(),
            source,
        };
        let hello = Hello {
            generation: self.options.generation,
            group: want.kind as u8,
            from: self.options.rank,
            to: want.peer,
        };
        stream.set_nodelay(true).map_err(io)?;
        let shaken = handshake::connect(
            &mut stream,
            hello,
            &self.options.secret,
            self.deadline,
            &self.options.abort,
        );
        match shaken {
            Ok(()) => Ok(Link {
                stream,
                rank: want.peer,
                addr: addr.to_string(),
            }),
            Err(ConnectFailure::Refused(reason)) => Err(CollectiveError::Refused {
                group,
                peer: want.peer,
                addr: addr.to_string(),
                reason,
            }),
            Err(ConnectFailure::Io(_)) if self.options.abort.is_triggered() => {
                Err(CollectiveError::Aborted {
                    op: "connect",
                    group,
                })
            }
            Err(ConnectFailure::Io(source)) => Err(io(source)),
        }
    }

    /// Accepts until every wanted incoming connection is in; stray or wrong
    /// connections are refused and logged, and do not end the wait.
    fn accept_all(&self, listener: &TcpListener, wanted: &[Wanted]) -> Result<Vec<Link>> {
        let mut got: Vec<Option<Link>> = wanted.iter().map(|_| None).collect();
        let local = listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let listener_err = |source| CollectiveError::Listener {
            addr: local.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(listener_err)?;
        let (claims_tx, claims) =
            mpsc::channel::<(SocketAddr, std::result::Result<Claimed, String>)>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        while got.iter().any(Option::is_none) {
            self.aborted("world")?;
            let stopping = self.stopping();
            if stopping
                .as_ref()
                .is_some_and(|(since, _)| since.elapsed() >= STOP_GRACE)
            {
                return Err(CollectiveError::Aborted {
                    op: "connect",
                    group: wanted[0].kind.name(),
                });
            }
            if Instant::now() >= self.deadline {
                let missing: Vec<String> = wanted
                    .iter()
                    .zip(&got)
                    .filter(|(_, g)| g.is_none())
                    .map(|(w, _)| {
                        format!(
                            "{} ({}, group {})",
                            w.peer,
                            self.addr(w.peer),
                            w.kind.name()
                        )
                    })
                    .collect();
                return Err(CollectiveError::AcceptTimeout {
                    group: wanted[0].kind.name(),
                    missing: missing.join(", "),
                    timeout: self.options.timeout,
                });
            }
            while let Ok((from, shaken)) = claims.try_recv() {
                let verdict = shaken.and_then(|claimed| self.admit(claimed, wanted, &mut got));
                if let Err(reason) = verdict {
                    tracing::warn!(rank = self.options.rank, from = %from, %reason, "refused a connection");
                }
            }
            let (stream, from) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(listener_err(e)),
            };
            self.shake(stream, from, &claims_tx, &in_flight);
        }
        Ok(got.into_iter().map(|g| g.expect("all accepted")).collect())
    }

    /// Runs `stream`'s handshake on a thread of its own; the claim (or the
    /// reason it was refused) arrives on `claims`. Past
    /// [`MAX_HANDSHAKES`] at once, new connections are dropped unread.
    fn shake(
        &self,
        stream: TcpStream,
        from: SocketAddr,
        claims: &mpsc::Sender<(SocketAddr, std::result::Result<Claimed, String>)>,
        in_flight: &Arc<AtomicUsize>,
    ) {
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(rank = self.options.rank, from = %from, "too many handshakes at once; dropped a connection");
            return;
        }
        let (generation, rank) = (self.options.generation, self.options.rank);
        let secret = self.options.secret.clone();
        let abort = self.options.abort.clone();
        let deadline = self.deadline.min(Instant::now() + HANDSHAKE_LIMIT);
        let (claims, in_flight) = (claims.clone(), in_flight.clone());
        std::thread::spawn(move || {
            let claim = handshake::accept(stream, generation, rank, &secret, deadline, &abort);
            in_flight.fetch_sub(1, Ordering::SeqCst);
            // The receiver is gone once every wanted peer is in.
            let _ = claims.send((from, claim));
        });
    }

    /// Files an authenticated connection under its group, or refuses it
    /// (returning the reason).
    fn admit(
        &self,
        claimed: Claimed,
        wanted: &[Wanted],
        got: &mut [Option<Link>],
    ) -> std::result::Result<(), String> {
        let h = claimed.hello;
        let verdict = match wanted.iter().position(|w| w.kind as u8 == h.group) {
            None => Err(format!(
                "rank {} expects no connection for group code {}",
                self.options.rank, h.group
            )),
            Some(i) if wanted[i].peer != h.from => Err(format!(
                "rank {} expects rank {} in group {}, not rank {}",
                self.options.rank,
                wanted[i].peer,
                wanted[i].kind.name(),
                h.from
            )),
            Some(i) if got[i].is_some() => Err(format!(
                "rank {} already has a connection from rank {} in group {}",
                self.options.rank,
                h.from,
                wanted[i].kind.name()
            )),
            Some(i) => Ok(i),
        };
        // Once this rank has failed to join, nobody may join it: say why,
        // so the other side's error names the real cause.
        let verdict = match (verdict, self.stopping()) {
            (Ok(_), Some((_, why))) => Err(format!(
                "rank {} could not join the generation: {why}",
                self.options.rank
            )),
            (v, _) => v,
        };
        match verdict {
            Ok(i) => {
                let stream = claimed
                    .admit(&self.options.secret)
                    .map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                got[i] = Some(Link {
                    stream,
                    rank: wanted[i].peer,
                    addr: self.addr(wanted[i].peer),
                });
                Ok(())
            }
            Err(reason) => {
                claimed.refuse(&reason);
                Err(reason)
            }
        }
    }
}

/// Handshakes running at once on one listener; more are dropped unread.
const MAX_HANDSHAKES: usize = 32;

/// The longest one handshake may take: a peer that says nothing is dropped.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);

impl ProcessGroups {
    /// Joins the world, dp and tp groups of `options.generation`. `listener`
    /// is this rank's, bound at `options.peers[options.rank]`.
    pub fn connect(options: GroupOptions, listener: TcpListener) -> Result<ProcessGroups> {
        let world = options.peers.len() as i64;
        let layout = Layout::new(world, options.tp, options.rank)?;
        let setup = Setup {
            options: &options,
            deadline: Instant::now() + options.timeout,
            stop: Mutex::new(None),
        };
        let mut outgoing = Vec::new();
        let mut incoming = Vec::new();
        for kind in KINDS {
            if let Some((next, prev)) = ring_neighbours(&layout, kind) {
                outgoing.push(Wanted { kind, peer: next });
                incoming.push(Wanted { kind, peer: prev });
            }
        }
        let (sent, accepted) = std::thread::scope(|s| {
            let acceptor = s.spawn(|| {
                if incoming.is_empty() {
                    Ok(Vec::new())
                } else {
                    setup.accept_all(&listener, &incoming)
                }
            });
            let sent: Result<Vec<Link>> = outgoing.iter().map(|&w| setup.connect(w)).collect();
            if let Err(e) = &sent {
                // The acceptor would otherwise wait out the whole timeout.
                if let Ok(mut stop) = setup.stop.lock() {
                    *stop = Some((Instant::now(), e.to_string()));
                }
            }
            let accepted = acceptor.join().unwrap_or_else(|_| {
                Err(CollectiveError::Invalid {
                    op: "connect",
                    message: "the accepting thread panicked".into(),
                })
            });
            (sent, accepted)
        });
        let mut sent = sent?;
        let mut accepted = accepted?;
        let mut group_of = |kind: GroupKind| -> Result<Arc<dyn Collective>> {
            let members = layout.members(kind);
            let index = members
                .iter()
                .position(|&r| r == layout.rank)
                .expect("a rank belongs to its own groups") as i64;
            let links = match outgoing.iter().position(|w| w.kind == kind) {
                None => None,
                Some(_) => {
                    let next = sent.remove(0);
                    let prev = accepted.remove(0);
                    for link in [&next, &prev] {
                        link.stream.set_nonblocking(true).map_err(|source| {
                            CollectiveError::Io {
                                op: "connect",
                                group: kind.name(),
                                peer: link.rank,
                                addr: link.addr.clone(),
                                source,
                            }
                        })?;
                    }
                    Some((next, prev))
                }
            };
            let ring = RingCollective::new(
                kind.name(),
                index,
                members.len() as i64,
                links,
                options.timeout,
                options.abort.clone(),
            );
            if options.shared_memory {
                let peers = members
                    .iter()
                    .map(|&r| (r, options.peers[r as usize].clone()))
                    .collect();
                ring.attach_shared_memory(peers)?;
            }
            Ok(Arc::new(ring))
        };
        // `sent` and `accepted` are in KINDS order, as are these calls.
        let world_group = group_of(GroupKind::World)?;
        let dp = group_of(GroupKind::Dp)?;
        let tp = group_of(GroupKind::Tp)?;
        tracing::debug!(
            rank = layout.rank,
            dp_rank = layout.dp_rank,
            tp_rank = layout.tp_rank,
            generation = options.generation,
            "process groups connected"
        );
        Ok(ProcessGroups {
            world: world_group,
            dp,
            tp,
            layout,
        })
    }

    /// Every rank's groups of a world of `world_size` ranks that are threads
    /// of this process ([`LocalCollective`]), in rank order: for tests, and
    /// for a one-process run (`in_process(1, 1)`).
    pub fn in_process(world_size: i64, tp: i64) -> Result<Vec<ProcessGroups>> {
        let layout0 = Layout::new(world_size, tp, 0)?;
        let mut world = LocalCollective::group(world_size);
        let mut dp_groups: Vec<Vec<LocalCollective>> = (0..tp)
            .map(|_| LocalCollective::group(layout0.dp))
            .collect();
        let mut tp_groups: Vec<Vec<LocalCollective>> = (0..layout0.dp)
            .map(|_| LocalCollective::group(tp))
            .collect();
        let take = |v: &mut Vec<LocalCollective>| -> Arc<dyn Collective> {
            Arc::new(v.pop().expect("one handle per member"))
        };
        // Taken from the back, so each group's handles come off in rank order.
        let mut ranks = Vec::with_capacity(world_size as usize);
        for rank in (0..world_size).rev() {
            let layout = Layout::new(world_size, tp, rank)?;
            ranks.push(ProcessGroups {
                world: take(&mut world),
                dp: take(&mut dp_groups[layout.tp_rank as usize]),
                tp: take(&mut tp_groups[layout.dp_rank as usize]),
                layout,
            });
        }
        ranks.reverse();
        Ok(ranks)
    }
}
