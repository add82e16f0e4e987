//! The object store under a checkpoint location, and every request to it
//! retried with exponential backoff and jitter: a transient error of the
//! store (a dropped connection, a 5xx, a server restarting) costs a retry,
//! not the checkpoint, and never the training run.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use url::Url;

use crate::error::CheckpointError;
use crate::format::{combine_crcs, Encoded};
use crate::read::{ShardReader, ShardTensors};
use crate::recycle::{Recycler, RECYCLED_DIR};
use crate::staging::Data;

/// How a failed request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles after each failure.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// About a minute and a half of retries before a request is given up:
    /// long enough for a store's brownout or a restart, short enough that a
    /// save that cannot succeed is reported while the next one is due.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`-th failure: exponential, capped, and
    /// drawn from its upper half so that ranks retrying together spread out.
    fn backoff(&self, failures: u32, noise: u64) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let cap = doubled.min(self.max_backoff);
        let half = cap / 2;
        let jitter = (noise % 1_000_001) as f64 / 1e6;
        half + half.mul_f64(jitter)
    }
}

/// Above this size a file is uploaded in parts (where the store has them),
/// each retried on its own, so that a failure late in a large file does not
/// send the whole file again.
const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// Parts of a multipart upload: S3 allows 10,000 of them, so files up to
/// 320 GiB fit.
const PART_SIZE: u64 = 32 << 20;
/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 8;
/// Bytes of a local file read at a time: enough to keep the system calls
/// few, few enough to be checksummed while still in the cache.
const LOCAL_PIECE: usize = 1 << 20;

/// A checkpoint location: its store, the folder in it, and how requests are
/// retried.
pub(crate) struct Store {
    store: Arc<dyn ObjectStore>,
    /// The same store, where it has multipart uploads with explicit part
    /// numbers: every remote store, and no local one.
    multipart: Option<Arc<dyn MultipartStore>>,
    base: StorePath,
    /// The folder, when the location is on the local file system: shards
    /// are read from it straight into tensor memory.
    local: Option<std::path::PathBuf>,
    /// A local location's bin of old shard files that new saves write
    /// into (see `recycle`).
    recycler: Option<Arc<Recycler>>,
    /// The location as given, for messages and checkpoint URLs.
    shown: String,
    retry: RetryPolicy,
    /// Retries done so far, for save outcomes.
    retries: AtomicU32,
    noise: AtomicU64,
}

impl Store {
    /// Opens `location`: a `file://`, `s3://`, `gs://` or `az://` URL, or a
    /// local path. Object-store settings come from the environment, as every
    /// object-store tool reads them (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`...),
    /// then from `options` (keys as object_store names them, e.g.
    /// `aws_endpoint`). Nothing is requested from the store here.
    pub(crate) fn open(
        location: &str,
        options: &[(String, String)],
        retry: RetryPolicy,
    ) -> Result<Self, CheckpointError> {
        let fail = |message: String| CheckpointError::Location {
            url: location.to_owned(),
            message,
        };
        if retry.max_attempts == 0 {
            return Err(fail("retry.max_attempts must be at least 1".into()));
        }
        // The store's own retries are off: every request is retried here,
        // under the one policy the job configured.
        let no_retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let shown = location.trim_end_matches('/').to_owned();
        let mut local_root = None;
        let (store, multipart, base): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>, _) =
            if let Some(rest) = location.strip_prefix("file://") {
                let url = Url::parse(location).map_err(|e| fail(e.to_string()))?;
                let path = url
                    .to_file_path()
                    .map_err(|()| fail(format!("{rest} is not a local path")))?;
                let store = local(&path).map_err(fail)?;
                local_root = Some(path);
                (Arc::new(store), None, StorePath::default())
            } else if location.contains("://") {
                let url = Url::parse(location).map_err(|e| fail(e.to_string()))?;
                let base = StorePath::from_url_path(url.path()).map_err(|e| fail(e.to_string()))?;
                let bucket_url = format!("{}://{}", url.scheme(), url.authority());
                match url.scheme() {
                    "s3" | "s3a" => {
                        let mut b = AmazonS3Builder::from_env()
                            .with_url(bucket_url)
                            .with_retry(no_retry);
                        for (k, v) in options {
                            let key: AmazonS3ConfigKey =
                                k.parse().map_err(|e| fail(format!("{e}")))?;
                            b = b.with_config(key, v);
                        }
                        let s = Arc::new(b.build().map_err(|e| fail(e.to_string()))?);
                        (s.clone(), Some(s), base)
                    }
                    "gs" => {
                        let mut b = GoogleCloudStorageBuilder::from_env()
                            .with_url(bucket_url)
                            .with_retry(no_retry);
                        for (k, v) in options {
                            let key: GoogleConfigKey =
                                k.parse().map_err(|e| fail(format!("{e}")))?;
                            b = b.with_config(key, v);
                        }
                        let s = Arc::new(b.build().map_err(|e| fail(e.to_string()))?);
                        (s.clone(), Some(s), base)
                    }
                    "az" | "azure" | "abfs" | "abfss" => {
                        let mut b = MicrosoftAzureBuilder::from_env()
                            .with_url(bucket_url)
                            .with_retry(no_retry);
                        for (k, v) in options {
                            let key: AzureConfigKey =
                                k.parse().map_err(|e| fail(format!("{e}")))?;
                            b = b.with_config(key, v);
                        }
                        let s = Arc::new(b.build().map_err(|e| fail(e.to_string()))?);
                        (s.clone(), Some(s), base)
                    }
                    other => {
                        return Err(fail(format!(
                            "unsupported scheme {other}:// (file, s3, gs, az are)"
                        )))
                    }
                }
            } else {
                let path = std::path::Path::new(location);
                let store = local(path).map_err(fail)?;
                local_root = Some(path.to_path_buf());
                (Arc::new(store), None, StorePath::default())
            };
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32;
        Ok(Self {
            store,
            multipart,
            base,
            recycler: local_root
                .as_deref()
                .map(|root| Arc::new(Recycler::new(root))),
            local: local_root,
            shown,
            retry,
            retries: AtomicU32::new(0),
            noise: AtomicU64::new(seed),
        })
    }

    /// The path of `name` under the checkpoint location.
    pub(crate) fn path(&self, name: &str) -> StorePath {
        name.split('/')
            .fold(self.base.clone(), |p, part| p.join(part))
    }

    /// `name` as a URL under the location, for messages.
    pub(crate) fn shown(&self, name: &str) -> String {
        format!("{}/{name}", self.shown)
    }

    pub(crate) fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// SplitMix64 on a shared counter: jitter needs no better randomness.
    fn noise(&self) -> u64 {
        let mut z = self
            .noise
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Runs `request` until it succeeds, fails for good, or the attempts
    /// run out.
    async fn retried<T, F, Fut>(
        &self,
        op: &'static str,
        name: &str,
        mut request: F,
    ) -> Result<T, CheckpointError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match request().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.retry.max_attempts && is_transient(&e) => {
                    let wait = self.retry.backoff(attempt, self.noise());
                    tracing::warn!(op, file = %self.shown(name), attempt, wait_ms = wait.as_millis() as u64, error = %e, "checkpoint request failed; retrying");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(source) => {
                    return Err(CheckpointError::Store {
                        op,
                        path: self.shown(name),
                        attempts: attempt,
                        source,
                    })
                }
            }
        }
    }

    /// Writes `chunks` (one file, in order) to `name`; the store makes it
    /// visible whole or not at all.
    pub(crate) async fn put(&self, name: &str, chunks: &[Bytes]) -> Result<(), CheckpointError> {
        let no_checksums = vec![None; chunks.len()];
        let local: Vec<Data> = chunks.iter().cloned().map(Data::Owned).collect();
        if self.put_local(name, &local, no_checksums).await?.is_some() {
            return Ok(());
        }
        self.put_remote(name, chunks).await
    }

    /// Writes `file` to `name` as [`put`](Self::put) does, and returns its
    /// CRC-32. The chunks whose checksum is not known yet are checksummed
    /// piece by piece as each piece is written to a local folder, while it
    /// is in the cache, so their bytes are read once; for a remote store,
    /// whose upload is bound by the network, before the upload.
    pub(crate) async fn put_encoded(
        &self,
        name: &str,
        file: &Encoded,
    ) -> Result<u32, CheckpointError> {
        let unknown = file
            .crcs
            .iter()
            .map(|known| known.is_none().then(crc32fast::Hasher::new))
            .collect();
        if let Some(computed) = self.put_local(name, &file.chunks, unknown).await? {
            return Ok(combine_crcs(file.crcs.iter().zip(computed).map(
                |(known, computed)| {
                    known
                        .clone()
                        .or(computed)
                        .expect("each chunk's checksum is known or computed")
                },
            )));
        }
        // Off the runtime's threads, which the other file's upload uses.
        let unsummed = Encoded {
            chunks: file.chunks.clone(),
            crcs: file.crcs.clone(),
            size: file.size,
        };
        let shown = self.shown(name);
        let fail = |e: String| CheckpointError::Runtime(format!("checksum of {shown}: {e}"));
        let (crc, chunks) = tokio::task::spawn_blocking(move || {
            let crc = unsummed.crc()?;
            let chunks = unsummed
                .chunks
                .iter()
                .map(Data::to_bytes)
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok::<_, std::io::Error>((crc, chunks))
        })
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
        self.put_remote(name, &chunks).await?;
        Ok(crc)
    }

    /// Writes `chunks` as `name` when it is in a local folder (into a
    /// recycled file when one fits), feeding each chunk's bytes, piece by
    /// piece as they are written, to its hasher in `hashers` where it has
    /// one; the hashers, or `None` when `name` is not in a local folder.
    async fn put_local(
        &self,
        name: &str,
        chunks: &[Data],
        mut hashers: Vec<Option<crc32fast::Hasher>>,
    ) -> Result<Option<Vec<Option<crc32fast::Hasher>>>, CheckpointError> {
        let (Some(recycler), Some(path)) = (&self.recycler, self.local_file(name)) else {
            return Ok(None);
        };
        let (recycler, chunks) = (recycler.clone(), chunks.to_vec());
        let (reused, hashers) = self
            .local_io("put", name, move || {
                let reused = recycler.write(&path, &chunks, |chunk, piece| {
                    if let Some(hasher) = &mut hashers[chunk] {
                        hasher.update(piece);
                    }
                })?;
                Ok((reused, hashers))
            })
            .await?;
        tracing::debug!(file = %self.shown(name), reused, "written");
        Ok(Some(hashers))
    }

    /// [`put`](Self::put) to a store that is not a local folder (or one
    /// without recycling).
    async fn put_remote(&self, name: &str, chunks: &[Bytes]) -> Result<(), CheckpointError> {
        let path = self.path(name);
        let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if let (Some(mp), true) = (&self.multipart, size > MULTIPART_THRESHOLD) {
            return self.put_parts(mp.as_ref(), name, &path, chunks, size).await;
        }
        self.retried("put", name, || {
            let payload: PutPayload = chunks.iter().cloned().collect();
            self.store.put(&path, payload)
        })
        .await
        .map(drop)
    }

    async fn put_parts(
        &self,
        mp: &dyn MultipartStore,
        name: &str,
        path: &StorePath,
        chunks: &[Bytes],
        size: u64,
    ) -> Result<(), CheckpointError> {
        let id = self
            .retried("create multipart", name, || mp.create_multipart(path))
            .await?;
        let parts = size.div_ceil(PART_SIZE) as usize;
        let uploaded: Result<Vec<PartId>, CheckpointError> = futures::stream::iter(0..parts)
            .map(|i| {
                let payload = slice_chunks(chunks, i as u64 * PART_SIZE, PART_SIZE);
                let id = &id;
                async move {
                    self.retried("put part", name, || {
                        mp.put_part(path, id, i, payload.clone())
                    })
                    .await
                }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await;
        let done = match uploaded {
            Ok(part_ids) => {
                self.retried("complete multipart", name, || {
                    mp.complete_multipart(path, &id, part_ids.clone())
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            // Parts left behind would be billed until a lifecycle rule
            // removes them.
            if let Err(abort) = mp.abort_multipart(path, &id).await {
                tracing::warn!(file = %self.shown(name), error = %abort, "cannot abort a failed multipart upload");
            }
            return Err(e);
        }
        Ok(())
    }

    /// The whole of `name`.
    pub(crate) async fn get(&self, name: &str) -> Result<Bytes, CheckpointError> {
        let path = self.path(name);
        self.retried("get", name, || async {
            self.store.get(&path).await?.bytes().await
        })
        .await
    }

    /// `name`'s size and checksum; from a remote store read as a stream (no
    /// whole copy in memory), from a local one in one read (its stream comes
    /// in small chunks, several times slower).
    pub(crate) async fn digest(&self, name: &str) -> Result<(u64, u32), CheckpointError> {
        if let Some(file) = self.local_file(name) {
            return self
                .local_io("read", name, move || {
                    let mut file = std::fs::File::open(file)?;
                    let mut buf = vec![0u8; LOCAL_PIECE];
                    let mut hasher = crc32fast::Hasher::new();
                    let mut size = 0u64;
                    loop {
                        let n = std::io::Read::read(&mut file, &mut buf)?;
                        if n == 0 {
                            return Ok((size, hasher.finalize()));
                        }
                        hasher.update(&buf[..n]);
                        size += n as u64;
                    }
                })
                .await;
        }
        let path = self.path(name);
        self.retried("read", name, || async {
            let mut stream = self.store.get(&path).await?.into_stream();
            let mut hasher = crc32fast::Hasher::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Ok((size, hasher.finalize()))
        })
        .await
    }

    /// The size of `name` and its version (the store's ETag, else its
    /// modification time), from its metadata (nothing is read): a file
    /// rewritten or changed in place gets another version.
    pub(crate) async fn version(&self, name: &str) -> Result<(u64, String), CheckpointError> {
        let path = self.path(name);
        let meta = self
            .retried("head", name, || self.store.head(&path))
            .await?;
        let version = meta.e_tag.clone().unwrap_or_else(|| {
            meta.last_modified
                .timestamp_nanos_opt()
                .unwrap_or(0)
                .to_string()
        });
        Ok((meta.size, version))
    }

    /// The size of `name`, from its metadata (nothing is read).
    pub(crate) async fn size(&self, name: &str) -> Result<u64, CheckpointError> {
        let path = self.path(name);
        self.retried("head", name, || self.store.head(&path))
            .await
            .map(|meta| meta.size)
    }

    /// `name`, a safetensors file that its manifest says has `size` bytes
    /// and checksum `crc32`, read straight into tensors of its own: from a
    /// local folder by reads into the tensors' memory, from a remote store
    /// as a stream whose chunks are copied into it. A request that fails
    /// for a transient reason reads the file again from its start.
    pub(crate) async fn read_shard(
        &self,
        name: &str,
        size: u64,
        crc32: &str,
        device: tch::Device,
    ) -> Result<ShardTensors, CheckpointError> {
        let reader = || ShardReader::new(self.shown(name), size, crc32.to_owned(), device);
        if let Some(file) = self.local_file(name) {
            let mut reader = reader();
            return self
                .local_io("read", name, move || {
                    let mut file = std::fs::File::open(file)?;
                    let found = file.metadata()?.len();
                    if found != size {
                        return Ok(Err(reader.wrong_size(found)));
                    }
                    while let Some(target) = reader.target() {
                        let piece = target.len().min(LOCAL_PIECE);
                        let n = std::io::Read::read(&mut file, &mut target[..piece])?;
                        if n == 0 {
                            break;
                        }
                        if let Err(e) = reader.filled(n) {
                            return Ok(Err(e));
                        }
                    }
                    Ok(reader.finish())
                })
                .await?;
        }
        let path = self.path(name);
        self.retried("read", name, || async {
            let mut reader = reader();
            let mut stream = self.store.get(&path).await?.into_stream();
            while let Some(chunk) = stream.next().await {
                if let Err(e) = reader.push(&chunk?) {
                    return Ok(Err(e));
                }
            }
            Ok(reader.finish())
        })
        .await?
    }

    /// Whether files are written to a local folder, in one pass over their
    /// bytes with no retry (which a save may lend tensors to).
    pub(crate) fn writes_in_place(&self) -> bool {
        self.recycler.is_some() && self.local.is_some()
    }

    /// The local file of `name`, when the location is a local folder.
    fn local_file(&self, name: &str) -> Option<std::path::PathBuf> {
        self.local.as_ref().map(|root| root.join(name))
    }

    /// Runs `io` (blocking I/O on a local file) off the runtime's threads;
    /// its errors are reported as the store's would be.
    async fn local_io<T: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, CheckpointError> {
        let shown = self.shown(name);
        let result = tokio::task::spawn_blocking(io)
            .await
            .map_err(|e| CheckpointError::Runtime(format!("{op} {shown}: {e}")))?;
        result.map_err(|e| CheckpointError::Store {
            op,
            path: shown.clone(),
            attempts: 1,
            source: if e.kind() == std::io::ErrorKind::NotFound {
                object_store::Error::NotFound {
                    path: shown,
                    source: Box::new(e),
                }
            } else {
                object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                }
            },
        })
    }

    /// `name` if it exists.
    pub(crate) async fn get_if_exists(&self, name: &str) -> Result<Option<Bytes>, CheckpointError> {
        match self.get(name).await {
            Ok(b) => Ok(Some(b)),
            Err(CheckpointError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `name`; a missing file is not an error.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), CheckpointError> {
        let path = self.path(name);
        match self
            .retried("delete", name, || self.store.delete(&path))
            .await
        {
            Err(CheckpointError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Removes the step folders `folders` (their manifests already gone):
    /// in a local location their shard files go to the recycle bin for the
    /// next saves to write into, from a remote store they are deleted.
    pub(crate) async fn remove_folders(&self, folders: &[String]) -> Result<(), CheckpointError> {
        let Some(recycler) = &self.recycler else {
            for folder in folders {
                for file in self.files_under(folder).await? {
                    self.delete(&file).await?;
                }
            }
            return Ok(());
        };
        let mut files = Vec::new();
        for folder in folders {
            for file in self.files_under(folder).await? {
                files.extend(self.local_file(&file));
            }
        }
        let dirs: Vec<_> = folders.iter().filter_map(|f| self.local_file(f)).collect();
        let recycler = recycler.clone();
        self.local_io("recycle", RECYCLED_DIR, move || {
            recycler.keep(&files)?;
            for dir in dirs {
                // Whatever is left (a crashed write's staging file) goes too.
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }

    /// The names of the folders directly under the location.
    pub(crate) async fn folders(&self) -> Result<Vec<String>, CheckpointError> {
        let listed = self
            .retried("list", "", || {
                self.store.list_with_delimiter(Some(&self.base))
            })
            .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// The names (relative to the location) of every file under `folder`.
    pub(crate) async fn files_under(&self, folder: &str) -> Result<Vec<String>, CheckpointError> {
        let prefix = self.path(folder);
        let listed: Vec<_> = self
            .retried("list", folder, || {
                self.store.list(Some(&prefix)).try_collect::<Vec<_>>()
            })
            .await?;
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                m.location.prefix_match(&self.base).map(|parts| {
                    parts
                        .map(|p| p.as_ref().to_owned())
                        .collect::<Vec<_>>()
                        .join("/")
                })
            })
            .collect())
    }
}

/// A local folder as a store, created if missing.
fn local(path: &std::path::Path) -> Result<LocalFileSystem, String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    LocalFileSystem::new_with_prefix(path)
        // Deleting a checkpoint's last file removes its folder, as on an object store.
        .map(|s| s.with_automatic_cleanup(true))
        .map_err(|e| e.to_string())
}

/// Errors worth another attempt: the store did not answer, or answered
/// that it could not serve the request now. A missing file, a refused
/// permission, a bad path, a full disk, a path through a file stay as they
/// are whatever the number of attempts.
fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !is_permanent_io(e)
        && !matches!(
            e,
            E::NotFound { .. }
                | E::InvalidPath { .. }
                | E::NotSupported { .. }
                | E::AlreadyExists { .. }
                | E::Precondition { .. }
                | E::NotModified { .. }
                | E::NotImplemented { .. }
                | E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::UnknownConfigurationKey { .. }
        )
}

/// Whether `e` or an error under it is a file system out of space, over a
/// quota, or over its file-size limit (the local store wraps the
/// `std::io::Error` of the failed write).
pub(crate) fn is_out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    io_error_kind(e).is_some_and(|kind| {
        matches!(
            kind,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
        )
    })
}

/// Whether `e` is a local file system's answer that another attempt gets
/// again: out of space, a path through a file, a read-only file system, a
/// refused permission.
fn is_permanent_io(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    is_out_of_space(e)
        || io_error_kind(e).is_some_and(|kind| {
            matches!(
                kind,
                ErrorKind::NotADirectory
                    | ErrorKind::IsADirectory
                    | ErrorKind::ReadOnlyFilesystem
                    | ErrorKind::PermissionDenied
                    | ErrorKind::InvalidFilename
            )
        })
}

/// The kind of the first `std::io::Error` in `e`'s chain of sources.
fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        next = e.source();
    }
    None
}

/// The bytes `[start, start + len)` of the file made of `chunks`, without copying.
fn slice_chunks(chunks: &[Bytes], start: u64, len: u64) -> PutPayload {
    let end = start + len;
    let mut offset = 0u64;
    let mut out = Vec::new();
    for c in chunks {
        let (lo, hi) = (offset, offset + c.len() as u64);
        offset = hi;
        if hi <= start || lo >= end {
            continue;
        }
        let from = start.max(lo) - lo;
        let to = end.min(hi) - lo;
        out.push(c.slice(from as usize..to as usize));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for (failures, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            for noise in [0, 500_000, 1_000_000] {
                let b = p.backoff(failures, noise).as_millis() as u64;
                assert!(b >= full / 2 && b <= full, "{failures} {noise}: {b}");
            }
        }
        assert_eq!(p.backoff(3, 0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1_000_000), Duration::from_millis(400));
    }

    #[test]
    fn parts_cover_the_file_without_gaps() {
        let chunks = [
            Bytes::from_static(b"abc"),
            Bytes::from_static(b""),
            Bytes::from_static(b"defgh"),
            Bytes::from_static(b"ij"),
        ];
        let mut joined = Vec::new();
        for i in 0..4 {
            let part: Bytes = slice_chunks(&chunks, i * 3, 3).into();
            assert!(part.len() <= 3);
            joined.extend_from_slice(&part);
        }
        assert_eq!(joined, b"abcdefghij");
    }
}
