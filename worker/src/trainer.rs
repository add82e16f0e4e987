//! The training loop of one rank of a data-parallel x tensor-parallel job.
//!
//! [`train`] loads the model folder (this rank's tensor-parallel shard), the
//! training set under the spec's bad-record policy, and the newest committed
//! checkpoint at the spec's URL if there is one: trainable tensors,
//! optimizer state, and the sampler's global position, so that a job resumed
//! at another data-parallel size re-shards the rest of the epoch. Then, per
//! optimizer step:
//!
//! 1. `grad_accum` micro-batches from the prefetching loader;
//! 2. the answer tokens of the global batch are counted (an all-reduce of
//!    one number over the dp group) and each micro-batch's mean loss is
//!    scaled by its share of them, so that the summed gradients are those of
//!    the mean loss over the whole global batch whatever the split: dp = 2
//!    equals one process with twice the batch, `grad_accum = 2` equals a
//!    batch twice as large;
//! 3. forward and backward (with the tensor-parallel tape when tp > 1),
//!    inside `catch_unwind`: the model's tensor-parallel all-reduce panics
//!    when a peer fails, which becomes a retriable [`TrainError::Collective`];
//! 4. gradients summed over the dp group in buckets ([`crate::ddp`]),
//!    clipped by their global norm ([`crate::optim::clip_grad_norm`]), and
//!    AdamW at the scheduled learning rate;
//! 5. a checkpoint every `checkpoint.every_steps` steps and at the last one.
//!
//! Randomness: libtorch's generator is seeded before every step with a mix
//! of (seed, step, rank), so nothing random depends on history and no RNG
//! state needs saving; the sample order depends on (seed, epoch) only (see
//! `samtrain_data::sampler`). With the same world size on the CPU a resumed
//! run reproduces an uninterrupted one bit for bit.
//!
//! The abort flag is checked before every step; it ends the generation with
//! [`TrainError::Aborted`]. After the last step the job predicts and scores
//! `data.eval` when given: the ranks of data-parallel rank 0 generate
//! (together, under tensor parallelism) and world rank 0 scores.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use samtrain_checkpoint::format::step_folder;
use samtrain_checkpoint::{
    CheckpointInfo, CheckpointOptions, Checkpointer, RetryPolicy, SaveStatus, SaveTicket,
    ShardState,
};
use samtrain_data::eval::Summary;
use samtrain_data::preprocess::{Loader, LoaderConfig};
use samtrain_data::rng::SplitMix64;
use samtrain_data::sampler::{Position, Sampler, SamplerConfig, TailPolicy};
use samtrain_model::parallel::{Collective, GradTape, TensorParallel};
use samtrain_model::{trainable, LoadedModel, SamInputs, SamModel};
use samtrain_proto::spec::{DeviceKind, JobSpec, Tail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::ddp::{GradBuckets, DEFAULT_BUCKET_BYTES};
use crate::error::{from_panic, TrainError};
use crate::inputs::{self, to_device};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::predict::{self, Predictor};
use crate::schedule::Schedule;

/// This rank's process groups. The dp group holds the ranks that share this
/// rank's tensor-parallel index; the tp group (absent or of size 1 without
/// tensor parallelism) the ranks that share its data.
pub struct Groups {
    pub dp: Arc<dyn Collective>,
    pub tp: Option<Arc<dyn Collective>>,
}

/// Everything one rank needs to train.
pub struct TrainJob {
    pub spec: JobSpec,
    /// World rank: `dp_rank * tp + tp_rank`.
    pub rank: u32,
    pub world_size: u32,
    pub groups: Groups,
    /// Set from outside to end the generation; checked before every step.
    pub abort: Arc<AtomicBool>,
    /// Progress and committed checkpoints, as they happen.
    pub events: Box<dyn FnMut(TrainEvent) + Send>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum TrainEvent {
    /// Training starts after `step` steps (0, or a resumed checkpoint's).
    Started {
        step: u64,
        samples_consumed: u64,
        resumed_from: Option<CheckpointReport>,
    },
    /// Every `training.log_every` steps and at the last step.
    Progress(StepMetrics),
    /// A checkpoint this rank committed (tp rank 0 of dp rank 0 commits).
    Checkpoint(CheckpointReport),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    /// Mean LM loss over the answer tokens of the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    /// Samples trained on by all ranks since the job began.
    pub samples_consumed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    pub step: u64,
    /// The step folder's URL.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOutcome {
    pub final_step: u64,
    pub samples_consumed: u64,
    /// The newest committed checkpoint the job knows of (the same on every rank).
    pub checkpoint: Option<CheckpointReport>,
    /// The step training resumed from, if any.
    pub resumed_from: Option<u64>,
    /// Training records left out under the `skip` bad-record policy.
    pub skipped_records: usize,
    /// Scores on `data.eval` (world rank 0 only).
    pub eval: Option<Summary>,
}

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

/// Where this rank sits, checked against its groups and the spec.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rank: u32,
    dp_rank: u32,
    dp_size: u32,
    tp_rank: u32,
    tp_size: u32,
}

fn config_error(field: &str, message: impl Into<String>) -> TrainError {
    TrainError::Config {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl Layout {
    fn new(
        rank: u32,
        world_size: u32,
        groups: &Groups,
        spec: &JobSpec,
    ) -> Result<Self, TrainError> {
        let (tp_rank, tp_size) = groups
            .tp
            .as_ref()
            .map_or((0, 1), |t| (t.rank() as u32, t.world_size() as u32));
        let layout = Layout {
            rank,
            dp_rank: groups.dp.rank() as u32,
            dp_size: groups.dp.world_size() as u32,
            tp_rank,
            tp_size,
        };
        if tp_size != spec.parallel.tp {
            return Err(config_error(
                "parallel.tp",
                format!(
                    "is {} but this rank's tp group has {tp_size} ranks",
                    spec.parallel.tp
                ),
            ));
        }
        if layout.dp_size * tp_size != world_size || rank != layout.dp_rank * tp_size + tp_rank {
            return Err(config_error(
                "rank",
                format!(
                    "rank {rank} of {world_size} does not match its groups: dp rank {} of {}, \
                     tp rank {tp_rank} of {tp_size} (rank = dp_rank * tp + tp_rank)",
                    layout.dp_rank, layout.dp_size
                ),
            ));
        }
        Ok(layout)
    }
}

/// The device of `kind` for this rank: CUDA index `LOCAL_RANK` (torchrun's
/// variable) when set, else the world rank modulo the devices present.
pub fn resolve_device(kind: DeviceKind, rank: u32) -> Result<Device, TrainError> {
    let cuda = || {
        let count = tch::Cuda::device_count().max(1) as usize;
        let index = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rank as usize);
        Device::Cuda(index % count)
    };
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if !tch::Cuda::is_available() => Err(config_error(
            "training.device",
            "is `cuda` but libtorch sees no CUDA device here",
        )),
        DeviceKind::Cuda => Ok(cuda()),
        DeviceKind::Auto if tch::Cuda::is_available() => Ok(cuda()),
        DeviceKind::Auto => Ok(Device::Cpu),
    }
}

/// The seed of libtorch's generator for one step of one rank.
fn step_seed(seed: u64, step: u64, rank: u32) -> i64 {
    let mut rng = SplitMix64::new(seed ^ SplitMix64::new(step).next_u64());
    (rng.next_u64() ^ u64::from(rank).wrapping_mul(0x9e37_79b9_7f4a_7c15)) as i64 >> 1
}

/// World rank 0's value of `value`, on every rank: broadcast over the tp
/// group (reaching the ranks of dp rank 0), then over the dp group, whose
/// root (dp rank 0) now holds it.
fn from_world_rank0(groups: &Groups, value: i64, what: &str) -> Result<i64, TrainError> {
    let mut t = Tensor::from_slice(&[value]);
    if let Some(tp) = groups.tp.as_ref().filter(|t| t.world_size() > 1) {
        t = tp
            .broadcast(&t, 0)
            .map_err(|e| TrainError::collective(what, e))?;
    }
    if groups.dp.world_size() > 1 {
        t = groups
            .dp
            .broadcast(&t, 0)
            .map_err(|e| TrainError::collective(what, e))?;
    }
    Ok(t.int64_value(&[0]))
}

fn checkpoint_url(ckpt: &Checkpointer, step: u64) -> String {
    format!("{}/{}", ckpt.url().trim_end_matches('/'), step_folder(step))
}

/// Trains one rank of `job` to `training.steps`; see the module docs.
pub fn train(job: TrainJob) -> Result<TrainOutcome, TrainError> {
    let TrainJob {
        spec,
        rank,
        world_size,
        groups,
        abort,
        mut events,
    } = job;
    if let Some(p) = spec.problems().first() {
        return Err(config_error(&p.field, p.message.clone()));
    }
    let layout = Layout::new(rank, world_size, &groups, &spec)?;
    let t = &spec.training;
    if t.threads > 0 {
        tch::set_num_threads(t.threads as i32);
    }
    let device = resolve_device(t.device, rank)?;
    let autocast = t.bf16 && device.is_cuda();
    let tp_comm = groups.tp.clone().filter(|c| c.world_size() > 1);
    let model_dir = Path::new(&spec.model.path);
    let loaded = LoadedModel::load(model_dir, device, tp_comm.clone().map(TensorParallel::new))
        .map_err(|e| TrainError::from_model(&spec.model.path, "loading the model", e))?;
    let params = trainable::apply(&loaded.vs, &loaded.model.config.samtrain);
    if params.is_empty() {
        return Err(config_error(
            "model.path",
            format!(
                "{}: the model's trainable-parameter policy leaves nothing to train",
                spec.model.path
            ),
        ));
    }
    tracing::info!(
        rank,
        dp_rank = layout.dp_rank,
        dp_size = layout.dp_size,
        tp_rank = layout.tp_rank,
        tp_size = layout.tp_size,
        ?device,
        trainable = trainable::count(&params),
        "model loaded"
    );
    let mut optimizer = AdamW::new(
        &params,
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    );

    let ckpt = Checkpointer::open(CheckpointOptions {
        url: spec.checkpoint.url.clone(),
        keep: spec.checkpoint.keep,
        retry: RetryPolicy::default(),
    })
    .map_err(|source| TrainError::store(&spec.checkpoint.url, source))?;
    let resumed = resume(&ckpt, &groups, &layout, &params, &mut optimizer)?;
    let (mut step, mut position, mut samples_consumed) = match &resumed {
        Some(meta) => (meta.step, meta.position, meta.samples_consumed),
        None => (0, Position::default(), 0),
    };
    let resumed_from = resumed.as_ref().map(|m| CheckpointReport {
        step: m.step,
        url: checkpoint_url(&ckpt, m.step),
    });
    let mut last_checkpoint = resumed_from.clone();
    events(TrainEvent::Started {
        step,
        samples_consumed,
        resumed_from: resumed_from.clone(),
    });
    // The attempt id pairs this attempt's checkpoint parts (same on a tp group).
    let attempt = from_world_rank0(
        &groups,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        "agreeing on the attempt id",
    )?;

    let train_set = inputs::load_dataset(&spec.data.train, spec.data.bad_records)?;
    let skipped_records = train_set.skipped;
    let image_size = loaded.model.config.vision_config.image_size;
    let mut loader = if step < t.steps {
        let pre = inputs::preprocessor(&spec, &train_set, image_size)?;
        let sampler = Sampler::new(
            SamplerConfig {
                num_samples: train_set.records.len() as u64,
                seed: t.seed,
                batch_size: t.batch_size,
                tail: match spec.data.tail {
                    Tail::Drop => TailPolicy::Drop,
                    Tail::Pad => TailPolicy::Pad,
                },
            },
            u64::from(layout.dp_rank),
            u64::from(layout.dp_size),
            position,
        )
        .map_err(|e| TrainError::Data {
            location: spec.data.train.clone(),
            message: e.to_string(),
        })?;
        let loader = Loader::spawn(
            Arc::new(pre),
            Arc::from(train_set.records.clone()),
            sampler,
            LoaderConfig {
                workers: spec.data.loader_threads,
                depth: spec.data.prefetch,
            },
        )
        .map_err(|e| TrainError::Data {
            location: spec.data.train.clone(),
            message: e.to_string(),
        })?;
        Some(loader)
    } else {
        None
    };

    allocate_grads(&params);
    let buckets = GradBuckets::new(&params, DEFAULT_BUCKET_BYTES);
    let schedule = Schedule::from_spec(t);
    let global_batch = t.batch_size * t.grad_accum * u64::from(layout.dp_size);
    let mut tickets: Vec<SaveTicket> = Vec::new();
    let ctx = StepContext {
        model: &loaded.model,
        params: &params,
        groups: &groups,
        tp: tp_comm.as_deref(),
        autocast,
    };

    while step < t.steps {
        if abort.load(Ordering::SeqCst) {
            tracing::warn!(step = step + 1, "abort requested; ending the generation");
            return Err(TrainError::Aborted { step: step + 1 });
        }
        step += 1;
        tch::manual_seed(step_seed(t.seed, step, rank));
        let started = Instant::now();
        let mut micro = Vec::with_capacity(t.grad_accum as usize);
        let mut epoch = position.epoch;
        let loader = loader
            .as_mut()
            .expect("a loader exists while steps are left");
        for _ in 0..t.grad_accum {
            let fetched = loader.next().ok_or_else(|| TrainError::Data {
                location: spec.data.train.clone(),
                message: "the loader stopped".into(),
            })?;
            let batch = fetched.batch.map_err(|e| TrainError::Data {
                location: spec.data.train.clone(),
                message: e.to_string(),
            })?;
            epoch = fetched.epoch;
            position = fetched.position_after;
            micro.push(to_device(&batch, device));
        }
        let stats = ctx.step(step, &micro, &buckets, t.max_grad_norm)?;
        let lr = schedule.lr(step - 1);
        optimizer.step(lr);
        optimizer.zero_grad();
        samples_consumed += global_batch;

        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let metrics = StepMetrics {
            step,
            epoch,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            samples_per_s: global_batch as f64 / seconds,
            tokens_per_s: stats.tokens as f64 / seconds,
            samples_consumed,
        };
        if step % t.log_every == 0 || step == t.steps {
            tracing::info!(
                step,
                epoch,
                loss = metrics.loss,
                lr,
                grad_norm = metrics.grad_norm,
                samples_per_s = metrics.samples_per_s,
                tokens_per_s = metrics.tokens_per_s,
                samples_consumed,
                "train step"
            );
            events(TrainEvent::Progress(metrics));
        } else {
            tracing::debug!(
                step,
                loss = metrics.loss,
                lr,
                grad_norm = metrics.grad_norm,
                "train step"
            );
        }

        if step % spec.checkpoint.every_steps == 0 || step == t.steps {
            let meta = CheckpointMeta {
                step,
                position,
                samples_consumed,
                optimizer_step: optimizer.steps(),
                model_path: spec.model.path.clone(),
                spec: spec.to_toml(),
                dp_size: layout.dp_size,
                tp_size: layout.tp_size,
                attempt,
            };
            let state = ShardState {
                step,
                tp_rank: layout.tp_rank,
                tp_size: layout.tp_size,
                writer: layout.dp_rank == 0,
                tensors: params
                    .iter()
                    .map(|(n, p)| (n.clone(), p.detach()))
                    .collect(),
                optimizer: optimizer.state(),
                meta: serde_json::to_value(&meta).expect("checkpoint meta serialises"),
            };
            let ticket = ckpt
                .save(state)
                .map_err(|source| TrainError::store(&spec.checkpoint.url, source))?;
            tickets.push(ticket);
        }
        collect_saves(
            &mut tickets,
            false,
            &ckpt,
            &mut last_checkpoint,
            &mut events,
        );
    }
    drop(loader);

    // Every rank learns the newest commit, which only tp rank 0 of dp rank 0 sees.
    collect_saves(&mut tickets, true, &ckpt, &mut last_checkpoint, &mut events);
    let committed = from_world_rank0(
        &groups,
        last_checkpoint.as_ref().map_or(-1, |c| c.step as i64),
        "sharing the last committed checkpoint",
    )?;
    let checkpoint = (committed >= 0).then(|| CheckpointReport {
        step: committed as u64,
        url: checkpoint_url(&ckpt, committed as u64),
    });

    let eval = match &spec.data.eval {
        Some(location) if layout.dp_rank == 0 => {
            evaluate(&spec, location, &loaded.model, device, layout.rank == 0)?
        }
        _ => None,
    };
    tracing::info!(
        step,
        samples_consumed,
        skipped_records,
        checkpoint = ?checkpoint.as_ref().map(|c| &c.url),
        "training done"
    );
    Ok(TrainOutcome {
        final_step: step,
        samples_consumed,
        checkpoint,
        resumed_from: resumed.map(|m| m.step),
        skipped_records,
        eval,
    })
}

/// Gives every trainable parameter a (zero) gradient buffer once, so that
/// every rank's buckets have the same size even if a parameter gets no
/// gradient in some step (`zero_grad` then keeps the buffers).
fn allocate_grads(params: &[(String, Tensor)]) {
    for (_, p) in params {
        if !p.grad().defined() {
            (p.sum(Kind::Float) * 0.0).backward();
        }
    }
}

/// Reports finished saves; with `wait`, waits for all of them first.
fn collect_saves(
    tickets: &mut Vec<SaveTicket>,
    wait: bool,
    ckpt: &Checkpointer,
    last: &mut Option<CheckpointReport>,
    events: &mut Box<dyn FnMut(TrainEvent) + Send>,
) {
    tickets.retain(|ticket| {
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
                let report = CheckpointReport {
                    step: outcome.step,
                    url: checkpoint_url(ckpt, outcome.step),
                };
                tracing::info!(step = outcome.step, url = %report.url, bytes = outcome.bytes, "checkpoint committed");
                *last = Some(report.clone());
                events(TrainEvent::Checkpoint(report));
            }
            SaveStatus::Failed(reason) => {
                tracing::warn!(step = outcome.step, %reason, "checkpoint not saved; training goes on");
            }
            SaveStatus::Uploaded | SaveStatus::Skipped => {}
        }
        false
    });
}

/// Restores the newest committed checkpoint (world rank 0 picks it, so that
/// every rank restores the same one).
fn resume(
    ckpt: &Checkpointer,
    groups: &Groups,
    layout: &Layout,
    params: &[(String, Tensor)],
    optimizer: &mut AdamW,
) -> Result<Option<CheckpointMeta>, TrainError> {
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
                url: checkpoint_url(ckpt, chosen as u64),
                message: "rank 0 resumes from it but this rank does not find it".into(),
            })?,
    };
    let state = ckpt
        .load(&info, layout.tp_rank, layout.tp_size)
        .map_err(store_error)?;
    let bad = |message: String| TrainError::Resume {
        url: info.url.clone(),
        message,
    };
    let meta: CheckpointMeta = serde_json::from_value(state.meta)
        .map_err(|e| bad(format!("meta.json is not samtrain's training state: {e}")))?;
    let mut saved: std::collections::HashMap<String, Tensor> = state.tensors.into_iter().collect();
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

/// What one optimizer step needs besides its data.
struct StepContext<'a> {
    model: &'a SamModel,
    params: &'a [(String, Tensor)],
    groups: &'a Groups,
    tp: Option<&'a dyn Collective>,
    autocast: bool,
}

struct StepStats {
    loss: f64,
    grad_norm: f64,
    /// Answer tokens in the global batch.
    tokens: i64,
}

impl StepContext<'_> {
    /// Forward, backward, dp reduction and clipping of one optimizer step;
    /// leaves the final gradients in the parameters.
    fn step(
        &self,
        step: u64,
        micro: &[(SamInputs, Tensor)],
        buckets: &GradBuckets,
        max_grad_norm: f64,
    ) -> Result<StepStats, TrainError> {
        let dp = self.groups.dp.as_ref();
        let local_tokens: i64 = micro
            .iter()
            .map(|(_, labels)| labels.ne(-100).sum(Kind::Int64).int64_value(&[]))
            .sum();
        let tokens = if dp.world_size() > 1 {
            dp.all_reduce_sum(&Tensor::from_slice(&[local_tokens]))
                .map_err(|e| TrainError::collective(&format!("step {step}: counting tokens"), e))?
                .int64_value(&[0])
        } else {
            local_tokens
        };
        if tokens == 0 {
            return Err(TrainError::Step {
                step,
                message: "the global batch has no answer tokens to learn from".into(),
            });
        }
        // The model's tensor-parallel all-reduce panics when a peer fails.
        let loss_sum = catch_unwind(AssertUnwindSafe(|| self.backward(step, micro, tokens)))
            .map_err(|p| from_panic(step, p.as_ref()))??;
        buckets
            .all_reduce(self.params, dp)
            .map_err(|e| TrainError::collective(&format!("step {step}: gradient all-reduce"), e))?;
        let loss_sum = if dp.world_size() > 1 {
            dp.all_reduce_sum(&Tensor::from_slice(&[loss_sum]))
                .map_err(|e| TrainError::collective(&format!("step {step}: loss all-reduce"), e))?
                .double_value(&[0])
        } else {
            loss_sum
        };
        let grad_norm = clip_grad_norm(self.params, max_grad_norm, self.tp)
            .map_err(|e| TrainError::collective(&format!("step {step}: gradient norm"), e))?;
        Ok(StepStats {
            loss: loss_sum / tokens as f64,
            grad_norm,
            tokens,
        })
    }

    /// Accumulates the gradients of every micro-batch, each loss weighted by
    /// its share of the global batch's `tokens`; returns this rank's summed
    /// token loss.
    fn backward(
        &self,
        step: u64,
        micro: &[(SamInputs, Tensor)],
        tokens: i64,
    ) -> Result<f64, TrainError> {
        let mut loss_sum = 0.0;
        for (inputs, labels) in micro {
            let mut tape = self.tp.map(|_| GradTape::new());
            let losses = tch::autocast(self.autocast, || {
                self.model.loss(inputs, labels, None, tape.as_mut())
            })
            .map_err(|e| {
                TrainError::from_model("", &format!("the forward pass of step {step}"), e)
            })?;
            if losses.tokens == 0 {
                continue;
            }
            let scaled = &losses.total * (losses.tokens as f64 / tokens as f64);
            match tape {
                Some(tape) => tape.backward(&scaled, self.tp).map_err(|e| {
                    TrainError::collective(&format!("the backward pass of step {step}"), e)
                })?,
                None => scaled.backward(),
            }
            loss_sum += losses.lm.double_value(&[]) * losses.tokens as f64;
        }
        Ok(loss_sum)
    }
}

/// Predicts `location` with the trained model and scores it (on world rank
/// 0, which also writes `evaluation.output`); the other ranks of dp rank 0
/// only join the generation.
fn evaluate(
    spec: &JobSpec,
    location: &str,
    model: &SamModel,
    device: Device,
    scorer: bool,
) -> Result<Option<Summary>, TrainError> {
    let set = inputs::load_dataset(location, spec.data.bad_records)?;
    let predictor = Predictor::new(
        &set.root,
        &inputs::text_config(spec),
        model.config.vision_config.image_size,
        spec.evaluation.clone(),
    )?;
    let started = Instant::now();
    let predictions = predictor.predict(model, device, &set.records)?;
    if !scorer {
        return Ok(None);
    }
    let out = spec.evaluation.output.as_deref().map(Path::new);
    if let Some(dir) = out {
        predict::write_predictions(&dir.join("pred.json"), &predictions)?;
    }
    let evaluation = predict::score(&predictions, out)?;
    let s = evaluation.summary;
    tracing::info!(
        samples = predictions.len(),
        rouge = s.rouge,
        cider = s.cider,
        bleu4 = s.bleu4,
        seconds = started.elapsed().as_secs_f64(),
        "evaluation"
    );
    Ok(Some(s))
}
