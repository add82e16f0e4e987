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

/// `samtrain local --metrics-listen`: the coordinator's `/metrics` is
/// served while the job runs, at the address it prints, and its series move
/// with the job.
#[test]
fn a_local_job_serves_metrics_that_move_with_it() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let spec = small_demo(30).replace("log_every = ", "log_every = 1 #");
    std::fs::write(dir.path().join("job.toml"), spec).unwrap();
    let mut local = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "local",
            "job.toml",
            "--json",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        // Slowed steps keep the job running across several scrapes.
        .env("SAMTRAIN_FAULT_SLOW_STEP_MS", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start samtrain local");
    // The address comes on stderr; the rest of it is drained meanwhile.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(local.stderr.take().unwrap());
    let drain = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("metrics: http://") {
                let _ = tx.send(addr.trim_end_matches("/metrics").to_owned());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("samtrain local printed its metrics address");
    let scrape = || -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).expect("connect to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
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
        let text = scrape();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
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
    let out = local.wait_with_output().unwrap();
    let stderr = drain.join().unwrap();
    assert_eq!(
        steps.len(),
        2,
        "the step did not move in /metrics: {steps:?}\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}\n{stdout}\n{stderr}"));
    assert!(out.status.success(), "{v}\n{stderr}");
    assert_eq!(v["state"], "succeeded", "{v}");
}
