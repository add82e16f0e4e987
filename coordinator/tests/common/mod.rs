//! Shared by the control-plane tests: coordinators in their own runtimes (so
//! a test can kill one as a crash would), job specs and agents (the etcd
//! server and ports come from samtrain-testkit).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use samtrain_coordinator::agent::{Agent, AgentOptions};
use samtrain_coordinator::{run, CoordinatorOptions};

/// Logs to the test's output when `RUST_LOG` is set.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A coordinator in its own runtime on its own thread; `kill` drops the
/// runtime without a word, as a crashed process would.
pub struct Node {
    pub addr: SocketAddr,
    pub health: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A coordinator's options for a test: gRPC and probes on free loopback
/// ports, the tests' store prefix, embedded; the rest by default.
pub fn loopback_options(node_id: &str) -> CoordinatorOptions {
    CoordinatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        health_listen: Some("127.0.0.1:0".parse().unwrap()),
        prefix: "/samtrain-test".to_owned(),
        node_id: node_id.to_owned(),
        ..CoordinatorOptions::default()
    }
}

impl Node {
    pub fn start(etcd: Vec<String>, node_id: &str, lease_ttl: Duration) -> Node {
        Node::start_with(CoordinatorOptions {
            etcd,
            lease_ttl,
            ..loopback_options(node_id)
        })
    }

    /// A coordinator with these options (its health probes must be served).
    pub fn start_with(options: CoordinatorOptions) -> Node {
        logs();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let running = rt.block_on(run(options));
            let running = match running {
                Ok(r) => r,
                Err(e) => {
                    ready_tx.send(Err(e.to_string())).unwrap();
                    return;
                }
            };
            ready_tx
                .send(Ok((running.addr(), running.health_addr().unwrap())))
                .unwrap();
            let graceful = kill_rx.recv().unwrap_or(true);
            if graceful {
                let _ = rt.block_on(running.shutdown());
            } else {
                std::mem::forget(running);
                rt.shutdown_background();
            }
        });
        let (addr, health) = ready_rx.recv().unwrap().expect("coordinator starts");
        Node {
            addr,
            health,
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the coordinator abruptly (no resignation, no lease revoke).
    pub fn kill(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, graceful: bool) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(graceful);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// A valid job spec; the coordinator never opens its paths.
pub fn spec(name: &str, min: u32, max: u32, tp: u32, max_restarts: u32) -> String {
    format!(
        r#"name = "{name}"
[model]
path = "/models/sam"
[data]
train = "/data/train"
[training]
steps = 50
[parallel]
tp = {tp}
min_workers = {min}
max_workers = {max}
last_call_s = 0.3
[checkpoint]
url = "file:///tmp/ckpt/{name}"
[restart]
max_restarts = {max_restarts}
"#
    )
}

/// Registers an agent with the given coordinators (and etcd, if any).
pub async fn agent(coordinators: &[String], etcd: &[String], name: &str, port: u16) -> Agent {
    Agent::register(AgentOptions {
        coordinators: coordinators.to_vec(),
        name: name.to_owned(),
        advertise: format!("127.0.0.1:{port}"),
        device: "cpu".to_owned(),
        etcd: etcd.to_vec(),
        etcd_prefix: "/samtrain-test".to_owned(),
        exit_when_idle: false,
        lease_ttl: Some(Duration::from_secs(1)),
        ..AgentOptions::default()
    })
    .await
    .expect("agent registers")
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
