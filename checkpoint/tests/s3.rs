//! Checkpoints on a real S3-compatible server (moto's, from the venv that
//! scripts/setup.sh installs), started by each test on loopback and stopped
//! by its PID: bit-exact round trips (a multipart file included), and
//! uploads that outlast a store that is down, retried until it is back,
//! without ever failing the caller.

mod common;

use std::time::{Duration, Instant};

use common::{assert_same, copy, model_state, values};
use samtrain_checkpoint::{
    CheckpointOptions, CheckpointTuning, Checkpointer, RetryPolicy, SaveStatus, ShardState,
};
use samtrain_testkit::{free_port, s3_options, S3Server};
use serde_json::json;
use tch::Kind;

fn open(port: u16, retry: RetryPolicy) -> Checkpointer {
    let mut options = CheckpointOptions::new("s3://ckpt/run-1");
    options.retry = retry;
    options.keep = 2;
    Checkpointer::open_with(
        options,
        CheckpointTuning {
            store_options: s3_options(&format!("http://127.0.0.1:{port}")),
            ..CheckpointTuning::default()
        },
    )
    .unwrap()
}

fn state(step: u64, seed: i64) -> ShardState {
    let (tensors, optimizer) = model_state(seed);
    ShardState {
        step,
        tp_rank: 0,
        tp_size: 1,
        writer: true,
        tensors,
        optimizer,
        meta: json!({ "step": step }),
    }
}

#[test]
fn round_trip_on_s3_is_bit_exact() {
    let server = S3Server::start(free_port(), "ckpt");
    let ck = open(server.port, RetryPolicy::default());
    let mut s = state(100, 3);
    // 72 MiB of f32: above the multipart threshold, three parts.
    s.tensors.push((
        "language_model.lm_head.weight".into(),
        values(&[18 << 10, 1 << 10], 3, 9),
    ));
    s.tensors.push((
        "vision.patch".into(),
        values(&[3, 5], 3, 8).to_kind(Kind::BFloat16),
    ));
    let (params, optimizer) = (copy(&s.tensors), copy(&s.optimizer));
    let (ticket, loan) = ck.save_lending(s).unwrap();
    assert_eq!(
        loan.bytes(),
        0,
        "an upload to S3 holds on to its bytes: nothing is lent"
    );
    let outcome = ticket.wait();
    assert_eq!(outcome.status, SaveStatus::Committed, "{outcome:?}");
    assert!(outcome.bytes > 72 << 20);

    for step in [200, 300] {
        assert_eq!(
            ck.save(state(step, 4)).unwrap().wait().status,
            SaveStatus::Committed
        );
    }
    // keep = 2: step 100 went; a fresh Checkpointer sees what the store has.
    let other = open(server.port, RetryPolicy::default());
    let steps: Vec<u64> = other.list().unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [200, 300]);
    let latest = other.latest().unwrap().unwrap();
    assert_eq!(latest.url, "s3://ckpt/run-1/step-00000300");
    let loaded = other.load(&latest, 0, 1).unwrap();
    let (p300, o300) = model_state(4);
    assert_same(&loaded.tensors, &p300);
    assert_same(&loaded.optimizer, &o300);
    assert_eq!(loaded.meta, json!({ "step": 300 }));

    // The multipart checkpoint, saved again under keep = 0, reads back whole.
    let mut options = CheckpointOptions::new("s3://ckpt/big");
    options.keep = 0;
    let big = Checkpointer::open_with(
        options,
        CheckpointTuning {
            store_options: server.options(),
            ..CheckpointTuning::default()
        },
    )
    .unwrap();
    let mut s = state(1, 3);
    s.tensors = copy(&params);
    s.optimizer = copy(&optimizer);
    assert_eq!(big.save(s).unwrap().wait().status, SaveStatus::Committed);
    let info = big.latest().unwrap().unwrap();
    let loaded = big.load(&info, 0, 1).unwrap();
    assert_same(&loaded.tensors, &params);
    assert_same(&loaded.optimizer, &optimizer);
    drop(server);
}

#[test]
fn uploads_wait_out_a_store_that_is_down() {
    // Nothing listens on the port yet: every request is refused.
    let port = free_port();
    let ck = open(
        port,
        RetryPolicy {
            max_attempts: 40,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        },
    );
    let s = state(7, 5);
    let expected = copy(&s.tensors);
    let start = Instant::now();
    let ticket = ck.save(s).unwrap();
    // save returned after staging alone: the store has not answered once.
    assert!(ticket.outcome().is_none());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(ticket.outcome().is_none());

    let server = S3Server::start(port, "ckpt");
    let outcome = ticket.wait();
    assert_eq!(outcome.status, SaveStatus::Committed, "{outcome:?}");
    assert!(outcome.retries > 0, "{outcome:?}");
    let info = ck.latest().unwrap().unwrap();
    assert_eq!(info.step, 7);
    assert_same(&ck.load(&info, 0, 1).unwrap().tensors, &expected);
    drop(server);
}

#[test]
fn a_save_that_fails_for_good_is_reported_and_the_next_one_works() {
    let port = free_port();
    let ck = open(
        port,
        RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(50),
        },
    );
    let ticket = ck.save(state(1, 0)).unwrap();
    let outcomes = ck.flush().unwrap();
    assert_eq!(outcomes.len(), 1);
    match &outcomes[0].status {
        SaveStatus::Failed(message) => {
            assert!(message.contains("2 attempt(s)"), "{message}")
        }
        other => panic!("a save to a store that is down: {other:?}"),
    }
    assert_eq!(ticket.wait(), outcomes[0]);

    // The store comes back (empty, as after a restart): the next save works.
    let server = S3Server::start(port, "ckpt");
    let outcome = ck.save(state(2, 0)).unwrap().wait();
    assert_eq!(outcome.status, SaveStatus::Committed, "{outcome:?}");
    assert_eq!(ck.latest().unwrap().unwrap().step, 2);

    // Down again mid-run, then back: a save in flight rides it out.
    drop(server);
    let patient = open(
        port,
        RetryPolicy {
            max_attempts: 40,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        },
    );
    let ticket = patient.save(state(3, 0)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let server = S3Server::start(port, "ckpt");
    let outcome = ticket.wait();
    assert_eq!(outcome.status, SaveStatus::Committed, "{outcome:?}");
    assert!(outcome.retries > 0);
    drop(server);
}
