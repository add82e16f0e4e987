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
use samtrain_checkpoint::{CheckpointInfo, Checkpointer, SaveStatus, SaveTicket, ShardState};
use samtrain_collective::ProcessGroups;
use samtrain_data::sampler::Position;
use samtrain_proto::Checkpoint;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::TrainError;
use crate::optim::AdamW;
use crate::report::{EventSink, TrainEvent};

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

/// Restores the newest committed checkpoint into `params` and `optimizer`
/// (world rank 0 picks it, so that every rank restores the same one).
pub fn resume(
    ckpt: &Checkpointer,
    groups: &ProcessGroups,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
) -> Result<Option<CheckpointMeta>, TrainError> {
    let layout = &groups.layout;
    let store_error = |source| TrainError::store(ckpt.url(), source);
    let mine = if layout.rank == 0 {
        ckpt.latest().map_err(store_error)?
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
    let info: CheckpointInfo = match mine {
        Some(info) => info,
        None => ckpt
            .list()
            .map_err(store_error)?
            .into_iter()
            .find(|i| i.step == chosen as u64)
            .ok_or_else(|| TrainError::Resume {
                url: checkpoint_at(ckpt, chosen as u64).url,
                message: "rank 0 resumes from it but this rank does not find it".into(),
            })?,
    };
    let state = ckpt
        .load(&info, layout.tp_rank as u32, layout.tp as u32)
        .map_err(store_error)?;
    let bad = |message: String| TrainError::Resume {
        url: info.url.clone(),
        message,
    };
    let meta: CheckpointMeta = serde_json::from_value(state.meta)
        .map_err(|e| bad(format!("meta.json is not samtrain's training state: {e}")))?;
    let mut saved: HashMap<String, Tensor> = state.tensors.into_iter().collect();
    for (name, p) in params {
        let value = saved
            .remove(name)
            .ok_or_else(|| bad(format!("has no tensor `{name}`, which this model trains")))?;
        if value.size() != p.size() {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?}, the model's shard {:?}",
                value.size(),
                p.size()
            )));
        }
        tch::no_grad(|| p.shallow_clone().copy_(&value));
    }
    if let Some(extra) = saved.keys().next() {
        return Err(bad(format!(
            "tensor `{extra}` is not trained by this model (another trainable policy?)"
        )));
    }
    optimizer
        .load_state(state.optimizer, meta.optimizer_step)
        .map_err(|e| bad(e.to_string()))?;
    tracing::info!(
        step = meta.step,
        url = %info.url,
        samples_consumed = meta.samples_consumed,
        epoch = meta.position.epoch,
        consumed_in_epoch = meta.position.consumed,
        saved_dp_size = meta.dp_size,
        "resumed from checkpoint"
    );
    Ok(Some(meta))
}

/// The checkpoint store, the saves in flight, and the newest commit seen.
pub struct Saves {
    ckpt: Checkpointer,
    tickets: Vec<SaveTicket>,
    last: Option<Checkpoint>,
}

impl Saves {
    /// `resumed`: the checkpoint this generation started from, if any.
    pub fn new(ckpt: Checkpointer, resumed: Option<Checkpoint>) -> Self {
        Self {
            ckpt,
            tickets: Vec::new(),
            last: resumed,
        }
    }

    pub fn checkpointer(&self) -> &Checkpointer {
        &self.ckpt
    }

    /// Starts saving `state` in the background.
    pub fn start(&mut self, state: ShardState) -> Result<(), TrainError> {
        let ticket = self
            .ckpt
            .save(state)
            .map_err(|source| TrainError::store(self.ckpt.url(), source))?;
        self.tickets.push(ticket);
        Ok(())
    }

    /// Reports finished saves to `events`; with `wait`, waits for all of
    /// them first. A failed save is logged: training goes on.
    pub fn collect(&mut self, wait: bool, events: &mut EventSink) {
        let ckpt = &self.ckpt;
        let last = &mut self.last;
        self.tickets.retain(|ticket| {
            let outcome = if wait {
                Some(ticket.wait())
            } else {
                ticket.outcome()
            };
            let Some(outcome) = outcome else {
                return true;
            };
            match outcome.status {
                SaveStatus::Committed => {
                    let committed = checkpoint_at(ckpt, outcome.step);
                    tracing::info!(step = outcome.step, url = %committed.url, bytes = outcome.bytes, "checkpoint committed");
                    *last = Some(committed.clone());
                    events(TrainEvent::Checkpoint(committed));
                }
                SaveStatus::Failed(reason) => {
                    tracing::warn!(step = outcome.step, %reason, "checkpoint not saved; training goes on");
                }
                SaveStatus::Uploaded | SaveStatus::Skipped => {}
            }
            false
        });
    }

    /// Waits for every save, then shares the newest commit (which only tp
    /// rank 0 of dp rank 0 sees) with every rank.
    pub fn finish(
        mut self,
        groups: &ProcessGroups,
        events: &mut EventSink,
    ) -> Result<Option<Checkpoint>, TrainError> {
        self.collect(true, events);
        let committed = from_world_rank0(
            groups,
            self.last.as_ref().map_or(-1, |c| c.step as i64),
            "sharing the last committed checkpoint",
        )?;
        Ok((committed >= 0).then(|| checkpoint_at(&self.ckpt, committed as u64)))
    }
}
