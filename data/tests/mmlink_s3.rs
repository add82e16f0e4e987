//! Reading an MmLINK dataset from a real S3-compatible server (moto's, from
//! the venv that scripts/setup.sh installs), started by this test on
//! loopback and stopped by its PID: the records equal those read from disk,
//! the dataset's digest follows its objects' ETags, and a dataset decoded
//! once is not decoded again until an object changes.

use std::path::{Path, PathBuf};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_data::mmlink::{load, LoadOptions};
use samtrain_testkit::{free_port, S3Server};

#[tokio::test(flavor = "multi_thread")]
async fn s3_dataset_reads_like_the_local_one() {
    let server = S3Server::start(free_port(), "datasets");
    let dir = tempfile::tempdir().unwrap();
    let options = SynthOptions {
        task: Task::Story,
        samples: 6,
        images: 3,
        min_images: 0,
        max_distractors: samtrain_data::mmlink::synth::MAX_DISTRACTORS,
        seed: 5,
    };
    synth(dir.path(), &options).unwrap();

    let endpoint = server.endpoint();
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
    for (k, v) in server.env() {
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

    // Decoded once, then only checked against the listing while unchanged.
    let validated = dir.path().join("validated");
    let remembering = || LoadOptions {
        validated: Some(validated.clone()),
        ..LoadOptions::default()
    };
    let first = load("s3://datasets/story", remembering()).await.unwrap();
    let second = load("s3://datasets/story", remembering()).await.unwrap();
    assert!(first.digest.is_some());
    assert_eq!(first.digest, second.digest);
    assert!(!first.validated_before && second.validated_before);
    // A rewritten image (new bytes, new ETag) changes the digest.
    let image = &local.records[1].img_list[0];
    let other = std::fs::read(dir.path().join(&local.records[2].img_list[0])).unwrap();
    let key = StorePath::from(format!("story/{image}"));
    store.put(&key, PutPayload::from(other)).await.unwrap();
    let third = load("s3://datasets/story", remembering()).await.unwrap();
    assert_ne!(third.digest, first.digest);
    assert!(!third.validated_before);

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
