//! `samtrain train` as a user runs it: real processes joined by the TCP
//! ring, checkpoints on local disk. A job killed with SIGKILL and started
//! again ends with the weights of a job never interrupted, bit for bit, and
//! the same samples consumed; it also resumes at another data-parallel size,
//! and the checkpoints' sample ledgers prove each sample trained once; and a
//! killed peer makes the survivor fail fast, naming the peer.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_model::{weights, LoadedModel, SamConfig};
use serde_json::json;
use tch::{Device, Tensor};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// 48 samples of 3 images each.
    fn new() -> Self {
        Self::with_images(3, 0)
    }

    /// 48 samples of `min_images` to `images` images each (0: all `images`).
    fn with_images(images: usize, min_images: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let made = synth(
            &data,
            &SynthOptions {
                task: Task::Story,
                samples: 48,
                images,
                min_images,
                max_distractors: samtrain_data::mmlink::synth::MAX_DISTRACTORS,
                seed: 11,
            },
        )
        .unwrap();
        let vocab = made.vocabulary + 1;
        // The Q-Former's MLP weights (512 x 32 floats, 64 KiB) are large
        // enough that a save to a local folder lends them to its upload
        // instead of copying them, until the next update.
        let config: SamConfig = serde_json::from_str(&format!(
            r#"{{
  "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "image_size": 16, "patch_size": 8}},
  "qformer_config": {{"hidden_size": 32, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": {vocab},
                     "max_position_embeddings": 64}},
  "text_config": {{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": {vocab}}},
  "num_query_tokens": 4,
  "samtrain": {{"trainable": {{"qformer": true, "projection": true}}}}
}}"#
        ))
        .unwrap();
        let m = LoadedModel::init(&config, Device::Cpu, None).unwrap();
        let model = dir.path().join("model");
        weights::save(&m.vs, &config, &model).unwrap();
        std::fs::copy(data.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A job spec file: `batch` samples per rank, checkpoints in `ckpt`.
    fn job(&self, name: &str, ckpt: &str, batch: u32) -> PathBuf {
        let text = format!(
            r#"
name = "resume-test"
[model]
path = "{}"
[data]
train = "{}"
max_txt_len = 32
max_output_txt_len = 16
loader_threads = 1
[training]
steps = 20
batch_size = {batch}
lr = 2e-3
warmup_steps = 3
min_lr = 1e-4
threads = 1
log_every = 1
[parallel]
collective_timeout_s = 10.0
[checkpoint]
url = "{}"
every_steps = 10
keep = 0
"#,
            self.path("model").display(),
            self.path("data").display(),
            self.path(ckpt).display(),
        );
        let file = self.path(name);
        std::fs::write(&file, text).unwrap();
        file
    }

    /// [`Fixture::job`] with `data.balance_images` on and the vision
    /// encoder's outputs kept in `<ckpt>-vision` (no augmentation: the
    /// same pixels every epoch).
    fn balanced_job(&self, name: &str, ckpt: &str, batch: u32) -> PathBuf {
        let file = self.job(name, ckpt, batch);
        let cache = self.path(&format!("{ckpt}-vision"));
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replacen(
                "[data]\n",
                "[data]\nbalance_images = true\naugmentation = \"none\"\n",
                1,
            )
            .replacen(
                "[model]\n",
                &format!("[model]\nvision_cache = \"{}\"\n", cache.display()),
                1,
            );
        std::fs::write(&file, text).unwrap();
        file
    }
}

/// One loopback address per rank, for the rank processes to bind.
fn free_ports(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("127.0.0.1:{}", samtrain_testkit::free_port()))
        .collect()
}

/// Starts every rank of `job` (one process each); stderr carries JSON logs.
fn launch(job: &Path, ranks: usize) -> Vec<Child> {
    launch_with(job, ranks, &[])
}

/// [`launch`] with `env` added to each rank's environment.
fn launch_with(job: &Path, ranks: usize, env: &[(&str, &str)]) -> Vec<Child> {
    let peers = free_ports(ranks).join(",");
    (0..ranks)
        .map(|rank| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_samtrain"));
            cmd.envs(env.iter().copied());
            cmd.args(["--log-json", "train"]).arg(job).arg("--json");
            if ranks > 1 {
                cmd.args(["--rank", &rank.to_string(), "--peers", &peers]);
            }
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start samtrain train")
        })
        .collect()
}

/// Waits for every rank; returns each final JSON line.
fn finish(children: Vec<Child>) -> Vec<serde_json::Value> {
    finish_logged(children)
        .into_iter()
        .map(|(l, _)| l)
        .collect()
}

/// [`finish`], with each rank's log.
fn finish_logged(children: Vec<Child>) -> Vec<(serde_json::Value, String)> {
    children
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let out = c.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "rank {rank} failed: {log}");
            let stdout = String::from_utf8(out.stdout).unwrap();
            let line = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
            (line, log)
        })
        .collect()
}

/// Bytes each save in a rank's JSON log lent to its upload.
fn lent_per_save(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "checkpoint lent")
        .map(|l| l["fields"]["lent"].as_u64().expect("bytes lent"))
        .collect()
}

/// The trainable tensors of the checkpoint of `step` under `url` (tp = 1:
/// one parameter file), read straight from its safetensors.
fn weights_at(url: &Path, step: u64) -> Vec<(String, Tensor)> {
    {
        let folder = url.join(format!("step-{step:08}"));
        assert!(
            folder.join("manifest.json").is_file(),
            "no committed checkpoint at {}",
            folder.display()
        );
        let mut tensors = Vec::new();
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("tp-") && name.ends_with(".safetensors") {
                tensors.extend(Tensor::read_safetensors(&path).unwrap());
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(
            !tensors.is_empty(),
            "no parameter files in {}",
            folder.display()
        );
        tensors
    }
}

fn kill_after_step(children: &mut [Child], step: u64, ckpt: &Path) {
    let stderr = children[0].stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &v["fields"];
        if fields["message"] == "train step" && fields["step"].as_u64() >= Some(step) {
            break;
        }
        assert!(Instant::now() < deadline, "no step {step} within 2 minutes");
    }
    // The step-10 checkpoint must be committed before the kill.
    let manifest = ckpt.join("step-00000010/manifest.json");
    while !manifest.is_file() {
        assert!(Instant::now() < deadline, "step 10 never committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in children.iter_mut() {
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }
    assert!(
        !ckpt.join("step-00000020/manifest.json").exists(),
        "the run finished before it was killed; the test needs slower steps"
    );
}

#[test]
fn killed_job_resumes_bit_for_bit() {
    let f = Fixture::new();
    let job_a = f.job("a.toml", "ckpt-a", 2);
    let straight = finish_logged(launch_with(
        &job_a,
        2,
        &[("RUST_LOG", "info,samtrain_checkpoint=debug")],
    ));
    for (line, _) in &straight {
        assert_eq!(line["step"], 20);
        assert_eq!(line["samples_consumed"], 80);
        assert_eq!(line["checkpoint"]["step"], 20);
    }
    // dp rank 0 saves, and lends its large tensors to the uploads: what
    // the resume below restores was read in place while training went on.
    let lent = lent_per_save(&straight[0].1);
    assert_eq!(lent.len(), 2, "saves at steps 10 and 20");
    assert!(lent.iter().all(|&b| b >= 64 << 10), "{lent:?}");

    let job_b = f.job("b.toml", "ckpt-b", 2);
    let mut run = launch(&job_b, 2);
    kill_after_step(&mut run, 13, &f.path("ckpt-b"));
    let resumed = finish(launch(&job_b, 2));
    for line in &resumed {
        assert_eq!(line["resumed_from"], 10);
        assert_eq!(line["step"], 20);
        assert_eq!(line["samples_consumed"], 80);
    }
    let (a, b) = (
        weights_at(&f.path("ckpt-a"), 20),
        weights_at(&f.path("ckpt-b"), 20),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
    let start = weights_at(&f.path("ckpt-a"), 10);
    assert!(
        a.iter().zip(&start).any(|((_, x), (_, y))| !x.equal(y)),
        "steps 11-20 changed nothing"
    );

    // The same checkpoint resumed by one process of twice the batch: the
    // rest of the epoch re-sharded, the same global batch, the same count.
    let c = f.path("ckpt-c");
    copy_folder(
        &f.path("ckpt-a").join("step-00000010"),
        &c.join("step-00000010"),
    );
    let job_c = f.job("c.toml", "ckpt-c", 4);
    let single = finish(launch(&job_c, 1));
    assert_eq!(single[0]["resumed_from"], 10);
    assert_eq!(single[0]["samples_consumed"], 80);
    let c20 = weights_at(&c, 20);
    let d = a
        .iter()
        .zip(&c20)
        .map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(d < 1e-5, "dp 1 after dp 2 differs from dp 2 by {d}");

    // The ledgers prove every sample was trained once: across the kill
    // (the steps after step 10 trained twice, but only once into a
    // checkpoint) and across the change of data-parallel size.
    for (ckpt, segments) in [("ckpt-b", 1), ("ckpt-c", 2)] {
        let out = ledger(&f.path(ckpt));
        assert_eq!(out["exactly_once"], true, "{out}");
        assert_eq!(out["verdict"]["steps"], 20, "{out}");
        assert_eq!(out["segments"].as_array().unwrap().len(), segments, "{out}");
        // 48 samples; 20 steps of a global batch of 4 = 80: epoch 0 whole
        // (48 = 12 steps), epoch 1 in progress with 32.
        let epochs = &out["verdict"]["epochs"];
        assert_eq!(
            (
                &epochs[0]["distinct"],
                &epochs[0]["trained"],
                &epochs[0]["complete"]
            ),
            (&json!(48), &json!(48), &json!(true)),
            "{out}"
        );
        assert_eq!(
            (&epochs[1]["distinct"], &epochs[1]["trained"]),
            (&json!(32), &json!(32)),
            "{out}"
        );
    }
}

/// Two ranks that share each global batch by the samples' images (2 to 4
/// each), and read the frozen encoder's outputs from a vision cache from
/// the second epoch on, train what one process of the whole global batch
/// trains without either; their ledger proves each sample trained once.
#[test]
fn balanced_ranks_train_what_one_process_trains() {
    let f = Fixture::with_images(4, 2);
    let job = f.balanced_job("two.toml", "ckpt-two", 2);
    assert!(std::fs::read_to_string(&job)
        .unwrap()
        .contains("balance_images = true"));
    for line in finish(launch(&job, 2)) {
        assert_eq!(line["samples_consumed"], 80);
    }
    let one = f.job("one.toml", "ckpt-one", 4);
    let text = std::fs::read_to_string(&one).unwrap();
    std::fs::write(
        &one,
        text.replacen("[data]\n", "[data]\naugmentation = \"none\"\n", 1),
    )
    .unwrap();
    finish(launch(&one, 1));
    let (two, one) = (
        weights_at(&f.path("ckpt-two"), 20),
        weights_at(&f.path("ckpt-one"), 20),
    );
    let d = two
        .iter()
        .zip(&one)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max);
    assert!(d < 1e-5, "balanced dp 2 differs from dp 1 by {d}");
    let out = ledger(&f.path("ckpt-two"));
    assert_eq!(out["exactly_once"], true, "{out}");
    assert_eq!(out["verdict"]["epochs"][0]["distinct"], 48, "{out}");
    assert_eq!(out["segments"][0]["sampler"]["balance"], true, "{out}");
    // One entry per image of the set: every image was seen in epoch 0.
    let images = std::fs::read_dir(f.path("data").join("images"))
        .unwrap()
        .count();
    let kept = std::fs::read_dir(f.path("ckpt-two-vision"))
        .unwrap()
        .count();
    assert_eq!(kept, images);
}

/// `samtrain ledger --json` of the checkpoint location `ckpt`.
fn ledger(ckpt: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_samtrain"))
        .args(["ledger", "--json"])
        .arg(ckpt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

/// Replaces `file` of `folder` with bytes that are not safetensors, and
/// records their size and checksum in the manifest: the checkpoint verifies
/// but does not decode.
fn damage_consistently(folder: &Path, file: &str) {
    let garbage = b"not a safetensors file, but its checksum is right".to_vec();
    std::fs::write(folder.join(file), &garbage).unwrap();
    let (size, crc) = samtrain_checkpoint::format::checksum(&[garbage.into()]);
    let path = folder.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut patched = 0;
    for shard in manifest["shards"].as_array_mut().unwrap() {
        for entry in shard["files"].as_array_mut().unwrap() {
            if entry["name"] == file {
                entry["size"] = size.into();
                entry["crc32"] = samtrain_checkpoint::format::crc_hex(crc).into();
                patched += 1;
            }
        }
    }
    assert_eq!(patched, 1, "{file} is not in {}", path.display());
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

#[test]
fn a_checkpoint_that_verifies_but_does_not_decode_falls_back_to_the_one_before() {
    let f = Fixture::new();
    let straight = finish(launch(&f.job("a.toml", "ckpt-a", 2), 2));
    assert_eq!(straight[0]["checkpoint"]["step"], 20);

    // Steps 10 and 20 of the straight run, step 20's parameters replaced.
    let d = f.path("ckpt-d");
    for step in ["step-00000010", "step-00000020"] {
        copy_folder(&f.path("ckpt-a").join(step), &d.join(step));
    }
    damage_consistently(&d.join("step-00000020"), "tp-00-of-01.safetensors");

    let resumed = finish(launch(&f.job("d.toml", "ckpt-d", 2), 2));
    for line in &resumed {
        assert_eq!(line["resumed_from"], 10, "{line}");
        assert_eq!(line["step"], 20);
        assert_eq!(line["samples_consumed"], 80);
    }
    // Steps 11 to 20 again, as the straight run had them; step 20 rewritten.
    let (a, again) = (weights_at(&f.path("ckpt-a"), 20), weights_at(&d, 20));
    assert_eq!(a.len(), again.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&again) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs from the straight run");
    }
}

/// Bytes of the files under `folder`.
fn folder_bytes(folder: &Path) -> u64 {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_full_disk_fails_the_save_at_once_removes_its_files_and_fails_the_run() {
    // A file system that holds one checkpoint and a half: a tmpfs of that
    // size, mounted in a mount namespace of the run's own (`unshare -m`, as
    // root, or `-rm` in a user namespace), so nothing outside sees it.
    let probe = |flags: &str| {
        Command::new("unshare")
            .args([flags, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let Some(flags) = ["-m", "-rm"].into_iter().find(|f| probe(f)) else {
        eprintln!(
            "SKIPPED: this machine cannot mount a tmpfs in a mount namespace (unshare -m / -rm)"
        );
        return;
    };
    let f = Fixture::new();
    let job = f.job("a.toml", "ckpt-a", 4);
    finish(launch(&job, 1));
    let one = folder_bytes(&f.path("ckpt-a").join("step-00000010"));
    let size = (one * 3 / 2).div_ceil(4096) * 4096;

    let full = f.path("ckpt-full");
    std::fs::create_dir_all(&full).unwrap();
    let job = f.job("full.toml", "ckpt-full", 4);
    let started = Instant::now();
    let out = Command::new("unshare")
        .args([flags, "sh", "-c"])
        .arg(
            "dir=$1; shift; mount -t tmpfs -o size=$0 tmpfs \"$dir\" || exit 99; \
             \"$@\"; rc=$?; echo FILES; find \"$dir\" -type f; exit $rc",
        )
        .arg(size.to_string())
        .arg(&full)
        .arg(env!("CARGO_BIN_EXE_samtrain"))
        .args(["--log-json", "train"])
        .arg(&job)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(99), "mount failed: {stderr}");
    // Out of space is no reason to train again: exit 1, not the retriable 128.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the final checkpoint")
            && stderr.contains("step-00000020")
            && stderr.contains("out of space"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("retrying"),
        "a full disk was retried: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let files: Vec<&str> = stdout
        .split_once("FILES")
        .map(|(_, f)| f.lines().filter(|l| !l.is_empty()).collect())
        .unwrap_or_default();
    let of = |step: &str| files.iter().filter(|f| f.contains(step)).count();
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("step-00000010/manifest.json")),
        "step 10 lost: {files:?}"
    );
    assert_eq!(of("step-00000020"), 0, "partial files left: {files:?}");
}

/// The survivor also sends its trace before it exits: the `train` span,
/// which closes with the failure, reaches the collector.
#[test]
fn a_killed_peer_fails_the_survivor_fast_naming_it() {
    let f = Fixture::new();
    let job = f.job("k.toml", "ckpt-k", 2);
    let collector = samtrain_testkit::OtlpCollector::start();
    let mut run = launch_with(&job, 2, &[("SAMTRAIN_OTLP_ENDPOINT", collector.endpoint())]);
    // Let both ranks train, then kill rank 1.
    let stderr = run[0].stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("\"train step\"") {
            break;
        }
    }
    run[1].kill().unwrap();
    run[1].wait().unwrap();
    let killed = Instant::now();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = run[0].wait().unwrap();
    let waited = killed.elapsed();
    assert_eq!(status.code(), Some(128), "a peer's death is retriable");
    assert!(waited < Duration::from_secs(8), "took {waited:?}");
    let text = rest.join("\n");
    assert!(text.contains("rank 1"), "the error names the peer: {text}");
    let trained: Vec<serde_json::Value> = collector
        .spans()
        .into_iter()
        .map(|(_, span)| span)
        .filter(|s| s["name"] == "train")
        .collect();
    assert_eq!(trained.len(), 1, "the survivor's train span: {trained:?}");
}

/// A copy of `from` (a flat folder) at `to`.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_checkpoint_resumes_onto_a_copy_of_its_base_model_but_never_onto_another() {
    let f = Fixture::new();
    let first = finish(launch(&f.job("a.toml", "ckpt-a", 2), 1));
    assert_eq!(first[0]["checkpoint"]["step"], 20);
    let with_model = |name: &str, model: &str| {
        let job = f.job(name, "ckpt-a", 2);
        let text = std::fs::read_to_string(&job).unwrap().replace(
            &format!("path = \"{}\"", f.path("model").display()),
            &format!("path = \"{}\"", f.path(model).display()),
        );
        std::fs::write(&job, text).unwrap();
        job
    };

    // Another node's copy (new modification times) is the same base model.
    copy_folder(&f.path("model"), &f.path("model-copy"));
    let copied = finish(launch(&with_model("copy.toml", "model-copy"), 1));
    assert_eq!(copied[0]["resumed_from"], 20, "{}", copied[0]);

    // The same shapes with one weight's lowest mantissa bit changed is not.
    copy_folder(&f.path("model"), &f.path("model-b"));
    let file = f.path("model-b").join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last_float = bytes.len() - 4;
    bytes[last_float] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let out = launch(&with_model("b.toml", "model-b"), 1)
        .pop()
        .unwrap()
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a permanent failure: {stderr}");
    assert!(
        stderr.contains("was trained on a base model with digest")
            && stderr.contains("model-b has digest")
            && stderr.contains("step-00000020"),
        "{stderr}"
    );
}
