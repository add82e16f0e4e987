//! Leader failover on one etcd: the leader is killed (its runtime dropped,
//! as a crash: no resignation), the standby leads once the old lease
//! expires, and the running generation goes on: no restart, the agents
//! reconnect, reports reach the new leader and the job completes there.
//! Prints the time from the kill to the new leader serving.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{agent, spec, Node};
use samtrain_coordinator::agent::{Outcome, Progress};
use samtrain_coordinator::client::{Client, Credentials};
use samtrain_proto::v1;
use samtrain_testkit::Etcd;
use tonic::Code;

async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Only the leader is ready; the standby names it.
async fn only_the_leader_is_ready(first: &Node, second: &Node) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http_status(first.health, "/readyz").await, 200);
    assert_eq!(http_status(second.health, "/readyz").await, 503);
    assert_eq!(http_status(second.health, "/healthz").await, 200);
    let err = Client::new(vec![second.address()], Credentials::none())
        .list()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("leader is first at {}", first.address())),
        "{err}"
    );
}

/// Waits until `standby` serves the job, which it must within 3 TTLs of
/// the kill at `t0`; meanwhile it may only say it does not lead.
async fn until_serving(standby: &mut Client, id: &str, ttl: Duration, t0: Instant) {
    loop {
        match standby.get(id).await {
            Ok(_) => break,
            Err(e) => assert!(
                e.code().is_none()
                    || e.code() == Some(Code::Unavailable)
                    || matches!(
                        e,
                        samtrain_coordinator::client::ClientError::NoLeader { .. }
                    ),
                "{e}"
            ),
        }
        assert!(
            t0.elapsed() < ttl * 3,
            "no new leader after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn standby_takes_over_without_ending_the_generation() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint.clone()];
    // SAMTRAIN_LEADER_TTL_S=5 measures the default TTL (docs/PERFORMANCE.md).
    let ttl_s = std::env::var("SAMTRAIN_LEADER_TTL_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let ttl = Duration::from_secs(ttl_s);
    let first = Node::start(endpoints.clone(), "first", ttl);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Node::start(endpoints.clone(), "second", ttl);
    let coords = vec![first.address(), second.address()];

    only_the_leader_is_ready(&first, &second).await;

    let mut client = Client::new(coords.clone(), Credentials::none());
    let id = client
        .submit(&spec("ha", 2, 2, 1, 3), "ha.toml")
        .await
        .unwrap();
    let mut w0 = agent(&coords, &endpoints, "w0", 6400).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut w1 = agent(&coords, &endpoints, "w1", 6401).await;
    let a0 = w0.next_assignment().await.unwrap().unwrap();
    let a1 = w1.next_assignment().await.unwrap().unwrap();
    assert_eq!((a0.rank, a1.rank, a0.generation), (0, 1, 0));

    // Kill the leader; the standby serves once the leader's lease expires.
    let t0 = Instant::now();
    first.kill();
    let mut standby = Client::new(vec![second.address()], Credentials::none());
    until_serving(&mut standby, &id, ttl, t0).await;
    let takeover = t0.elapsed();
    println!(
        "failover: leader killed -> standby serving in {:.2} s (lease TTL {} s)",
        takeover.as_secs_f64(),
        ttl.as_secs()
    );
    assert!(
        takeover <= ttl + Duration::from_millis(1500),
        "{takeover:?}"
    );
    assert_eq!(http_status(second.health, "/readyz").await, 200);

    // The generation was not ended; the job runs on, no restart.
    let job = standby.get(&id).await.unwrap();
    assert_eq!(
        (job.state(), job.generation, job.restarts),
        (v1::JobState::Running, 0, 0)
    );
    assert!(!a0.ended.load(Ordering::SeqCst) && !a1.ended.load(Ordering::SeqCst));

    // The agents found the new leader: progress reaches it, and so does
    // the outcome, through the same address list.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        w0.reporter().progress(Progress {
            step: 7,
            total_steps: 50,
            loss: 1.5,
            ..Progress::default()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        if standby.get(&id).await.unwrap().step == 7 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "progress never reached the new leader"
        );
    }
    w1.report_outcome(
        &a1,
        Outcome::Completed {
            eval: None,
            examples: Vec::new(),
            step: 50,
            checkpoint: None,
        },
    )
    .await
    .unwrap();
    w0.report_outcome(
        &a0,
        Outcome::Completed {
            eval: None,
            examples: Vec::new(),
            step: 50,
            checkpoint: None,
        },
    )
    .await
    .unwrap();
    let job = standby.get(&id).await.unwrap();
    assert_eq!((job.state(), job.restarts), (v1::JobState::Succeeded, 0));
    w0.shutdown().await;
    w1.shutdown().await;
}
