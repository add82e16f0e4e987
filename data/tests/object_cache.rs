//! The object cache's model folders against a real S3-compatible server
//! (moto's, started on loopback and stopped by its PID): a folder fetched
//! once is used without fetching again, and a file that changed in the
//! bucket is fetched again, alone.

use std::os::unix::fs::MetadataExt;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use samtrain_data::remote::ObjectCache;
use samtrain_testkit::{free_port, S3Server};

#[test]
fn a_model_file_changed_in_the_bucket_is_fetched_again() {
    let server = S3Server::start(free_port(), "models");
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    let store = AmazonS3Builder::from_env()
        .with_bucket_name("models")
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let put = |key: &str, bytes: &'static [u8]| {
        runtime
            .block_on(store.put(&StorePath::from(key), PutPayload::from_static(bytes)))
            .unwrap();
    };
    put("m/config.json", b"{}");
    put("m/model.safetensors", b"first weights");
    let dir = tempfile::tempdir().unwrap();
    let cache = ObjectCache::open(dir.path(), 1 << 20, 1).unwrap();

    let folder = cache.fetch_model("s3://models/m").unwrap();
    let weights = folder.join("model.safetensors");
    assert_eq!(std::fs::read(&weights).unwrap(), b"first weights");
    let config_inode = folder.join("config.json").metadata().unwrap().ino();
    assert_eq!(cache.stats().fetched, 2);

    // Unchanged: checked, not fetched.
    assert_eq!(cache.fetch_model("s3://models/m").unwrap(), folder);
    assert_eq!(cache.stats().fetched, 2);

    put("m/model.safetensors", b"second weights!");
    assert_eq!(cache.fetch_model("s3://models/m").unwrap(), folder);
    assert_eq!(std::fs::read(&weights).unwrap(), b"second weights!");
    assert_eq!(cache.stats().fetched, 3, "only the changed file is fetched");
    assert_eq!(
        folder.join("config.json").metadata().unwrap().ino(),
        config_inode
    );
    drop(server);
}
