//! Objects in object storage (`s3://`, `gs://`, `az://`, `http(s)://`) as
//! local files: a worker's images, tokenizers and model folder.
//!
//! Each object is fetched once into an on-disk cache (written to a temporary
//! name, then renamed, so a half-written file is never taken for a whole
//! one) and read locally afterwards: later epochs and restarts touch the
//! store no more. The cache of images is bounded in size: past the bound the
//! least recently used files go. Model files live in their own folder that
//! is never evicted (a model is read whole at every cold load).
//!
//! Stores are configured from the environment as every object-store tool
//! is (`AWS_*`, `GOOGLE_*`, `AZURE_*`), as the checkpoints are. Transient
//! errors (connection failures, throttling, 5xx) are retried by
//! object_store's client up to `retries` times, with exponential backoff and
//! jitter; what still fails is an error naming the URL and saying which kind
//! of failure it is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
use sha2::{Digest, Sha256};
use thiserror::Error;
use url::Url;

#[derive(Debug, Error)]
#[error("{url}: {message}")]
pub struct RemoteError {
    pub url: String,
    pub message: String,
}

/// Whether `location` names an object store rather than a local path
/// (`file://` URLs are local).
pub fn is_remote(location: &str) -> bool {
    matches!(
        location.split_once("://").map(|(s, _)| s),
        Some("s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" | "http" | "https")
    )
}

/// `location` without a `file://` prefix.
pub fn local_path(location: &str) -> PathBuf {
    PathBuf::from(location.strip_prefix("file://").unwrap_or(location))
}

/// What fetching has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Objects read from the store.
    pub fetched: u64,
    /// Objects found in the cache.
    pub hits: u64,
    pub bytes_fetched: u64,
}

/// An on-disk cache of objects, shared by a worker's loader threads.
pub struct ObjectCache {
    dir: PathBuf,
    max_bytes: u64,
    retries: usize,
    runtime: tokio::runtime::Runtime,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    /// Bytes of the evictable part, as last counted.
    size: Mutex<u64>,
    fetched: AtomicU64,
    hits: AtomicU64,
    bytes_fetched: AtomicU64,
}

/// The evictable folder (images) and the kept one (model files).
const OBJECTS: &str = "objects";
const MODELS: &str = "models";
/// Objects one loader thread fetches at once.
pub const FETCHES_IN_FLIGHT: usize = 16;
/// Numbers the temporary files of downloads.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);
/// Written into a model folder once every file of it is fetched.
const COMPLETE: &str = ".samtrain-complete";

impl ObjectCache {
    /// A cache in `dir` holding at most `max_bytes` of images, retrying a
    /// transient store error `retries` times.
    pub fn open(dir: &Path, max_bytes: u64, retries: usize) -> Result<Arc<Self>, RemoteError> {
        let fail = |message: String| RemoteError {
            url: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir.join(OBJECTS))
            .map_err(|e| fail(format!("cannot create the cache folder: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("samtrain-fetch")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the I/O runtime: {e}")))?;
        let size = files_by_age(&dir.join(OBJECTS))
            .iter()
            .map(|(_, len, _)| len)
            .sum();
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            retries,
            runtime,
            stores: Mutex::new(HashMap::new()),
            size: Mutex::new(size),
            fetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
        }))
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            fetched: self.fetched.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
        }
    }

    /// The local file of the object at `url` (evictable). Blocking: call it
    /// from loader threads, not from inside an async runtime.
    pub fn fetch(&self, url: &str) -> Result<PathBuf, RemoteError> {
        self.runtime.block_on(self.fetch_async(url))
    }

    /// [`Self::fetch`] of every URL, up to [`FETCHES_IN_FLIGHT`] at once: a
    /// loader thread gets a whole batch's images in about the time of the
    /// slowest, not the sum of their latencies. Results in the order given.
    pub fn fetch_all(&self, urls: &[String]) -> Vec<Result<PathBuf, RemoteError>> {
        use futures::StreamExt;
        self.runtime.block_on(
            futures::stream::iter(urls)
                .map(|url| self.fetch_async(url))
                .buffered(FETCHES_IN_FLIGHT)
                .collect(),
        )
    }

    async fn fetch_async(&self, url: &str) -> Result<PathBuf, RemoteError> {
        let local = self.dir.join(OBJECTS).join(digest(url));
        if local.is_file() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            // The modification time is the recency the eviction goes by.
            if let Ok(f) = std::fs::File::options().append(true).open(&local) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok(local);
        }
        let (len, _) = self.download_async(url, &local).await?;
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        *size += len;
        if *size > self.max_bytes {
            *size = evict(&self.dir.join(OBJECTS), self.max_bytes, &local);
        }
        Ok(local)
    }

    /// The files of the model folder at `url` in a local folder that is
    /// never evicted: `config.json`, the weights (one file or the shards of
    /// `model.safetensors.index.json`), and `sam.safetensors` and
    /// `tokenizer.json` when present. A folder fetched whole is marked so,
    /// with each file's size and version (ETag); a later call checks them
    /// with one `HEAD` per file and fetches again only the files that
    /// changed in the bucket. An interrupted fetch keeps the files it
    /// finished and fetches the rest.
    pub fn fetch_model(&self, url: &str) -> Result<PathBuf, RemoteError> {
        let folder = self.dir.join(MODELS).join(digest(url));
        let complete = folder.join(COMPLETE);
        let base = url.trim_end_matches('/');
        if let Some(manifest) = read_manifest(&complete) {
            if self.drop_changed(base, &folder, &manifest) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(folder);
            }
        }
        std::fs::create_dir_all(&folder).map_err(|e| RemoteError {
            url: url.to_owned(),
            message: format!("cannot create {}: {e}", folder.display()),
        })?;
        let mut manifest = Manifest::new();
        let mut get = |name: &str, required: bool| -> Result<bool, RemoteError> {
            let local = folder.join(name);
            let remote = format!("{base}/{name}");
            let version = if local.is_file() {
                self.version(&remote)
            } else {
                self.download(&remote, &local).map(|(_, version)| version)
            };
            match version {
                Ok(version) => {
                    manifest.insert(name.to_owned(), version);
                    Ok(true)
                }
                Err(e) if !required && e.message.starts_with(NOT_FOUND) => Ok(false),
                Err(e) => Err(e),
            }
        };
        get("config.json", true)?;
        if get("model.safetensors.index.json", false)? {
            let index = std::fs::read_to_string(folder.join("model.safetensors.index.json"))
                .map_err(|e| RemoteError {
                    url: format!("{base}/model.safetensors.index.json"),
                    message: e.to_string(),
                })?;
            let parsed: serde_json::Value =
                serde_json::from_str(&index).map_err(|e| RemoteError {
                    url: format!("{base}/model.safetensors.index.json"),
                    message: format!("not JSON: {e}"),
                })?;
            let mut shards: Vec<String> = parsed["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                get(&shard, true)?;
            }
        } else {
            get("model.safetensors", true)?;
        }
        get("sam.safetensors", false)?;
        get("tokenizer.json", false)?;
        let written = serde_json::to_vec_pretty(&manifest)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&complete, bytes));
        written.map_err(|e| RemoteError {
            url: url.to_owned(),
            message: format!("cannot write {}: {e}", complete.display()),
        })?;
        Ok(folder)
    }

    /// Checks each file of a fetched model folder against the bucket and
    /// deletes the local copies that changed there; true when none did.
    /// A bucket that cannot be reached leaves the cached folder in use.
    fn drop_changed(&self, base: &str, folder: &Path, manifest: &Manifest) -> bool {
        let mut unchanged = true;
        for (name, version) in manifest {
            match self.version(&format!("{base}/{name}")) {
                Ok(now) if &now == version => {}
                Ok(_) => {
                    tracing::info!(url = %format!("{base}/{name}"), "the model file changed in the bucket; fetching it again");
                    let _ = std::fs::remove_file(folder.join(name));
                    unchanged = false;
                }
                Err(e) => {
                    tracing::warn!(url = %e.url, error = %e.message, "cannot check the cached model against the bucket; using the cached copy");
                    return unchanged;
                }
            }
        }
        unchanged
    }

    /// The size and version (ETag, else modification time) of the object
    /// at `url`, from one `HEAD`.
    fn version(&self, url: &str) -> Result<String, RemoteError> {
        let (store, path) = self.store_of(url)?;
        let meta = self
            .runtime
            .block_on(store.head(&path))
            .map_err(|e| RemoteError {
                url: url.to_owned(),
                message: describe(&e),
            })?;
        Ok(version_of(&meta))
    }

    /// Writes the object at `url` to `local` (via a temporary name); its
    /// size and version.
    fn download(&self, url: &str, local: &Path) -> Result<(u64, String), RemoteError> {
        self.runtime.block_on(self.download_async(url, local))
    }

    async fn download_async(&self, url: &str, local: &Path) -> Result<(u64, String), RemoteError> {
        let fail = |message: String| RemoteError {
            url: url.to_owned(),
            message,
        };
        let (store, path) = self.store_of(url)?;
        let got = async {
            let got = store.get(&path).await?;
            let version = version_of(&got.meta);
            Ok::<_, object_store::Error>((got.bytes().await?, version))
        };
        let (bytes, version) = got.await.map_err(|e| fail(describe(&e)))?;
        // Unique per process and call: two loader threads may fetch the
        // same object at once.
        let n = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
        let tmp = local.with_extension(format!("part-{}-{n}", std::process::id()));
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, local))
            .map_err(|e| fail(format!("cannot write {}: {e}", local.display())))?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok((bytes.len() as u64, version))
    }

    /// The store of `url`'s bucket (built once, configured from the
    /// environment, with this cache's retry policy) and the object's path.
    fn store_of(&self, url: &str) -> Result<(Arc<dyn ObjectStore>, StorePath), RemoteError> {
        let fail = |message: String| RemoteError {
            url: url.to_owned(),
            message,
        };
        let parsed = Url::parse(url).map_err(|e| fail(format!("not a URL: {e}")))?;
        let origin = parsed[..url::Position::BeforePath].to_owned();
        let path = StorePath::from_url_path(parsed.path()).map_err(|e| fail(e.to_string()))?;
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(&origin) {
            return Ok((store.clone(), path));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: self.retries,
            retry_timeout: std::time::Duration::from_secs(120),
        };
        let built: object_store::Result<Arc<dyn ObjectStore>> = match parsed.scheme() {
            "s3" | "s3a" => AmazonS3Builder::from_env()
                .with_url(&origin)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            "gs" => GoogleCloudStorageBuilder::from_env()
                .with_url(&origin)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            "az" | "abfs" | "abfss" | "azure" => MicrosoftAzureBuilder::from_env()
                .with_url(&origin)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            // An `http://` location is the user's explicit choice of plain
            // HTTP, which the client otherwise refuses.
            "http" | "https" => HttpBuilder::new()
                .with_url(&origin)
                .with_client_options(
                    object_store::ClientOptions::new().with_allow_http(parsed.scheme() == "http"),
                )
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            other => return Err(fail(format!("unsupported scheme `{other}://`"))),
        };
        let store = built.map_err(|e| fail(e.to_string()))?;
        stores.insert(origin, store.clone());
        Ok((store, path))
    }
}

const NOT_FOUND: &str = "object not found";

/// A fetched model folder's files and the version each was fetched at.
type Manifest = std::collections::BTreeMap<String, String>;

/// The manifest a complete model folder was marked with; None when the
/// folder is not complete (or was marked by an older samtrain, without one).
fn read_manifest(complete: &Path) -> Option<Manifest> {
    serde_json::from_slice(&std::fs::read(complete).ok()?).ok()
}

/// An object's size and version, as one comparable string.
pub(crate) fn version_of(meta: &object_store::ObjectMeta) -> String {
    let version = meta.e_tag.clone().unwrap_or_else(|| {
        meta.last_modified
            .timestamp_nanos_opt()
            .unwrap_or(0)
            .to_string()
    });
    format!("{} {version}", meta.size)
}

/// An object-store error in a user's words: which kind of failure, then
/// the store's own message with its causes.
fn describe(e: &object_store::Error) -> String {
    use object_store::Error as E;
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    // The text is matched only where the store gives no structure, and never
    // for bare digits: the URL in it carries a port, and port 34033 is not a
    // 403.
    let lower = text.to_lowercase();
    match e {
        E::NotFound { .. } => format!("{NOT_FOUND} (or no such bucket)"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => format!("access denied: {text}"),
        _ if never_reached(e) => format!("cannot reach the endpoint (after retries): {text}"),
        _ if lower.contains("accessdenied") || lower.contains("forbidden") => {
            format!("access denied: {text}")
        }
        _ if lower.contains("dns error") || lower.contains("timed out") => {
            format!("cannot reach the endpoint (after retries): {text}")
        }
        _ => text,
    }
}

/// Whether the request behind `e` failed in transport (no connection, no
/// answer in time) rather than with an answer from the store.
fn never_reached(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(http) = cause.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        source = cause.source();
    }
    false
}

/// The cache file name of `url`.
fn digest(url: &str) -> String {
    short_hex(&Sha256::digest(url.as_bytes()))
}

/// The first 16 bytes of a SHA-256 digest in hex: a name for a cache entry.
pub(crate) fn short_hex(hash: &[u8]) -> String {
    hash.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Every file of `dir` with its size and modification time, oldest first.
fn files_by_age(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            Some((e.path(), meta.len(), meta.modified().ok()?))
        })
        .collect();
    files.sort_by_key(|f| f.2);
    files
}

/// Deletes the least recently used files of `dir` (never `keep`) until at
/// most 90% of `max_bytes` remain; returns what remains.
fn evict(dir: &Path, max_bytes: u64, keep: &Path) -> u64 {
    let files = files_by_age(dir);
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let target = max_bytes / 10 * 9;
    let mut evicted = 0;
    for (path, len, _) in files {
        if total <= target {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
            evicted += 1;
        }
    }
    tracing::debug!(evicted, remaining_bytes = total, "object cache evicted");
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_locations() {
        assert!(is_remote("s3://b/k") && is_remote("gs://b/k") && is_remote("https://h/k"));
        assert!(!is_remote("/data/set") && !is_remote("file:///data/set"));
        assert_eq!(local_path("file:///d/x"), PathBuf::from("/d/x"));
    }

    /// A loopback port, free when asked, whose number has "403" in it.
    fn free_port_that_reads_403() -> u16 {
        (40300..40400)
            .chain(14030..14040)
            .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            .expect("a free port among 40300-40399 and 14030-14039")
    }

    /// One answer to every request on a loopback listener, as a store that
    /// refuses the caller would give it.
    fn forbidding_server() -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(
                    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        port
    }

    #[test]
    fn failures_are_named_by_what_happened_not_by_digits_in_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::open(dir.path(), 1 << 20, 0).unwrap();

        let error_at = |port: u16| {
            cache
                .fetch(&format!("http://127.0.0.1:{port}/images/a.jpg"))
                .unwrap_err()
                .to_string()
        };
        let err = error_at(free_port_that_reads_403());
        assert!(err.contains("cannot reach the endpoint"), "{err}");
        assert!(!err.contains("access denied"), "{err}");
        let err = error_at(forbidding_server());
        assert!(err.contains("access denied"), "{err}");
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let path = dir.path().join(name);
            std::fs::write(&path, [0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(10 * i as u64))
                .unwrap();
        }
        let left = evict(dir.path(), 250, &dir.path().join("new"));
        assert_eq!(left, 200);
        assert!(!dir.path().join("old").exists());
        assert!(dir.path().join("mid").exists() && dir.path().join("new").exists());
    }
}
