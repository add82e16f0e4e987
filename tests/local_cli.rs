//! `samtrain local` and `samtrain demo` as a newcomer runs them: real
//! processes (the launcher, its coordinator and its worker processes), real
//! files, the final JSON line checked.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_samtrain");

fn samtrain(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run samtrain")
}

/// The demo's spec, shrunk to `steps` steps on a small data set.
fn small_demo(steps: u64) -> String {
    let root = samtrain_testkit::workspace_root();
    std::fs::read_to_string(root.join("examples/demo.toml"))
        .unwrap()
        .replace(
            "examples/demo-model.json",
            root.join("examples/demo-model.json").to_str().unwrap(),
        )
        .replace("train_samples = 2048", "train_samples = 128")
        .replace("eval_samples = 64", "eval_samples = 8")
        .replace("steps = 1400", &format!("steps = {steps}"))
        .replace("warmup_steps = 200", "warmup_steps = 2")
}

/// The last line of stdout, as JSON.
fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{e}: last line {line:?}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The demo, as a user runs it: two data-parallel workers train through
/// the local cluster, and the trained model names the object the images
/// share in most held-out samples, where the untrained model and the most
/// frequent answer stay near chance; its files are where it says.
#[test]
fn demo_learns_what_its_images_show() {
    let dir = tempfile::tempdir().unwrap();
    let out = samtrain(dir.path(), &["demo", "--out", "demo", "--json"]);
    let v = last_json(&out);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["steps"], 1400, "{v}");
    assert_eq!(v["restarts"], 0, "{v}");
    let trained = v["eval"]["cider"].as_f64().unwrap();
    let untrained = v["untrained_eval"]["cider"].as_f64().unwrap();
    assert!(
        trained > untrained + 30.0,
        "trained CIDEr {trained} vs untrained {untrained}"
    );
    let ckpt = v["checkpoint"].as_str().unwrap();
    assert!(ckpt.ends_with("step-00001400"), "{ckpt}");
    assert!(dir.path().join(ckpt).join("manifest.json").is_file());
    let curve =
        std::fs::read_to_string(dir.path().join(v["loss_curve"].as_str().unwrap())).unwrap();
    assert!(curve.starts_with("<svg") && curve.contains("polyline"));
    let pred: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("demo/eval/pred.json")).unwrap(),
    )
    .unwrap();
    let pred = pred.as_array().unwrap();
    assert_eq!(pred.len(), 64);

    // The content measure: the share of answers naming the shared object,
    // as the library computes it from pred.json; the untrained model and
    // the most-frequent-answer baseline stay near chance (1 in 16 objects,
    // and 64 samples), the trained model names most.
    let named = |p: &Value| {
        samtrain_data::mmlink::content::names_content(
            p["pred_response"].as_str().unwrap(),
            p["gt_response"].as_str().unwrap(),
        )
    };
    let recomputed = pred.iter().filter(|p| named(p)).count() as f64 / 64.0;
    assert_eq!(
        v["shared_object_accuracy"].as_f64(),
        Some(recomputed),
        "{v}"
    );
    let baseline = v["most_frequent_answer_accuracy"].as_f64().unwrap();
    assert!(baseline < 0.2, "most frequent answer accuracy {baseline}");
    let untrained = v["untrained_eval"]["shared_object_accuracy"]
        .as_f64()
        .unwrap();
    assert!(untrained < 0.15, "untrained accuracy {untrained}");
    let trained = v["shared_object_accuracy"].as_f64().unwrap();
    assert!(trained >= 0.8, "trained accuracy {trained}");
    // Answers follow the images: not one sentence for every input.
    let answers: std::collections::HashSet<_> =
        pred.iter().map(|p| p["pred_response"].as_str()).collect();
    assert!(answers.len() >= 12, "{} distinct answers", answers.len());
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    assert_eq!(examples[0]["answer"], pred[0]["gt_response"]);
}

/// `[logging] tensorboard`: rank 0's event files, read back by
/// TensorBoard's own reader, hold the loss at every progress report, the
/// save's timing and the final scores (those the run printed) with a table
/// of example predictions.
/// What the demo refuses, before it writes anything: a number of workers
/// that does not share its global batch, and a GPU where libtorch sees
/// none (each with the reason, never a panic).
#[test]
fn the_demo_refuses_workers_that_split_its_batch_and_gpus_it_cannot_have() {
    let dir = tempfile::tempdir().unwrap();
    let out = samtrain(dir.path(), &["demo", "--out", "demo", "--workers", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--workers 3 does not divide the demo's global batch of 16 samples"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    if samtrain_torchext::cuda::is_available() {
        eprintln!("skipped the CPU-only half: a GPU is here");
        return;
    }
    let out = samtrain(dir.path(), &["demo", "--out", "demo", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--device cuda")
            && (stderr.contains("libtorch sees no CUDA device here")
                || stderr.contains("this libtorch is built without CUDA")),
        "{stderr}"
    );
    assert!(
        !dir.path().join("demo/data").exists(),
        "data written before the refusal"
    );
}

#[test]
fn a_local_job_writes_what_tensorboard_reads() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_demo(20).replace("log_every = ", "log_every = 5 #")
        + "\n[logging]\ntensorboard = \"tb/demo\"\n";
    std::fs::write(dir.path().join("job.toml"), spec).unwrap();
    let out = samtrain(dir.path(), &["local", "job.toml", "--json"]);
    let v = last_json(&out);
    assert_eq!(v["state"], "succeeded", "{v}");

    const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "texts": {t: [[e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()]
                  for e in acc.Tensors(t)] for t in tags["tensors"]},
}))
"#;
    let read = Command::new(samtrain_testkit::python())
        .args(["-c", READ])
        .arg(dir.path().join("tb/demo"))
        .output()
        .expect("run the venv python");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let tb: Value = serde_json::from_slice(&read.stdout).unwrap();
    let steps = |tag: &str| -> Vec<u64> {
        tb["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"))
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps("train/loss"), [5, 10, 15, 20], "{tb}");
    assert!(tb["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p[1].as_f64().is_some_and(|l| l > 0.0 && l.is_finite())));
    assert_eq!(steps("step_time/data_seconds"), [5, 10, 15, 20], "{tb}");
    assert_eq!(steps("checkpoint/save_seconds"), [20], "{tb}");
    for (tag, key) in [
        ("eval/cider", "cider"),
        ("eval/bleu4", "bleu4"),
        ("eval/rouge_l", "rouge"),
    ] {
        let logged = tb["scalars"][tag][0][1].as_f64().unwrap();
        let printed = v["eval"][key].as_f64().unwrap();
        assert!(
            (logged - printed).abs() <= 1e-4 * printed.abs().max(1.0),
            "{tag}: {logged} vs {printed}"
        );
    }
    let examples = &tb["texts"]["eval/examples"][0];
    assert_eq!(examples[0], 20, "{tb}");
    let table = examples[1].as_str().unwrap();
    assert!(
        table.starts_with("| sample | prediction | reference |"),
        "{table}"
    );
    assert!(table.lines().count() >= 3, "{table}");
}

/// `--otlp-endpoint`: the coordinator's rendezvous and both ranks' spans
/// of generation 0 reach the collector in one trace, the steps, the save
/// and the evaluation under each rank's training.
#[test]
fn a_local_job_sends_one_trace_per_generation_to_the_collector() {
    let collector = samtrain_testkit::OtlpCollector::start();
    let dir = tempfile::tempdir().unwrap();
    let spec = small_demo(6).replace("log_every = ", "log_every = 2 #");
    std::fs::write(dir.path().join("job.toml"), spec).unwrap();
    let out = samtrain(
        dir.path(),
        &[
            "local",
            "job.toml",
            "--json",
            "--otlp-endpoint",
            collector.endpoint(),
        ],
    );
    let v = last_json(&out);
    assert_eq!(v["state"], "succeeded", "{v}");
    let spans = collector.spans();
    let named = |service: &str, name: &str| -> Vec<&Value> {
        spans
            .iter()
            .filter(|(svc, s)| svc == service && s["name"] == name)
            .map(|(_, s)| s)
            .collect()
    };
    let rendezvous = named("samtrain-local", "rendezvous");
    assert_eq!(rendezvous.len(), 1, "{spans:?}");
    let trace = &rendezvous[0]["traceId"];
    let generations = named("samtrain-worker", "generation");
    assert_eq!(generations.len(), 2, "{spans:?}");
    assert!(generations.iter().all(|g| &g["traceId"] == trace));
    let trains = named("samtrain-worker", "train");
    assert_eq!(trains.len(), 2);
    for train in &trains {
        assert_eq!(&train["traceId"], trace);
        // (name, its `step` attribute) of the train span's children.
        let children = |name: &str| -> Vec<Option<&str>> {
            spans
                .iter()
                .filter(|(_, s)| s["name"] == name && s["parentSpanId"] == train["spanId"])
                .map(|(_, s)| {
                    s["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|a| a["key"] == "step")
                        .and_then(|a| a["value"]["intValue"].as_str())
                })
                .collect()
        };
        // The steps that report (log_every = 2), not every step.
        assert_eq!(
            children("step"),
            [Some("2"), Some("4"), Some("6")],
            "{train}"
        );
        assert_eq!(children("load"), [None], "{train}");
    }
    // One rank saves (step 6, the last) and one evaluates.
    let saves = named("samtrain-worker", "checkpoint");
    assert_eq!(saves.len(), 1, "{spans:?}");
    assert_eq!(&saves[0]["traceId"], trace);
    let uploads = named("samtrain-worker", "upload");
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0]["parentSpanId"], saves[0]["spanId"]);
    assert_eq!(named("samtrain-worker", "evaluate").len(), 1);
}

/// A spec run twice: the second run finds the first's checkpoints and
/// resumes from the newest instead of starting over.
#[test]
fn local_runs_a_spec_a_rerun_resumes_it_and_a_failed_save_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_demo(20).replace("every_steps = 50", "every_steps = 10");
    std::fs::write(dir.path().join("job.toml"), spec).unwrap();

    let first = samtrain(dir.path(), &["local", "job.toml", "--json"]);
    let v = last_json(&first);
    assert!(first.status.success(), "{v}");
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["steps"], 20, "{v}");
    assert!(v["eval"]["cider"].as_f64().is_some(), "{v}");
    let ckpts = dir.path().join("target/demo/checkpoints");
    assert!(ckpts.join("step-00000020/manifest.json").is_file());

    // Lose the last checkpoint's commit point: a rerun resumes from step 10.
    std::fs::remove_file(ckpts.join("step-00000020/manifest.json")).unwrap();
    let second = samtrain(dir.path(), &["local", "job.toml", "--json"]);
    let v = last_json(&second);
    assert!(second.status.success(), "{v}");
    assert_eq!(v["steps"], 20, "{v}");
    let logs = std::fs::read_to_string(
        dir.path()
            .join(v["run_dir"].as_str().unwrap())
            .join("local-0.log"),
    )
    .unwrap();
    assert!(
        logs.contains("resumed from checkpoint") && logs.contains("step-00000010"),
        "{logs}"
    );

    // A save that fails (its step folder's path runs through a file) is
    // told at once and costs no restart; the next save commits.
    let spec = std::fs::read_to_string(dir.path().join("job.toml"))
        .unwrap()
        .replace("target/demo/checkpoints", "target/demo/blocked");
    std::fs::write(dir.path().join("blocked.toml"), spec).unwrap();
    let blocked = dir.path().join("target/demo/blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("step-00000010"), b"a file").unwrap();
    let third = samtrain(dir.path(), &["local", "blocked.toml", "--json"]);
    let v = last_json(&third);
    assert!(third.status.success(), "{v}");
    assert_eq!(
        (v["state"].as_str(), v["restarts"].as_u64()),
        (Some("succeeded"), Some(0)),
        "{v}"
    );
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(
        stderr.contains("checkpoint step 10 not saved") && stderr.contains("Not a directory"),
        "{stderr}"
    );
    assert!(blocked.join("step-00000020/manifest.json").is_file());
}

/// A `samtrain local` job started in the background, its steps slowed so
/// that it runs across several requests, with the addresses it printed.
struct LocalRun {
    child: std::process::Child,
    /// `host:port` of the coordinator's health port.
    addr: String,
    /// The run's operator token, from the dashboard's address.
    token: String,
    /// The dashboard's address as printed.
    dashboard: String,
    /// Joins with the whole of stderr once the process ends.
    stderr: std::thread::JoinHandle<String>,
    _dir: tempfile::TempDir,
}

impl LocalRun {
    fn start(steps: u64, slow_step_ms: u64) -> LocalRun {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let spec = small_demo(steps).replace("log_every = ", "log_every = 1 #");
        std::fs::write(dir.path().join("job.toml"), spec).unwrap();
        let mut child = Command::new(BIN)
            .current_dir(dir.path())
            .args(["local", "job.toml", "--json"])
            .env("SAMTRAIN_FAULT_SLOW_STEP_MS", slow_step_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samtrain local");
        // The addresses come on stderr; the rest of it is drained meanwhile.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("dashboard: ") {
                    let _ = tx.send(url.to_owned());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let dashboard = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("samtrain local printed its dashboard's address");
        let (addr, token) = dashboard
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once("/ui#token="))
            .unwrap_or_else(|| panic!("not a dashboard address: {dashboard}"));
        LocalRun {
            addr: addr.to_owned(),
            token: token.to_owned(),
            dashboard: dashboard.clone(),
            child,
            stderr,
            _dir: dir,
        }
    }

    /// `(status code, body)` of one request to the health port.
    fn http(&self, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).expect("connect to the health port");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("Connection: close\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let code = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP reply: {reply}"));
        let body = reply
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (code, body)
    }

    /// The dashboard's JSON at `path` (under `/ui/api/`), as the operator.
    fn api(&self, path: &str) -> Value {
        let bearer = format!("Authorization: Bearer {}", self.token);
        let (code, body) = self.http("GET", &format!("/ui/api/{path}"), &[&bearer]);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Waits for the end; the final JSON line and the whole stderr.
    fn finish(self) -> (std::process::ExitStatus, Value, String) {
        let out = self.child.wait_with_output().unwrap();
        let stderr = self.stderr.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}\n{stdout}\n{stderr}"));
        (out.status, v, stderr)
    }
}

/// `samtrain local`: the coordinator's `/metrics` is served while the job
/// runs, at the address it prints, and its series move with the job.
#[test]
fn a_local_job_serves_metrics_that_move_with_it() {
    use std::time::{Duration, Instant};

    let run = LocalRun::start(30, 300);
    let value = |text: &str, prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    // Two scrapes while the job runs, the second at a later step.
    let mut steps = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while steps.len() < 2 && Instant::now() < deadline {
        let (code, text) = run.http("GET", "/metrics", &[]);
        assert_eq!(code, 200, "{text}");
        if value(&text, "samtrain_jobs{state=\"running\"}") == Some(1.0) {
            if let Some(step) = value(&text, "samtrain_job_step{") {
                let loss = value(&text, "samtrain_job_loss{");
                if step > 0.0 && steps.last().is_none_or(|&last| step > last) {
                    assert!(loss.is_some_and(|l| l > 0.0), "{text}");
                    steps.push(step);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, v, stderr) = run.finish();
    assert_eq!(
        steps.len(),
        2,
        "the step did not move in /metrics: {steps:?}\n{stderr}"
    );
    assert!(status.success(), "{v}\n{stderr}");
    assert_eq!(v["state"], "succeeded", "{v}");
}

/// The dashboard as a user opens it: headless Chromium loads the address
/// `samtrain local` printed while the job runs, runs the page's script,
/// and the page shows the job, a row for each of its two ranks and a loss
/// curve with points. The API refuses callers without the token, and a
/// cancel without the dashboard's header; with it, the job ends cancelled.
#[test]
fn the_dashboard_shows_a_running_job_in_a_real_browser_and_cancels_it() {
    use std::time::{Duration, Instant};

    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no chromium on PATH: scripts/setup.sh installs Debian's chromium package");
    let run = LocalRun::start(400, 200);
    // Who may look: the token, not anyone on the port.
    let (code, body) = run.http("GET", "/ui/api/jobs", &[]);
    assert_eq!(code, 401, "{body}");
    assert!(
        body.contains("log in at /ui with an operator token"),
        "{body}"
    );
    let (code, body) = run.http("GET", "/ui", &[]);
    assert_eq!(code, 401, "{body}");
    assert!(
        body.contains("<form id=\"login\""),
        "the login page: {body}"
    );
    let wrong = "Authorization: Bearer not-the-token-0123456789";
    let (code, _) = run.http("GET", "/ui/api/jobs", &[wrong]);
    assert_eq!(code, 401);
    // The login takes the token in a header, never from the address.
    let (code, body) = run.http("GET", &format!("/ui?token={}", run.token), &[]);
    assert_eq!(code, 400, "{body}");
    let (code, _) = run.http("POST", "/ui/login", &[wrong, "x-samtrain-ui: 1"]);
    assert_eq!(code, 401);
    let bearer = format!("Authorization: Bearer {}", run.token);
    let (code, body) = run.http("POST", "/ui/login", &[&bearer]);
    assert_eq!(code, 403, "a login without the dashboard's header: {body}");
    let (code, body) = run.http("POST", "/ui/login", &[&bearer, "x-samtrain-ui: 1"]);
    assert_eq!(code, 200, "{body}");

    // Wait for a few logged steps, so the curve has points.
    let deadline = Instant::now() + Duration::from_secs(180);
    let id = loop {
        let jobs = run.api("jobs");
        let job = &jobs["jobs"][0];
        if job["step"].as_u64() >= Some(5) {
            assert_eq!(job["state"], "running", "{job}");
            break job["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the job did not reach step 5: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let profile = tempfile::tempdir().unwrap();
    let browse = |extra: &str| {
        let out = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=1280,1100",
                "--virtual-time-budget=3000",
                &format!("--user-data-dir={}", profile.path().display()),
                extra,
                &format!("{}#/job/{id}", run.dashboard),
            ])
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = browse("--dump-dom");
    assert!(dom.contains(&format!("data-job=\"{id}\"")), "{dom}");
    assert!(dom.contains("data-state=\"running\""), "{dom}");
    for rank in 0..2 {
        assert!(
            dom.contains(&format!("<tr data-rank=\"{rank}\">")),
            "rank {rank}: {dom}"
        );
    }
    let points: usize = dom
        .split("id=\"loss\"")
        .nth(1)
        .and_then(|rest| rest.split("data-points=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss chart: {dom}"));
    assert!(points >= 2, "{points} points: {dom}");
    assert!(dom.contains("<polyline class=\"curve\""), "{dom}");
    // A picture of it for people, beside the build's outputs.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browse(&format!("--screenshot={}", shot.display()));
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "{}",
        shot.display()
    );

    // Cancel: refused without the dashboard's header, done with it.
    let bearer = format!("Authorization: Bearer {}", run.token);
    let cancel = format!("/ui/api/jobs/{id}/cancel");
    let (code, body) = run.http("POST", &cancel, &[&bearer]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = run.http("POST", &cancel, &[&bearer, "x-samtrain-ui: 1"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\":\"cancelled\""), "{body}");
    let (_, v, stderr) = run.finish();
    assert_eq!(v["state"], "cancelled", "{v}\n{stderr}");
}
