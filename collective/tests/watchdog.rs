//! The watchdog against a backend that never returns on its own, as an
//! NCCL kernel whose peer died: only an abort from another thread ends its
//! operation. The watchdog must abort it within its limit, and at once when
//! the generation ends from outside.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use samtrain_collective::{Abort, CollectiveError, Fired, Layout, ProcessGroups, Watchdog};
use samtrain_comm::{Collective, Pending, Result};
use tch::Tensor;

/// A group of two whose all-reduce blocks until it is aborted; its device
/// work (what `pending` reports) starts with the call.
#[derive(Default)]
struct NeverReturns {
    aborted: AtomicBool,
    since: std::sync::Mutex<Option<Instant>>,
}

impl NeverReturns {
    fn block(&self, op: &'static str) -> CollectiveError {
        *self.since.lock().unwrap() = Some(Instant::now());
        while !self.aborted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        CollectiveError::Aborted { op, group: "dp" }
    }
}

impl Collective for NeverReturns {
    fn rank(&self) -> i64 {
        0
    }
    fn world_size(&self) -> i64 {
        2
    }
    fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
        Err(self.block("all_reduce"))
    }
    fn all_gather(&self, _: &Tensor) -> Result<Vec<Tensor>> {
        Err(self.block("all_gather"))
    }
    fn broadcast(&self, _: &Tensor, _: i64) -> Result<Tensor> {
        Err(self.block("broadcast"))
    }
    fn barrier(&self) -> Result<()> {
        Err(self.block("barrier"))
    }
    fn pending(&self) -> Option<Pending> {
        self.since.lock().unwrap().map(|since| Pending {
            op: "all_reduce",
            since,
        })
    }
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

fn groups(dp: Arc<NeverReturns>) -> ProcessGroups {
    let single =
        || -> Arc<dyn Collective> { Arc::new(samtrain_collective::RingCollective::single("tp")) };
    ProcessGroups {
        world: single(),
        dp,
        tp: single(),
        layout: Layout::new(2, 1, 0).unwrap(),
    }
}

#[test]
fn an_operation_pending_past_the_limit_is_aborted_and_the_generation_ends() {
    let backend = Arc::new(NeverReturns::default());
    let ended = Abort::new();
    let limit = Duration::from_millis(300);
    let (groups, watchdog) =
        Watchdog::start(groups(backend.clone()), ended.clone(), limit).unwrap();
    let started = Instant::now();
    let err = groups
        .dp
        .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, CollectiveError::Aborted { .. }), "{err}");
    assert!(took >= limit, "aborted after {took:?}, before the limit");
    assert!(
        took < limit + Duration::from_secs(1),
        "aborted only after {took:?}"
    );
    assert!(ended.is_triggered(), "the generation's flag is raised");
    match watchdog.fired() {
        Some(Fired::Overdue { op, group, pending }) => {
            assert_eq!((op, group), ("all_reduce", "dp"));
            assert!(pending > limit);
        }
        other => panic!("fired: {other:?}"),
    }
    assert!(watchdog
        .fired()
        .unwrap()
        .to_string()
        .contains("all_reduce in group dp was pending"));
}

#[test]
fn the_end_of_the_generation_aborts_a_blocked_operation_at_once() {
    let backend = Arc::new(NeverReturns::default());
    let ended = Abort::new();
    let (groups, watchdog) = Watchdog::start(
        groups(backend.clone()),
        ended.clone(),
        Duration::from_secs(600),
    )
    .unwrap();
    let blocked = std::thread::spawn(move || {
        let started = Instant::now();
        let r = groups.dp.barrier();
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let ending = Instant::now();
    ended.trigger();
    let (r, _) = blocked.join().unwrap();
    assert!(r.is_err());
    assert!(
        ending.elapsed() < Duration::from_secs(1),
        "{:?}",
        ending.elapsed()
    );
    assert_eq!(watchdog.fired(), Some(Fired::Ended));
}

#[test]
fn a_quiet_watchdog_stops_with_its_generation() {
    let backend = Arc::new(NeverReturns::default());
    let ended = Abort::new();
    let (groups, watchdog) = Watchdog::start(
        groups(backend.clone()),
        ended.clone(),
        Duration::from_millis(50),
    )
    .unwrap();
    // Calls that return are never overdue, however long the generation.
    for _ in 0..5 {
        groups.world.barrier().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(watchdog.fired(), None);
    drop(watchdog);
    assert!(!ended.is_triggered());
    assert!(!backend.aborted.load(Ordering::SeqCst));
}
