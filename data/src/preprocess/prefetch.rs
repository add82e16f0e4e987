//! Batches built on background threads ahead of the training step and handed
//! out in sampler order.
//!
//! Workers take the sampler's next step under a lock (so steps are numbered
//! in order), build the batch without it, and send it back; the consumer puts
//! early arrivals aside until their turn. At most `depth` batches are taken
//! beyond the last one the consumer received, which bounds memory however
//! uneven the workers are. A failed batch arrives as an `Err` in its turn and
//! the loader goes on with the next step; a panic inside preprocessing is
//! caught and arrives the same way. Dropping the [`Loader`] stops and joins
//! the threads.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::{Batch, PreprocessError, Preprocessor, Visit};
use crate::mmlink::Record;
use crate::sampler::{Position, Sampler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Preprocessing threads.
    pub workers: usize,
    /// Batches that may be prepared ahead of the consumer.
    pub depth: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            workers: 2,
            depth: 4,
        }
    }
}

/// One step of this rank, as the loader delivers it.
#[derive(Debug)]
pub struct Fetched {
    pub epoch: u64,
    /// The dataset indices of the batch's samples.
    pub indices: Vec<usize>,
    /// The sampler position after this step: save it once the step is trained.
    pub position_after: Position,
    pub batch: Result<Batch, PreprocessError>,
}

struct State {
    sampler: Sampler,
    /// Steps handed to workers so far.
    issued: u64,
    /// Steps received by the consumer so far.
    delivered: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    depth: u64,
}

impl Shared {
    // A worker that panicked while holding the lock leaves the state intact
    // (it only counts steps), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// This rank's batches, in sampler order, built in the background.
pub struct Loader {
    shared: Arc<Shared>,
    results: Option<Receiver<(u64, Fetched)>>,
    threads: Vec<JoinHandle<()>>,
    /// Batches that arrived before their turn.
    early: BTreeMap<u64, Fetched>,
    next: u64,
}

impl Loader {
    /// Starts the workers at the sampler's current position.
    pub fn spawn(
        preprocessor: Arc<Preprocessor>,
        records: Arc<[Record]>,
        sampler: Sampler,
        config: LoaderConfig,
    ) -> Result<Self, PreprocessError> {
        if config.workers == 0 {
            return Err(PreprocessError::Config {
                setting: "loader.workers",
                message: "must be at least 1".into(),
            });
        }
        if config.depth == 0 {
            return Err(PreprocessError::Config {
                setting: "loader.depth",
                message: "must be at least 1".into(),
            });
        }
        let sampled = sampler.config().num_samples;
        if sampled != records.len() as u64 {
            return Err(PreprocessError::DatasetSize {
                sampler: sampled,
                records: records.len(),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sampler,
                issued: 0,
                delivered: 0,
                stop: false,
            }),
            changed: Condvar::new(),
            depth: config.depth as u64,
        });
        let (tx, rx) = channel();
        let threads = (0..config.workers)
            .map(|w| {
                let (shared, pre, records, tx) = (
                    shared.clone(),
                    preprocessor.clone(),
                    records.clone(),
                    tx.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("samtrain-prefetch-{w}"))
                    .spawn(move || work(&shared, &pre, &records, &tx))
                    .map_err(|e| PreprocessError::Config {
                        setting: "loader.workers",
                        message: format!("cannot start a preprocessing thread: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>();
        let mut loader = Loader {
            shared,
            results: Some(rx),
            threads: Vec::new(),
            early: BTreeMap::new(),
            next: 0,
        };
        // On a failed spawn, dropping `loader` stops the threads started.
        loader.threads = threads?;
        tracing::debug!(
            workers = config.workers,
            depth = config.depth,
            "prefetch started"
        );
        Ok(loader)
    }
}

fn work(shared: &Shared, pre: &Preprocessor, records: &[Record], tx: &Sender<(u64, Fetched)>) {
    loop {
        let (seq, step) = {
            let mut state = shared.lock();
            while !state.stop && state.issued >= state.delivered + shared.depth {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stop {
                return;
            }
            let step = state.sampler.next_step();
            state.issued += 1;
            (state.issued - 1, step)
        };
        let batch = catch_unwind(AssertUnwindSafe(|| {
            pre.batch(step.indices.iter().map(|&i| {
                let visit = Visit {
                    epoch: step.epoch,
                    sample: i as u64,
                };
                (&records[i], Some(visit))
            }))
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PreprocessError::WorkerPanic {
                indices: step.indices.clone(),
                message,
            })
        });
        if let Err(e) = &batch {
            tracing::debug!(seq, error = %e, "prefetch: batch failed");
        }
        let loaded = Fetched {
            epoch: step.epoch,
            indices: step.indices,
            position_after: step.position_after,
            batch,
        };
        if tx.send((seq, loaded)).is_err() {
            // The loader is gone.
            return;
        }
    }
}

impl Iterator for Loader {
    type Item = Fetched;

    /// The next step in sampler order; blocks until it is built. `None` only
    /// if every worker has stopped, which a live loader never does.
    fn next(&mut self) -> Option<Fetched> {
        loop {
            if let Some(loaded) = self.early.remove(&self.next) {
                self.next += 1;
                self.shared.lock().delivered = self.next;
                self.shared.changed.notify_all();
                return Some(loaded);
            }
            let (seq, loaded) = self.results.as_ref()?.recv().ok()?;
            self.early.insert(seq, loaded);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        // Closing the channel makes a worker that is sending stop too.
        self.results = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!("prefetch: a worker thread ended in a panic");
            }
        }
        tracing::debug!("prefetch stopped");
    }
}
