//! The trainer's side of checkpoints: what a checkpoint carries besides
//! tensors ([`CheckpointMeta`]), restoring the newest committed one
//! ([`resume`]), and following the background saves until they commit
//! ([`Saves`]). Storage, commit and retention are `samtrain-checkpoint`'s.
//!
//! Every rank must restore the same checkpoint and agree on what was
//! committed, though only world rank 0 looks at the store and only tp rank
//! 0 of dp rank 0 commits: [`from_world_rank0`] shares such a value over the
//! world group.

use std::collections::HashMap;

use samtrain_checkpoint::format::step_folder;
use samtrain_checkpoint::{
    CheckpointError, CheckpointInfo, Checkpointer, Loan, SaveStatus, SaveTicket, ShardState,
};
use samtrain_collective::ProcessGroups;
use samtrain_data::ledger::Segment;
use samtrain_data::sampler::Position;
use samtrain_proto::Checkpoint;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::TrainError;
use crate::optim::AdamW;
use crate::report::{EventSink, SaveTiming, TrainEvent};

/// The training state a checkpoint carries besides tensors (its `meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: u64,
    /// The sampler's global position after `step`.
    pub position: Position,
    pub samples_consumed: u64,
    pub optimizer_step: u64,
    /// The model folder the trainable tensors belong to.
    pub model_path: String,
    /// The job spec, as TOML.
    pub spec: String,
    pub dp_size: u32,
    pub tp_size: u32,
    /// Identifies the run attempt (see `samtrain_checkpoint::ShardState`).
    pub attempt: i64,
    /// The digest of the base model the trainable tensors were trained on
    /// (`samtrain_model::weights::base_digest`); absent in checkpoints of
    /// older samtrain, which are resumed without the check.
    #[serde(default)]
    pub base_model: Option<String>,
    /// Which samples training consumed, from its start to `step`
    /// (`samtrain_data::ledger`); empty in checkpoints of older samtrain.
    #[serde(default)]
    pub ledger: Vec<Segment>,
}

/// The checkpoint of `step` under the store's URL.
pub fn checkpoint_at(ckpt: &Checkpointer, step: u64) -> Checkpoint {
    Checkpoint {
        step,
        url: format!("{}/{}", ckpt.url().trim_end_matches('/'), step_folder(step)),
    }
}

/// World rank 0's `value`, on every rank.
pub(crate) fn from_world_rank0(
    groups: &ProcessGroups,
    value: i64,
    what: &str,
) -> Result<i64, TrainError> {
    if groups.layout.world_size == 1 {
        return Ok(value);
    }
    let shared = groups
        .world
        .broadcast(&Tensor::from_slice(&[value]), 0)
        .map_err(|e| TrainError::collective(what, e))?;
    Ok(shared.int64_value(&[0]))
}

/// Restores the newest committed checkpoint that every rank can decode into
/// `params` and `optimizer` (world rank 0 picks it, so that every rank
/// restores the same one). One whose files verify but do not decode on some
/// rank is passed over for the one before, on every rank; a checkpoint that
/// decodes but does not fit this job's model is an error, never a reason to
/// start again from an older one.
pub fn resume(
    ckpt: &Checkpointer,
    groups: &ProcessGroups,
    base: &BaseModel,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
) -> Result<Option<CheckpointMeta>, TrainError> {
    let layout = &groups.layout;
    let store_error = |source| TrainError::store(ckpt.url(), source);
    let mut before: Option<u64> = None;
    loop {
        let mine = if layout.rank == 0 {
            match before {
                None => ckpt.latest(),
                Some(step) => ckpt.latest_before(step),
            }
            .map_err(store_error)?
        } else {
            None
        };
        let chosen = from_world_rank0(
            groups,
            mine.as_ref().map_or(-1, |i| i.step as i64),
            "agreeing on the checkpoint to resume",
        )?;
        if chosen < 0 {
            tracing::info!(url = %ckpt.url(), "no committed checkpoint; starting from the model folder");
            return Ok(None);
        }
        let step = chosen as u64;
        let restored = restore(ckpt, groups, step, mine, base, params, optimizer);
        let url = checkpoint_at(ckpt, step).url;
        // Ranks that could not restore say whether trying again may help,
        // so every rank's error is as retriable as the worst one's.
        let counts = match &restored {
            Ok(_) => [0, 0, 0],
            Err(Restore::Undecodable(_)) => [1, 0, 0],
            Err(Restore::Failed(e)) if e.retriable() => [0, 1, 0],
            Err(Restore::Failed(_)) => [0, 0, 1],
        };
        let [undecodable, transient, permanent] =
            sum_over_world(groups, counts, "agreeing on the restore")?;
        let elsewhere = "another rank could not restore it (its log says why)";
        match restored {
            Err(Restore::Failed(e)) => return Err(e),
            _ if permanent > 0 => {
                return Err(TrainError::Resume {
                    url,
                    message: elsewhere.into(),
                })
            }
            _ if transient > 0 => {
                return Err(TrainError::store(
                    &url,
                    CheckpointError::Runtime(elsewhere.into()),
                ))
            }
            Ok(meta) if undecodable == 0 => {
                tracing::info!(
                    step = meta.step,
                    %url,
                    samples_consumed = meta.samples_consumed,
                    epoch = meta.position.epoch,
                    consumed_in_epoch = meta.position.consumed,
                    saved_dp_size = meta.dp_size,
                    "resumed from checkpoint"
                );
                return Ok(Some(meta));
            }
            Ok(_) => {
                tracing::warn!(step, %url, ranks = undecodable, "checkpoint does not decode on another rank; falling back to the one before")
            }
            Err(Restore::Undecodable(reason)) => {
                tracing::warn!(step, %url, %reason, "checkpoint does not decode; falling back to the one before")
            }
        }
        before = Some(step);
    }
}

/// Why one rank could not restore a checkpoint.
enum Restore {
    /// Its files verify against the manifest, but what they hold is not a
    /// training state: an older checkpoint may do.
    Undecodable(String),
    /// The store could not be read, or the state does not fit the model.
    Failed(TrainError),
}

/// The base model a job trains on: where, and its digest.
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub path: String,
    pub digest: String,
}

/// Restores `step`'s checkpoint (`info` when this rank already found it)
/// into `params` and `optimizer`, if it was trained on `base`.
fn restore(
    ckpt: &Checkpointer,
    groups: &ProcessGroups,
    step: u64,
    info: Option<CheckpointInfo>,
    base: &BaseModel,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
) -> Result<CheckpointMeta, Restore> {
    let layout = &groups.layout;
    let url = checkpoint_at(ckpt, step).url;
    let read_error = |source: CheckpointError| {
        if source.is_corrupt() {
            Restore::Undecodable(source.to_string())
        } else {
            Restore::Failed(TrainError::store(ckpt.url(), source))
        }
    };
    let info: CheckpointInfo = match info {
        Some(info) => info,
        None => ckpt
            .list()
            .map_err(read_error)?
            .into_iter()
            .find(|i| i.step == step)
            .ok_or_else(|| {
                Restore::Undecodable("rank 0 resumes from it but this rank does not find it".into())
            })?,
    };
    // Read straight onto the parameters' device: their copies below are
    // then device to device.
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    let state = ckpt
        .load_onto(&info, layout.tp_rank as u32, layout.tp as u32, device)
        .map_err(read_error)?;
    let meta: CheckpointMeta = serde_json::from_value(state.meta).map_err(|e| {
        Restore::Undecodable(format!("meta.json is not samtrain's training state: {e}"))
    })?;
    let misfit = |message: String| {
        Restore::Failed(TrainError::Resume {
            url: url.clone(),
            message,
        })
    };
    match &meta.base_model {
        Some(digest) if *digest != base.digest => {
            return Err(misfit(format!(
                "was trained on a base model with digest {digest} ({}), but model.path {} has digest {}: \
                 resume with the model it was trained on, or give this job a new checkpoint.url",
                meta.model_path, base.path, base.digest
            )))
        }
        Some(_) => {}
        None => tracing::warn!(%url, "the checkpoint records no base-model digest (older samtrain); resuming without the check"),
    }
    let mut saved: HashMap<String, Tensor> = state.tensors.into_iter().collect();
    for (name, p) in params {
        let value = saved
            .remove(name)
            .ok_or_else(|| misfit(format!("has no tensor `{name}`, which this model trains")))?;
        if value.size() != p.size() {
            return Err(misfit(format!(
                "tensor `{name}` has shape {:?}, the model's shard {:?}",
                value.size(),
                p.size()
            )));
        }
        tch::no_grad(|| p.shallow_clone().copy_(&value));
    }
    if let Some(extra) = saved.keys().next() {
        return Err(misfit(format!(
            "tensor `{extra}` is not trained by this model (another trainable policy?)"
        )));
    }
    optimizer
        .load_state(state.optimizer, meta.optimizer_step)
        .map_err(|e| misfit(e.to_string()))?;
    Ok(meta)
}

/// The sum of `values` over every rank of the world group.
fn sum_over_world<const N: usize>(
    groups: &ProcessGroups,
    values: [i64; N],
    what: &str,
) -> Result<[i64; N], TrainError> {
    if groups.layout.world_size == 1 {
        return Ok(values);
    }
    let sum = groups
        .world
        .all_reduce_sum(&Tensor::from_slice(&values))
        .map_err(|e| TrainError::collective(what, e))?;
    let mut out = [0i64; N];
    sum.copy_data(&mut out, N);
    Ok(out)
}

/// The checkpoint store, the saves in flight, the newest commit seen and
/// the newest save this rank saw fail.
pub struct Saves {
    ckpt: Checkpointer,
    tickets: Vec<SaveTicket>,
    last: Option<Checkpoint>,
    failed: Option<FailedSave>,
}

/// A save given up: its step, why, and whether the store was out of space.
#[derive(Debug, Clone)]
struct FailedSave {
    step: u64,
    reason: String,
    out_of_space: bool,
}

impl Saves {
    /// `resumed`: the checkpoint this generation started from, if any.
    pub fn new(ckpt: Checkpointer, resumed: Option<Checkpoint>) -> Self {
        Self {
            ckpt,
            tickets: Vec::new(),
            last: resumed,
            failed: None,
        }
    }

    pub fn checkpointer(&self) -> &Checkpointer {
        &self.ckpt
    }

    /// Starts saving `state` in the background. Its tensors are lent to
    /// the save where the store allows (a local folder): the returned loan
    /// must be settled before any of them changes ([`AdamW::lend`]).
    pub fn start(&mut self, state: ShardState) -> Result<Loan, TrainError> {
        let (ticket, loan) = self
            .ckpt
            .save_lending(state)
            .map_err(|source| TrainError::store(self.ckpt.url(), source))?;
        self.tickets.push(ticket);
        Ok(loan)
    }

    /// Reports finished saves to `events`; with `wait`, waits for all of
    /// them first. A failed save is logged: training goes on.
    pub fn collect(&mut self, wait: bool, events: &mut EventSink) {
        let ckpt = &self.ckpt;
        let last = &mut self.last;
        let failed = &mut self.failed;
        self.tickets.retain(|ticket| {
            let outcome = if wait {
                Some(ticket.wait())
            } else {
                ticket.outcome()
            };
            let Some(outcome) = outcome else {
                return true;
            };
            let out_of_space = matches!(outcome.status, SaveStatus::OutOfSpace(_));
            match outcome.status {
                SaveStatus::Committed => {
                    let committed = checkpoint_at(ckpt, outcome.step);
                    tracing::info!(step = outcome.step, url = %committed.url, bytes = outcome.bytes, "checkpoint committed");
                    *last = Some(committed.clone());
                    events(TrainEvent::Checkpoint {
                        checkpoint: committed,
                        save: SaveTiming {
                            bytes: outcome.bytes,
                            blocked_s: outcome.staging.as_secs_f64(),
                            upload_s: outcome.upload.as_secs_f64(),
                        },
                    });
                }
                SaveStatus::Failed(reason) | SaveStatus::OutOfSpace(reason) => {
                    tracing::warn!(step = outcome.step, %reason, out_of_space, "checkpoint not saved; training goes on");
                    events(TrainEvent::CheckpointFailed {
                        checkpoint: checkpoint_at(ckpt, outcome.step),
                        reason: reason.clone(),
                    });
                    *failed = Some(FailedSave {
                        step: outcome.step,
                        reason,
                        out_of_space,
                    });
                }
                SaveStatus::Uploaded | SaveStatus::Skipped => {}
            }
            false
        });
    }

    /// Waits for every save, then shares the newest commit (which only tp
    /// rank 0 of dp rank 0 sees) with every rank. A run whose last step
    /// (`final_step`) was not committed fails: its trained state would be
    /// lost with an exit that says success.
    pub fn finish(
        mut self,
        groups: &ProcessGroups,
        final_step: u64,
        events: &mut EventSink,
    ) -> Result<Checkpoint, TrainError> {
        self.collect(true, events);
        let committed = from_world_rank0(
            groups,
            self.last.as_ref().map_or(-1, |c| c.step as i64),
            "sharing the last committed checkpoint",
        )?;
        // Every rank has the same `committed`: the agreement below is only
        // needed, and only reached, when the final save is missing.
        if committed == final_step as i64 {
            return Ok(checkpoint_at(&self.ckpt, final_step));
        }
        let mine = self.failed.filter(|f| f.step == final_step);
        let [out_of_space] = sum_over_world(
            groups,
            [mine.as_ref().is_some_and(|f| f.out_of_space) as i64],
            "agreeing on the final save",
        )?;
        Err(TrainError::FinalSave {
            url: checkpoint_at(&self.ckpt, final_step).url,
            reason: mine.map_or_else(
                || "another rank's save failed (its log says why)".to_owned(),
                |f| f.reason,
            ),
            out_of_space: out_of_space > 0,
        })
    }
}
