//! A job whose dataset, tokenizer and model folder are in S3 (moto's server,
//! started by the test on loopback and stopped by its PID): it ends bit for
//! bit where the same job from local folders ends; a second run reads every
//! object from the worker's cache; a missing object, a denied request and an
//! unreachable endpoint each fail with an error naming the URL and the kind
//! of failure.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{final_weights, fixture, max_diff, run_threads};
use samtrain_proto::spec::JobSpec;
use samtrain_testkit::{free_port, S3Server};

/// Every file under `dir` with its inode: a re-fetched object is renamed
/// into place, so it gets a new one.
fn inodes(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(inodes(&path));
        } else {
            out.insert(path.display().to_string(), path.metadata().unwrap().ino());
        }
    }
    out
}

fn remote(spec: &JobSpec, bucket: &str, cache: &Path) -> JobSpec {
    let mut spec = spec.clone();
    spec.model.path = format!("s3://{bucket}/model");
    spec.data.train = format!("s3://{bucket}/data");
    spec.data.cache_dir = Some(cache.display().to_string());
    spec.data.fetch_retries = 1;
    spec
}

/// The error of a one-rank run of `spec`.
fn failure(spec: &JobSpec) -> String {
    match run_threads(spec, 1, 1, None).remove(0) {
        Ok(_) => panic!("the job should have failed"),
        Err(e) => e.to_string(),
    }
}

fn point_at(endpoint: &str) {
    std::env::set_var("AWS_ENDPOINT", endpoint);
}

#[test]
fn a_job_from_s3_equals_the_job_from_local_folders() {
    let f = fixture(16);
    let server = S3Server::start(free_port(), "samtrain-ml");
    server.put_folder("samtrain-ml", "data", &f.data);
    server.put_folder("samtrain-ml", "model", &f.model);
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }

    let local = f.spec("local", "steps = 6\nbatch_size = 2", "");
    for o in run_threads(&local, 2, 1, None) {
        o.unwrap();
    }
    let cache = f.dir.path().join("cache");
    let from_s3 = remote(
        &f.spec("s3", "steps = 6\nbatch_size = 2", ""),
        "samtrain-ml",
        &cache,
    );
    for o in run_threads(&from_s3, 2, 1, None) {
        assert_eq!(o.unwrap().final_step, 6);
    }
    let d = max_diff(
        &final_weights(&f.ckpt("local")),
        &final_weights(&f.ckpt("s3")),
    );
    assert_eq!(d, 0.0, "the S3 job differs from the local one by {d}");

    // Again, into a new checkpoint location: nothing is fetched twice.
    let cached = inodes(&cache);
    assert!(
        cached.len() > 16,
        "images and model files are cached: {cached:?}"
    );
    let again = remote(
        &f.spec("s3-again", "steps = 6\nbatch_size = 2", ""),
        "samtrain-ml",
        &cache,
    );
    for o in run_threads(&again, 2, 1, None) {
        o.unwrap();
    }
    assert_eq!(inodes(&cache), cached, "a second run re-fetched objects");
    let d = max_diff(
        &final_weights(&f.ckpt("s3")),
        &final_weights(&f.ckpt("s3-again")),
    );
    assert_eq!(d, 0.0);

    // A missing model folder and a missing dataset.
    let fresh = f.dir.path().join("cache-2");
    let mut missing = remote(
        &f.spec("m", "steps = 1\nbatch_size = 2", ""),
        "samtrain-ml",
        &fresh,
    );
    missing.model.path = "s3://samtrain-ml/no-such-model".into();
    let err = failure(&missing);
    assert!(
        err.contains("s3://samtrain-ml/no-such-model/config.json")
            && err.contains("object not found"),
        "{err}"
    );
    let mut missing = remote(
        &f.spec("m", "steps = 1\nbatch_size = 2", ""),
        "samtrain-ml",
        &fresh,
    );
    missing.data.train = "s3://samtrain-ml/no-such-data".into();
    let err = failure(&missing);
    assert!(err.contains("s3://samtrain-ml/no-such-data"), "{err}");

    // Credentials the store refuses: 403.
    let denying = S3Server::start_denying(free_port(), "samtrain-locked");
    point_at(&denying.endpoint());
    let err = failure(&remote(
        &f.spec("d", "steps = 1\nbatch_size = 2", ""),
        "samtrain-locked",
        &fresh,
    ));
    assert!(
        err.contains("s3://samtrain-locked/model/config.json") && err.contains("access denied"),
        "{err}"
    );
    drop(denying);

    // Nobody listening at the endpoint (and nothing cached yet).
    point_at(&format!("http://127.0.0.1:{}", free_port()));
    let empty = f.dir.path().join("cache-3");
    let err = failure(&remote(
        &f.spec("u", "steps = 1\nbatch_size = 2", ""),
        "samtrain-ml",
        &empty,
    ));
    assert!(
        err.contains("s3://samtrain-ml/model/config.json")
            && err.contains("cannot reach the endpoint"),
        "{err}"
    );
    drop(server);
}

#[test]
fn an_unchanged_local_dataset_is_decoded_once() {
    use samtrain_proto::spec::BadRecords;
    use samtrain_worker::inputs::{load_dataset, Remote};
    let f = fixture(6);
    let cache = f.dir.path().join("validated-cache");
    let remote = Remote::new(Some(cache.to_str().unwrap()), 1.0, 0);
    let location = f.data.to_str().unwrap();
    let first = load_dataset(
        location,
        BadRecords::Fail,
        samtrain_data::limits::InputLimits::default(),
        &remote,
    )
    .unwrap();
    assert!(!first.validated_before);
    let second = load_dataset(
        location,
        BadRecords::Fail,
        samtrain_data::limits::InputLimits::default(),
        &remote,
    )
    .unwrap();
    assert!(second.validated_before);
    assert_eq!(first.records, second.records);

    // A rewritten (here: corrupt) image changes the digest: decoded again.
    let image = f.data.join(&first.records[0].img_list[0]);
    std::fs::write(&image, b"not an image").unwrap();
    let err = load_dataset(
        location,
        BadRecords::Fail,
        samtrain_data::limits::InputLimits::default(),
        &remote,
    )
    .err()
    .expect("a corrupt image is found")
    .to_string();
    assert!(
        err.contains("img_list[0]") && err.contains("decoded"),
        "{err}"
    );
}
