//! The cluster end to end, as an operator runs it: a real etcd, a real S3
//! server (moto), `samtrain coordinator` and `samtrain worker` processes on
//! loopback, jobs submitted and followed with the CLI. Each test kills only
//! processes it started, by their PIDs.
//!
//! The tests run one at a time: several small clusters at once on a
//! two-core machine would starve each other's lease keep-alives.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use samtrain_testkit::{free_port, Etcd, S3Server};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const BIN: &str = env!("CARGO_BIN_EXE_samtrain");
const STEPS: u64 = 40;

/// A process this test started; killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(args: &[&str], env: &[(String, String)], log: PathBuf) -> Proc {
        let out = File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start samtrain");
        Proc { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until this process has logged `message`.
    fn wait_logged(&self, message: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(message) {
            assert!(
                Instant::now() < deadline,
                "no {message:?} within {timeout:?} in:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's cluster: etcd, S3, a folder with data, model and job spec.
struct Cluster {
    etcd: Etcd,
    s3: S3Server,
    dir: tempfile::TempDir,
    spec: PathBuf,
}

impl Cluster {
    fn new() -> Cluster {
        let etcd = Etcd::start();
        let s3 = S3Server::start(free_port(), "ckpt");
        let dir = tempfile::tempdir().unwrap();
        let spec = write_job(dir.path());
        Cluster {
            etcd,
            s3,
            dir,
            spec,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Changes the job spec: `from` (which must be in it) becomes `to`.
    fn edit_spec(&self, from: &str, to: &str) {
        let spec = std::fs::read_to_string(&self.spec).unwrap();
        assert!(spec.contains(from), "`{from}` is not in the spec");
        std::fs::write(&self.spec, spec.replace(from, to)).unwrap();
    }

    fn coordinator(&self, name: &str) -> (Proc, String, u16) {
        let port = free_port();
        let health = free_port();
        let p = Proc::start(
            &[
                "coordinator",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--health-listen",
                &format!("127.0.0.1:{health}"),
                "--etcd",
                &self.etcd.endpoint,
                "--node-id",
                name,
                "--lease-ttl",
                "2",
            ],
            &[],
            self.path(&format!("{name}.log")),
        );
        // Its own line, logged once both ports serve: a port that merely
        // accepts could be another process's, and a coordinator that fails
        // to start shows its error here.
        p.wait_logged("coordinator serving", Duration::from_secs(20));
        (p, format!("http://127.0.0.1:{port}"), health)
    }

    fn worker(&self, name: &str, coordinators: &str) -> Proc {
        self.worker_with(name, coordinators, &[])
    }

    /// A worker with extra environment variables (flags by their env names).
    fn worker_with(&self, name: &str, coordinators: &str, extra: &[(&str, &str)]) -> Proc {
        let mut env = self.s3.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Proc::start(
            &[
                "worker",
                "--coordinator",
                coordinators,
                "--etcd",
                &self.etcd.endpoint,
                "--advertise",
                "127.0.0.1",
                "--collective-port",
                "0",
                "--name",
                name,
                "--device",
                "cpu",
            ],
            &env,
            self.path(&format!("{name}.log")),
        )
    }
}

/// Synthetic data, a small model and a job that checkpoints to S3.
fn write_job(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    for (split, samples, seed) in [("train", "64", "3"), ("eval", "8", "4")] {
        run_ok(&[
            "data",
            "synth",
            "--task",
            "group",
            "--samples",
            samples,
            "--images",
            "3",
            "--seed",
            seed,
            "--out",
            data.join(split).to_str().unwrap(),
        ]);
    }
    let model = dir.join("model");
    let config = samtrain_testkit::workspace_root().join("examples/demo-model.json");
    run_ok(&[
        "model",
        "init",
        "--config",
        config.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    let spec = dir.join("job.toml");
    let text = format!(
        r#"name = "e2e"
[model]
path = "{model}"
[data]
train = "{train}"
eval = "{eval}"
llm_tokenizer = "{train}/tokenizer.json"
loader_threads = 1
max_txt_len = 32
max_output_txt_len = 16
[training]
steps = {STEPS}
batch_size = 4
lr = 2e-3
device = "cpu"
log_every = 1
threads = 1
[parallel]
min_workers = 2
max_workers = 2
collective_timeout_s = 20
[checkpoint]
url = "s3://ckpt/e2e"
every_steps = 10
keep = 2
[restart]
max_restarts = 3
[evaluation]
num_beams = 2
max_new_tokens = 12
"#,
        model = model.display(),
        train = data.join("train").display(),
        eval = data.join("eval").display(),
    );
    std::fs::write(&spec, text).unwrap();
    spec
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run samtrain")
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "samtrain {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn submit(coordinators: &str, spec: &Path) -> String {
    let out = run_ok(&[
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        coordinators,
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["job_id"].as_str().expect("job_id").to_owned()
}

fn status(coordinators: &str, job: &str) -> Option<Value> {
    let out = run(&["status", job, "--coordinator", coordinators, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `samtrain status` until `done` holds; the last status.
fn wait_status(
    coordinators: &str,
    job: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(s) = status(coordinators, job) {
            if done(&s) {
                return s;
            }
            last = s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {timeout:?}; last status: {last}");
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

fn step(s: &Value) -> u64 {
    s["step"].as_u64().unwrap_or(0)
}

fn finished(s: &Value) -> bool {
    matches!(state(s), "succeeded" | "failed" | "cancelled")
}

fn assert_succeeded(s: &Value) {
    assert_succeeded_at(s, STEPS);
}

fn assert_succeeded_at(s: &Value, steps: u64) {
    assert_eq!(state(s), "succeeded", "{s}");
    assert_eq!(step(s), steps, "{s}");
    let cider = s["eval"]["cider"].as_f64().unwrap_or(-1.0);
    assert!(cider >= 0.0, "no CIDEr in {s}");
    // The first held-out predictions, beside their references.
    let examples = s["eval_examples"].as_array().map_or(0, Vec::len);
    assert!((1..=5).contains(&examples), "{s}");
    assert!(
        s["eval_examples"][0]["reference"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{s}"
    );
    let ckpt = s["latest_checkpoint"]["url"].as_str().unwrap_or("");
    assert!(
        ckpt.starts_with("s3://ckpt/e2e/") && ckpt.ends_with(&format!("step-{steps:08}")),
        "{s}"
    );
}

/// Two workers train a job to its end; meanwhile their `/metrics` and the
/// coordinator's move with it (w1's behind a token).
#[test]
fn two_workers_train_to_the_end_and_report_their_evaluation() {
    let _one = serial();
    let c = Cluster::new();
    let (_coord, addr, coord_health) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    let (h0, h1) = (free_port(), free_port());
    let token = "metrics-token-0123456789";
    let token_file = c.path("metrics.token");
    std::fs::write(&token_file, format!("# scrapers present this\n{token}\n")).unwrap();
    // Slowed steps keep the job running across several scrapes.
    let _w0 = c.worker_with(
        "w0",
        &addr,
        &[
            ("SAMTRAIN_HEALTH_LISTEN", &format!("127.0.0.1:{h0}")),
            ("SAMTRAIN_FAULT_SLOW_STEP_MS", "300"),
        ],
    );
    let _w1 = c.worker_with(
        "w1",
        &addr,
        &[
            ("SAMTRAIN_HEALTH_LISTEN", &format!("127.0.0.1:{h1}")),
            ("SAMTRAIN_METRICS_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    );
    wait_status(&addr, &job, Duration::from_secs(120), "training", |s| {
        step(s) >= 2
    });
    let control = http_get(coord_health, "/metrics", None);
    assert!(control.starts_with("HTTP/1.1 200"), "{control}");
    assert_series(
        &control,
        &[
            ("samtrain_coordinator_leader", 1.0),
            ("samtrain_jobs{state=\"running\"}", 1.0),
            ("samtrain_workers{state=\"subscribed\"}", 2.0),
        ],
    );
    // Calls are timed by method: the submit, and the workers' reports.
    for method in [
        "/samtrain.v1.Jobs/Submit",
        "/samtrain.v1.Workers/ReportProgress",
    ] {
        let series = format!("samtrain_grpc_request_duration_seconds_count{{method=\"{method}\"}}");
        assert!(
            metric(&control, &series).is_some_and(|n| n >= 1.0),
            "{series} in\n{control}"
        );
    }
    // The worker's step moves between scrapes, with the rest of its series.
    let first = http_get(h0, "/metrics", None);
    let step_of = |text: &str| metric(text, "samtrain_train_step{").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let later = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = http_get(h0, "/metrics", None);
        if step_of(&now) > step_of(&first) || Instant::now() > deadline {
            break now;
        }
    };
    assert!(
        step_of(&later) > step_of(&first),
        "the step did not move:\n{first}\n{later}"
    );
    for series in [
        "samtrain_train_loss{",
        "samtrain_train_learning_rate{",
        "samtrain_train_samples_per_second{",
        "samtrain_train_step_seconds{",
        "samtrain_train_generation{",
    ] {
        let v = metric(&later, series).unwrap_or_else(|| panic!("no {series} in\n{later}"));
        assert!(v.is_finite() && v >= 0.0, "{series} {v}");
    }
    assert!(
        metric(&later, "samtrain_train_loss{").unwrap() > 0.0,
        "{later}"
    );
    // A worker with a metrics token answers only to it.
    let refused = http_get(h1, "/metrics", None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let wrong = http_get(h1, "/metrics", Some("not-the-token-at-all"));
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let scraped = http_get(h1, "/metrics", Some(token));
    assert!(
        scraped.starts_with("HTTP/1.1 200") && scraped.contains("# EOF"),
        "{scraped}"
    );

    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(0), "{s}");
    let control = http_get(coord_health, "/metrics", None);
    assert_series(
        &control,
        &[
            ("samtrain_jobs{state=\"succeeded\"}", 1.0),
            ("samtrain_jobs{state=\"running\"}", 0.0),
            ("samtrain_rendezvous_seconds_count", 1.0),
        ],
    );
    // The rank that saves timed each of its four commits (steps 10 to 40).
    let saves: f64 = [
        http_get(h0, "/metrics", None),
        http_get(h1, "/metrics", Some(token)),
    ]
    .iter()
    .map(|text| {
        assert!(
            text.contains("phase=\"data\"} "),
            "no data phase in\n{text}"
        );
        metric(text, "samtrain_checkpoint_save_seconds_count").unwrap_or(0.0)
    })
    .sum();
    assert_eq!(saves, 4.0);
}

/// Checks that each named series of OpenMetrics `text` has its value.
fn assert_series(text: &str, want: &[(&str, f64)]) {
    for &(series, value) in want {
        assert_eq!(metric(text, series), Some(value), "{series} in\n{text}");
    }
}

/// The reply to one HTTP GET on loopback, with a bearer token if given.
fn http_get(port: u16, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

/// The value of the first series of OpenMetrics `text` that starts with
/// `name` (a name, or a name and the start of its labels).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name)
                && (name.ends_with(['{', '}']) || l[name.len()..].starts_with([' ', '{']))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint() {
    let _one = serial();
    let c = Cluster::new();
    let (_coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    let _w0 = c.worker("w0", &addr);
    let mut w1 = c.worker("w1", &addr);
    wait_status(&addr, &job, Duration::from_secs(300), "a checkpoint", |s| {
        s["latest_checkpoint"]["step"].as_u64().unwrap_or(0) >= 10 && step(s) >= 12
    });
    let killed = Instant::now();
    w1.kill();
    let _w2 = c.worker("w2", &addr);
    // The new generation may train to the end between two polls (its
    // steps take milliseconds): its end counts as running and stepping.
    let s = wait_status(&addr, &job, Duration::from_secs(300), "restart", |s| {
        s["restarts"].as_u64().unwrap_or(0) >= 1 && (state(s) == "running" || finished(s))
    });
    let regrouped = killed.elapsed();
    let stale = step(&s);
    wait_status(&addr, &job, Duration::from_secs(300), "a step", |s| {
        step(s) != stale || finished(s)
    });
    eprintln!(
        "worker SIGKILL to the next generation running: {regrouped:?}; to its first training step: {:?}",
        killed.elapsed()
    );
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(1), "{s}");
}

#[test]
fn a_collective_that_never_returns_is_aborted_by_the_watchdog_and_the_job_recovers() {
    let _one = serial();
    let c = Cluster::new();
    c.edit_spec("collective_timeout_s = 20", "collective_timeout_s = 4");
    let (_coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    // Both ranks block in the same data-parallel all-reduce, as NCCL's
    // kernels do when a peer dies: neither ring times out, only the
    // watchdogs (4 s + a quarter) can end it.
    let hang = [("SAMTRAIN_FAULT_HANG_COLLECTIVE", "30")];
    let w0 = c.worker_with("w0", &addr, &hang);
    let w1 = c.worker_with("w1", &addr, &hang);
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(
        s["restarts"].as_u64(),
        Some(1),
        "one failure, one restart: {s}"
    );
    for w in [&w0, &w1] {
        let log = w.log();
        assert!(
            log.contains("the watchdog aborted the process groups: all_reduce in group dp was pending for 5."),
            "{log}"
        );
    }
}

#[test]
fn a_worker_whose_training_thread_is_stuck_exits_to_be_replaced() {
    let _one = serial();
    let c = Cluster::new();
    c.edit_spec("collective_timeout_s = 20", "collective_timeout_s = 4");
    let (_coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    let _w0 = c.worker("w0", &addr);
    // Blocked for good, aborts or not, as in a CUDA call that never returns.
    let mut w1 = c.worker_with(
        "w1",
        &addr,
        &[("SAMTRAIN_FAULT_HANG_COLLECTIVE", "30:stuck")],
    );
    let started = Instant::now();
    let exited = loop {
        if let Some(status) = w1.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the stuck worker did not exit: {}",
            w1.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exited.code(), Some(128), "{}", w1.log());
    assert!(
        w1.log()
            .contains("did not stop within 10s after the generation ended"),
        "{}",
        w1.log()
    );
    let _w2 = c.worker("w2", &addr);
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(1), "{s}");
}

/// The number in `field=N` of the first line of `log` that holds `message`
/// (colour codes, which the logs carry, stripped).
fn logged(log: &str, message: &str, field: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(message))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(ch);
        }
    }
    let line = plain;
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_job_grows_at_a_checkpoint_when_a_worker_joins_and_keeps_its_sample_count() {
    let _one = serial();
    let c = Cluster::new();
    c.edit_spec("min_workers = 2", "min_workers = 1");
    let (_coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    // The lone rank holds at step 3 until the joining worker waits at the
    // coordinator, so the job grows at its step-10 checkpoint however long
    // that worker takes to start: the polls below never race the training.
    let gate = c.dir.path().join("joined");
    let hold = format!("3:{}", gate.display());
    let w0 = c.worker_with("w0", &addr, &[("SAMTRAIN_FAULT_HOLD_AT_STEP", &hold)]);
    let s = wait_status(
        &addr,
        &job,
        Duration::from_secs(300),
        "one rank training",
        |s| step(s) >= 2,
    );
    assert_eq!(
        (s["world_size"].as_u64(), s["dp"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    // The joining worker's steps are slowed (1 s each) so that the grown
    // generation (30 steps) outlasts the status polls that look at it.
    let w1 = c.worker_with("w1", &addr, &[("SAMTRAIN_FAULT_SLOW_STEP_MS", "1000")]);
    w1.wait_logged("subscribed to the leader", Duration::from_secs(300));
    std::fs::write(&gate, b"").unwrap();
    let s = wait_status(&addr, &job, Duration::from_secs(300), "two ranks", |s| {
        s["world_size"].as_u64() == Some(2) || finished(s)
    });
    assert_eq!(
        (s["dp"].as_u64(), s["tp"].as_u64(), s["resizes"].as_u64()),
        (Some(2), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(s["members"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["members"][1]["host"], "127.0.0.1", "{s}");
    let s = wait_status(
        &addr,
        &job,
        Duration::from_secs(300),
        "a rank's report",
        |s| s["members"][1]["last_report_unix_ms"].is_i64() || finished(s),
    );
    assert!(s["members"][1]["step"].as_u64() > Some(0), "{s}");
    succeeded_after_one_resize(&addr, &job);
    // Steps up to the checkpoint trained one rank's batch (4), the rest
    // two ranks' (8): the global sample position carried over exactly.
    let log = w0.log();
    let grown_at = logged(&log, "resumed from checkpoint", "step")
        .unwrap_or_else(|| panic!("no resume in the log of w0:\n{log}"));
    assert_eq!(
        logged(&log, "resumed from checkpoint", "saved_dp_size"),
        Some(1),
        "{log}"
    );
    let consumed = logged(&log, "training done", "samples_consumed")
        .unwrap_or_else(|| panic!("no end in the log of w0:\n{log}"));
    eprintln!(
        "grew from 1 to 2 ranks at checkpoint step {grown_at}; {consumed} samples in {STEPS} steps"
    );
    assert_eq!(consumed, 4 * grown_at + 8 * (STEPS - grown_at), "{log}");
    // The final checkpoint's ledger: two segments (one rank, then two),
    // every sample once.
    let out = Command::new(BIN)
        .args(["ledger", "--json", "--job", &job, "--coordinator", &addr])
        .envs(c.s3.env())
        .output()
        .unwrap();
    let ledger: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(ledger["exactly_once"], true, "{ledger}");
    let dps: Vec<u64> = ledger["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["dp"].as_u64().unwrap())
        .collect();
    assert_eq!(dps, [1, 2], "{ledger}");
    assert_eq!(ledger["segments"][0]["last_step"], grown_at, "{ledger}");
}

/// A cluster whose job (submitted) wants tp = 2 on four ranks.
fn tp2_job() -> (Cluster, Proc, String, String) {
    let c = Cluster::new();
    c.edit_spec(
        "min_workers = 2\nmax_workers = 2",
        "tp = 2\nmin_workers = 4\nmax_workers = 4",
    );
    let (coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    (c, coord, addr, job)
}

/// Two tensor-parallel groups, one per node, ranks node by node:
/// `(rank, node, local_rank, dp_rank, tp_rank)`.
const NODE_MAJOR: [(u64, &str, u64, u64, u64); 4] = [
    (0, "node-a", 0, 0, 0),
    (1, "node-a", 1, 0, 1),
    (2, "node-b", 0, 1, 0),
    (3, "node-b", 1, 1, 1),
];

/// Each rank's place in a status, as [`NODE_MAJOR`] lists them.
fn placement(s: &Value) -> Vec<(u64, &str, u64, u64, u64)> {
    s["ranks"]
        .as_array()
        .map(|ranks| {
            ranks
                .iter()
                .map(|r| {
                    (
                        r["rank"].as_u64().unwrap(),
                        r["node"].as_str().unwrap(),
                        r["local_rank"].as_u64().unwrap(),
                        r["dp_rank"].as_u64().unwrap(),
                        r["tp_rank"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Four workers on two nodes (`--node`), registering a, b, a, b, and a
/// tp = 2 job: each tensor-parallel group sits on one node, ranks go node
/// by node, and `status --json` lists where each rank runs.
#[test]
fn tensor_parallel_groups_are_placed_inside_nodes() {
    let _one = serial();
    let (c, _coord, addr, job) = tp2_job();
    let mut workers = Vec::new();
    for (i, node) in ["node-a", "node-b", "node-a", "node-b"].iter().enumerate() {
        let w = c.worker_with(&format!("w{i}"), &addr, &[("SAMTRAIN_NODE", node)]);
        // One at a time, so that registration interleaves the nodes.
        w.wait_logged("subscribed to the leader", Duration::from_secs(300));
        workers.push(w);
    }
    let s = wait_status(&addr, &job, Duration::from_secs(300), "four ranks", |s| {
        s["world_size"].as_u64() == Some(4) || finished(s)
    });
    assert_eq!(
        (s["dp"].as_u64(), s["tp"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    assert_eq!(placement(&s), NODE_MAJOR, "{s}");
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(0), "{s}");
}

/// A client of the cluster's etcd, and the runtime that drives it.
fn etcd_client(
    etcd: &Etcd,
) -> (
    tokio::runtime::Runtime,
    samtrain_coordinator::store::SharedStore,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoints = std::slice::from_ref(&etcd.endpoint);
    let store = runtime
        .block_on(samtrain_coordinator::store::open(
            endpoints,
            &Default::default(),
        ))
        .unwrap();
    (runtime, store)
}

/// The live worker records in the cluster's etcd and the lease of each.
fn worker_records(etcd: &Etcd) -> Vec<(samtrain_coordinator::WorkerRecord, i64)> {
    let (runtime, store) = etcd_client(etcd);
    runtime
        .block_on(store.range("/samtrain/workers/"))
        .unwrap()
        .into_iter()
        .map(|kv| {
            (
                serde_json::from_slice(&kv.value).unwrap(),
                kv.lease.unwrap(),
            )
        })
        .collect()
}

/// Ends an etcd lease, as its expiry would.
fn revoke(etcd: &Etcd, lease: i64) {
    let (runtime, store) = etcd_client(etcd);
    runtime.block_on(store.revoke(lease)).unwrap();
}

/// Two nodes of two slots each (`samtrain worker --slots 2`) and a tp = 2,
/// dp = 2 job: each node's rank processes hold one tensor-parallel group,
/// and their records live under their node's one lease. One rank process
/// killed ends the generation; its node starts it again and the job
/// resumes from its checkpoint on the same placement. A node's lease lost
/// ends the next one; the node registers again, starts its rank processes
/// under the new lease, and the job resumes again.
#[test]
fn a_node_runs_a_rank_process_per_slot_and_starts_a_killed_one_again() {
    let _one = serial();
    let (c, _coord, addr, job) = tp2_job();
    let slowed = ("SAMTRAIN_FAULT_SLOW_STEP_MS", "300");
    let node_a = c.worker_with(
        "node-a",
        &addr,
        &[("SAMTRAIN_SLOTS", "2"), ("SAMTRAIN_NODE", "node-a"), slowed],
    );
    node_a.wait_logged("subscribed to the leader", Duration::from_secs(300));
    let health = free_port();
    let node_b = c.worker_with(
        "node-b",
        &addr,
        &[
            ("SAMTRAIN_SLOTS", "2"),
            ("SAMTRAIN_NODE", "node-b"),
            ("SAMTRAIN_HEALTH_LISTEN", &format!("127.0.0.1:{health}")),
            slowed,
        ],
    );
    let s = wait_status(&addr, &job, Duration::from_secs(300), "a checkpoint", |s| {
        s["latest_checkpoint"]["step"].as_u64() >= Some(10) || finished(s)
    });
    assert_eq!(placement(&s), NODE_MAJOR, "{s}");
    assert_eq!(s["generation"].as_u64(), Some(0), "{s}");
    // One lease per node: its agent's record and its two ranks' share it.
    let records = worker_records(&c.etcd);
    let agents: Vec<_> = records.iter().filter(|(r, _)| r.slots == 2).collect();
    assert_eq!(agents.len(), 2, "{records:?}");
    for (agent, lease) in &agents {
        let ranks: Vec<_> = records
            .iter()
            .filter(|(r, _)| r.node_agent == agent.worker_id)
            .collect();
        assert_eq!(ranks.len(), 2, "{records:?}");
        assert!(ranks
            .iter()
            .all(|(r, l)| l == lease && r.node == agent.node));
    }
    assert_ne!(agents[0].1, agents[1].1);
    let node_a_lease = agents
        .iter()
        .find(|(r, _)| r.node == "node-a")
        .map(|(_, lease)| *lease)
        .unwrap();
    // The supervisor answers the probes (ready: both slots run); each
    // slot serves its own next to it.
    for (port, path) in [
        (health, "/healthz"),
        (health, "/readyz"),
        (health + 2, "/readyz"),
    ] {
        let reply = http_get(port, path, None);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "{path} on {port}: {reply}"
        );
    }
    // One scrape of the node shows each slot's training, labelled.
    let metrics = http_get(health, "/metrics", None);
    for slot in ["0", "1"] {
        for series in [
            format!("samtrain_slot_up{{slot=\"{slot}\"}} 1"),
            format!("samtrain_train_step{{slot=\"{slot}\",job=\"{job}\""),
        ] {
            assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
        }
    }
    assert_eq!(metrics.matches("# TYPE samtrain_train_step ").count(), 1);
    let log = node_b.log();
    let pid = logged(&log, "rank process started", "pid")
        .unwrap_or_else(|| panic!("no rank process in the log of node-b:\n{log}"));
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let s = wait_status(
        &addr,
        &job,
        Duration::from_secs(300),
        "the next generation",
        |s| {
            (s["generation"].as_u64() >= Some(1) && s["world_size"].as_u64() == Some(4))
                || finished(s)
        },
    );
    assert_eq!(placement(&s), NODE_MAJOR, "{s}");
    assert!(
        node_b.log().contains("dead rank process removed"),
        "{}",
        node_b.log()
    );
    // Node a's lease goes (as when its keep-alives stop): every one of its
    // ranks leaves the generation with it.
    revoke(&c.etcd, node_a_lease);
    let s = wait_status(
        &addr,
        &job,
        Duration::from_secs(300),
        "the generation after the lost lease",
        |s| {
            (s["generation"].as_u64() >= Some(2) && s["world_size"].as_u64() == Some(4))
                || finished(s)
        },
    );
    assert_eq!(s["generation"].as_u64(), Some(2), "{s}");
    // Node a registered again after node b, so it comes second now; each
    // group is still inside one node.
    let node_b_first: Vec<_> = NODE_MAJOR
        .iter()
        .map(|&(rank, node, local, dp, tp)| {
            let other = if node == "node-a" { "node-b" } else { "node-a" };
            (rank, other, local, dp, tp)
        })
        .collect();
    assert_eq!(placement(&s), node_b_first, "{s}");
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(2), "{s}");
    assert!(
        node_b
            .log()
            .contains("rank process died; starting it again"),
        "{}",
        node_b.log()
    );
    assert!(
        node_a
            .log()
            .contains("the node's lease was lost; registering the node again")
            && node_a
                .log()
                .contains("the node registered again; starting its rank processes again"),
        "{}",
        node_a.log()
    );
    // Killed, resumed and spread over four processes, the job trained what
    // one process does on the same global batch (2 x 4 samples a step).
    let reference = c.path("reference");
    let spec = std::fs::read_to_string(&c.spec)
        .unwrap()
        .replace(
            "tp = 2\nmin_workers = 4\nmax_workers = 4",
            "min_workers = 1\nmax_workers = 1",
        )
        .replace("batch_size = 4", "batch_size = 8")
        .replace(
            "url = \"s3://ckpt/e2e\"",
            &format!("url = \"{}\"", reference.display()),
        );
    let reference_spec = c.path("reference.toml");
    std::fs::write(&reference_spec, spec).unwrap();
    run_ok(&["train", reference_spec.to_str().unwrap()]);
    let trained = final_weights("s3://ckpt/e2e", c.s3.options());
    let one = final_weights(reference.to_str().unwrap(), Vec::new());
    assert_eq!(trained.len(), one.len());
    let mut diff = 0.0f64;
    for ((name, a), (other, b)) in trained.iter().zip(&one) {
        assert_eq!(name, other);
        diff = diff.max((a - b).abs().max().double_value(&[]));
    }
    eprintln!("2 nodes x 2 slots, killed and resumed, vs one process: max diff {diff:e}");
    // Sums in another order (the ring's, tp's halves) drift apart by
    // ~1e-5 over 40 steps; one AdamW step moves a weight by ~lr = 2e-3, so
    // a lost, repeated or misplaced step is far above this bound.
    assert!(
        diff < 1e-4,
        "the trained weights differ from one process's by {diff}"
    );
}

/// The trainable tensors of the newest checkpoint at `url`, unsharded.
fn final_weights(url: &str, store_options: Vec<(String, String)>) -> Vec<(String, tch::Tensor)> {
    use samtrain_checkpoint::{CheckpointOptions, CheckpointTuning, Checkpointer};
    let tuning = CheckpointTuning {
        store_options,
        ..CheckpointTuning::default()
    };
    let c = Checkpointer::open_with(CheckpointOptions::new(url), tuning).unwrap();
    let info = c.latest().unwrap().expect("a committed checkpoint");
    let mut tensors = c.load(&info, 0, 1).unwrap().tensors;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn a_slowed_rank_is_flagged_a_straggler_and_replaced_at_a_checkpoint() {
    let _one = serial();
    let c = Cluster::new();
    c.edit_spec(
        "collective_timeout_s = 20",
        "collective_timeout_s = 60\nstraggler_factor = 1.5\nstraggler_steps = 3\nstraggler_policy = \"replace\"",
    );
    let (coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    let w0 = c.worker("w0", &addr);
    // The slowed rank also holds at step 4 until the spare waits at the
    // coordinator, so a replacement is there at the step-10 checkpoint
    // however long the spare takes to start (within the 60 s collective
    // timeout its peer waits under).
    let gate = c.dir.path().join("spare-waits");
    let hold = format!("4:{}", gate.display());
    let slow = c.worker_with(
        "w1",
        &addr,
        &[
            ("SAMTRAIN_FAULT_SLOW_STEP_MS", "400"),
            ("SAMTRAIN_FAULT_HOLD_AT_STEP", &hold),
        ],
    );
    let s = wait_status(&addr, &job, Duration::from_secs(300), "two ranks", |s| {
        s["world_size"].as_u64() == Some(2)
    });
    let slow_id = worker_id(&slow, &s);
    let spare = c.worker("w2", &addr);
    spare.wait_logged("subscribed to the leader", Duration::from_secs(50));
    std::fs::write(&gate, b"").unwrap();
    succeeded_after_one_resize(&addr, &job);
    let log = coord.log();
    let flagged = log
        .lines()
        .find(|l| l.contains("a straggler"))
        .unwrap_or_else(|| panic!("no straggler in the coordinator's log:\n{log}"));
    assert!(flagged.contains(&slow_id), "{flagged}");
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("worker {slow_id} (rank "))
                && l.contains("is a straggler; replacing it")),
        "{log}"
    );
    // Its replacement trained to the end with the fast rank.
    assert!(w0.log().contains("training done"));
    assert!(!slow.log().contains("training done"));
}

/// Waits for the job's end: succeeded, with one resize and no restart.
fn succeeded_after_one_resize(addr: &str, job: &str) {
    let s = wait_status(addr, job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(
        (s["restarts"].as_u64(), s["resizes"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
}

/// The id of the member whose worker wrote `proc`'s log.
fn worker_id(proc: &Proc, status: &Value) -> String {
    let log = proc.log();
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["worker_id"].as_str().unwrap().to_owned())
        .find(|id| log.contains(id.as_str()))
        .unwrap_or_else(|| panic!("no member's id in the log: {status}"))
}

#[test]
fn a_standby_coordinator_takes_over_without_restarting_workers() {
    let _one = serial();
    let c = Cluster::new();
    let (mut leader, a, a_health) = c.coordinator("c-a");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(a_health) {
        assert!(Instant::now() < deadline, "c-a never led");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_standby, b, b_health) = c.coordinator("c-b");
    assert!(!ready(b_health), "two leaders");
    let both = format!("{a},{b}");
    let job = submit(&both, &c.spec);
    let _w0 = c.worker("w0", &both);
    let _w1 = c.worker("w1", &both);
    wait_status(&both, &job, Duration::from_secs(300), "training", |s| {
        step(s) >= 5
    });
    let killed = Instant::now();
    leader.kill();
    while !ready(b_health) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the standby did not lead within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "leader SIGKILL to the standby leading: {:?}",
        killed.elapsed()
    );
    let s = wait_status(&b, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded(&s);
    assert_eq!(s["restarts"].as_u64(), Some(0), "workers restarted: {s}");
}

#[test]
fn an_interrupted_job_resumes_when_the_cluster_comes_back() {
    let _one = serial();
    let c = Cluster::new();
    const LONG: u64 = 150;
    // Long enough that the job cannot end between the status that shows
    // the first checkpoint and the power cut (40 steps once did, on a fast
    // machine, and then nothing was left to resume).
    let text = std::fs::read_to_string(&c.spec).unwrap();
    let long = c.path("long.toml");
    std::fs::write(
        &long,
        text.replace(&format!("steps = {STEPS}\n"), &format!("steps = {LONG}\n")),
    )
    .unwrap();
    let (mut coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &long);
    let mut w0 = c.worker("w0", &addr);
    let mut w1 = c.worker("w1", &addr);
    wait_status(&addr, &job, Duration::from_secs(300), "a checkpoint", |s| {
        s["latest_checkpoint"]["step"].as_u64().unwrap_or(0) >= 10
    });
    // Everything stops at once, as in a power cut.
    coord.kill();
    w0.kill();
    w1.kill();
    let (_coord, addr, _) = c.coordinator("c1");
    let w2 = c.worker("w2", &addr);
    let _w3 = c.worker("w3", &addr);
    let s = wait_status(&addr, &job, Duration::from_secs(300), "job end", finished);
    assert_succeeded_at(&s, LONG);
    let log = w2.log();
    assert!(
        log.contains("resum"),
        "the new workers did not resume from a checkpoint:\n{log}"
    );
}

/// A worker confined to other places refuses a job that would checkpoint
/// to `s3://ckpt/e2e`: the job fails at once, naming the field, and no
/// checkpoint is written.
#[test]
fn a_worker_refuses_to_write_outside_its_roots() {
    let _one = serial();
    let c = Cluster::new();
    let (_coord, addr, _) = c.coordinator("c0");
    let job = submit(&addr, &c.spec);
    let allowed = [(
        "SAMTRAIN_ALLOW_WRITE",
        "s3://other-bucket,/var/lib/samtrain",
    )];
    let _w0 = c.worker_with("w0", &addr, &allowed);
    let _w1 = c.worker_with("w1", &addr, &allowed);
    let s = wait_status(&addr, &job, Duration::from_secs(120), "job end", finished);
    assert_eq!(state(&s), "failed", "{s}");
    let message = s["message"].as_str().unwrap_or("");
    assert!(
        message.contains("checkpoint.url = `s3://ckpt/e2e` is outside")
            && message.contains("--allow-write"),
        "{s}"
    );
    assert_eq!(step(&s), 0, "{s}");
}

#[test]
fn bad_specs_and_unreachable_etcd_get_clear_errors() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        "name = \"Bad_Name\"\n[model]\npath = \"m\"\n[data]\ntrain = \"d\"\n[checkpoint]\nurl = \"ftp://x\"\n[training]\nlr = 0.0\n",
    )
    .unwrap();
    // Refused before any coordinator is asked.
    let out = run(&[
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        "http://127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["name", "training.lr", "checkpoint.url"] {
        assert!(err.contains(field), "{field} not named in: {err}");
    }

    let dead = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--etcd", &dead])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead), "the endpoint is not named: {err}");
}

/// Whether the coordinator's `/readyz` answers 200 (it leads).
fn ready(health_port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", health_port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}
