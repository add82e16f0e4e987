//! The watchdog of one generation's process groups: a thread that aborts
//! every communicator when a collective has been pending too long, or when
//! the generation ends from outside (the coordinator ended it, the worker
//! lost its lease). Without it, a rank whose peer died inside an NCCL
//! all-reduce waits forever: the kernel spins on the device and the host
//! blocks at its next synchronising call, which no flag can interrupt.
//!
//! [`Watched`] wraps a group and times each call on the host; the group's
//! own [`Collective::pending`] adds what runs on the device after the call
//! returned (NCCL's kernels). The watchdog polls both every
//! [`POLL`] and, once it fires, triggers the generation's [`Abort`] flag
//! (the control loop sees the generation end) and calls
//! [`Collective::abort`] on every group, as PyTorch's NCCL watchdog calls
//! `ncclCommAbort`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use samtrain_comm::{Collective, Pending, Result};
use tch::Tensor;

use crate::abort::Abort;
use crate::groups::ProcessGroups;

/// How often the watchdog looks.
pub const POLL: Duration = Duration::from_millis(20);

/// A group whose calls the watchdog times.
pub struct Watched {
    inner: Arc<dyn Collective>,
    /// The call running now on the host, if any.
    call: Mutex<Option<Pending>>,
}

impl Watched {
    pub fn new(inner: Arc<dyn Collective>) -> Watched {
        Watched {
            inner,
            call: Mutex::new(None),
        }
    }

    fn timed<T>(&self, op: &'static str, f: impl FnOnce(&dyn Collective) -> T) -> T {
        self.set(Some(Pending {
            op,
            since: Instant::now(),
        }));
        let out = f(self.inner.as_ref());
        self.set(None);
        out
    }

    fn set(&self, call: Option<Pending>) {
        *self.call.lock().unwrap_or_else(|e| e.into_inner()) = call;
    }
}

impl Collective for Watched {
    fn rank(&self) -> i64 {
        self.inner.rank()
    }
    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
    fn world_size(&self) -> i64 {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.timed("all_reduce", |c| c.all_reduce_sum(tensor))
    }
    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
        self.timed("all_reduce", |c| c.all_reduce_sum_(tensor))
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.timed("all_gather", |c| c.all_gather(tensor))
    }
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        self.timed("broadcast", |c| c.broadcast(tensor, root))
    }
    fn barrier(&self) -> Result<()> {
        self.timed("barrier", |c| c.barrier())
    }

    /// The older of the call on the host and the group's work on the device.
    fn pending(&self) -> Option<Pending> {
        let host = *self.call.lock().unwrap_or_else(|e| e.into_inner());
        [host, self.inner.pending()]
            .into_iter()
            .flatten()
            .min_by_key(|p| p.since)
    }

    fn abort(&self) {
        self.inner.abort();
    }
}

/// Why the watchdog aborted the groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fired {
    /// A collective was pending longer than the limit.
    Overdue {
        op: &'static str,
        group: &'static str,
        pending: Duration,
    },
    /// The generation ended from outside.
    Ended,
}

impl std::fmt::Display for Fired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fired::Overdue { op, group, pending } => write!(
                f,
                "the watchdog aborted the process groups: {op} in group {group} was pending for {:.1} s",
                pending.as_secs_f64()
            ),
            Fired::Ended => f.write_str("the generation ended; the watchdog aborted the process groups"),
        }
    }
}

/// The running watchdog; stopped (its thread joined) when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<Mutex<Option<Fired>>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Wraps `groups` in [`Watched`] and starts watching them: a
    /// collective pending longer than `limit`, or `ended` triggered from
    /// outside, aborts every group.
    pub fn start(
        groups: ProcessGroups,
        ended: Abort,
        limit: Duration,
    ) -> std::io::Result<(ProcessGroups, Watchdog)> {
        let watch = |g: Arc<dyn Collective>| -> Arc<dyn Collective> { Arc::new(Watched::new(g)) };
        let groups = ProcessGroups {
            world: watch(groups.world),
            dp: watch(groups.dp),
            tp: watch(groups.tp),
            layout: groups.layout,
        };
        let watched: Vec<(&'static str, Arc<dyn Collective>)> = vec![
            ("world", groups.world.clone()),
            ("dp", groups.dp.clone()),
            ("tp", groups.tp.clone()),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, fired) = (stop.clone(), fired.clone());
            std::thread::Builder::new()
                .name("collective-watchdog".to_owned())
                .spawn(move || watch_loop(&watched, &ended, limit, &stop, &fired))?
        };
        Ok((
            groups,
            Watchdog {
                stop,
                fired,
                thread: Some(thread),
            },
        ))
    }

    /// Why the watchdog aborted the groups, if it did.
    pub fn fired(&self) -> Option<Fired> {
        self.fired.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(
    groups: &[(&'static str, Arc<dyn Collective>)],
    ended: &Abort,
    limit: Duration,
    stop: &AtomicBool,
    fired: &Mutex<Option<Fired>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let why = if ended.is_triggered() {
            Some(Fired::Ended)
        } else {
            groups.iter().find_map(|(group, g)| {
                let p = g.pending()?;
                let pending = p.since.elapsed();
                (pending > limit).then_some(Fired::Overdue {
                    op: p.op,
                    group,
                    pending,
                })
            })
        };
        if let Some(why) = why {
            tracing::error!(reason = %why, "aborting the process groups");
            *fired.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            ended.trigger();
            for (_, g) in groups {
                g.abort();
            }
            return;
        }
        std::thread::sleep(POLL);
    }
}
