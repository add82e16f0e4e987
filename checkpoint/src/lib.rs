//! Checkpoints for samtrain in object storage (`file://`, `s3://`, `gs://`,
//! `az://` or a local path).
//!
//! Every rank calls [`Checkpointer::save`] at every checkpoint step. The
//! call copies the rank's tensors to CPU memory (the only time training
//! waits) and returns; a background thread of the [`Checkpointer`] uploads
//! them, retrying transient store errors with backoff. To a local folder,
//! [`Checkpointer::save_lending`] copies none of the large CPU tensors: the
//! upload reads them in place, and the trainer settles the [`Loan`] before
//! its next update, copying only what the upload has not read by then.
//!
//! The writer of each tensor-parallel rank uploads its shard (parameters and optimizer state as
//! safetensors, bit for bit) and a part record with sizes and checksums; the
//! writer of tp rank 0 also uploads the training state (`meta.json`), waits
//! for every rank's part record to appear in the store, and writes
//! `manifest.json` last: a checkpoint without its manifest does not exist,
//! so saving needs no collective between ranks. Then the oldest committed
//! checkpoints beyond the retention are deleted.
//!
//! [`Checkpointer::latest`] is the newest checkpoint whose files are all in
//! the store at the sizes its manifest records (their metadata, not their
//! bytes, are read); [`Checkpointer::load`] reads one tp rank's files
//! straight into its tensors, checking every checksum on the way, and
//! reshards them when the checkpoint was written at another tensor-parallel
//! size. [`Checkpointer::verify`] reads a checkpoint's every file. A failed
//! upload never fails training: it is logged and reported in the save's
//! [`SaveOutcome`], and the next save starts afresh.
//!
//! The methods block; they may be called from inside a tokio runtime (the
//! work then runs on a helper thread).

mod error;
pub mod format;
mod load;
mod loan;
mod read;
mod recycle;
mod save;
mod staging;
mod store;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

pub use error::CheckpointError;
pub use format::{FileEntry, Manifest, PartRecord, TensorEntry};
pub use loan::{Loan, Settled};
pub use store::RetryPolicy;

use save::Job;
use staging::StagingPool;
use store::Store;

/// Where checkpoints go and how they are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Base URL (`file:///...`, `s3://bucket/prefix`, `gs://...`, `az://...`) or a local path.
    pub url: String,
    /// Retention: the newest `keep` committed checkpoints stay; 0 keeps all.
    pub keep: usize,
    pub retry: RetryPolicy,
}

impl CheckpointOptions {
    /// `url`, keeping every checkpoint, with the default retries.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            keep: 0,
            retry: RetryPolicy::default(),
        }
    }
}

/// Settings most jobs leave at their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointTuning {
    /// Object-store settings applied over those of the environment, keyed as
    /// object_store names them (`aws_endpoint`, `aws_allow_http`,
    /// `google_service_account`, `azure_storage_account_name`...).
    pub store_options: Vec<(String, String)>,
    /// How long tp rank 0 waits for the other ranks' part records before it
    /// gives the checkpoint up.
    pub commit_timeout: Duration,
    /// How often it looks for them.
    pub poll_interval: Duration,
    /// Saves staged but not yet uploaded, at most: a further save waits for
    /// the oldest, so that uploads slower than the save interval cost time
    /// instead of unbounded memory.
    pub max_pending: usize,
}

impl Default for CheckpointTuning {
    fn default() -> Self {
        Self {
            store_options: Vec::new(),
            commit_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(500),
            max_pending: 2,
        }
    }
}

/// What one rank saves at one step.
///
/// Every rank calls [`Checkpointer::save`] for every checkpoint step; only
/// ranks with `writer == true` (dp rank 0 of each tp rank) upload, the
/// others return at once. `meta` must be the same on every rank of one
/// save (tp rank 0 stores it); an id of the run attempt in it (its start
/// time, say) keeps a save of a step that a crashed attempt had half
/// written from being paired with that attempt's files.
#[derive(Debug)]
pub struct ShardState {
    pub step: u64,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub writer: bool,
    /// Trainable parameters of this tp rank, named as in the model and
    /// split as [`samtrain_comm::shard_dim`] says.
    pub tensors: Vec<(String, Tensor)>,
    /// Optimizer state, named `<state>.<param>` (`exp_avg.<param>`...):
    /// split as `<param>` is. Other names are split as `shard_dim` says.
    pub optimizer: Vec<(String, Tensor)>,
    /// Sampler position, optimizer step, RNG state, job config...
    pub meta: serde_json::Value,
}

/// How one save ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveStatus {
    /// tp rank 0 wrote the manifest: the checkpoint exists.
    Committed,
    /// This rank's files are in the store; tp rank 0 commits the checkpoint.
    Uploaded,
    /// Not a writer: nothing to upload.
    Skipped,
    /// The save was given up (the message says why); training goes on.
    Failed(String),
    /// The store is out of space (or over a quota or file-size limit): the
    /// save was given up at once, not retried, and its files removed.
    OutOfSpace(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SaveOutcome {
    pub step: u64,
    pub tp_rank: u32,
    pub status: SaveStatus,
    /// Bytes this rank uploaded (or meant to).
    pub bytes: u64,
    /// Time training was blocked: while the tensors were copied, and
    /// while the loan of those lent was settled ([`Checkpointer::save_lending`]).
    pub staging: Duration,
    /// From the end of staging to the end of the upload (and commit).
    pub upload: Duration,
    /// Requests retried during the upload.
    pub retries: u32,
}

impl SaveOutcome {
    pub fn is_failed(&self) -> bool {
        matches!(
            self.status,
            SaveStatus::Failed(_) | SaveStatus::OutOfSpace(_)
        )
    }
}

/// Where a save's outcome lands when its upload ends.
#[derive(Default)]
struct Slot {
    outcome: Mutex<Option<SaveOutcome>>,
    done: Condvar,
}

impl Slot {
    fn set(&self, outcome: SaveOutcome) {
        *lock(&self.outcome) = Some(outcome);
        self.done.notify_all();
    }
}

/// A save in progress, returned by [`Checkpointer::save`] once staging is over.
#[derive(Clone)]
pub struct SaveTicket {
    step: u64,
    staging: Duration,
    /// Time spent settling the save's loan, in nanoseconds.
    settling: Arc<AtomicU64>,
    slot: Arc<Slot>,
}

impl SaveTicket {
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Time training was blocked: the call, and settling its loan so far.
    pub fn staging(&self) -> Duration {
        self.staging + Duration::from_nanos(self.settling.load(Ordering::Relaxed))
    }

    /// The outcome if the upload has ended.
    pub fn outcome(&self) -> Option<SaveOutcome> {
        lock(&self.slot.outcome).clone()
    }

    /// Waits for the upload to end.
    pub fn wait(&self) -> SaveOutcome {
        let mut guard = lock(&self.slot.outcome);
        loop {
            if let Some(o) = guard.as_ref() {
                return o.clone();
            }
            guard = self
                .slot
                .done
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A checkpoint that is committed (its manifest exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub step: u64,
    /// The step folder's URL.
    pub url: String,
    /// Tensor-parallel size it was written at.
    pub tp_size: u32,
    /// Size of all its files.
    pub bytes: u64,
    pub manifest: Manifest,
}

/// One tp rank's share of a checkpoint.
#[derive(Debug)]
pub struct LoadedState {
    pub step: u64,
    pub tensors: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub meta: serde_json::Value,
}

/// Saves in the queue and outcomes not yet collected by a flush.
#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
    changed: Condvar,
}

#[derive(Default)]
struct PendingState {
    queued: usize,
    finished: Vec<SaveOutcome>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind, still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared part of a [`Checkpointer`]: the store and the runtime that
/// drives its requests.
pub(crate) struct Inner {
    store: Store,
    options: CheckpointOptions,
    tuning: CheckpointTuning,
    runtime: Option<tokio::runtime::Runtime>,
    /// Steps whose files this process has read back and found whole, so
    /// the retention sweep verifies each checkpoint once, not every save.
    verified: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The files this process wrote as tp rank 0 (when retention keeps
    /// more than the newest), by name, with the version the store gave
    /// each right after: the retention's check reads none that is still
    /// at that version (`load::verify`).
    written: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Staging memory kept between saves.
    staging: Arc<StagingPool>,
}

impl Inner {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives until the Checkpointer is dropped")
    }

    /// Runs `f` to completion; from inside another runtime, on a helper
    /// thread, since a runtime cannot block on work within another.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.runtime().block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.runtime().block_on(f)
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime it is dropped within forbids.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Saves and loads the checkpoints under one location.
pub struct Checkpointer {
    inner: Arc<Inner>,
    jobs: Option<mpsc::Sender<(Job, Arc<Slot>)>>,
    worker: Option<JoinHandle<()>>,
    pending: Arc<Pending>,
}

impl Checkpointer {
    pub fn open(options: CheckpointOptions) -> Result<Self, CheckpointError> {
        Self::open_with(options, CheckpointTuning::default())
    }

    /// [`Checkpointer::open`] with settings beyond the usual ones. Opening
    /// sends no request to the store: an unreachable store shows in the
    /// first save's outcome or the first load.
    pub fn open_with(
        options: CheckpointOptions,
        tuning: CheckpointTuning,
    ) -> Result<Self, CheckpointError> {
        let store = Store::open(&options.url, &tuning.store_options, options.retry.clone())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("samtrain-checkpoint")
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Runtime(e.to_string()))?;
        let inner = Arc::new(Inner {
            store,
            options,
            tuning,
            runtime: Some(runtime),
            verified: Default::default(),
            written: Default::default(),
            staging: Default::default(),
        });
        let pending = Arc::new(Pending::default());
        let (jobs, queue) = mpsc::channel::<(Job, Arc<Slot>)>();
        let worker = {
            let inner = inner.clone();
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("samtrain-checkpoint-upload".into())
                .spawn(move || {
                    // One save at a time, in order: a rank's part for step s
                    // is in the store before it starts on any later step.
                    for (job, slot) in queue {
                        let outcome = save::run(&inner, job);
                        slot.set(outcome.clone());
                        let mut state = lock(&pending.state);
                        state.queued -= 1;
                        state.finished.push(outcome);
                        pending.changed.notify_all();
                    }
                })
                .map_err(|e| CheckpointError::Runtime(e.to_string()))?
        };
        Ok(Self {
            inner,
            jobs: Some(jobs),
            worker: Some(worker),
            pending,
        })
    }

    /// The base location, as given.
    pub fn url(&self) -> &str {
        &self.inner.options.url
    }

    /// Copies the tensors to CPU memory now (the only part that blocks
    /// training) and uploads them in the background; returns at once. An
    /// upload that fails is not an error here: it is logged and reported
    /// by the ticket and by [`Checkpointer::flush`]. Errors are for what no
    /// retry can mend: a rank outside the tp size, a tensor of a dtype
    /// safetensors has no name for.
    pub fn save(&self, state: ShardState) -> Result<SaveTicket, CheckpointError> {
        let (ticket, loan) = self.start_save(state, false)?;
        debug_assert_eq!(loan.bytes(), 0, "nothing lent");
        Ok(ticket)
    }

    /// As [`Checkpointer::save`], but to a local folder the large CPU
    /// tensors are not copied: the upload reads them where they are, and
    /// the caller settles the returned [`Loan`] before any of them changes
    /// (the next optimizer step), which copies only what the upload has
    /// not read yet. To other stores, and for GPU tensors, it copies as
    /// `save` does and lends nothing.
    pub fn save_lending(&self, state: ShardState) -> Result<(SaveTicket, Loan), CheckpointError> {
        self.start_save(state, self.inner.store.writes_in_place())
    }

    fn start_save(
        &self,
        state: ShardState,
        lend: bool,
    ) -> Result<(SaveTicket, Loan), CheckpointError> {
        if state.tp_size == 0 || state.tp_rank >= state.tp_size {
            return Err(CheckpointError::Rank {
                tp_rank: state.tp_rank,
                tp_size: state.tp_size,
            });
        }
        let start = Instant::now();
        let slot = Arc::new(Slot::default());
        if !state.writer {
            let outcome = SaveOutcome {
                step: state.step,
                tp_rank: state.tp_rank,
                status: SaveStatus::Skipped,
                bytes: 0,
                staging: Duration::ZERO,
                upload: Duration::ZERO,
                retries: 0,
            };
            slot.set(outcome.clone());
            lock(&self.pending.state).finished.push(outcome);
            return Ok((
                SaveTicket {
                    step: state.step,
                    staging: Duration::ZERO,
                    settling: Arc::default(),
                    slot,
                },
                Loan::none(),
            ));
        }
        let span = tracing::info_span!("checkpoint", step = state.step, tp_rank = state.tp_rank);
        self.wait_for_room();
        let staged = tracing::info_span!(parent: &span, "stage")
            .in_scope(|| Job::stage(state, &self.inner.staging, lend));
        let mut job = staged?;
        job.span = span;
        let staging = start.elapsed();
        let step = job.step;
        job.staging = staging;
        tracing::debug!(
            step,
            staging_ms = staging.as_millis() as u64,
            bytes = job.bytes(),
            "checkpoint staged"
        );
        let jobs = self
            .jobs
            .as_ref()
            .expect("the queue lives until the Checkpointer is dropped");
        lock(&self.pending.state).queued += 1;
        let settling = job.settling.clone();
        let loan = Loan::new(job.lent(), settling.clone());
        tracing::debug!(step, lent = loan.bytes(), "checkpoint lent");
        if jobs.send((job, slot.clone())).is_err() {
            lock(&self.pending.state).queued -= 1;
            return Err(CheckpointError::Runtime(
                "the upload thread has stopped".into(),
            ));
        }
        Ok((
            SaveTicket {
                step,
                staging,
                settling,
                slot,
            },
            loan,
        ))
    }

    fn wait_for_room(&self) {
        let max = self.inner.tuning.max_pending.max(1);
        let mut state = lock(&self.pending.state);
        if state.queued >= max {
            tracing::warn!(
                pending = state.queued,
                "checkpoint uploads are slower than the save interval; waiting for the oldest"
            );
        }
        while state.queued >= max {
            state = self
                .pending
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for every pending upload of this process; returns the outcomes
    /// of the saves since the last flush, oldest first.
    pub fn flush(&self) -> Result<Vec<SaveOutcome>, CheckpointError> {
        let mut state = lock(&self.pending.state);
        while state.queued > 0 {
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                return Err(CheckpointError::Runtime(
                    "the upload thread has stopped".into(),
                ));
            }
            state = self
                .pending
                .changed
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(std::mem::take(&mut state.finished))
    }

    /// Every committed checkpoint (manifest present and well-formed), oldest
    /// first. Files are not read: see [`Checkpointer::verify`].
    pub fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError> {
        self.inner.block_on(load::list(&self.inner.store))
    }

    /// Reads every file of `info` and checks its size and checksum against
    /// the manifest.
    pub fn verify(&self, info: &CheckpointInfo) -> Result<(), CheckpointError> {
        self.inner
            .block_on(load::verify(&self.inner.store, info, &Default::default()))
    }

    /// The newest checkpoint whose files are all in the store at the sizes
    /// its manifest records; others are skipped with a warning. Reads the
    /// files' metadata only: a file of the right size whose bytes changed
    /// is found by [`Checkpointer::load`] (a checksum error, after which
    /// [`Checkpointer::latest_before`] gives the one to fall back to) or by
    /// [`Checkpointer::verify`]. A store that cannot be reached is an
    /// error, not a reason to fall back to an older checkpoint.
    pub fn latest(&self) -> Result<Option<CheckpointInfo>, CheckpointError> {
        self.inner.block_on(load::latest(&self.inner.store, None))
    }

    /// As [`Checkpointer::latest`], among the checkpoints of steps below
    /// `step`: the one to fall back to when `step`'s does not decode.
    pub fn latest_before(&self, step: u64) -> Result<Option<CheckpointInfo>, CheckpointError> {
        self.inner
            .block_on(load::latest(&self.inner.store, Some(step)))
    }

    /// tp rank `tp_rank`'s tensors and optimizer state of `info` in CPU
    /// memory, in the order they were saved, resharded if the checkpoint
    /// was written at another tp size; checksums are checked on what is
    /// read.
    pub fn load(
        &self,
        info: &CheckpointInfo,
        tp_rank: u32,
        tp_size: u32,
    ) -> Result<LoadedState, CheckpointError> {
        self.load_onto(info, tp_rank, tp_size, tch::Device::Cpu)
    }

    /// As [`Checkpointer::load`], the tensors allocated on `device` and
    /// read straight into them: onto a GPU through a small page-locked
    /// buffer per file, with no whole copy in CPU memory.
    pub fn load_onto(
        &self,
        info: &CheckpointInfo,
        tp_rank: u32,
        tp_size: u32,
        device: tch::Device,
    ) -> Result<LoadedState, CheckpointError> {
        self.inner.block_on(load::load(
            &self.inner.store,
            info,
            tp_rank,
            tp_size,
            device,
        ))
    }
}

impl Drop for Checkpointer {
    /// Finishes the queued uploads first: a checkpoint that was staged is
    /// not thrown away because the trainer is exiting.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the checkpoint upload thread panicked");
            }
        }
    }
}

/// Runs `f` on the checkpointer's runtime; for the save thread.
pub(crate) fn run_blocking<F: Future>(inner: &Inner, f: F) -> F::Output {
    inner.runtime().block_on(f)
}
