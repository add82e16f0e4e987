//! Where an event file's bytes go, and the writer thread's loop that puts
//! them there on a schedule, so that the training loop only ever hands a
//! record to a channel.
//!
//! A local file is appended to and flushed to the OS at least every
//! [`LOCAL_PERIOD`]. An object store cannot append, so the whole file is
//! kept in memory and put again under the same key, at most every
//! [`OBJECT_PERIOD`] when something new arrived: a run's scalars come to a
//! few MB, and a whole object is always a readable event file, whereas a
//! multipart upload is not visible until it completes. The memory is bounded
//! by [`OBJECT_LIMIT`]; past it, new records are dropped with a warning.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::TensorBoardError;

/// How long appended records may wait in the process before the OS has them.
pub(crate) const LOCAL_PERIOD: Duration = Duration::from_secs(2);
/// The shortest time between two puts of the object.
pub(crate) const OBJECT_PERIOD: Duration = Duration::from_secs(10);
/// The most an object's bytes may take in memory.
pub(crate) const OBJECT_LIMIT: usize = 64 << 20;

/// What the training thread sends the writer thread.
pub(crate) enum Message {
    /// A framed record to append.
    Record(Vec<u8>),
    /// Write out everything received so far, then answer.
    Flush(SyncSender<Result<(), TensorBoardError>>),
}

/// An open event file.
pub(crate) struct Sink {
    /// The location as the user gave it, for errors and logs.
    location: String,
    /// Where the file is, as shown in logs.
    shown: String,
    dest: Dest,
    period: Duration,
    /// Whether records arrived since the last write-out.
    dirty: bool,
    last_sync: Instant,
    /// Whether the last periodic write-out failed (to warn once per outage).
    failing: bool,
}

enum Dest {
    Local(BufWriter<File>),
    Object(ObjectFile),
}

/// An event file in an object store: its bytes so far, put whole each time.
pub(crate) struct ObjectFile {
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    key: StorePath,
    /// The bytes already put once, in the pieces they arrived in between
    /// puts: a put sends them again without copying them.
    sent: Vec<Bytes>,
    /// Records since the last put.
    pending: Vec<u8>,
    size: usize,
    limit: usize,
    dropped: u64,
}

impl Sink {
    /// Opens `location` (a local folder, `file://`, or an object-store URL)
    /// and writes `header`, the file's first record, there at once: a wrong
    /// folder, bucket or credential fails here, not at the end of the run.
    /// `options` configure the object store (`AWS_ENDPOINT`,
    /// `aws_access_key_id`, ...).
    pub(crate) fn open(
        location: &str,
        file_name: &str,
        options: Vec<(String, String)>,
        header: Vec<u8>,
    ) -> Result<Sink, TensorBoardError> {
        let fail = |message: String| TensorBoardError::Location {
            location: location.to_owned(),
            message,
        };
        let local_dir = if location.starts_with("file://") {
            let url = Url::parse(location).map_err(|e| fail(e.to_string()))?;
            Some(
                url.to_file_path()
                    .map_err(|()| fail("not a local path".to_owned()))?,
            )
        } else if location.contains("://") {
            None
        } else {
            Some(PathBuf::from(location))
        };
        let (dest, shown, period) = match local_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| fail(format!("cannot create the folder: {e}")))?;
                let path = dir.join(file_name);
                let file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| fail(format!("cannot create {}: {e}", path.display())))?;
                let mut file = BufWriter::new(file);
                file.write_all(&header)
                    .and_then(|()| file.flush())
                    .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
                (Dest::Local(file), path.display().to_string(), LOCAL_PERIOD)
            }
            None => {
                let url = Url::parse(location).map_err(|e| fail(e.to_string()))?;
                let (store, prefix) =
                    object_store::parse_url_opts(&url, options).map_err(|e| fail(e.to_string()))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| fail(format!("cannot start an I/O runtime: {e}")))?;
                let key = prefix.clone().join(file_name);
                let shown = format!("{}/{file_name}", location.trim_end_matches('/'));
                let mut object = ObjectFile::new(runtime, Arc::from(store), key, OBJECT_LIMIT);
                object.append(&header);
                // A store that does not answer now may later: retriable,
                // unlike a malformed location.
                object.put().map_err(|source| TensorBoardError::Store {
                    location: location.to_owned(),
                    source,
                })?;
                (Dest::Object(object), shown, OBJECT_PERIOD)
            }
        };
        Ok(Sink {
            location: location.to_owned(),
            shown,
            dest,
            period,
            dirty: false,
            last_sync: Instant::now(),
            failing: false,
        })
    }

    /// Where the file is, for logs.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    fn append(&mut self, record: &[u8]) {
        let result = match &mut self.dest {
            Dest::Local(file) => file.write_all(record),
            Dest::Object(object) => {
                object.append(record);
                Ok(())
            }
        };
        self.dirty = true;
        if let Err(e) = result {
            let error = self.io_error(e);
            self.warn_failing(&error);
        }
    }

    /// Writes out what arrived since the last time.
    fn sync(&mut self) -> Result<(), TensorBoardError> {
        self.last_sync = Instant::now();
        self.dirty = false;
        let result = match &mut self.dest {
            Dest::Local(file) => file.flush().map_err(|e| self.io_error(e)),
            Dest::Object(object) => object.put().map_err(|source| TensorBoardError::Store {
                location: self.location.clone(),
                source,
            }),
        };
        if result.is_err() {
            // What failed is written out again next time: a local file keeps
            // the unwritten bytes in its buffer, an object is put whole.
            self.dirty = true;
        } else if self.failing {
            self.failing = false;
            tracing::info!(file = %self.shown, "writing TensorBoard events works again");
        }
        result
    }

    fn io_error(&self, source: std::io::Error) -> TensorBoardError {
        TensorBoardError::Io {
            location: self.location.clone(),
            source,
        }
    }

    fn warn_failing(&mut self, error: &TensorBoardError) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(file = %self.shown, "{error}; retrying");
        }
    }

    /// When the next periodic write-out is due, if anything waits for one.
    fn due(&self) -> Option<Instant> {
        self.dirty.then(|| self.last_sync + self.period)
    }

    /// The writer thread: appends records as they come, writes them out when
    /// due and when asked, and once more when the sender goes away.
    pub(crate) fn run(mut self, receiver: Receiver<Message>) -> Result<(), TensorBoardError> {
        loop {
            let message = match self.due() {
                Some(due) => {
                    match receiver.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(message) => Some(message),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match receiver.recv() {
                    Ok(message) => Some(message),
                    Err(_) => break,
                },
            };
            match message {
                Some(Message::Record(record)) => self.append(&record),
                Some(Message::Flush(reply)) => {
                    let result = self.sync();
                    // The caller may have given up waiting; nothing to do.
                    let _ = reply.send(result);
                    continue;
                }
                None => {}
            }
            if self.due().is_some_and(|due| Instant::now() >= due) {
                if let Err(e) = self.sync() {
                    self.warn_failing(&e);
                }
            }
        }
        if let Dest::Object(object) = &self.dest {
            if object.dropped > 0 {
                tracing::warn!(
                    file = %self.shown,
                    records = object.dropped,
                    "TensorBoard records left out: the event file reached its memory limit"
                );
            }
        }
        self.sync()
    }
}

impl ObjectFile {
    pub(crate) fn new(
        runtime: tokio::runtime::Runtime,
        store: Arc<dyn ObjectStore>,
        key: StorePath,
        limit: usize,
    ) -> ObjectFile {
        ObjectFile {
            runtime,
            store,
            key,
            sent: Vec::new(),
            pending: Vec::new(),
            size: 0,
            limit,
            dropped: 0,
        }
    }

    /// Keeps `record` for the next put, or drops it (warning the first time)
    /// when it would take the file past its limit: a truncated file is still
    /// a readable one, and memory stays bounded however long the run.
    pub(crate) fn append(&mut self, record: &[u8]) {
        if self.size + record.len() > self.limit {
            if self.dropped == 0 {
                tracing::warn!(
                    key = %self.key,
                    limit = self.limit,
                    "the TensorBoard event file reached its memory limit; further records are left out"
                );
            }
            self.dropped += 1;
            return;
        }
        self.pending.extend_from_slice(record);
        self.size += record.len();
    }

    /// Puts the whole file so far under its key.
    pub(crate) fn put(&mut self) -> Result<(), object_store::Error> {
        if !self.pending.is_empty() {
            self.sent
                .push(Bytes::from(std::mem::take(&mut self.pending)));
        }
        let payload: PutPayload = self.sent.iter().cloned().collect();
        let (store, key) = (&self.store, &self.key);
        self.runtime.block_on(store.put(key, payload))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn object(limit: usize) -> (ObjectFile, Arc<InMemory>) {
        let store = Arc::new(InMemory::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let file = ObjectFile::new(runtime, store.clone(), StorePath::from("tb/events"), limit);
        (file, store)
    }

    fn stored(store: &InMemory) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let object = store.get(&StorePath::from("tb/events")).await.unwrap();
            object.bytes().await.unwrap().to_vec()
        })
    }

    #[test]
    fn each_put_writes_the_whole_file_so_far() {
        let (mut file, store) = object(1 << 20);
        file.append(b"one ");
        file.put().unwrap();
        assert_eq!(stored(&store), b"one ");
        file.append(b"two ");
        file.append(b"three");
        file.put().unwrap();
        assert_eq!(stored(&store), b"one two three");
        // A put with nothing new is the same file again.
        file.put().unwrap();
        assert_eq!(stored(&store), b"one two three");
        assert_eq!(file.sent.len(), 2, "one piece per put, not per record");
    }

    #[test]
    fn records_past_the_limit_are_left_out_whole() {
        let (mut file, store) = object(10);
        file.append(b"1234");
        file.append(b"5678");
        file.append(b"abc"); // 11 bytes: over
        file.append(b"xy"); // exactly 10: fits
        file.append(b"z");
        file.put().unwrap();
        assert_eq!(stored(&store), b"12345678xy");
        assert_eq!(file.dropped, 2);
        assert_eq!(file.size, 10);
    }
}
