//! Faults a test injects into a running worker through its environment,
//! so that recovery and detection are proven on real processes over real
//! sockets:
//!
//! - `SAMTRAIN_FAULT_HANG_COLLECTIVE=N`: the `N`-th data-parallel
//!   all-reduce of this process (counted from 1) never returns until its
//!   group is aborted, as an NCCL kernel whose peer died never does. It
//!   hangs once per process, so the next generation trains.
//!   `N:stuck` never returns at all, as a CUDA call that an abort does not
//!   free: the worker must give up on its training thread.
//! - `SAMTRAIN_FAULT_SLOW_STEP_MS=N`: every step of this rank computes
//!   `N` ms longer, as on a throttled GPU or a slow node.
//! - `SAMTRAIN_FAULT_HOLD_AT_STEP=N:PATH`: step `N` of this rank waits
//!   until the file `PATH` exists, so that a test decides when a job
//!   moves on (a worker joining before a checkpoint, say) instead of
//!   racing the training against its polls.
//!
//! Unset (always, outside tests), nothing changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use samtrain_collective::ProcessGroups;
use samtrain_comm::{Collective, CollectiveError, Pending, Result};
use tch::Tensor;

const HANG: &str = "SAMTRAIN_FAULT_HANG_COLLECTIVE";
const SLOW_STEP: &str = "SAMTRAIN_FAULT_SLOW_STEP_MS";
const HOLD: &str = "SAMTRAIN_FAULT_HOLD_AT_STEP";

/// The faults a step's compute carries: slowed, and held at one step.
pub(crate) fn in_step(step: u64) {
    slow_step();
    hold_at(step);
}

/// Sleeps as long as `SAMTRAIN_FAULT_SLOW_STEP_MS` says.
fn slow_step() {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let ms = std::env::var(SLOW_STEP).ok()?.parse::<u64>().ok()?;
        tracing::warn!(ms, "{SLOW_STEP}: every step of this rank is slowed");
        Some(Duration::from_millis(ms))
    });
    if let Some(delay) = delay {
        std::thread::sleep(*delay);
    }
}

/// Waits, at the step `SAMTRAIN_FAULT_HOLD_AT_STEP` names, for its file.
fn hold_at(step: u64) {
    static HOLD_AT: std::sync::OnceLock<Option<(u64, std::path::PathBuf)>> =
        std::sync::OnceLock::new();
    let hold = HOLD_AT.get_or_init(|| {
        let value = std::env::var(HOLD).ok()?;
        let (at, path) = value.split_once(':')?;
        let at = at.parse::<u64>().ok()?;
        tracing::warn!(step = at, path, "{HOLD}: this rank will wait for a file");
        Some((at, path.into()))
    });
    let Some((at, path)) = hold else { return };
    if *at != step {
        return;
    }
    tracing::warn!(step, path = %path.display(), "{HOLD}: holding until the file exists");
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(step, "{HOLD}: released");
}

/// Data-parallel all-reduces this process made, over every generation.
static CALLS: AtomicU64 = AtomicU64::new(0);
static HUNG: AtomicBool = AtomicBool::new(false);

/// `groups` with the faults the environment asks for.
pub fn inject(groups: ProcessGroups) -> ProcessGroups {
    let Some((at, stuck)) = std::env::var(HANG).ok().and_then(|v| {
        let (n, stuck) = match v.split_once(':') {
            Some((n, "stuck")) => (n.to_owned(), true),
            _ => (v, false),
        };
        Some((n.parse::<u64>().ok()?, stuck))
    }) else {
        return groups;
    };
    if HUNG.load(Ordering::SeqCst) {
        return groups;
    }
    tracing::warn!(
        call = at,
        stuck,
        "{HANG}: a data-parallel all-reduce will hang"
    );
    ProcessGroups {
        dp: Arc::new(Hang {
            inner: groups.dp,
            at,
            stuck,
            aborted: AtomicBool::new(false),
        }),
        ..groups
    }
}

/// A group whose `at`-th all-reduce blocks until [`Collective::abort`]
/// (for ever when `stuck`).
struct Hang {
    inner: Arc<dyn Collective>,
    at: u64,
    stuck: bool,
    aborted: AtomicBool,
}

impl Hang {
    fn maybe_hang(&self) -> Result<()> {
        let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.at || HUNG.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        tracing::warn!(call = n, "{HANG}: hanging until aborted");
        while self.stuck || !self.aborted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(CollectiveError::Aborted {
            op: "all_reduce",
            group: "dp",
        })
    }
}

impl Collective for Hang {
    fn rank(&self) -> i64 {
        self.inner.rank()
    }
    fn world_size(&self) -> i64 {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.maybe_hang()?;
        self.inner.all_reduce_sum(tensor)
    }
    fn all_reduce_sum_(&self, tensor: &mut Tensor) -> Result<()> {
        self.maybe_hang()?;
        self.inner.all_reduce_sum_(tensor)
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.inner.all_gather(tensor)
    }
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<Tensor> {
        self.inner.broadcast(tensor, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn pending(&self) -> Option<Pending> {
        self.inner.pending()
    }
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.inner.abort();
    }
}
