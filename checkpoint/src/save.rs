//! Saving: staging a rank's tensors, then (on the upload thread) writing its
//! shard and part record, and on tp rank 0 the training state, the manifest
//! once every rank's part is in the store, and the retention sweep.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use samtrain_comm::shard_dim;

use crate::error::CheckpointError;
use crate::format::{
    self, checksum, crc_hex, encode, optimizer_file, params_file, part_file, step_folder, Encoded,
    FileEntry, Manifest, PartRecord, FORMAT, MANIFEST_FILE, META_FILE,
};
use crate::loan::Lent;
use crate::staging::{stage_all, Data, Staged, StagingPool};
use crate::{load, lock, run_blocking, CheckpointInfo, Inner, SaveOutcome, SaveStatus, ShardState};

/// A staged save, waiting for the upload thread.
pub(crate) struct Job {
    pub step: u64,
    tp_rank: u32,
    tp_size: u32,
    params: Vec<Staged>,
    optimizer: Vec<Staged>,
    meta: Bytes,
    pub staging: Duration,
    /// Time the trainer spent settling this save's loan (nanoseconds), part
    /// of what the save blocked.
    pub settling: Arc<AtomicU64>,
    /// The save's span, from the call to the commit (a trace shows the
    /// upload under the step that asked for it).
    pub span: tracing::Span,
}

impl Job {
    /// Copies the tensors of `state` into memory of `pool` (the part of a
    /// save training waits for); with `lend`, lends those it can instead
    /// ([`stage_all`]).
    pub fn stage(
        state: ShardState,
        pool: &Arc<StagingPool>,
        lend: bool,
    ) -> Result<Self, CheckpointError> {
        let dims: HashMap<&str, Option<i64>> = state
            .tensors
            .iter()
            .map(|(n, _)| (n.as_str(), shard_dim(n)))
            .collect();
        let params: Vec<_> = state
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t, dims[n.as_str()]))
            .collect();
        let optimizer: Vec<_> = state
            .optimizer
            .iter()
            .map(|(n, t)| (n.as_str(), t, optimizer_dim(n, &dims)))
            .collect();
        let mut staged = stage_all(pool, &[params, optimizer].concat(), lend)?;
        let optimizer = staged.split_off(state.tensors.len());
        let params = staged;
        let meta = serde_json::to_vec_pretty(&state.meta).expect("a JSON value serialises");
        Ok(Self {
            step: state.step,
            tp_rank: state.tp_rank,
            tp_size: state.tp_size,
            params,
            optimizer,
            meta: Bytes::from(meta),
            staging: Duration::ZERO,
            settling: Arc::default(),
            span: tracing::Span::none(),
        })
    }

    /// The tensors read in the trainer's memory.
    pub fn lent(&self) -> Vec<Arc<Lent>> {
        self.params
            .iter()
            .chain(&self.optimizer)
            .filter_map(|s| match &s.data {
                Data::Lent(l) => Some(l.clone()),
                Data::Owned(_) => None,
            })
            .collect()
    }

    /// Bytes of tensor data staged.
    pub fn bytes(&self) -> u64 {
        self.params
            .iter()
            .chain(&self.optimizer)
            .map(|s| s.data.len() as u64)
            .sum()
    }
}

/// The split of optimizer state `name`: that of the parameter it ends with
/// (`exp_avg.<param>`), or else what `shard_dim` says of the name itself.
fn optimizer_dim(name: &str, params: &HashMap<&str, Option<i64>>) -> Option<i64> {
    name.match_indices('.')
        .find_map(|(i, _)| params.get(&name[i + 1..]).copied())
        .unwrap_or_else(|| shard_dim(name))
}

/// Uploads `job` and reports how it went; never panics, never fails.
pub(crate) fn run(inner: &Inner, job: Job) -> SaveOutcome {
    let start = Instant::now();
    let retries_before = inner.store.retries();
    let (step, tp_rank) = (job.step, job.tp_rank);
    let (staged, settling) = (job.staging, job.settling.clone());
    let bytes = job.bytes();
    let _upload = tracing::info_span!(parent: &job.span, "upload", bytes).entered();
    let written = files_of(&job);
    let result =
        std::panic::catch_unwind(AssertUnwindSafe(|| run_blocking(inner, upload(inner, job))))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(CheckpointError::Runtime(format!(
                    "upload panicked: {message}"
                )))
            });
    let upload = start.elapsed();
    // A loan settled while the upload ran blocked training too.
    let staging = staged + Duration::from_nanos(settling.load(Ordering::Relaxed));
    let status = match result {
        Ok(status) => {
            tracing::info!(step, tp_rank, bytes, upload_ms = upload.as_millis() as u64, status = ?status, "checkpoint saved");
            status
        }
        Err(e) => {
            tracing::error!(step, tp_rank, error = %e, "checkpoint save failed; training goes on");
            remove_partial(inner, step, &written);
            if e.is_out_of_space() {
                SaveStatus::OutOfSpace(e.to_string())
            } else {
                SaveStatus::Failed(e.to_string())
            }
        }
    };
    SaveOutcome {
        step,
        tp_rank,
        status,
        bytes,
        staging,
        upload,
        retries: inner.store.retries() - retries_before,
    }
}

/// The files a save of `job` writes in its step folder (the manifest aside).
fn files_of(job: &Job) -> Vec<String> {
    let mut files = vec![
        params_file(job.tp_rank, job.tp_size),
        optimizer_file(job.tp_rank, job.tp_size),
        part_file(job.tp_rank, job.tp_size),
    ];
    if job.tp_rank == 0 {
        files.push(META_FILE.into());
    }
    files
}

/// Removes what a failed save of this rank wrote: the checkpoint was not
/// committed (the manifest is written last and was removed first), and a
/// full disk must not stay full of a save that will never count.
fn remove_partial(inner: &Inner, step: u64, files: &[String]) {
    let folder = step_folder(step);
    let removed = run_blocking(inner, async {
        let mut removed = 0;
        for name in files {
            match inner.store.delete(&format!("{folder}/{name}")).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(step, file = %name, error = %e, "could not remove a failed save's file")
                }
            }
        }
        removed
    });
    tracing::info!(step, url = %inner.store.shown(&folder), removed, "a failed save's files removed");
}

async fn upload(inner: &Inner, job: Job) -> Result<SaveStatus, CheckpointError> {
    let store = &inner.store;
    let folder = step_folder(job.step);
    let at = |name: &str| format!("{folder}/{name}");
    if job.tp_rank == 0 {
        // A manifest left by an earlier attempt at this step would commit
        // files this save is about to replace.
        store.delete(&at(MANIFEST_FILE)).await?;
    }
    let params = encode(&job.params);
    let optimizer = encode(&job.optimizer);
    let (params_name, optimizer_name) = (
        params_file(job.tp_rank, job.tp_size),
        optimizer_file(job.tp_rank, job.tp_size),
    );
    let (params_at, optimizer_at) = (at(&params_name), at(&optimizer_name));
    let (meta_size, meta_crc) = checksum(std::slice::from_ref(&job.meta));
    let meta = FileEntry {
        name: META_FILE.into(),
        size: meta_size,
        crc32: crc_hex(meta_crc),
    };
    // The tensor files' checksums are complete once they are written: the
    // writer checksums what staging left to it.
    let (params_crc, optimizer_crc, ()) = futures::try_join!(
        store.put_encoded(&params_at, &params),
        store.put_encoded(&optimizer_at, &optimizer),
        async {
            if job.tp_rank == 0 {
                store
                    .put(&at(META_FILE), std::slice::from_ref(&job.meta))
                    .await
            } else {
                Ok(())
            }
        }
    )?;
    let entry = |name: String, file: &Encoded, crc: u32| FileEntry {
        name,
        size: file.size,
        crc32: crc_hex(crc),
    };
    let files = vec![
        entry(params_name, &params, params_crc),
        entry(optimizer_name, &optimizer, optimizer_crc),
    ];
    // The retention of a later save checks this checkpoint when it keeps
    // more than the newest: these files' versions spare it reading them.
    if job.tp_rank == 0 && inner.options.keep > 1 {
        for name in [&params_at, &optimizer_at, &at(META_FILE)] {
            let (_, version) = store.version(name).await?;
            lock(&inner.written).insert(name.clone(), version);
        }
    }
    let part = PartRecord {
        format: FORMAT.into(),
        step: job.step,
        tp_rank: job.tp_rank,
        tp_size: job.tp_size,
        meta_crc32: meta.crc32.clone(),
        files,
        params: job.params.iter().map(|s| s.entry.clone()).collect(),
        optimizer: job.optimizer.iter().map(|s| s.entry.clone()).collect(),
    };
    // The staged tensors are in the store: their memory goes back to the
    // staging pool.
    drop((params, optimizer));
    drop(job.params);
    drop(job.optimizer);
    let record = serde_json::to_vec_pretty(&part).expect("a part record serialises");
    store
        .put(
            &at(&part_file(part.tp_rank, part.tp_size)),
            &[Bytes::from(record)],
        )
        .await?;
    if part.tp_rank != 0 {
        return Ok(SaveStatus::Uploaded);
    }

    let shards = gather_parts(inner, &part).await?;
    let manifest = Manifest {
        format: FORMAT.into(),
        step: part.step,
        tp_size: part.tp_size,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        meta,
        shards,
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    store.put(&at(MANIFEST_FILE), &[Bytes::from(bytes)]).await?;
    tracing::info!(step = part.step, url = %store.shown(&folder), "checkpoint committed");
    if let Err(e) = retain(inner, part.step).await {
        tracing::warn!(error = %e, "checkpoint retention failed; old checkpoints stay for now");
    }
    Ok(SaveStatus::Committed)
}

/// Every rank's part record for this save, once all are in the store.
async fn gather_parts(inner: &Inner, own: &PartRecord) -> Result<Vec<PartRecord>, CheckpointError> {
    let store = &inner.store;
    let folder = step_folder(own.step);
    let deadline = Instant::now() + inner.tuning.commit_timeout;
    let mut parts: Vec<Option<PartRecord>> = (0..own.tp_size).map(|_| None).collect();
    parts[0] = Some(own.clone());
    loop {
        for (rank, slot) in parts.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let name = format!("{folder}/{}", part_file(rank as u32, own.tp_size));
            match store.get_if_exists(&name).await {
                Ok(Some(bytes)) => match serde_json::from_slice::<PartRecord>(&bytes) {
                    Ok(p)
                        if p.step == own.step
                            && p.tp_rank == rank as u32
                            && p.meta_crc32 == own.meta_crc32 =>
                    {
                        *slot = Some(p)
                    }
                    Ok(_) => {
                        tracing::debug!(file = %store.shown(&name), "part record of another save; waiting")
                    }
                    Err(e) => {
                        tracing::debug!(file = %store.shown(&name), error = %e, "part record unreadable; waiting")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(file = %store.shown(&name), error = %e, "part record not readable yet")
                }
            }
        }
        if parts.iter().all(Option::is_some) {
            return Ok(parts.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is_none())
                .map(|(i, _)| i)
                .collect();
            return Err(CheckpointError::Layout {
                step: own.step,
                message: format!(
                    "the parts of tp ranks {missing:?} did not appear within {:?}; not committed",
                    inner.tuning.commit_timeout
                ),
            });
        }
        tokio::time::sleep(inner.tuning.poll_interval).await;
    }
}

/// Deletes the committed checkpoints beyond the newest `keep` (0: none)
/// that verify, and the uncommitted step folders older than the one just
/// written (saves that never completed). Only checkpoints whose files match
/// their manifest count towards `keep`: a damaged one is not counted (it is
/// skipped at resume), so damage can never push a good checkpoint, or the
/// one just written (`newest`), out of the retention. Once `keep` are
/// counted, the older ones go without being read, damaged or not: with
/// `keep = 1` a save reads nothing back.
async fn retain(inner: &Inner, newest: u64) -> Result<(), CheckpointError> {
    let store = &inner.store;
    let keep = inner.options.keep;
    let committed = load::list(store).await?;
    let mut doomed: Vec<u64> = Vec::new();
    if keep > 0 {
        let mut kept = 0;
        for info in committed.iter().rev() {
            if kept == keep {
                doomed.push(info.step);
            } else if info.step == newest || verified(inner, info).await? {
                kept += 1;
            }
        }
    }
    for folder in store.folders().await? {
        if let Some(step) = format::parse_step(&folder) {
            if step < newest && !committed.iter().any(|c| c.step == step) {
                doomed.push(step);
            }
        }
    }
    lock(&inner.written).retain(|name, _| {
        !doomed
            .iter()
            .any(|&step| name.starts_with(&format!("{}/", step_folder(step))))
    });
    let mut folders = Vec::new();
    for step in doomed {
        let folder = step_folder(step);
        // The manifests go first: from then on the checkpoint does not
        // exist, whatever happens to the removal of its other files.
        store.delete(&format!("{folder}/{MANIFEST_FILE}")).await?;
        inner.verified.lock().expect("verified lock").remove(&step);
        tracing::info!(step, url = %store.shown(&folder), "old checkpoint deleted");
        folders.push(folder);
    }
    // Their files are deleted, or in a local folder kept for the next
    // saves to write into.
    store.remove_folders(&folders).await
}

/// Whether `info`'s files match its manifest (checked once per process,
/// reading only the files this process did not write or that changed
/// since); a store that cannot be reached is an error, so nothing is
/// deleted on a guess.
async fn verified(inner: &Inner, info: &CheckpointInfo) -> Result<bool, CheckpointError> {
    if inner
        .verified
        .lock()
        .expect("verified lock")
        .contains(&info.step)
    {
        return Ok(true);
    }
    let written = lock(&inner.written).clone();
    match load::verify(&inner.store, info, &written).await {
        Ok(()) => {
            inner
                .verified
                .lock()
                .expect("verified lock")
                .insert(info.step);
            Ok(true)
        }
        Err(e) if e.is_corrupt() => {
            tracing::warn!(step = info.step, url = %info.url, error = %e, "checkpoint damaged; retention neither counts nor deletes it");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_state_is_split_like_its_parameter() {
        let q = "language_model.model.layers.0.self_attn.q_proj.weight";
        let o = "language_model.model.layers.0.self_attn.o_proj.weight";
        let norm = "language_model.model.norm.weight";
        let dims: HashMap<&str, Option<i64>> = [q, o, norm]
            .into_iter()
            .map(|n| (n, shard_dim(n)))
            .collect();
        assert_eq!(optimizer_dim(&format!("exp_avg.{q}"), &dims), Some(0));
        assert_eq!(optimizer_dim(&format!("exp_avg_sq.{o}"), &dims), Some(1));
        assert_eq!(optimizer_dim(&format!("exp_avg.{norm}"), &dims), None);
        assert_eq!(optimizer_dim("step", &dims), None);
    }
}
