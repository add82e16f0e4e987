//! A benchmark, not a test (ignored by default): the latency of sequential
//! `Get` calls from one client to an embedded coordinator, in plaintext and
//! over TLS, the figures docs/PERFORMANCE.md records. Run it with
//! `cargo test -p samtrain-coordinator --release --test grpc_latency -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{loopback_options, spec, Node};
use samtrain_coordinator::client::{Client, ClientTls, Credentials};
use samtrain_coordinator::tls::{generate, ServerTlsFiles};
use samtrain_coordinator::CoordinatorOptions;

#[tokio::test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn sequential_get_latency() {
    let dir = tempfile::tempdir().unwrap();
    let made = generate(&["127.0.0.1".to_owned()], 1).unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (ca, cert, key) = (
        file("ca.pem", &made.ca_cert),
        file("server.pem", &made.server_cert),
        file("server-key.pem", &made.server_key),
    );
    for tls in [false, true] {
        let node = Node::start_with(CoordinatorOptions {
            tls: tls.then(|| ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            }),
            ..loopback_options("bench")
        });
        let credentials = match tls {
            true => Credentials::none().with_tls(ClientTls {
                ca: Some(ca.clone()),
                ..ClientTls::default()
            }),
            false => Credentials::none(),
        };
        let client = Client::new(vec![node.address()], credentials.clone());
        let (found, missing) = latency(client).await;
        eprintln!("sequential Get, tls {tls}: {found:?} per call (a missing job: {missing:?})");
        // What every call cost when each connected anew: a client per call.
        let start = Instant::now();
        for _ in 0..CALLS {
            let mut fresh = Client::new(vec![node.address()], credentials.clone());
            fresh.get("no-such-job").await.unwrap_err();
        }
        eprintln!(
            "sequential Get, tls {tls}, a new connection per call: {:?}",
            start.elapsed() / CALLS
        );
    }
}

const CALLS: u32 = 200;

/// Per call: `Get` of a job, and of a missing job.
async fn latency(mut client: Client) -> (Duration, Duration) {
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
    (found, start.elapsed() / CALLS)
}
