//! Starts process groups of several ranks as threads of the test, over real
//! TCP on 127.0.0.1.

use std::net::TcpListener;
use std::time::Duration;

use samtrain_collective::{Abort, GroupOptions, ProcessGroups, Result, Secret};

/// Binds one listener per rank on a free port.
pub fn listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, peers)
}

/// Connects every rank (one thread each); `generation(rank)` and `abort(rank)`
/// pick each rank's generation and abort flag.
pub fn connect_with(
    world: usize,
    tp: i64,
    timeout: Duration,
    generation: impl Fn(usize) -> u64,
    abort: impl Fn(usize) -> Abort,
) -> Vec<Result<ProcessGroups>> {
    connect_over(world, tp, timeout, generation, abort, true)
}

/// [`connect_with`], choosing whether same-host groups use shared memory.
pub fn connect_over(
    world: usize,
    tp: i64,
    timeout: Duration,
    generation: impl Fn(usize) -> u64,
    abort: impl Fn(usize) -> Abort,
    shared_memory: bool,
) -> Vec<Result<ProcessGroups>> {
    let (listeners, peers) = listeners(world);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let options = GroupOptions {
                rank: rank as i64,
                peers: peers.clone(),
                tp,
                generation: generation(rank),
                timeout,
                abort: abort(rank),
                secret: Secret::new(b"test generation".to_vec()),
                shared_memory,
            };
            std::thread::spawn(move || ProcessGroups::connect(options, listener))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every rank's groups, generation 1, no abort.
pub fn connect(world: usize, tp: i64, timeout: Duration) -> Vec<ProcessGroups> {
    connect_with(world, tp, timeout, |_| 1, |_| Abort::new())
        .into_iter()
        .map(|r| r.expect("connect"))
        .collect()
}

/// Runs `f` on every rank's groups at once, results in rank order.
pub fn on_all<T: Send + 'static>(
    groups: Vec<ProcessGroups>,
    f: impl Fn(usize, &ProcessGroups) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(rank, &g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
