//! The control plane against callers it must not trust: a coordinator with
//! tokens admits each role to its own service only; a worker token does not
//! let one worker act as another (reports, deregistration, re-registration
//! under its id); reports are checked against what the coordinator knows
//! (rank, checkpoint location and step); lease TTLs are bounded by the
//! server; and an open or plaintext API is refused off loopback.

mod common;

use std::time::Duration;

use common::{loopback_options, spec, Node};
use samtrain_coordinator::auth::{AuthOptions, TokenSource, WORKER_SECRET_HEADER};
use samtrain_coordinator::client::{Client, Credentials};
use samtrain_coordinator::CoordinatorOptions;
use samtrain_proto::v1;
use samtrain_proto::v1::workers_client::WorkersClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A coordinator with a fresh operator and worker token.
fn secured() -> (Node, String, String) {
    let (auth, operator, worker) = AuthOptions::generated();
    let node = Node::start_with(CoordinatorOptions {
        auth,
        ..loopback_options("secured")
    });
    (node, operator, worker)
}

fn operator_client(node: &Node, token: &str) -> Client {
    Client::new(
        vec![node.address()],
        Credentials::token(TokenSource::Literal(token.to_owned())),
    )
}

/// A request with a bearer token and, when given, a worker secret.
fn request<T>(message: T, token: &str, secret: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    let bearer = AsciiMetadataValue::try_from(format!("Bearer {token}")).unwrap();
    r.metadata_mut().insert("authorization", bearer);
    if let Some(secret) = secret {
        r.metadata_mut().insert(
            WORKER_SECRET_HEADER,
            AsciiMetadataValue::try_from(secret).unwrap(),
        );
    }
    r
}

/// A worker driven by hand over raw RPCs, as an impostor would.
struct RawWorker {
    id: String,
    secret: String,
    client: WorkersClient<Channel>,
    token: String,
}

impl RawWorker {
    async fn register(node: &Node, token: &str, name: &str, port: u16) -> RawWorker {
        let mut client = WorkersClient::connect(format!("http://{}", node.address()))
            .await
            .unwrap();
        let r = client
            .register(request(
                v1::RegisterRequest {
                    name: name.to_owned(),
                    advertise: format!("127.0.0.1:{port}"),
                    device: "cpu".to_owned(),
                    ..Default::default()
                },
                token,
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        RawWorker {
            id: r.worker_id,
            secret: r.worker_secret,
            client,
            token: token.to_owned(),
        }
    }

    /// Subscribes and waits for this worker's assignment.
    async fn assignment(&mut self) -> v1::Assignment {
        let mut stream = self
            .client
            .subscribe(request(
                v1::SubscribeRequest {
                    worker_id: self.id.clone(),
                    current: None,
                },
                &self.token,
                Some(&self.secret),
            ))
            .await
            .unwrap()
            .into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let event = tokio::time::timeout_at(deadline, stream.message())
                .await
                .expect("an assignment within 10 s")
                .unwrap()
                .expect("the stream stays open");
            if let Some(v1::worker_event::Event::Assignment(a)) = event.event {
                // Keep the subscription open for the rest of the test.
                tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
                return a;
            }
        }
    }
}

#[tokio::test]
async fn each_service_admits_only_its_own_role() {
    let (node, operator, worker) = secured();
    let job = spec("roles", 1, 1, 1, 0);

    let anonymous = Client::new(vec![node.address()], Credentials::none())
        .submit(&job, "roles.toml")
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Some(Code::Unauthenticated), "{anonymous}");
    let as_worker = operator_client(&node, &worker)
        .submit(&job, "roles.toml")
        .await
        .unwrap_err();
    assert_eq!(
        as_worker.code(),
        Some(Code::PermissionDenied),
        "{as_worker}"
    );
    let mut ops = operator_client(&node, &operator);
    let id = ops.submit(&job, "roles.toml").await.unwrap();
    assert_eq!(ops.get(&id).await.unwrap().id, id);

    // The operator's token does not register workers.
    let mut workers = WorkersClient::connect(format!("http://{}", node.address()))
        .await
        .unwrap();
    let refused = workers
        .register(request(
            v1::RegisterRequest {
                name: "rogue".into(),
                advertise: "127.0.0.1:1".into(),
                ..Default::default()
            },
            &operator,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_worker_cannot_act_for_another_or_misreport_its_job() {
    let (node, operator, token) = secured();
    let mut ops = operator_client(&node, &operator);
    let job_id = ops
        .submit(&spec("pair", 2, 2, 1, 3), "pair.toml")
        .await
        .unwrap();
    let mut a = RawWorker::register(&node, &token, "a", 41001).await;
    let mut b = RawWorker::register(&node, &token, "b", 41002).await;
    let (first, second) = tokio::join!(a.assignment(), b.assignment());
    let (rank0, rank1) = if first.rank == 0 { (&a, &b) } else { (&b, &a) };
    let generation = first.generation;
    assert_eq!(second.generation, generation);

    // Rank 1 forges rank 0's completion: without a secret, then with its own.
    let forged = v1::OutcomeReport {
        worker_id: rank0.id.clone(),
        job_id: job_id.clone(),
        generation,
        rank: 0,
        outcome: Some(v1::outcome_report::Outcome::Completed(v1::Completed {
            step: 50,
            eval: Some(v1::Scores {
                cider: 999.0,
                ..Default::default()
            }),
            examples: Vec::new(),
            checkpoint: None,
        })),
    };
    let mut impostor = rank1.client.clone();
    let no_secret = impostor
        .report_outcome(request(forged.clone(), &token, None))
        .await
        .unwrap_err();
    assert_eq!(no_secret.code(), Code::Unauthenticated);
    let wrong_secret = impostor
        .report_outcome(request(forged, &token, Some(&rank1.secret)))
        .await
        .unwrap_err();
    assert_eq!(wrong_secret.code(), Code::PermissionDenied);

    // Rank 1 speaking as itself but naming rank 0 moves nothing.
    let progress = v1::ProgressReport {
        worker_id: rank1.id.clone(),
        job_id: job_id.clone(),
        generation,
        rank: 0,
        progress: Some(v1::Progress {
            step: 49,
            loss: 0.1,
            ..Default::default()
        }),
    };
    impostor
        .report_progress(request(progress, &token, Some(&rank1.secret)))
        .await
        .unwrap();
    assert_eq!(ops.get(&job_id).await.unwrap().step, 0);

    // Deregistering another worker, or registering again under its id.
    let deregister = impostor
        .deregister(request(
            v1::DeregisterRequest {
                worker_id: rank0.id.clone(),
            },
            &token,
            Some(&rank1.secret),
        ))
        .await
        .unwrap_err();
    assert_eq!(deregister.code(), Code::PermissionDenied);
    let takeover = impostor
        .register(request(
            v1::RegisterRequest {
                name: "a".into(),
                advertise: "127.0.0.1:41009".into(),
                worker_id: rank0.id.clone(),
                ..Default::default()
            },
            &token,
            Some(&rank1.secret),
        ))
        .await
        .unwrap_err();
    assert_eq!(takeover.code(), Code::PermissionDenied);

    // A member's checkpoint must be a step folder of this job's URL, at a
    // step the job can reach.
    let mut honest = rank0.client.clone();
    for (step, url) in [
        (1u64 << 62, "file:///tmp/ckpt/pair/step-4611686018427387904"),
        (10, "s3://attacker-bucket/evil"),
        (10, "file:///tmp/ckpt/pair/../other/step-00000010"),
    ] {
        let refused = honest
            .report_checkpoint(request(
                v1::CheckpointReport {
                    worker_id: rank0.id.clone(),
                    job_id: job_id.clone(),
                    generation,
                    checkpoint: Some(v1::Checkpoint {
                        step,
                        url: url.into(),
                    }),
                    failure: String::new(),
                },
                &token,
                Some(&rank0.secret),
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}");
    }
    let good = v1::Checkpoint {
        step: 10,
        url: "file:///tmp/ckpt/pair/step-00000010".into(),
    };
    let ack = honest
        .report_checkpoint(request(
            v1::CheckpointReport {
                worker_id: rank0.id.clone(),
                job_id: job_id.clone(),
                generation,
                checkpoint: Some(good.clone()),
                failure: String::new(),
            },
            &token,
            Some(&rank0.secret),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.stale);
    let job = ops.get(&job_id).await.unwrap();
    assert_eq!(job.latest_checkpoint, Some(good));
    assert_eq!(job.state(), v1::JobState::Running);
}

#[tokio::test]
async fn lease_ttls_are_the_servers() {
    let (node, _, token) = secured();
    let mut workers = WorkersClient::connect(format!("http://{}", node.address()))
        .await
        .unwrap();
    let register = |lease_ttl_s, lease_id| {
        request(
            v1::RegisterRequest {
                name: "w".into(),
                advertise: "127.0.0.1:41100".into(),
                lease_ttl_s,
                lease_id,
                ..Default::default()
            },
            &token,
            None,
        )
    };
    let long = workers
        .register(register(4_000_000_000, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.lease_ttl_s, 60);
    let default = workers.register(register(0, 0)).await.unwrap().into_inner();
    assert_eq!(default.lease_ttl_s, 5);
    let foreign = workers.register(register(0, 12345)).await.unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
}

/// Why a coordinator on every interface with `auth` refuses to start
/// (before anything is bound).
async fn refusal_off_loopback(auth: AuthOptions) -> String {
    let options = CoordinatorOptions {
        listen: "0.0.0.0:0".parse().unwrap(),
        node_id: "refused".to_owned(),
        auth,
        ..CoordinatorOptions::default()
    };
    samtrain_coordinator::run(options)
        .await
        .err()
        .expect("refused")
        .to_string()
}

#[tokio::test]
async fn an_open_api_is_refused_off_loopback() {
    let err = refusal_off_loopback(AuthOptions::default()).await;
    assert!(
        err.contains("without tokens") && err.contains("--insecure"),
        "{err}"
    );
}

#[tokio::test]
async fn plaintext_is_refused_off_loopback() {
    let (auth, _, _) = AuthOptions::generated();
    let err = refusal_off_loopback(auth).await;
    assert!(
        err.contains("without TLS") && err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
}

#[tokio::test]
async fn history_is_bounded_listed_by_page_and_specs_are_sized() {
    let (auth, operator, _) = AuthOptions::generated();
    let node = Node::start_with(CoordinatorOptions {
        auth,
        history: samtrain_coordinator::History {
            max_jobs: 2,
            max_age: Duration::from_secs(86_400),
        },
        ..loopback_options("history")
    });
    let mut ops = operator_client(&node, &operator);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            ops.submit(&spec(&format!("h{i}"), 1, 1, 1, 0), "h.toml")
                .await
                .unwrap(),
        );
    }

    // Pages of two, in submission order, each token continuing the last.
    let mut jobs =
        samtrain_proto::v1::jobs_client::JobsClient::connect(format!("http://{}", node.address()))
            .await
            .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = jobs
            .list(request(
                v1::ListJobsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
                &operator,
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((seen, pages), (ids.clone(), 3));

    // Five finished jobs, two kept: the oldest three go.
    for id in &ids {
        ops.cancel(id).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed: Vec<String> = ops
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        if listed == ids[3..] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history still holds {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = ops.get(&ids[0]).await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound));

    // A spec too large for the store is refused with the reason.
    let padded = format!(
        "{}\n# {}\n",
        spec("big", 1, 1, 1, 0),
        "x".repeat(300 * 1024)
    );
    let err = ops.submit(&padded, "big.toml").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("at most 262144"), "{err}");
}

#[tokio::test]
async fn a_failed_save_is_told_to_the_job_checked_bounded_and_cleared_by_a_commit() {
    let (node, operator, token) = secured();
    let mut ops = operator_client(&node, &operator);
    let job_id = ops
        .submit(&spec("saves", 1, 1, 1, 3), "saves.toml")
        .await
        .unwrap();
    let mut w = RawWorker::register(&node, &token, "w", 41101).await;
    let a = w.assignment().await;
    let mut watch = ops.watch(&job_id).await.unwrap();
    let report = |step: u64, url: String, failure: String| v1::CheckpointReport {
        worker_id: w.id.clone(),
        job_id: job_id.clone(),
        generation: a.generation,
        checkpoint: Some(v1::Checkpoint { step, url }),
        failure,
    };
    let folder = |step: u64| format!("file:///tmp/ckpt/saves/step-{step:08}");
    let mut client = w.client.clone();

    // A failure must name a checkpoint of the job, as a commit must.
    let elsewhere = client
        .report_checkpoint(request(
            report(
                10,
                "s3://elsewhere/step-00000010".into(),
                "disk full".into(),
            ),
            &token,
            Some(&w.secret),
        ))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::InvalidArgument);

    // A reason of any size is kept to 4 KiB.
    let reason = format!("No space left on device {}", "x".repeat(100_000));
    client
        .report_checkpoint(request(
            report(10, folder(10), reason),
            &token,
            Some(&w.secret),
        ))
        .await
        .unwrap();
    let job = ops.get(&job_id).await.unwrap();
    let failure = job.checkpoint_failure.expect("the job is told");
    assert_eq!(failure.checkpoint.unwrap().step, 10);
    assert!(failure.reason.starts_with("No space left on device"));
    assert!(failure.reason.len() < 4200, "{}", failure.reason.len());
    let told = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        if let Some(v1::job_event::Event::CheckpointFailed(f)) = event.event {
            break f;
        }
    };
    assert_eq!(told.checkpoint.unwrap().url, folder(10));

    // A later commit clears it.
    client
        .report_checkpoint(request(
            report(20, folder(20), String::new()),
            &token,
            Some(&w.secret),
        ))
        .await
        .unwrap();
    let job = ops.get(&job_id).await.unwrap();
    assert_eq!(job.latest_checkpoint.unwrap().step, 20);
    assert_eq!(job.checkpoint_failure, None);
}
