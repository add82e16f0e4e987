//! Failures: a closed or killed peer, a stuck peer, an abort, a wrong
//! generation, and ranks calling different operations. None may hang, and
//! each error must name the peer involved.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use samtrain_collective::{Abort, GroupOptions, ProcessGroups, Secret};
use tch::{Kind, Tensor};

const CHILD_ENV: &str = "SAMTRAIN_COLLECTIVE_TEST_CHILD";

fn big() -> Tensor {
    Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu))
}

#[test]
fn closed_peer_fails_the_others_fast_naming_it() {
    let groups = common::connect(3, 1, Duration::from_secs(30));
    let results = common::on_all(groups, |rank, g| {
        g.world.barrier().unwrap();
        if rank == 2 {
            // Leaves the group: its connections close.
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let err = g.world.all_reduce_sum(&big()).unwrap_err().to_string();
        Some((err, start.elapsed()))
    });
    let addr_of_2 = "rank 2 (127.0.0.1:";
    for (rank, r) in results.into_iter().enumerate().take(2) {
        let (err, took) = r.unwrap();
        assert!(
            took < Duration::from_secs(3),
            "rank {rank} took {took:?}: {err}"
        );
        assert!(err.contains(addr_of_2), "rank {rank}: {err}");
        assert!(err.contains("closed"), "rank {rank}: {err}");
    }
}

/// A rank in its own process: prints its address, reads the peers line,
/// joins, passes one barrier, then waits to be killed.
#[test]
fn child_rank_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rank: i64 = spec.parse().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("ADDR {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers = line.trim().split(',').map(str::to_string).collect();
    let g = ProcessGroups::connect(
        GroupOptions {
            rank,
            peers,
            tp: 1,
            generation: 1,
            timeout: Duration::from_secs(20),
            abort: Abort::new(),
            secret: Secret::new(b"test generation".to_vec()),
            shared_memory: true,
        },
        listener,
    )
    .unwrap();
    g.world.barrier().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn killed_process_fails_the_survivor_at_once() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_rank_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let child_addr = loop {
        let line = lines.next().expect("the child prints its address").unwrap();
        // The harness may print "test child_rank_entry ... " before it.
        if let Some(at) = line.find("ADDR ") {
            break line[at + 5..].trim().to_string();
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        listener.local_addr().unwrap().to_string(),
        child_addr.clone(),
    ];
    writeln!(child.stdin.as_mut().unwrap(), "{}", peers.join(",")).unwrap();
    let g = ProcessGroups::connect(
        GroupOptions {
            rank: 0,
            peers,
            tp: 1,
            generation: 1,
            timeout: Duration::from_secs(30),
            abort: Abort::new(),
            secret: Secret::new(b"test generation".to_vec()),
            shared_memory: true,
        },
        listener,
    )
    .unwrap();
    g.world.barrier().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let err = g.world.all_reduce_sum(&big()).unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.contains(&format!("rank 1 ({child_addr})")), "{err}");
    // The group stays failed, with the first cause.
    let again = g.world.barrier().unwrap_err().to_string();
    assert!(
        again.contains("earlier failure") && again.contains("rank 1"),
        "{again}"
    );
}

#[test]
fn stuck_peer_times_out_naming_it() {
    let groups = common::connect(2, 1, Duration::from_millis(600));
    let results = common::on_all(groups, |rank, g| {
        if rank == 1 {
            // Connected but never calls: stuck.
            std::thread::sleep(Duration::from_millis(2500));
            return None;
        }
        let start = Instant::now();
        let err = g.world.all_reduce_sum(&big()).unwrap_err().to_string();
        Some((err, start.elapsed()))
    });
    let (err, took) = results[0].clone().unwrap();
    assert!(took >= Duration::from_millis(600), "gave up after {took:?}");
    assert!(took < Duration::from_millis(2000), "gave up after {took:?}");
    assert!(
        err.contains("no progress") && err.contains("rank 1 (127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn abort_unblocks_a_waiting_rank() {
    let abort = Abort::new();
    let a = abort.clone();
    let groups = common::connect_with(
        2,
        1,
        Duration::from_secs(30),
        |_| 1,
        move |rank| if rank == 0 { a.clone() } else { Abort::new() },
    );
    let groups: Vec<_> = groups.into_iter().map(Result::unwrap).collect();
    let trigger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        abort.trigger();
    });
    let results = common::on_all(groups, |rank, g| {
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        let start = Instant::now();
        let err = g.world.all_reduce_sum(&big()).unwrap_err().to_string();
        Some((err, start.elapsed()))
    });
    trigger.join().unwrap();
    let (err, took) = results[0].clone().unwrap();
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert!(err.contains("aborted"), "{err}");
}

#[test]
fn wrong_generation_is_refused() {
    let start = Instant::now();
    let results = common::connect_with(
        2,
        1,
        Duration::from_secs(10),
        |rank| if rank == 0 { 7 } else { 8 },
        |_| Abort::new(),
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    for (rank, r) in results.into_iter().enumerate() {
        let err = r.unwrap_err().to_string();
        assert!(err.contains("refused"), "rank {rank}: {err}");
        assert!(err.contains("generation mismatch"), "rank {rank}: {err}");
        assert!(
            err.contains("generation 7") && err.contains("generation 8"),
            "rank {rank}: {err}"
        );
    }
}

#[test]
fn different_operations_are_reported_not_mixed() {
    let groups = common::connect(2, 1, Duration::from_secs(10));
    let results = common::on_all(groups, |rank, g| {
        let n = 10 + rank as i64;
        g.world
            .all_reduce_sum(&Tensor::ones([n], (Kind::Float, tch::Device::Cpu)))
            .unwrap_err()
            .to_string()
    });
    for (rank, err) in results.iter().enumerate() {
        // At least one side sees the header mismatch; the other may see the
        // connection close first.
        assert!(err.contains("rank"), "rank {rank}: {err}");
    }
    assert!(
        results
            .iter()
            .any(|e| e.contains("disagrees") && e.contains("of 11 elements")),
        "{results:?}"
    );
}

/// What a stranger on the network does to a rank's port while the real
/// ranks connect: one connects and says nothing, one claims to be rank 1
/// without the generation's secret. Neither takes a slot nor stalls anyone.
#[test]
fn strangers_neither_join_nor_stall_the_ranks() {
    use std::io::Read;
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let silent = TcpStream::connect(&peers[0]).unwrap();
    let mut forger = TcpStream::connect(&peers[0]).unwrap();
    let forged = std::thread::spawn(move || {
        let mut challenge = [0u8; 24];
        forger.read_exact(&mut challenge).unwrap();
        // A well-formed hello from "rank 1" to rank 0, with a guessed tag.
        let mut answer = b"SAMTCOL2".to_vec();
        answer.extend_from_slice(&1u64.to_le_bytes());
        answer.push(0);
        answer.extend_from_slice(&1i64.to_le_bytes());
        answer.extend_from_slice(&0i64.to_le_bytes());
        answer.extend_from_slice(&[7u8; 16 + 32]);
        forger.write_all(&answer).unwrap();
        let mut reply = Vec::new();
        let _ = forger.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let ranks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let g = ProcessGroups::connect(
                    GroupOptions {
                        rank: rank as i64,
                        peers,
                        tp: 1,
                        generation: 1,
                        timeout: Duration::from_secs(20),
                        abort: Abort::new(),
                        secret: Secret::new(b"the real generation".to_vec()),
                        shared_memory: true,
                    },
                    listener,
                )
                .unwrap();
                let sum = g
                    .world
                    .all_reduce_sum(&tch::Tensor::from_slice(&[rank as f32 + 1.0]))
                    .unwrap();
                sum.double_value(&[0])
            })
        })
        .collect();
    for r in ranks {
        assert_eq!(r.join().unwrap(), 3.0);
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the ranks took {:?} beside the strangers",
        start.elapsed()
    );
    assert!(forged.join().unwrap().contains("not authenticated"));
    drop(silent);
}
