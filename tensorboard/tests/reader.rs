//! TensorBoard's own reader (the venv's `tensorboard` package, its
//! `EventAccumulator`) reading back what samtrain-tensorboard writes, to a
//! local folder and to a real S3 server (moto), value for value.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use samtrain_tensorboard::{TensorBoard, TensorBoardError};
use samtrain_testkit::{free_port, python, S3Server};
use serde_json::Value;

/// Prints, as one JSON line, everything TensorBoard reads from the folder
/// given as the first argument.
const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
try:
    text_tags = sorted(acc.PluginTagToContent("text"))
except KeyError:
    text_tags = []
print(json.dumps({
    "file_version": acc.file_version,
    "scalars": {
        tag: [[e.step, e.wall_time, e.value] for e in acc.Scalars(tag)]
        for tag in tags["scalars"]
    },
    "texts": {
        tag: [
            [e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()]
            for e in acc.Tensors(tag)
        ]
        for tag in tags["tensors"]
    },
    "text_plugin_tags": text_tags,
}))
"#;

const LOSSES: [f64; 5] = [2.5, 1.7321, 1.25, 0.999_999_9, 0.875];
const EXAMPLE: &str = "**step 5**\n\nprediction: \"two cats on a sofa\" ☃";

fn read_with_tensorboard(dir: &Path) -> Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(READ)
        .arg(dir)
        .output()
        .expect("run the venv python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "TensorBoard's reader failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .last()
        .expect("the reader printed its result");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What `write_run` writes.
fn write_run(tb: &TensorBoard) {
    for (step, loss) in (1..=5).zip(LOSSES) {
        tb.scalar("train/loss", step, loss);
        tb.scalar("train/lr", step, 1e-4 * step as f64);
    }
    tb.text("eval/examples", 5, EXAMPLE);
}

/// The series `tag` as (step, wall time, value).
fn series(read: &Value, tag: &str) -> Vec<(u64, f64, f64)> {
    read["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalars {tag} in {read}"))
        .iter()
        .map(|e| {
            (
                e[0].as_u64().unwrap(),
                e[1].as_f64().unwrap(),
                e[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn assert_close(got: f64, expected: f64, what: &str) {
    // TensorBoard's scalars are float32.
    assert!(
        (got - expected).abs() <= 1e-6 * expected.abs(),
        "{what}: read {got}, wrote {expected}"
    );
}

/// Checks that `read` holds exactly what `write_run` wrote between
/// `before` and `after` (Unix seconds).
fn assert_run(read: &Value, before: f64, after: f64) {
    assert_eq!(read["file_version"].as_f64(), Some(2.0), "{read}");
    let scalar_tags: Vec<&str> = read["scalars"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(scalar_tags, ["train/loss", "train/lr"]);

    let loss = series(read, "train/loss");
    assert_eq!(
        loss.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    for ((step, wall_time, value), expected) in loss.iter().zip(LOSSES) {
        assert_close(*value, expected, &format!("train/loss at step {step}"));
        assert!(
            (before..=after).contains(wall_time),
            "wall time {wall_time} not in [{before}, {after}]"
        );
    }
    let lr = series(read, "train/lr");
    assert_eq!(lr.len(), 5);
    for (step, _, value) in lr {
        assert_close(
            value,
            1e-4 * step as f64,
            &format!("train/lr at step {step}"),
        );
    }

    assert_eq!(
        read["texts"],
        serde_json::json!({"eval/examples": [[5, EXAMPLE]]})
    );
    assert_eq!(
        read["text_plugin_tags"],
        serde_json::json!(["eval/examples"])
    );
}

fn event_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn assert_event_file_name(name: &str) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let rest = name
        .strip_prefix("events.out.tfevents.")
        .unwrap_or_else(|| panic!("{name} is not an event file"));
    let (seconds, rest) = rest.split_once('.').unwrap();
    let seconds: f64 = seconds.parse().unwrap();
    assert!(
        (seconds - now()).abs() < 600.0,
        "{name}: not this run's time"
    );
    let suffix = format!("{}.{}.samtrain", host.trim(), std::process::id());
    assert!(rest.starts_with(&suffix), "{name}: expected …{suffix}");
}

#[test]
fn tensorboard_reads_scalars_and_text_from_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder that does not exist yet, two levels deep.
    let dir = tmp.path().join("runs/run1");
    let before = now();
    let tb = TensorBoard::start(dir.to_str().unwrap()).unwrap();
    write_run(&tb);
    tb.flush().unwrap();
    let after = now();

    let files = event_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_event_file_name(&files[0]);
    assert_run(&read_with_tensorboard(&dir), before, after);

    // More after a flush goes to the same file.
    tb.scalar("train/loss", 6, 0.5);
    tb.flush().unwrap();
    let read = read_with_tensorboard(&dir);
    let loss = series(&read, "train/loss");
    assert_eq!(loss.len(), 6);
    assert_eq!((loss[5].0, loss[5].2), (6, 0.5));
    drop(tb);
    assert_eq!(event_files(&dir), files);
}

#[test]
fn dropping_the_writer_writes_everything_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let location = format!("file://{}", dir.display());
    let before = now();
    {
        let tb = TensorBoard::start(&location).unwrap();
        write_run(&tb);
        for step in 6..=1000 {
            tb.scalar("train/loss", step, 1.0 / step as f64);
        }
    }
    let after = now();
    let read = read_with_tensorboard(&dir);
    let loss = series(&read, "train/loss");
    assert_eq!(loss.len(), 1000);
    for (step, _, value) in &loss[5..] {
        assert_close(*value, 1.0 / *step as f64, &format!("step {step}"));
    }
    // The first five are write_run's.
    let mut first = read.clone();
    first["scalars"]["train/loss"] =
        Value::Array(read["scalars"]["train/loss"].as_array().unwrap()[..5].to_vec());
    assert_run(&first, before, after);
}

#[test]
fn records_reach_the_file_without_a_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let tb = TensorBoard::start(tmp.path().to_str().unwrap()).unwrap();
    let file = tmp.path().join(&event_files(tmp.path())[0]);
    let header = std::fs::metadata(&file).unwrap().len();
    // The file-version record: 16 bytes of framing and a 24-byte event.
    assert_eq!(header, 40);
    // Records trickle in as a training loop sends them, no flush.
    let start = Instant::now();
    tb.scalar("train/loss", 1, 1.0);
    let mut step = 1;
    while std::fs::metadata(&file).unwrap().len() == header {
        // Generous: a loaded machine may be slow to schedule the writer;
        // what matters is that records arrive with no flush at all.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing reached the file in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        step += 1;
        tb.scalar("train/loss", step, 1.0);
    }
}

fn s3_store(server: &S3Server) -> Arc<dyn ObjectStore> {
    let url = url::Url::parse("s3://bucket").unwrap();
    let (store, _) = object_store::parse_url_opts(&url, server.options()).unwrap();
    Arc::from(store)
}

/// Downloads every object under `prefix` into `dir`, returning their keys.
fn download(store: &Arc<dyn ObjectStore>, prefix: &str, dir: &Path) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let prefix = StorePath::from(prefix);
        let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
        let mut keys = Vec::new();
        for meta in listed {
            let bytes = store
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let name = meta.location.filename().unwrap().to_owned();
            std::fs::write(dir.join(&name), &bytes).unwrap();
            keys.push(meta.location.to_string());
        }
        keys.sort();
        keys
    })
}

#[test]
fn tensorboard_reads_the_object_written_to_s3() {
    let server = S3Server::start(free_port(), "bucket");
    let before = now();
    let tb = TensorBoard::start_with_options("s3://bucket/tb/run1/", server.env()).unwrap();
    let store = s3_store(&server);

    // The object exists as soon as the writer started, with its header.
    let tmp = tempfile::tempdir().unwrap();
    let keys = download(&store, "tb/run1", tmp.path());
    assert_eq!(keys.len(), 1, "{keys:?}");
    let name = keys[0].strip_prefix("tb/run1/").unwrap().to_owned();
    assert_event_file_name(&name);
    assert_eq!(std::fs::metadata(tmp.path().join(&name)).unwrap().len(), 40);

    write_run(&tb);
    tb.flush().unwrap();
    let after = now();
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(download(&store, "tb/run1", tmp.path()), keys);
    assert_run(&read_with_tensorboard(tmp.path()), before, after);

    // The next put replaces the object with the whole file, longer.
    tb.scalar("train/loss", 6, 0.5);
    drop(tb);
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(download(&store, "tb/run1", tmp.path()), keys);
    let loss = series(&read_with_tensorboard(tmp.path()), "train/loss");
    assert_eq!(loss.len(), 6);
    assert_eq!((loss[5].0, loss[5].2), (6, 0.5));
}

#[test]
fn bad_locations_are_errors_that_name_them() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let under_a_file = file.join("run1");
    let under_a_file = under_a_file.to_str().unwrap();
    let error = TensorBoard::start(under_a_file).err().expect("an error");
    assert!(
        matches!(error, TensorBoardError::Location { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(under_a_file), "{message}");
    assert!(message.contains("cannot create the folder"), "{message}");

    for location in [
        "nope://bucket/tb",
        "s3:///no-bucket",
        "file://remote-host/tb",
    ] {
        let error = TensorBoard::start_with_options(location, Vec::<(String, String)>::new())
            .err()
            .unwrap_or_else(|| panic!("{location} opened"));
        let message = error.to_string();
        assert!(message.contains(location), "{message}");
    }
}

#[test]
fn a_bucket_that_does_not_exist_fails_at_start() {
    let server = S3Server::start(free_port(), "bucket");
    let error = TensorBoard::start_with_options("s3://missing/tb", server.env())
        .err()
        .expect("an error");
    let message = error.to_string();
    assert!(message.contains("s3://missing/tb"), "{message}");
}

#[test]
fn the_object_is_put_again_every_ten_seconds_without_a_flush() {
    let server = S3Server::start(free_port(), "bucket");
    let tb = TensorBoard::start_with_options("s3://bucket/tb/periodic", server.env()).unwrap();
    let started = Instant::now();
    let store = s3_store(&server);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let size = || {
        runtime.block_on(async {
            let listed: Vec<_> = store
                .list(Some(&StorePath::from("tb/periodic")))
                .try_collect()
                .await
                .unwrap();
            assert_eq!(listed.len(), 1, "{listed:?}");
            listed[0].size
        })
    };
    assert_eq!(size(), 40, "the header is put at start");
    let mut step = 0;
    while size() == 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing was put again in 60 s"
        );
        step += 1;
        tb.scalar("train/loss", step, 1.0);
        std::thread::sleep(Duration::from_millis(250));
    }
    let waited = started.elapsed();
    // Not one put per record (one went every 250 ms): the first put after
    // the header waits out the period (10 s from the header's put, which
    // may have begun a little before `started`).
    assert!(
        waited >= Duration::from_secs(5),
        "put again after {waited:?}"
    );
    drop(tb);
    let tmp = tempfile::tempdir().unwrap();
    download(&store, "tb/periodic", tmp.path());
    let loss = series(&read_with_tensorboard(tmp.path()), "train/loss");
    assert_eq!(loss.len(), step as usize, "every record, after the drop");
}
