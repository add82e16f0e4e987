//! A benchmark, not a test (ignored by default): the latency of sequential
//! `Get` calls on one client connection to an embedded coordinator, the
//! figure docs/PERFORMANCE.md records. Run it with
//! `cargo test -p samtrain-coordinator --release --test grpc_latency -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{spec, Node};
use samtrain_coordinator::client::{Client, Credentials};

#[tokio::test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn sequential_get_latency() {
    const CALLS: u32 = 200;
    let node = Node::start(vec![], "bench", Duration::from_secs(5));
    let mut client = Client::new(vec![node.address()], Credentials::none());
    let id = client
        .submit(&spec("latency", 1, 1, 1, 1), "latency.toml")
        .await
        .unwrap();
    for _ in 0..10 {
        client.get(&id).await.unwrap();
    }
    let start = Instant::now();
    for _ in 0..CALLS {
        client.get(&id).await.unwrap();
    }
    let found = start.elapsed() / CALLS;
    let start = Instant::now();
    for _ in 0..CALLS {
        client.get("no-such-job").await.unwrap_err();
    }
    let missing = start.elapsed() / CALLS;
    eprintln!("sequential Get: {found:?} per call (a missing job: {missing:?})");
}
