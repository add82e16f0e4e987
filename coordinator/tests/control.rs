//! Control-plane scenarios with real coordinators and real agents (no
//! training): a generation forms and completes, a lost lease or a
//! reported failure restarts it, max_restarts fails the job, cancel, an
//! invalid spec, and the state as it lands in etcd.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{agent, eventually, spec, Node};
use samtrain_coordinator::agent::{Assignment, Outcome, Progress, SaveTiming};
use samtrain_coordinator::client::{Client, Credentials};
use samtrain_coordinator::jobs::{JobRecord, JobState};
use samtrain_coordinator::store;
use samtrain_proto::v1;
use samtrain_testkit::Etcd;
use tonic::Code;

async fn next(a: &mut samtrain_coordinator::agent::Agent) -> Assignment {
    tokio::time::timeout(Duration::from_secs(10), a.next_assignment())
        .await
        .expect("an assignment within 10 s")
        .unwrap()
        .expect("an assignment, not idle")
}

async fn state(client: &mut Client, id: &str) -> v1::Job {
    client.get(id).await.unwrap()
}

/// Every event of a watch until it closes, each as a short string.
async fn event_kinds(watch: &mut tonic::Streaming<v1::JobEvent>) -> Vec<String> {
    let mut kinds = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
    {
        kinds.push(match e.event.unwrap() {
            v1::job_event::Event::Snapshot(_) => "snapshot".to_owned(),
            v1::job_event::Event::StateChanged(s) => format!("state:{}", s.state().as_str_name()),
            v1::job_event::Event::Progress(p) => format!("progress:{}", p.step),
            v1::job_event::Event::CheckpointCommitted(c) => format!("checkpoint:{}", c.step),
            v1::job_event::Event::CheckpointFailed(f) => {
                format!("checkpoint-failed:{}", f.checkpoint.unwrap().step)
            }
            v1::job_event::Event::Restarted(_) => "restarted".to_owned(),
            v1::job_event::Event::Straggler(g) => format!("straggler:{}", g.rank),
            v1::job_event::Event::Finished(f) => {
                format!(
                    "finished:{}:{}",
                    f.state().as_str_name(),
                    f.eval.unwrap().rouge
                )
            }
        });
    }
    kinds
}

/// The final state is in etcd, readable without the coordinator; the
/// store, for further checks.
async fn stored_job_is(endpoints: &[String], id: &str, eval: v1::Scores) -> store::SharedStore {
    let s = store::open(endpoints, &Default::default()).await.unwrap();
    let kv = s
        .get(&format!("/samtrain-test/jobs/{id}"))
        .await
        .unwrap()
        .unwrap();
    let stored: JobRecord = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.eval, Some(eval));
    assert_eq!(
        stored.checkpoint.unwrap().url,
        "file:///tmp/ckpt/pair/step-00000010"
    );
    s
}

#[tokio::test]
async fn two_workers_form_a_generation_and_complete_with_state_in_etcd() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint.clone()];
    let node = Node::start(endpoints.clone(), "c1", Duration::from_secs(2));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());
    let id = client
        .submit(&spec("pair", 2, 2, 1, 3), "pair.toml")
        .await
        .unwrap();
    assert!(id.starts_with("pair-"), "{id}");
    let mut watch = client.watch(&id).await.unwrap();

    // Workers hold their leases in etcd themselves.
    let mut w0 = agent(&coords, &endpoints, "w0", 6100).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut w1 = agent(&coords, &endpoints, "w1", 6101).await;
    let (a0, a1) = (next(&mut w0).await, next(&mut w1).await);
    assert_eq!((a0.rank, a1.rank), (0, 1));
    assert_eq!((a0.world_size, a0.tp, a0.generation), (2, 1, 0));
    assert_eq!(a0.peers, ["127.0.0.1:6100", "127.0.0.1:6101"]);
    assert_eq!(a1.peers, a0.peers);
    assert_eq!(a0.spec.name, "pair");
    assert_eq!(a0.resume_checkpoint, None);

    let job = state(&mut client, &id).await;
    assert_eq!(job.state(), v1::JobState::Running);
    let members: Vec<&str> = job.members.iter().map(|m| m.worker_id.as_str()).collect();
    assert_eq!(members, [w0.worker_id(), w1.worker_id()]);

    let r = w0.reporter();
    r.progress(Progress {
        step: 10,
        total_steps: 50,
        loss: 2.5,
        lr: 1e-4,
        ..Progress::default()
    });
    r.checkpoint(
        v1::Checkpoint {
            step: 10,
            url: "file:///tmp/ckpt/pair/step-00000010".into(),
        },
        SaveTiming::default(),
    );
    eventually(Duration::from_secs(5), "progress and checkpoint", || {
        let mut c = client.clone();
        let id = id.clone();
        async move {
            let j = c.get(&id).await.unwrap();
            j.step == 10 && j.loss == Some(2.5) && j.latest_checkpoint.is_some_and(|c| c.step == 10)
        }
    })
    .await;

    let eval = v1::Scores {
        cider: 0.75,
        bleu4: 0.25,
        rouge: 0.5,
    };
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
    assert_eq!(
        state(&mut client, &id).await.state(),
        v1::JobState::Running,
        "rank 1 does not end the job"
    );
    w0.report_outcome(
        &a0,
        Outcome::Completed {
            eval: Some(eval),
            // A few examples are kept, each bounded; the rest are dropped.
            examples: (0..9)
                .map(|i| v1::EvalExample {
                    sample_id: i.to_string(),
                    prediction: "é".repeat(150 * (i + 1)),
                    reference: "a red circle".into(),
                })
                .collect(),
            step: 50,
            checkpoint: None,
        },
    )
    .await
    .unwrap();
    let job = state(&mut client, &id).await;
    assert_eq!(job.state(), v1::JobState::Succeeded);
    assert_eq!(job.eval.map(|e| e.cider), Some(0.75));
    assert_eq!(job.eval_examples.len(), 5);
    assert_eq!(job.eval_examples[0].prediction, "é".repeat(150));
    assert!(job.eval_examples[4]
        .prediction
        .ends_with("[cut at 512 bytes]"));
    assert!(job
        .eval_examples
        .iter()
        .all(|e| e.prediction.len() <= 512 + 64));
    assert_eq!(job.eval_examples[4].reference, "a red circle");
    assert!(job.finished_unix_ms.is_some());

    // The watch saw the whole story, in order, and closed after the end.
    let kinds = event_kinds(&mut watch).await;
    assert_eq!(
        kinds,
        [
            "snapshot",
            "state:JOB_STATE_RUNNING",
            "progress:10",
            "checkpoint:10",
            "state:JOB_STATE_SUCCEEDED",
            "finished:JOB_STATE_SUCCEEDED:0.5",
        ]
    );

    let s = stored_job_is(&endpoints, &id, eval).await;

    // A clean exit revokes the worker's lease at once.
    let key = format!("/samtrain-test/workers/{}", w0.worker_id());
    assert!(s.get(&key).await.unwrap().is_some());
    w0.shutdown().await;
    assert!(s.get(&key).await.unwrap().is_none());
    drop(w1);
}

/// A worker whose lease stops ends the generation; the survivor and a new
/// worker form the next one. Embedded mode: leases kept by Heartbeat.
#[tokio::test]
async fn lost_lease_restarts_with_a_replacement_then_max_restarts_fails() {
    let node = Node::start(Vec::new(), "solo", Duration::from_secs(1));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());
    let id = client
        .submit(&spec("elastic", 2, 2, 1, 1), "elastic.toml")
        .await
        .unwrap();
    let mut w0 = agent(&coords, &[], "w0", 6200).await;
    let w1 = agent(&coords, &[], "w1", 6201).await;
    let mut w1 = w1;
    let (a0, _a1) = (next(&mut w0).await, next(&mut w1).await);
    assert_eq!(a0.generation, 0);

    // w1 dies without a word: its heartbeats stop, its lease lapses.
    let t0 = Instant::now();
    drop(w1);
    eventually(Duration::from_secs(5), "the generation to end", || async {
        a0.ended.load(Ordering::SeqCst)
    })
    .await;
    let noticed = t0.elapsed();
    assert!(
        noticed < Duration::from_secs(3),
        "lease loss seen after {noticed:?}"
    );
    let job = state(&mut client, &id).await;
    assert_eq!((job.generation, job.restarts), (1, 1));
    assert!(job.message.contains("lost its lease"), "{}", job.message);

    // The survivor says how its part ended (its trainer stopped), which
    // frees it; a replacement joins; they form generation 1.
    w0.report_outcome(&a0, aborted()).await.unwrap();
    let mut w2 = agent(&coords, &[], "w2", 6202).await;
    let (b0, b2) = (next(&mut w0).await, next(&mut w2).await);
    assert_eq!((b0.generation, b2.generation), (1, 1));
    assert_eq!((b0.rank, b2.rank), (0, 1));
    assert_eq!(b0.peers, ["127.0.0.1:6200", "127.0.0.1:6202"]);
    assert_eq!(state(&mut client, &id).await.state(), v1::JobState::Running);

    // A retriable failure ends the generation at once (not after a TTL);
    // with max_restarts = 1 used up, the job fails with the reason.
    let t0 = Instant::now();
    w2.report_outcome(
        &b2,
        Outcome::Failed {
            retriable: true,
            message: "peer rank 0 at 127.0.0.1:6200 closed the connection".into(),
        },
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(2), "the survivor to hear", || async {
        b0.ended.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    let job = state(&mut client, &id).await;
    assert_eq!(job.state(), v1::JobState::Failed);
    assert!(
        job.message.contains("max_restarts (1)") && job.message.contains("closed the connection"),
        "{}",
        job.message
    );
    // A late, repeated report is acknowledged and ignored.
    w0.report_outcome(
        &b0,
        Outcome::Completed {
            eval: None,
            examples: Vec::new(),
            step: 3,
            checkpoint: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(state(&mut client, &id).await.state(), v1::JobState::Failed);
    w0.shutdown().await;
    w2.shutdown().await;
}

fn aborted() -> Outcome {
    Outcome::Failed {
        retriable: true,
        message: "collective aborted: the generation ended".into(),
    }
}

/// One failure costs one restart: a member that has not said how its part
/// of the ended generation went (it died, and its stream and lease have
/// not run out yet) is not picked for the next one, which would fail too.
#[tokio::test]
async fn a_member_that_never_reports_is_not_picked_again() {
    let node = Node::start(Vec::new(), "solo", Duration::from_secs(30));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());
    let id = client
        .submit(&spec("once", 2, 2, 1, 3), "once.toml")
        .await
        .unwrap();
    let mut w0 = agent(&coords, &[], "w0", 6210).await;
    let mut w1 = agent(&coords, &[], "w1", 6211).await;
    let (a0, a1) = (next(&mut w0).await, next(&mut w1).await);
    // w1's process is gone but its lease (30 s) and stream live on: w0
    // sees the peer die and reports; w1 says nothing.
    w0.report_outcome(
        &a0,
        Outcome::Failed {
            retriable: true,
            message: "connection with rank 1 closed".into(),
        },
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(2), "w1 to hear", || async {
        a1.ended.load(Ordering::SeqCst)
    })
    .await;
    let mut w2 = agent(&coords, &[], "w2", 6212).await;
    let (b0, b2) = (next(&mut w0).await, next(&mut w2).await);
    assert_eq!((b0.generation, b2.generation), (1, 1));
    assert_eq!(b0.peers, ["127.0.0.1:6210", "127.0.0.1:6212"]);
    let job = state(&mut client, &id).await;
    assert_eq!((job.generation, job.restarts), (1, 1));
    // w1, once it reports, waits for the next generation like any worker.
    w1.report_outcome(&a1, aborted()).await.unwrap();
    assert_eq!(state(&mut client, &id).await.restarts, 1);
    for w in [w0, w1, w2] {
        w.shutdown().await;
    }
}

fn committed(job: &str, step: u64) -> v1::Checkpoint {
    v1::Checkpoint {
        step,
        url: format!("file:///tmp/ckpt/{job}/step-{step:08}"),
    }
}

/// `Scale` and `Drain` change a running generation at its next committed
/// checkpoint, as resizes (not restarts); bad values are refused.
#[tokio::test]
async fn scale_and_drain_resize_at_a_checkpoint_without_a_restart() {
    let node = Node::start(Vec::new(), "solo", Duration::from_secs(30));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());
    let id = client
        .submit(&spec("resize", 1, 2, 1, 0), "resize.toml")
        .await
        .unwrap();
    let mut w0 = agent(&coords, &[], "w0", 6220).await;
    let mut w1 = agent(&coords, &[], "w1", 6221).await;
    let (a0, a1) = (next(&mut w0).await, next(&mut w1).await);
    assert_eq!(a0.world_size, 2);
    let job = state(&mut client, &id).await;
    assert_eq!(
        (job.world_size, job.dp, job.tp, job.max_workers),
        (2, 2, 1, 2)
    );

    // Every rank's progress shows on its member.
    for (agent, step) in [(&w0, 7), (&w1, 6)] {
        agent.reporter().progress(Progress {
            step,
            total_steps: 50,
            ..Progress::default()
        });
    }
    eventually(Duration::from_secs(5), "both ranks heard", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let job = state(&mut client, &id).await;
            job.members.iter().map(|m| m.step).collect::<Vec<_>>() == [7, 6]
                && job.members.iter().all(|m| m.last_report_unix_ms.is_some())
        }
    })
    .await;

    for bad in [0, 65_537] {
        let err = client.scale(&id, bad).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    }
    let scaled = client.scale(&id, 1).await.unwrap();
    assert_eq!((scaled.max_workers, scaled.world_size), (1, 2));
    // Nothing changes until a checkpoint commits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a0.ended.load(Ordering::SeqCst));
    w0.reporter()
        .checkpoint(committed("resize", 10), SaveTiming::default());
    eventually(Duration::from_secs(5), "the resize", || async {
        a0.ended.load(Ordering::SeqCst) && a1.ended.load(Ordering::SeqCst)
    })
    .await;
    let job = state(&mut client, &id).await;
    assert_eq!((job.restarts, job.resizes), (0, 1), "{}", job.message);
    assert!(
        job.message.contains("scaled to 1 workers from 2"),
        "{}",
        job.message
    );
    w0.report_outcome(&a0, aborted()).await.unwrap();
    w1.report_outcome(&a1, aborted()).await.unwrap();
    let b0 = next(&mut w0).await;
    assert_eq!((b0.generation, b0.world_size), (1, 1));

    // Draining the only member moves the job to the other worker.
    let err = client.drain("nobody-0123456789abcdef").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    let drained = client.drain(w0.worker_id()).await.unwrap();
    assert_eq!(drained.job_id.as_deref(), Some(id.as_str()));
    w0.reporter()
        .checkpoint(committed("resize", 20), SaveTiming::default());
    eventually(Duration::from_secs(5), "the drain's resize", || async {
        b0.ended.load(Ordering::SeqCst)
    })
    .await;
    w0.report_outcome(&b0, aborted()).await.unwrap();
    let c1 = next(&mut w1).await;
    assert_eq!((c1.generation, c1.world_size, c1.rank), (2, 1, 0));
    let job = state(&mut client, &id).await;
    assert_eq!((job.restarts, job.resizes), (0, 2), "{}", job.message);
    assert_eq!(job.members[0].worker_id, w1.worker_id());
    for w in [w0, w1] {
        w.shutdown().await;
    }
}

/// A rank whose compute time per step stays above `straggler_factor`
/// times the others' median for `straggler_steps` steps is flagged (an
/// event and a field), and unflagged once it keeps up again.
#[tokio::test]
async fn a_slow_rank_is_flagged_after_enough_steps_and_cleared_when_it_recovers() {
    let node = Node::start(Vec::new(), "solo", Duration::from_secs(30));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());
    let spec = spec("slow", 3, 3, 1, 0).replace(
        "last_call_s = 0.3",
        "last_call_s = 0.3\nstraggler_factor = 2.0\nstraggler_steps = 4",
    );
    let id = client.submit(&spec, "slow.toml").await.unwrap();
    let mut agents = Vec::new();
    for (i, port) in [6230, 6231, 6232].into_iter().enumerate() {
        agents.push(agent(&coords, &[], &format!("w{i}"), port).await);
    }
    let mut ranks = Vec::new();
    for a in &mut agents {
        ranks.push(next(a).await.rank);
    }
    let mut watch = client.watch(&id).await.unwrap();
    let report = |step: u64, slow_compute: f64| {
        for (a, &rank) in agents.iter().zip(&ranks) {
            a.reporter().progress(Progress {
                step,
                total_steps: 50,
                compute_s: if rank == 2 { slow_compute } else { 0.1 },
                comm_s: if rank == 2 { 0.0 } else { slow_compute - 0.1 },
                ..Progress::default()
            });
        }
    };
    let flags = |client: &Client| {
        let (mut client, id) = (client.clone(), id.clone());
        async move {
            let job = state(&mut client, &id).await;
            job.members.iter().map(|m| m.straggler).collect::<Vec<_>>()
        }
    };
    // Every rank keeps up to step 2; rank 2 is slow over steps 3-4 (two
    // steps in a row: not yet), then 5-6.
    for (step, compute) in [(2, 0.1), (4, 0.5)] {
        report(step, compute);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(flags(&client).await, [false, false, false]);
    report(6, 0.5);
    eventually(Duration::from_secs(5), "rank 2 flagged", || async {
        flags(&client).await == [false, false, true]
    })
    .await;
    let job = state(&mut client, &id).await;
    assert!(
        (job.members[2].compute_s - 0.5).abs() < 1e-9,
        "{:?}",
        job.members[2]
    );
    let event = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::job_event::Event::Straggler(g)) = e.event {
            break g;
        }
    };
    assert_eq!((event.rank, event.steps, event.replace), (2, 4, false));
    assert!((event.median_compute_s - 0.1).abs() < 1e-9, "{event:?}");
    // Keeping up again clears the flag.
    report(8, 0.1);
    eventually(Duration::from_secs(5), "rank 2 cleared", || async {
        flags(&client).await == [false, false, false]
    })
    .await;
    for a in agents {
        a.shutdown().await;
    }
}

#[tokio::test]
async fn permanent_failure_cancel_invalid_spec_and_idle_workers() {
    let node = Node::start(Vec::new(), "solo", Duration::from_secs(1));
    let coords = vec![node.address()];
    let mut client = Client::new(coords.clone(), Credentials::none());

    // Every problem of the spec is named; nothing is stored.
    let bad = spec("Bad_Name", 3, 2, 2, 1).replace("steps = 50", "steps = 0");
    let err = client.submit(&bad, "bad.toml").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    let message = err.to_string();
    for field in ["bad.toml", "name", "training.steps", "parallel.max_workers"] {
        assert!(message.contains(field), "{field} missing in {message}");
    }
    assert!(client.list().await.unwrap().is_empty());
    let err = client.get("nope-123").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.to_string().contains("nope-123"));

    // A permanent failure fails the job at once, without restarts.
    let id = client
        .submit(&spec("perm", 1, 1, 1, 3), "perm.toml")
        .await
        .unwrap();
    let mut w = agent(&coords, &[], "w", 6300).await;
    let a = next(&mut w).await;
    w.report_outcome(
        &a,
        Outcome::Failed {
            retriable: false,
            message: "record 7 of /data/train: no images".into(),
        },
    )
    .await
    .unwrap();
    let job = state(&mut client, &id).await;
    assert_eq!((job.state(), job.restarts), (v1::JobState::Failed, 0));
    assert!(job.message.contains("no images"), "{}", job.message);

    // Cancel ends the generation; the member hears it.
    let id = client
        .submit(&spec("stop", 1, 1, 1, 3), "stop.toml")
        .await
        .unwrap();
    let b = next(&mut w).await;
    assert_eq!(b.job_id, id);
    let job = client.cancel(&id).await.unwrap();
    assert_eq!(job.state(), v1::JobState::Cancelled);
    eventually(
        Duration::from_secs(2),
        "the member to hear of the cancel",
        || async { b.ended.load(Ordering::SeqCst) },
    )
    .await;
    let err = client.cancel(&id).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert_eq!(client.list().await.unwrap().len(), 2);

    // No job left: a local-mode agent is told it is idle.
    let mut local =
        samtrain_coordinator::agent::Agent::register(samtrain_coordinator::agent::AgentOptions {
            coordinators: coords.clone(),
            name: "local".into(),
            advertise: "127.0.0.1:6301".into(),
            exit_when_idle: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let idle = tokio::time::timeout(Duration::from_secs(5), local.next_assignment())
        .await
        .unwrap()
        .unwrap();
    assert!(idle.is_none());
    local.shutdown().await;
    w.shutdown().await;
}

/// A node's agent and its two rank processes, with the lease in etcd (the
/// agents write their records) and held by the coordinator (Heartbeat
/// calls): the three records share one lease; the coordinator admits no
/// third rank and none without the agent's secret; a dead rank's record
/// goes alone; draining the agent drains its ranks; the node's lease
/// ending takes every rank with it.
#[tokio::test]
async fn a_nodes_ranks_share_its_one_lease_and_go_with_it() {
    use samtrain_coordinator::agent::{Agent, AgentError, AgentOptions, NodeAgent, NodeLease};

    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint.clone()];
    let node = Node::start(endpoints.clone(), "c1", Duration::from_secs(2));
    let coords = vec![node.address()];
    let store = store::open(&endpoints, &Default::default()).await.unwrap();
    let records = || {
        let store = store.clone();
        async move { store.range("/samtrain-test/workers/").await.unwrap() }
    };
    for worker_etcd in [Vec::new(), endpoints.clone()] {
        let held_by_coordinator = worker_etcd.is_empty();
        let options = |name: &str, port: u16| AgentOptions {
            coordinators: coords.clone(),
            name: name.to_owned(),
            advertise: format!("127.0.0.1:{port}"),
            node: "node-a".to_owned(),
            etcd: worker_etcd.clone(),
            etcd_prefix: "/samtrain-test".to_owned(),
            lease_ttl: Some(Duration::from_secs(2)),
            ..AgentOptions::default()
        };
        let node_agent = NodeAgent::register(options("node-a", 0), 2).await.unwrap();
        let mut ranks = Vec::new();
        for slot in 0..2 {
            let rank = Agent::register(AgentOptions {
                node_membership: Some(node_agent.membership(slot)),
                ..options(&format!("node-a-slot{slot}"), 6200 + slot as u16)
            })
            .await
            .unwrap();
            ranks.push(rank);
        }
        let kvs = records().await;
        assert_eq!(kvs.len(), 3, "the agent's and two ranks' records");
        let leases: std::collections::HashSet<_> = kvs.iter().map(|kv| kv.lease).collect();
        assert_eq!(leases.len(), 1, "one lease: {kvs:?}");
        assert!(leases.iter().all(Option::is_some));

        if held_by_coordinator {
            let refused = |result: Result<Agent, AgentError>| match result {
                Err(AgentError::Refused { status, .. }) => status.code(),
                Err(e) => panic!("not refused but {e}"),
                Ok(_) => panic!("registered"),
            };
            // A third rank, though it holds the agent's secret.
            let (worker_id, worker_secret) =
                samtrain_coordinator::records::new_worker_identity("extra");
            let third = Agent::register(AgentOptions {
                node_membership: Some(samtrain_coordinator::agent::NodeMembership {
                    worker_id: worker_id.clone(),
                    worker_secret: worker_secret.clone(),
                    ..node_agent.membership(0)
                }),
                ..options("extra", 6202)
            })
            .await;
            assert_eq!(refused(third), Code::ResourceExhausted);
            // A rank that does not hold the agent's secret.
            let impostor = Agent::register(AgentOptions {
                node_membership: Some(samtrain_coordinator::agent::NodeMembership {
                    worker_id,
                    worker_secret,
                    lease: NodeLease::Coordinator {
                        agent_secret: "not-the-agents".to_owned(),
                    },
                    ..node_agent.membership(0)
                }),
                ..options("impostor", 6203)
            })
            .await;
            assert_eq!(refused(impostor), Code::PermissionDenied);
        }

        // Draining the node's agent drains each of its ranks.
        let mut client = Client::new(coords.clone(), Credentials::none());
        client.drain(node_agent.agent_id()).await.unwrap();
        let drained: Vec<String> = store
            .range("/samtrain-test/drained/")
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key.rsplit('/').next().unwrap().to_owned())
            .collect();
        for rank in &ranks {
            assert!(
                drained.iter().any(|id| id == rank.worker_id()),
                "{} not drained: {drained:?}",
                rank.worker_id()
            );
        }
        // And the agent itself: a rank started again later stays out.
        assert!(drained.iter().any(|id| id == node_agent.agent_id()));

        // A dead rank's record goes alone: the lease is the node's.
        node_agent.remove_rank(0).await.unwrap();
        let left: Vec<String> = records().await.into_iter().map(|kv| kv.key).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!left.iter().any(|k| k.ends_with(ranks[0].worker_id())));
        assert!(left.iter().any(|k| k.ends_with(ranks[1].worker_id())));

        // The node's lease ends: every record goes at once.
        node_agent.release().await;
        assert!(records().await.is_empty(), "{:?}", records().await);
        drop(ranks);
    }
}

/// Rank processes of one node's agent registering all at once, through
/// two coordinators: no more are admitted than the agent has slots, however
/// their calls interleave (the count and the write are one transaction).
#[tokio::test]
async fn ranks_registering_at_once_never_exceed_their_agents_slots() {
    use samtrain_coordinator::agent::{Agent, AgentError, AgentOptions, NodeAgent, NodeMembership};

    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint.clone()];
    let first = Node::start(endpoints.clone(), "c1", Duration::from_secs(2));
    let second = Node::start(endpoints.clone(), "c2", Duration::from_secs(2));
    let options = |name: &str, coordinator: String, port: u16| AgentOptions {
        coordinators: vec![coordinator],
        name: name.to_owned(),
        advertise: format!("127.0.0.1:{port}"),
        node: "node-a".to_owned(),
        etcd_prefix: "/samtrain-test".to_owned(),
        lease_ttl: Some(Duration::from_secs(5)),
        ..AgentOptions::default()
    };
    let node_agent = NodeAgent::register(options("node-a", first.address(), 0), 2)
        .await
        .unwrap();
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..12u16 {
        let (worker_id, worker_secret) =
            samtrain_coordinator::records::new_worker_identity(&format!("rank{i}"));
        let coordinator = if i % 2 == 0 {
            first.address()
        } else {
            second.address()
        };
        attempts.spawn(Agent::register(AgentOptions {
            node_membership: Some(NodeMembership {
                worker_id,
                worker_secret,
                ..node_agent.membership(0)
            }),
            ..options(&format!("rank{i}"), coordinator, 6300 + i)
        }));
    }
    let mut admitted = Vec::new();
    while let Some(result) = attempts.join_next().await {
        match result.unwrap() {
            Ok(rank) => admitted.push(rank),
            Err(AgentError::Refused { status, .. }) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}")
            }
            Err(e) => panic!("neither admitted nor refused: {e}"),
        }
    }
    assert_eq!(admitted.len(), 2, "a node of 2 slots");
    let store = store::open(&endpoints, &Default::default()).await.unwrap();
    let ranks = store
        .range("/samtrain-test/workers/")
        .await
        .unwrap()
        .into_iter()
        .filter(|kv| !kv.key.ends_with(node_agent.agent_id()))
        .count();
    assert_eq!(ranks, 2, "the records of the admitted ranks only");
    node_agent.release().await;
}
