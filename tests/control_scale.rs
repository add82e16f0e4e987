//! The control plane at scale: many workers against one `samtrain
//! coordinator` process on a real etcd. The workers are full agents (the
//! worker's own control-plane client), light enough to run by the hundred
//! in this process: each registers, keeps its own lease by Heartbeat calls
//! (the coordinator holds one etcd lease per worker) and subscribes; then
//! one job asks for all of them and one generation forms.
//!
//! `one_generation_of_many_workers_forms` (60 workers) runs with the tests.
//! `control_plane_at_scale` is the benchmark docs/PERFORMANCE.md records,
//! ignored by default:
//!
//! ```sh
//! SAMTRAIN_SCALE_WORKERS=1000 cargo test --release --test control_scale -- --ignored --nocapture
//! ```

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use samtrain_coordinator::agent::{Agent, AgentOptions, Assignment};
use samtrain_coordinator::client::{Client, Credentials};
use samtrain_testkit::{free_port, wait_for_port, Etcd};

const BIN: &str = env!("CARGO_BIN_EXE_samtrain");

/// Registrations in flight at once, as a fleet of workers starting together.
const REGISTERING_AT_ONCE: usize = 64;

/// A coordinator process, killed by its PID when dropped.
struct Coordinator {
    child: Child,
    address: String,
}

impl Coordinator {
    fn start(etcd: &Etcd, log: &std::path::Path) -> Coordinator {
        let port = free_port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--etcd", &etcd.endpoint, "--node-id", "scale"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_port(port, "the coordinator", Duration::from_secs(30));
        Coordinator {
            child,
            address: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Resident memory now and at its peak, in MiB (Linux's /proc).
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(f64::NAN, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(workers: usize) -> String {
    format!(
        r#"name = "scale"
[model]
path = "/models/sam"
[data]
train = "/data/train"
[training]
steps = 50
[parallel]
min_workers = {workers}
max_workers = {workers}
last_call_s = 0.3
[checkpoint]
url = "file:///tmp/samtrain-scale-ckpt"
"#
    )
}

/// What one run measured.
struct Figures {
    registration: Vec<Duration>,
    heartbeats: Vec<Duration>,
    formation: Duration,
    assignments: Vec<Assignment>,
    memory_mib: (f64, f64),
}

/// Each agent holds a connection, and the coordinator one per agent: lifts
/// the soft limit on open files to the hard one.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a stack value of the type they take.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Registers `workers` agents, lets them heartbeat for `steady`, then
/// submits a job that takes all of them and waits for every assignment.
async fn run(workers: usize, steady: Duration) -> Figures {
    raise_open_files();
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start();
    let coordinator = Coordinator::start(&etcd, &dir.path().join("coordinator.log"));
    let coordinators = vec![coordinator.address.clone()];

    let registering = (0..workers).map(|i| {
        let coordinators = coordinators.clone();
        async move {
            let started = Instant::now();
            let agent = Agent::register(AgentOptions {
                coordinators,
                name: format!("w{i}"),
                // Only named in assignments: nothing listens there.
                advertise: format!("127.0.0.1:{}", 20_000 + i),
                exit_when_idle: false,
                credentials: Credentials::none(),
                ..AgentOptions::default()
            })
            .await
            .expect("the agent registers");
            (agent, started.elapsed())
        }
    });
    let registered: Vec<(Agent, Duration)> = futures::stream::iter(registering)
        .buffer_unordered(REGISTERING_AT_ONCE)
        .collect()
        .await;
    let (mut agents, mut registration): (Vec<Agent>, Vec<Duration>) =
        registered.into_iter().unzip();
    registration.sort();

    // Steady state: every agent renews its lease every third of the TTL;
    // each renewal's round trip is sampled as it happens.
    let mut seen = vec![0u64; agents.len()];
    let mut heartbeats = Vec::new();
    let until = Instant::now() + steady;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (agent, seen) in agents.iter().zip(seen.iter_mut()) {
            if let (count, Some(rtt)) = agent.heartbeats() {
                if count != *seen {
                    *seen = count;
                    heartbeats.push(rtt);
                }
            }
        }
    }
    heartbeats.sort();

    let mut client = Client::new(coordinators.clone(), Credentials::none());
    let submitted = Instant::now();
    client.submit(&spec(workers), "scale.toml").await.unwrap();
    let formed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waits = agents.iter_mut().map(|agent| {
        let formed = formed.clone();
        async move {
            let assignment = agent
                .next_assignment()
                .await
                .expect("an assignment")
                .expect("a job");
            formed.lock().unwrap().push(assignment);
        }
    });
    futures::future::join_all(waits).await;
    let formation = submitted.elapsed();
    let memory_mib = coordinator.memory_mib();
    let assignments = std::mem::take(&mut *formed.lock().unwrap());
    drop(agents);
    Figures {
        registration,
        heartbeats,
        formation,
        assignments,
        memory_mib,
    }
}

/// Every agent got a rank of one generation of `workers`, each rank once.
fn assert_one_generation(figures: &Figures, workers: usize) {
    let a = &figures.assignments;
    assert_eq!(a.len(), workers);
    let ranks: BTreeSet<u32> = a.iter().map(|a| a.rank).collect();
    assert_eq!(ranks, (0..workers as u32).collect::<BTreeSet<_>>());
    assert!(a.iter().all(|a| a.generation == 0));
    assert!(a
        .iter()
        .all(|a| a.world_size == workers as u32 && a.tp == 1));
    let jobs: BTreeSet<&str> = a.iter().map(|a| a.job_id.as_str()).collect();
    assert_eq!(jobs.len(), 1);
    assert!(a.iter().all(|a| a.peers.len() == workers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generation_of_many_workers_forms() {
    let workers = 60;
    let figures = run(workers, Duration::from_secs(3)).await;
    assert_one_generation(&figures, workers);
    assert_eq!(figures.registration.len(), workers);
    assert!(!figures.heartbeats.is_empty(), "no heartbeat was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn control_plane_at_scale() {
    let workers: usize = std::env::var("SAMTRAIN_SCALE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let figures = run(workers, Duration::from_secs(15)).await;
    assert_one_generation(&figures, workers);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (r, h) = (&figures.registration, &figures.heartbeats);
    eprintln!(
        "control plane, {workers} workers: registration p50 {:.1} ms p99 {:.1} ms ({} in flight); \
         heartbeat p50 {:.1} ms p99 {:.1} ms ({} sampled); formation of one {workers}-rank generation {:.2} s \
         from submit; coordinator memory {:.1} MiB (peak {:.1} MiB)",
        ms(percentile(r, 0.5)),
        ms(percentile(r, 0.99)),
        REGISTERING_AT_ONCE,
        ms(percentile(h, 0.5)),
        ms(percentile(h, 0.99)),
        h.len(),
        figures.formation.as_secs_f64(),
        figures.memory_mib.0,
        figures.memory_mib.1,
    );
}
