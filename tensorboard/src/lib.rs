//! TensorBoard event files for samtrain: the training loop's scalars (loss,
//! learning rate, throughput) and text (sample predictions) written where
//! `tensorboard --logdir` can show them, in a local folder or an object
//! store.
//!
//! The training loop must never wait on a disk or a network, so a
//! [`TensorBoard`] only frames each event and hands it to a background
//! thread over a bounded channel; when the channel is full the event is
//! dropped and counted rather than stall a step. The thread owns the file
//! (see `sink` for how local files and objects are written out).
//!
//! The format is TensorFlow's: a file named `events.out.tfevents.*` (the
//! name TensorBoard looks for) holding length-prefixed, CRC-checked records
//! of `tensorflow.Event` protobufs (see `record`). Nothing of TensorFlow
//! is needed to write it.

mod record;
mod sink;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::sink::{Message, Sink};

/// How many events may wait for the writer thread before new ones are
/// dropped: minutes of logging at a few scalars per step.
const CHANNEL_CAPACITY: usize = 4096;

/// Environment variables whose names start with these configure the object
/// store, as for every other object-store location in samtrain.
const STORE_ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

/// Why TensorBoard events could not be written, naming where to.
#[derive(Debug, Error)]
pub enum TensorBoardError {
    /// The location is malformed or cannot be opened.
    #[error("TensorBoard location {location}: {message}")]
    Location { location: String, message: String },
    /// Writing the local file failed.
    #[error("writing TensorBoard events to {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    /// Putting the object failed.
    #[error("writing TensorBoard events to {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    /// The writer thread is gone (it panicked).
    #[error("the TensorBoard writer for {location} has stopped")]
    Stopped { location: String },
}

/// Where event files go: a local folder, or an object-store URL (s3://,
/// gs://, az://, file://).
pub struct TensorBoard {
    location: String,
    /// `None` once dropped, which tells the writer thread to finish.
    sender: Option<SyncSender<Message>>,
    thread: Option<JoinHandle<Result<(), TensorBoardError>>>,
    /// Events dropped because the writer thread was behind.
    dropped: AtomicU64,
}

impl TensorBoard {
    /// Opens the destination and starts the writer thread; errors (bad URL,
    /// folder not creatable) name the location. An object store is
    /// configured from the environment variables starting with `AWS_`,
    /// `GOOGLE_` or `AZURE_`.
    pub fn start(location: &str) -> Result<TensorBoard, TensorBoardError> {
        let options = std::env::vars().filter(|(key, _)| {
            STORE_ENV_PREFIXES
                .iter()
                .any(|prefix| key.starts_with(prefix))
        });
        Self::start_with_options(location, options)
    }

    /// [`TensorBoard::start`] with the object store's options given instead
    /// of read from the environment: pairs such as `("AWS_ENDPOINT", ...)`
    /// or `("aws_endpoint", ...)`, as object_store names them.
    pub fn start_with_options<I, K, V>(
        location: &str,
        options: I,
    ) -> Result<TensorBoard, TensorBoardError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let now = wall_time();
        let file_name = file_name(now as u64);
        let header = record::encode(&record::file_version(now));
        let (sender, receiver) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let (opened_tx, opened_rx) = mpsc::sync_channel(1);
        let owned_location = location.to_owned();
        // The destination is opened on the writer thread, which owns the
        // I/O runtime: opening it here would fail if the caller were itself
        // inside an async runtime.
        let thread = std::thread::Builder::new()
            .name("tensorboard".to_owned())
            .spawn(move || {
                let sink = match Sink::open(&owned_location, &file_name, options, header) {
                    Ok(sink) => sink,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let _ = opened_tx.send(Ok(sink.shown().to_owned()));
                sink.run(receiver)
            })
            .map_err(|e| TensorBoardError::Location {
                location: location.to_owned(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        let opened = opened_rx.recv().unwrap_or_else(|_| {
            Err(TensorBoardError::Stopped {
                location: location.to_owned(),
            })
        });
        match opened {
            Ok(shown) => {
                tracing::info!(file = %shown, "writing TensorBoard events");
                Ok(TensorBoard {
                    location: location.to_owned(),
                    sender: Some(sender),
                    thread: Some(thread),
                    dropped: AtomicU64::new(0),
                })
            }
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Logs `value` under `tag` (e.g. "train/loss") at `step`, as a float32.
    pub fn scalar(&self, tag: &str, step: u64, value: f64) {
        self.send(record::encode(&record::scalar(
            wall_time(),
            tag,
            step,
            value,
        )));
    }

    /// Logs `text` under `tag` at `step`, for TensorBoard's text tab (which
    /// renders it as Markdown).
    pub fn text(&self, tag: &str, step: u64, text: &str) {
        self.send(record::encode(&record::text(wall_time(), tag, step, text)));
    }

    /// Writes out everything sent so far and waits for it (used at the end
    /// of training and by tests).
    pub fn flush(&self) -> Result<(), TensorBoardError> {
        let stopped = || TensorBoardError::Stopped {
            location: self.location.clone(),
        };
        let sender = self.sender.as_ref().ok_or_else(stopped)?;
        let (reply, done) = mpsc::sync_channel(1);
        sender.send(Message::Flush(reply)).map_err(|_| stopped())?;
        done.recv().map_err(|_| stopped())?
    }

    fn send(&self, record: Vec<u8>) {
        let Some(sender) = &self.sender else { return };
        let why = match sender.try_send(Message::Record(record)) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "the writer is behind",
            Err(TrySendError::Disconnected(_)) => "the writer has stopped",
        };
        if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                location = %self.location,
                "dropping TensorBoard events: {why}; training goes on"
            );
        }
    }
}

impl Drop for TensorBoard {
    /// Writes out what is left and stops the writer thread; a failure is
    /// logged, since a run must not fail for its charts.
    fn drop(&mut self) {
        // Closing the channel is the writer thread's signal to finish.
        self.sender = None;
        let dropped = *self.dropped.get_mut();
        if dropped > 0 {
            tracing::warn!(location = %self.location, dropped, "TensorBoard events were dropped");
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => tracing::warn!(location = %self.location, "the TensorBoard writer panicked"),
        }
    }
}

/// Seconds since the Unix epoch, as events carry them.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `events.out.tfevents.<seconds>.<host>.<pid>.samtrain`, as TensorFlow
/// names them (TensorBoard reads only files with "tfevents" in the name,
/// and the seconds first make them sort by time). A second writer started by
/// this process gets `.samtrain.<n>` so that two started in the same second
/// do not write to the same file (and still sort in the order started).
fn file_name(seconds: u64) -> String {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let suffix = if n == 0 {
        String::new()
    } else {
        format!(".{n}")
    };
    format!(
        "events.out.tfevents.{seconds}.{}.{}.samtrain{suffix}",
        host_name(),
        std::process::id()
    )
}

/// This machine's name, or "localhost" where the kernel does not say.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_event_files_and_differ_within_a_process() {
        let first = file_name(1_700_000_000);
        let second = file_name(1_700_000_000);
        for name in [&first, &second] {
            assert!(
                name.starts_with("events.out.tfevents.1700000000."),
                "{name}"
            );
            assert!(
                name.contains(&format!(".{}.samtrain", std::process::id())),
                "{name}"
            );
            assert!(!name.contains('/'), "{name}");
        }
        assert_ne!(first, second);
    }

    /// A writer whose thread never reads: its channel holds `capacity`.
    fn stalled(capacity: usize) -> (TensorBoard, mpsc::Receiver<Message>) {
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let tb = TensorBoard {
            location: "stalled".to_owned(),
            sender: Some(sender),
            thread: None,
            dropped: AtomicU64::new(0),
        };
        (tb, receiver)
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (tb, receiver) = stalled(3);
        for step in 0..10 {
            tb.scalar("train/loss", step, 1.0);
        }
        tb.text("eval/examples", 10, "hello");
        assert_eq!(tb.dropped.load(Ordering::Relaxed), 8);
        let kept: Vec<Vec<u8>> = receiver
            .try_iter()
            .map(|m| match m {
                Message::Record(r) => r,
                Message::Flush(_) => panic!("no flush was asked"),
            })
            .collect();
        // The first three, in order.
        let steps: Vec<i64> = kept
            .iter()
            .map(|r| {
                <record::Event as prost::Message>::decode(&r[12..r.len() - 4])
                    .unwrap()
                    .step
            })
            .collect();
        assert_eq!(steps, [0, 1, 2]);
    }

    #[test]
    fn a_stopped_writer_drops_events_and_fails_flush() {
        let (tb, receiver) = stalled(3);
        drop(receiver);
        tb.scalar("train/loss", 1, 1.0);
        assert_eq!(tb.dropped.load(Ordering::Relaxed), 1);
        let error = tb.flush().unwrap_err();
        assert!(
            matches!(error, TensorBoardError::Stopped { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("stalled"), "{error}");
    }
}
