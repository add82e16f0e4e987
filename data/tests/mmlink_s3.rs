//! Reading an MmLINK dataset from a real S3-compatible server (moto's, from
//! the venv that scripts/setup.sh installs), started by this test on
//! loopback and stopped by its PID: the records equal those read from disk.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_data::mmlink::{load, LoadOptions};

/// The S3 server; killed (by its PID) when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moto = common::python().parent().unwrap().join("moto_server");
    let child = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", moto.display()));
    let server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// Creates a bucket with a plain HTTP request (moto does not check signatures).
fn create_bucket(port: u16, bucket: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_dataset_reads_like_the_local_one() {
    let server = start_server();
    create_bucket(server.port, "datasets");
    let dir = tempfile::tempdir().unwrap();
    let options = SynthOptions {
        task: Task::Story,
        samples: 6,
        images: 3,
        seed: 5,
    };
    synth(dir.path(), &options).unwrap();

    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let store = AmazonS3Builder::new()
        .with_bucket_name("datasets")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    for entry in walk(dir.path()) {
        let relative = entry.strip_prefix(dir.path()).unwrap().to_str().unwrap();
        let key = StorePath::from(format!("story/{relative}"));
        let bytes = std::fs::read(&entry).unwrap();
        store.put(&key, PutPayload::from(bytes)).await.unwrap();
    }

    // The loader takes its S3 settings from the environment, as AWS tools do.
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        std::env::set_var(k, v);
    }
    let remote = load("s3://datasets/story", LoadOptions::default())
        .await
        .unwrap();
    let local = load(dir.path().to_str().unwrap(), LoadOptions::default())
        .await
        .unwrap();
    assert_eq!(remote.records.len(), 6);
    assert!(
        remote.report.problems.is_empty(),
        "{:?}",
        remote.report.problems
    );
    assert_eq!(remote.records, local.records);

    // A missing image on the server is reported with its record and field.
    let first = &local.records[0];
    let gone = StorePath::from(format!("story/{}", first.img_list[0]));
    store.delete(&gone).await.unwrap();
    let err = load("s3://datasets/story", LoadOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&first.img_list[0]) && err.contains("img_list[0]"),
        "{err}"
    );
    drop(server);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
