//! Loading: finding the committed checkpoints, checking their files against
//! the manifest, and giving one tp rank its tensors, resharded when the
//! checkpoint was written at another tensor-parallel size.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tch::{Device, Tensor};

use crate::error::CheckpointError;
use crate::format::{
    crc_hex, index, parse_step, step_folder, FileEntry, Manifest, TensorEntry, MANIFEST_FILE,
};
use crate::read::ShardTensors;
use crate::store::Store;
use crate::{CheckpointInfo, LoadedState};

/// Requests in flight when reading many files.
const READS_IN_FLIGHT: usize = 8;

/// The committed checkpoints, oldest first.
pub(crate) async fn list(store: &Store) -> Result<Vec<CheckpointInfo>, CheckpointError> {
    let mut steps: Vec<u64> = store
        .folders()
        .await?
        .iter()
        .filter_map(|f| parse_step(f))
        .collect();
    steps.sort_unstable();
    // Futures made up front, not in a stream's closure: the latter's
    // lifetimes defeat the Send bound the runtime's block_on puts on them.
    let reads: Vec<_> = steps
        .into_iter()
        .map(|step| {
            let name = format!("{}/{MANIFEST_FILE}", step_folder(step));
            async move { store.get_if_exists(&name).await.map(|b| (step, b)) }
        })
        .collect();
    let manifests: Vec<(u64, Option<Bytes>)> = futures::stream::iter(reads)
        .buffered(READS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut out = Vec::new();
    for (step, bytes) in manifests {
        let Some(bytes) = bytes else { continue };
        let folder = step_folder(step);
        let name = format!("{folder}/{MANIFEST_FILE}");
        let manifest = serde_json::from_slice::<Manifest>(&bytes)
            .map_err(|source| CheckpointError::Json {
                path: store.shown(&name),
                source,
            })
            .and_then(|m| {
                m.check()?;
                if m.step != step {
                    return Err(CheckpointError::Layout {
                        step,
                        message: format!("its manifest is that of step {}", m.step),
                    });
                }
                Ok(m)
            });
        match manifest {
            Ok(manifest) => out.push(CheckpointInfo {
                step,
                url: store.shown(&folder),
                tp_size: manifest.tp_size,
                bytes: manifest.bytes(),
                manifest,
            }),
            Err(e) => tracing::warn!(step, error = %e, "checkpoint manifest unusable; skipped"),
        }
    }
    Ok(out)
}

/// Checks that `entry`'s file in `info`'s folder has the size and, when
/// `crc` is given, the checksum the manifest records.
fn check(
    store: &Store,
    info: &CheckpointInfo,
    entry: &FileEntry,
    size: u64,
    crc: Option<u32>,
) -> Result<(), CheckpointError> {
    let path = store.shown(&format!("{}/{}", step_folder(info.step), entry.name));
    if size != entry.size {
        return Err(CheckpointError::Size {
            path,
            expected: entry.size,
            found: size,
        });
    }
    match crc.map(crc_hex) {
        Some(found) if found != entry.crc32 => Err(CheckpointError::Checksum {
            path,
            expected: entry.crc32.clone(),
            found,
        }),
        _ => Ok(()),
    }
}

/// Runs `check_one` on every file of `info` (its name under the location
/// and its manifest entry), a few at a time; the first failure is the
/// result.
async fn each_file<'a, Fut>(
    info: &'a CheckpointInfo,
    check_one: impl Fn(String, &'a FileEntry) -> Fut,
) -> Result<(), CheckpointError>
where
    Fut: std::future::Future<Output = Result<(), CheckpointError>>,
{
    let folder = step_folder(info.step);
    let checks: Vec<Fut> = info
        .manifest
        .files()
        .map(|entry| check_one(format!("{folder}/{}", entry.name), entry))
        .collect();
    futures::stream::iter(checks)
        .buffer_unordered(READS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// Reads every file of `info` and checks its size and checksum; but a file
/// this process wrote (in `written`, by name, with the version the store
/// gave it then) that is still at that version holds the bytes it wrote,
/// whose checksum it computed: its size is checked, from its metadata.
pub(crate) async fn verify(
    store: &Store,
    info: &CheckpointInfo,
    written: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    each_file(info, |name, entry| async move {
        if let Some(version) = written.get(&name) {
            let (size, now) = store.version(&name).await?;
            if &now == version {
                return check(store, info, entry, size, None);
            }
        }
        let (size, crc) = store.digest(&name).await?;
        check(store, info, entry, size, Some(crc))
    })
    .await
}

/// Checks that every file of `info` is in the store at the size its
/// manifest records, from the files' metadata: nothing is read. The
/// checksums are checked when the checkpoint is loaded.
async fn present(store: &Store, info: &CheckpointInfo) -> Result<(), CheckpointError> {
    each_file(info, |name, entry| async move {
        check(store, info, entry, store.size(&name).await?, None)
    })
    .await
}

/// The newest checkpoint, of a step below `before` when given, whose files
/// are all there at their sizes.
pub(crate) async fn latest(
    store: &Store,
    before: Option<u64>,
) -> Result<Option<CheckpointInfo>, CheckpointError> {
    let candidates = list(store).await?.into_iter().rev();
    for info in candidates.filter(|i| before.is_none_or(|b| i.step < b)) {
        match present(store, &info).await {
            Ok(()) => return Ok(Some(info)),
            Err(e) if e.is_corrupt() => {
                tracing::warn!(step = info.step, url = %info.url, error = %e, "checkpoint damaged; trying the one before")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Where one output tensor comes from.
enum Source<'m> {
    /// A whole tensor of one shard.
    Whole(usize, &'m TensorEntry),
    /// Slices `(shard, entry, start, len)` along `dim`, concatenated.
    Slices(i64, Vec<(usize, &'m TensorEntry, i64, i64)>),
}

/// Plans the output tensors of one kind (`file` 0: parameters, 1: optimizer).
fn plan<'m>(
    manifest: &'m Manifest,
    entries_of: fn(&crate::PartRecord) -> &Vec<TensorEntry>,
    tp_rank: u32,
    tp_size: u32,
) -> Result<Vec<(&'m str, Source<'m>)>, CheckpointError> {
    let a = manifest.tp_size as usize;
    let shards: Vec<_> = manifest
        .shards
        .iter()
        .map(|s| index(entries_of(s)))
        .collect();
    let missing = |name: &str, shard: usize| CheckpointError::Tensor {
        name: name.to_owned(),
        message: format!(
            "in shard 0 but not in shard {shard} of step {}",
            manifest.step
        ),
    };
    let mut out = Vec::new();
    for e0 in entries_of(&manifest.shards[0]) {
        let name = e0.name.as_str();
        let source = match e0.shard_dim {
            _ if a == tp_size as usize => {
                let r = tp_rank as usize;
                Source::Whole(r, shards[r].get(name).ok_or_else(|| missing(name, r))?)
            }
            None => Source::Whole(0, e0),
            Some(dim) => {
                let d = dim as usize;
                let fail = |message: String| CheckpointError::Tensor {
                    name: name.to_owned(),
                    message,
                };
                if d >= e0.shape.len() {
                    return Err(fail(format!(
                        "split along dim {dim} of shape {:?}",
                        e0.shape
                    )));
                }
                let mut pieces = Vec::with_capacity(a);
                for (i, s) in shards.iter().enumerate() {
                    let e = s.get(name).ok_or_else(|| missing(name, i))?;
                    let same_elsewhere = e.shape.len() == e0.shape.len()
                        && e.shape
                            .iter()
                            .zip(&e0.shape)
                            .enumerate()
                            .all(|(k, (x, y))| k == d || x == y);
                    if e.dtype != e0.dtype || !same_elsewhere {
                        return Err(fail(format!(
                            "shard {i} is {:?} {:?}, shard 0 {:?} {:?}",
                            e.dtype, e.shape, e0.dtype, e0.shape
                        )));
                    }
                    pieces.push(*e);
                }
                let total: i64 = pieces.iter().map(|e| e.shape[d]).sum();
                if total % tp_size as i64 != 0 {
                    return Err(fail(format!(
                        "dim {dim} of size {total} does not split into {tp_size} tensor-parallel ranks"
                    )));
                }
                let len = total / tp_size as i64;
                let (lo, hi) = (tp_rank as i64 * len, (tp_rank as i64 + 1) * len);
                let mut slices = Vec::new();
                let mut offset = 0;
                for (i, e) in pieces.into_iter().enumerate() {
                    let (start, end) = (offset, offset + e.shape[d]);
                    offset = end;
                    if end > lo && start < hi {
                        let from = lo.max(start);
                        slices.push((i, e, from - start, hi.min(end) - from));
                    }
                }
                Source::Slices(dim, slices)
            }
        };
        out.push((name, source));
    }
    Ok(out)
}

fn shards_used(plan: &[(&str, Source<'_>)]) -> BTreeSet<usize> {
    let mut used = BTreeSet::new();
    for (_, source) in plan {
        match source {
            Source::Whole(i, _) => {
                used.insert(*i);
            }
            Source::Slices(_, s) => used.extend(s.iter().map(|p| p.0)),
        }
    }
    used
}

/// Builds the tensors of `plan` from the files of one kind.
fn assemble(
    plan: Vec<(&str, Source<'_>)>,
    files: &BTreeMap<usize, ShardTensors>,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    plan.into_iter()
        .map(|(name, source)| {
            let tensor = match source {
                Source::Whole(i, e) => files[&i].tensor(e)?,
                Source::Slices(dim, slices) => {
                    let parts = slices
                        .into_iter()
                        .map(|(i, e, start, len)| Ok(files[&i].tensor(e)?.narrow(dim, start, len)))
                        .collect::<Result<Vec<_>, CheckpointError>>()?;
                    Tensor::cat(&parts, dim)
                }
            };
            Ok((name.to_owned(), tensor))
        })
        .collect()
}

pub(crate) async fn load(
    store: &Store,
    info: &CheckpointInfo,
    tp_rank: u32,
    tp_size: u32,
    device: Device,
) -> Result<LoadedState, CheckpointError> {
    if tp_size == 0 || tp_rank >= tp_size {
        return Err(CheckpointError::Rank { tp_rank, tp_size });
    }
    let manifest = &info.manifest;
    let params = plan(manifest, |s| &s.params, tp_rank, tp_size)?;
    let optimizer = plan(manifest, |s| &s.optimizer, tp_rank, tp_size)?;
    // (shard, file index) of every file to read; then the training state.
    let mut wanted: Vec<&FileEntry> = Vec::new();
    let mut keys = Vec::new();
    for (kind, p) in [(0usize, &params), (1, &optimizer)] {
        for shard in shards_used(p) {
            wanted.push(&manifest.shards[shard].files[kind]);
            keys.push((kind, shard));
        }
    }
    let folder = step_folder(info.step);
    let reads: Vec<_> = wanted
        .iter()
        .map(|&entry| {
            let name = format!("{folder}/{}", entry.name);
            async move {
                store
                    .read_shard(&name, entry.size, &entry.crc32, device)
                    .await
            }
        })
        .collect();
    let shards: Vec<ShardTensors> = futures::stream::iter(reads)
        .buffered(READS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut decoded: [BTreeMap<usize, ShardTensors>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for ((kind, shard), tensors) in keys.into_iter().zip(shards) {
        decoded[kind].insert(shard, tensors);
    }
    let meta_name = format!("{folder}/{}", manifest.meta.name);
    let meta_bytes = store.get(&meta_name).await?;
    check(
        store,
        info,
        &manifest.meta,
        meta_bytes.len() as u64,
        Some(crc32fast::hash(&meta_bytes)),
    )?;
    let meta = serde_json::from_slice(&meta_bytes).map_err(|source| CheckpointError::Json {
        path: store.shown(&meta_name),
        source,
    })?;
    let [params_files, optimizer_files] = decoded;
    Ok(LoadedState {
        step: info.step,
        tensors: assemble(params, &params_files)?,
        optimizer: assemble(optimizer, &optimizer_files)?,
        meta,
    })
}
