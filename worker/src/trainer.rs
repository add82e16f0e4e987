//! The training loop of one rank of a data-parallel x tensor-parallel job,
//! as a [`Trainer`] with a set-up, a step, a checkpoint hook and a finish:
//!
//! - [`Trainer::new`] loads the model folder (this rank's tensor-parallel
//!   shard), builds the optimizer, restores the newest committed checkpoint
//!   at the spec's URL if there is one (trainable tensors, optimizer state
//!   and the sampler's global position, so that a job resumed at another
//!   data-parallel size re-shards the rest of the epoch; see
//!   [`crate::checkpointing`]) and starts the prefetching loader;
//! - [`Trainer::step`] takes `grad_accum` micro-batches, runs forward,
//!   backward and the gradient reduction ([`crate::step`]), and AdamW at the
//!   scheduled learning rate;
//! - [`Trainer::maybe_checkpoint`] saves every `checkpoint.every_steps`
//!   steps and at the last one, in the background;
//! - [`Trainer::finish`] waits for the saves, agrees on the newest commit,
//!   and predicts and scores `data.eval` when given: the ranks of
//!   data-parallel rank 0 generate (together, under tensor parallelism) and
//!   world rank 0 scores.
//!
//! Randomness: nothing draws from libtorch's process-wide generator. The
//! sample order depends on (seed, epoch) only (see `samtrain_data::sampler`)
//! and the Q-Former's dropout masks on (seed, epoch, sample) only (see
//! `samtrain_model::rng`), so no RNG state needs saving, data-parallel and
//! accumulated runs draw what one process would, and with the same world
//! size on the CPU a resumed run reproduces an uninterrupted one bit for
//! bit.
//!
//! The abort flag is checked before every step; it ends the generation with
//! [`TrainError::Aborted`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use samtrain_checkpoint::{CheckpointOptions, Checkpointer, RetryPolicy, ShardState};
use samtrain_collective::ProcessGroups;
use samtrain_data::ledger::{self, Segment, Tally};
use samtrain_data::preprocess::Loader;
use samtrain_data::sampler::{Position, SamplerConfig};
use samtrain_model::parallel::TensorParallel;
use samtrain_model::vision_cache::VisionCache;
use samtrain_model::{rng, trainable, weights, DropoutKeys, LoadedModel};
use samtrain_proto::spec::{Augmentation, JobSpec};
use tch::{Device, Kind, Tensor};

use crate::checkpointing::{
    self, checkpoint_at, from_world_rank0, BaseModel, CheckpointMeta, Saves,
};
use crate::ddp::{GradBuckets, DEFAULT_BUCKET_BYTES};
use crate::device::{model_dtype, resolve_device};
use crate::error::{DataError, TrainError};
use crate::inputs::{self, to_device};
use crate::optim::{AdamW, AdamWConfig};
use crate::predict;
use crate::report::{self, EvalExample, EventSink, StepMetrics, TrainEvent, TrainOutcome};
use crate::resident::{ModelKey, ModelLease, ResidentModels};
use crate::schedule::Schedule;
use crate::step::StepContext;
use crate::tensorboard::Board;

/// Everything one rank needs to train.
pub struct TrainJob {
    pub spec: JobSpec,
    /// This rank's world, data-parallel and tensor-parallel groups; their
    /// layout says the rank (`dp_rank * tp + tp_rank`) and the world size.
    pub groups: ProcessGroups,
    /// Set from outside to end the generation; checked before every step.
    pub abort: Arc<AtomicBool>,
    /// Progress and committed checkpoints, as they happen.
    pub events: EventSink,
    /// The worker's model kept from its previous generation, if any; this
    /// generation takes it back or loads, and leaves its model there.
    pub models: ResidentModels,
}

/// Trains one rank of `job` to `training.steps`; see the module docs.
pub fn train(job: TrainJob) -> Result<TrainOutcome, TrainError> {
    let layout = job.groups.layout;
    let span = tracing::info_span!(
        "train",
        rank = layout.rank,
        dp_rank = layout.dp_rank,
        tp_rank = layout.tp_rank
    );
    let _entered = span.enter();
    let mut trainer = Trainer::new(job)?;
    while !trainer.done() {
        trainer.step()?;
        trainer.maybe_checkpoint()?;
    }
    trainer.finish()
}

/// One rank's training state between steps.
pub struct Trainer {
    /// First, so that it is dropped first: its uploads end before the
    /// model (whose tensors a save may be reading) goes back to its slot.
    saves: Saves,
    spec: JobSpec,
    /// `spec` with local paths for the model folder and tokenizers.
    local: JobSpec,
    remote: inputs::Remote,
    groups: ProcessGroups,
    abort: Arc<AtomicBool>,
    events: EventSink,
    device: Device,
    lease: ModelLease,
    params: Vec<(String, Tensor)>,
    optimizer: AdamW,
    schedule: Schedule,
    buckets: GradBuckets,
    /// Absent once no steps are left (a job resumed at its last step).
    loader: Option<Loader>,
    /// Pairs this attempt's checkpoint parts (the same on every rank).
    attempt: i64,
    /// The base model's digest, recorded in every checkpoint.
    base_model: String,
    /// Step times since the last progress report.
    timing: StepTiming,
    /// The sample ledger up to the checkpoint this generation resumed
    /// from, and this generation's part of it so far.
    ledger: Vec<Segment>,
    trained: Trained,
    step: u64,
    position: Position,
    samples_consumed: u64,
    resumed_from: Option<u64>,
    skipped_records: usize,
    /// Where world rank 0 records the job for TensorBoard, if anywhere.
    board: Option<Board>,
}

impl Trainer {
    /// Loads the model, the optimizer, the newest checkpoint and the data.
    pub fn new(job: TrainJob) -> Result<Self, TrainError> {
        let TrainJob {
            spec,
            groups,
            abort,
            mut events,
            models,
        } = job;
        if let Some(p) = spec.problems().first() {
            return Err(TrainError::config(&p.field, p.message.clone()));
        }
        // Model, optimizer, checkpoint and data loader: a trace's "load".
        let load_span = tracing::info_span!("load").entered();
        let layout = groups.layout;
        if layout.tp != i64::from(spec.parallel.tp) {
            return Err(TrainError::config(
                "parallel.tp",
                format!(
                    "is {} but this rank's tp group has {} ranks",
                    spec.parallel.tp, layout.tp
                ),
            ));
        }
        let t = &spec.training;
        if t.threads > 0 {
            tch::set_num_threads(t.threads as i32);
        }
        // World rank 0 records the job's scalars, from its own events.
        let board = match &spec.logging.tensorboard {
            Some(location) if layout.rank == 0 => Some(Board::start(location)?),
            _ => None,
        };
        if let Some(board) = board.clone() {
            let mut forward = events;
            events = Box::new(move |event| {
                board.event(&event);
                forward(event)
            });
        }
        let device = resolve_device(t.device, layout.rank as u32)?;
        // Model folder and tokenizers as local files (fetched when URLs);
        // `spec` itself, as the user wrote it, is what checkpoints record.
        let remote = inputs::Remote::of(&spec.data);
        let local = inputs::localize(&spec, &remote)?;
        let (lease, params) = load_trainable(&local, &groups, device, &models)?;
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
        let base = BaseModel {
            path: spec.model.path.clone(),
            digest: weights::base_digest(Path::new(&local.model.path)).map_err(|e| {
                TrainError::from_model(&spec.model.path, "reading the base model", e)
            })?,
        };
        let vision_cache = match &spec.model.vision_cache {
            Some(dir) => {
                if spec.data.augmentation != Augmentation::None {
                    tracing::warn!(%dir, "model.vision_cache with data.augmentation on: augmented images differ every epoch, so the cache keeps new ones instead of reusing them (set data.augmentation = \"none\")");
                }
                Some(Arc::new(
                    VisionCache::open(
                        Path::new(dir),
                        &base.digest,
                        spec.model.vision_cache_max_bytes(),
                    )
                    .map_err(|e| TrainError::from_model(dir, "opening the vision cache", e))?,
                ))
            }
            None => None,
        };
        // Set or cleared at every start: the model may be a resident one
        // that another job's cache was set on.
        lease.model().model.set_vision_cache(vision_cache);
        let loading = Instant::now();
        let resumed = checkpointing::resume(&ckpt, &groups, &base, &params, &mut optimizer)?;
        let load_s = resumed.as_ref().map(|_| loading.elapsed().as_secs_f64());
        let (step, position, samples_consumed) = match &resumed {
            Some(meta) => (meta.step, meta.position, meta.samples_consumed),
            None => (0, Position::default(), 0),
        };
        let ledger = resumed
            .as_ref()
            .map(|m| m.ledger.clone())
            .unwrap_or_default();
        let resumed_at = resumed.as_ref().map(|m| checkpoint_at(&ckpt, m.step));
        drop(load_span);
        events(TrainEvent::Started {
            step,
            samples_consumed,
            resumed_from: resumed_at.clone(),
            load_s,
        });
        let attempt = from_world_rank0(
            &groups,
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            "agreeing on the attempt id",
        )?;

        let train_set = inputs::load_dataset(
            &spec.data.train,
            spec.data.bad_records,
            inputs::input_limits(&spec),
            &remote,
        )?;
        let skipped_records = train_set.skipped;
        let sampler_config = inputs::sampler_config(&local, train_set.records.len());
        let config = &lease.model().model.config;
        inputs::check_vocabulary(
            &inputs::text_config(&local),
            local.data.qformer_tokenizer.is_some(),
            config,
            Path::new(&spec.model.path),
        )?;
        let loader = if step < t.steps {
            let image_size = config.vision_config.image_size;
            Some(inputs::start_loader(
                &local,
                train_set,
                image_size,
                (groups.layout.dp_rank as u64, groups.layout.dp as u64),
                position,
            )?)
        } else {
            None
        };

        allocate_grads(&params);
        let buckets = GradBuckets::new(&params, DEFAULT_BUCKET_BYTES);
        Ok(Trainer {
            schedule: Schedule::from_spec(&spec.training),
            saves: Saves::new(ckpt, resumed_at),
            resumed_from: resumed.map(|m| m.step),
            spec,
            local,
            remote,
            groups,
            abort,
            events,
            device,
            lease,
            params,
            optimizer,
            buckets,
            loader,
            attempt,
            base_model: base.digest,
            timing: StepTiming::default(),
            ledger,
            trained: Trained {
                from: position,
                first_step: step + 1,
                micro_steps: 0,
                tally: Tally::default(),
                sampler: sampler_config,
            },
            step,
            position,
            samples_consumed,
            skipped_records,
            board,
        })
    }

    /// Whether every step of the job is done.
    pub fn done(&self) -> bool {
        self.step >= self.spec.training.steps
    }

    /// One optimizer step: its micro-batches, forward, backward, gradient
    /// reduction and the AdamW update; reports progress every
    /// `training.log_every` steps and at the last one.
    pub fn step(&mut self) -> Result<StepMetrics, TrainError> {
        if self.abort.load(Ordering::SeqCst) {
            tracing::warn!(
                step = self.step + 1,
                "abort requested; ending the generation"
            );
            return Err(TrainError::Aborted {
                step: self.step + 1,
            });
        }
        self.step += 1;
        let step = self.step;
        let log_every = self.spec.training.log_every;
        let reporting = step % log_every == 0 || step == self.spec.training.steps;
        // Steps that report are info spans (what a trace shows, one per
        // `log_every`: a long run's every step would swamp it); the others
        // debug spans, for logs at debug.
        let span = if reporting {
            tracing::info_span!("step", step)
        } else {
            tracing::debug_span!("step", step)
        };
        let _entered = span.enter();
        let started = Instant::now();
        let (micro, epoch) = self.next_micro_batches()?;
        let data_s = started.elapsed().as_secs_f64();
        let t = &self.spec.training;
        let stats = StepContext {
            model: &self.lease.model().model,
            params: &self.params,
            dp: self.groups.dp.as_ref(),
            tp: (self.groups.layout.tp > 1).then_some(self.groups.tp.as_ref()),
            buckets: &self.buckets,
            max_grad_norm: t.max_grad_norm,
            autocast: (t.bf16 && self.device.is_cuda()).then_some(self.device),
            activation_checkpointing: t.activation_checkpointing,
            overlap: self.spec.parallel.overlap_grad_reduce,
        }
        .run(step, &micro)?;
        let lr = self.schedule.lr(step - 1);
        self.optimizer.step(lr).map_err(|e| TrainError::Step {
            step,
            message: format!("the AdamW update: {e}"),
        })?;
        // Data parallelism's buckets reduce the same gradient buffers every
        // step; a rank alone needs none kept.
        if self.groups.dp.world_size() > 1 {
            self.optimizer.zero_grad();
        } else {
            self.optimizer.drop_grads().map_err(|e| TrainError::Step {
                step,
                message: format!("dropping the gradients: {e}"),
            })?;
        }
        let global_batch = t.batch_size * t.grad_accum * self.groups.layout.dp as u64;
        self.samples_consumed += global_batch;

        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let comm_s = stats.comm.as_secs_f64();
        self.timing.add(seconds - comm_s, comm_s, data_s);
        let (compute_s, comm_s, data_s) = if reporting {
            self.timing.take()
        } else {
            (seconds - comm_s, comm_s, data_s)
        };
        let metrics = StepMetrics {
            step,
            epoch,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            samples_per_s: global_batch as f64 / seconds,
            tokens_per_s: stats.tokens as f64 / seconds,
            samples_consumed: self.samples_consumed,
            compute_s,
            comm_s,
            data_s,
            objects: self.remote.stats(),
        };
        if reporting {
            tracing::info!(
                step,
                epoch,
                loss = metrics.loss,
                lr,
                grad_norm = metrics.grad_norm,
                samples_per_s = metrics.samples_per_s,
                tokens_per_s = metrics.tokens_per_s,
                samples_consumed = self.samples_consumed,
                compute_s,
                comm_s,
                data_s,
                "train step"
            );
            (self.events)(TrainEvent::Progress(metrics.clone()));
        } else {
            tracing::debug!(
                step,
                loss = metrics.loss,
                lr,
                grad_norm = metrics.grad_norm,
                "train step"
            );
        }
        Ok(metrics)
    }

    /// `grad_accum` batches from the loader, on the training device, and the
    /// epoch of the last one; advances the sampler position.
    fn next_micro_batches(
        &mut self,
    ) -> Result<(Vec<(samtrain_model::SamInputs, Tensor)>, u64), TrainError> {
        let location = &self.spec.data.train;
        let loader = self
            .loader
            .as_mut()
            .expect("a loader exists while steps are left");
        let mut micro = Vec::with_capacity(self.spec.training.grad_accum as usize);
        let mut epoch = self.position.epoch;
        for _ in 0..self.spec.training.grad_accum {
            let fetched = loader
                .next()
                .ok_or_else(|| DataError::new(location, "the loader stopped"))?;
            let batch = fetched
                .batch
                .map_err(|e| DataError::new(location, e.to_string()))?;
            epoch = fetched.epoch;
            self.position = fetched.position_after;
            let (mut inputs, labels) = to_device(&batch, self.device);
            // Dropout masks follow the sample and the epoch, not the step or
            // the rank: data-parallel and accumulated runs draw what one
            // process would, and a resumed job what it drew before.
            self.trained.micro_steps += 1;
            for &id in &fetched.indices {
                self.trained.tally.add(fetched.epoch, id as u64);
            }
            let samples: Vec<i64> = fetched.indices.iter().map(|&i| i as i64).collect();
            inputs.dropout = Some(DropoutKeys {
                seed: rng::derive(self.spec.training.seed, &[epoch]),
                samples: Tensor::from_slice(&samples),
            });
            micro.push((inputs, labels));
        }
        Ok((micro, epoch))
    }

    /// Starts a background save of this step when it is due (every
    /// `checkpoint.every_steps` steps and the last), and reports the saves
    /// that committed since the last call.
    pub fn maybe_checkpoint(&mut self) -> Result<(), TrainError> {
        let step = self.step;
        if step % self.spec.checkpoint.every_steps == 0 || step == self.spec.training.steps {
            let layout = self.groups.layout;
            let meta = CheckpointMeta {
                step,
                position: self.position,
                samples_consumed: self.samples_consumed,
                optimizer_step: self.optimizer.steps(),
                model_path: self.spec.model.path.clone(),
                spec: self.spec.to_toml(),
                dp_size: layout.dp as u32,
                tp_size: layout.tp as u32,
                attempt: self.attempt,
                base_model: Some(self.base_model.clone()),
                ledger: self.ledger_at(step)?,
            };
            let loan = self.saves.start(ShardState {
                step,
                tp_rank: layout.tp_rank as u32,
                tp_size: layout.tp as u32,
                writer: layout.dp_rank == 0,
                tensors: self
                    .params
                    .iter()
                    .map(|(n, p)| (n.clone(), p.detach()))
                    .collect(),
                optimizer: self.optimizer.state(),
                meta: serde_json::to_value(&meta).expect("checkpoint meta serialises"),
            })?;
            // The save reads the parameters and moments in place until the
            // optimizer next writes them.
            self.optimizer.lend(loan);
        }
        self.saves.collect(false, &mut self.events);
        Ok(())
    }

    /// Waits for the saves, agrees on the newest commit, and evaluates.
    pub fn finish(mut self) -> Result<TrainOutcome, TrainError> {
        drop(self.loader.take());
        let checkpoint = Some(
            self.saves
                .finish(&self.groups, self.step, &mut self.events)?,
        );
        let layout = self.groups.layout;
        // The ranks of dp rank 0 generate together; world rank 0 scores.
        let eval = match &self.spec.data.eval {
            Some(location) if layout.dp_rank == 0 => {
                let _evaluating = tracing::info_span!("evaluate").entered();
                let predictions = predict::predict_set(
                    &self.local,
                    &self.remote,
                    location,
                    &self.lease.model().model,
                    self.device,
                )?;
                let out = self.spec.evaluation.output.as_deref().map(Path::new);
                (layout.rank == 0)
                    .then(|| -> Result<_, TrainError> {
                        let scores = predict::score_into(&predictions, out)?;
                        Ok((scores, examples(&predictions)))
                    })
                    .transpose()?
            }
            _ => None,
        };
        let (eval, examples) = match eval {
            Some((scores, examples)) => (Some(scores), examples),
            None => (None, Vec::new()),
        };
        if let Some(board) = &self.board {
            if let Some(scores) = &eval {
                board.evaluation(self.step, scores, &examples);
            }
            board.flush();
        }
        tracing::info!(
            step = self.step,
            samples_consumed = self.samples_consumed,
            skipped_records = self.skipped_records,
            checkpoint = ?checkpoint.as_ref().map(|c| &c.url),
            "training done"
        );
        Ok(TrainOutcome {
            final_step: self.step,
            samples_consumed: self.samples_consumed,
            checkpoint,
            resumed_from: self.resumed_from,
            skipped_records: self.skipped_records,
            eval,
            examples,
        })
    }
}

/// What this generation trained on so far: its part of the ledger.
#[derive(Debug)]
struct Trained {
    from: Position,
    first_step: u64,
    micro_steps: u64,
    /// This rank's tally.
    tally: Tally,
    sampler: SamplerConfig,
}

impl Trainer {
    /// The ledger up to `step`: the resumed checkpoint's, and this
    /// generation's segment with every data-parallel rank's tally (an
    /// all-gather over the world; tensor-parallel ranks of one dp rank
    /// train the same samples, so their tp rank 0 speaks for them).
    fn ledger_at(&self, step: u64) -> Result<Vec<Segment>, TrainError> {
        let mut ledger = self.ledger.clone();
        let t = &self.trained;
        if t.micro_steps == 0 {
            return Ok(ledger);
        }
        let layout = self.groups.layout;
        let mine = [t.tally.count as i64, t.tally.digest as i64];
        let all: Vec<[i64; 2]> = if layout.world_size == 1 {
            vec![mine]
        } else {
            self.groups
                .world
                .all_gather(&Tensor::from_slice(&mine))
                .map_err(|e| TrainError::collective("gathering the sample ledger", e))?
                .iter()
                .map(|t| [t.int64_value(&[0]), t.int64_value(&[1])])
                .collect()
        };
        let ranks = (0..layout.dp)
            .map(|d| {
                let [count, digest] = all[(d * layout.tp) as usize];
                Tally {
                    count: count as u64,
                    digest: digest as u64,
                }
            })
            .collect();
        ledger::append(
            &mut ledger,
            Segment {
                from: t.from,
                to: self.position,
                first_step: t.first_step,
                last_step: step,
                micro_steps: t.micro_steps,
                dp: layout.dp as u64,
                sampler: t.sampler,
                ranks,
            },
        );
        Ok(ledger)
    }
}

/// Sums of the steps' seconds outside and inside the data-parallel
/// collectives, and of the first the part spent waiting for data, since
/// the last report.
#[derive(Debug, Default)]
struct StepTiming {
    compute_s: f64,
    comm_s: f64,
    data_s: f64,
    steps: u32,
}

impl StepTiming {
    fn add(&mut self, compute_s: f64, comm_s: f64, data_s: f64) {
        self.compute_s += compute_s;
        self.comm_s += comm_s;
        self.data_s += data_s;
        self.steps += 1;
    }

    /// The means per step (compute, communication, data), and a fresh
    /// start.
    fn take(&mut self) -> (f64, f64, f64) {
        let n = f64::from(self.steps.max(1));
        let means = (self.compute_s / n, self.comm_s / n, self.data_s / n);
        *self = StepTiming::default();
        means
    }
}

/// This rank's shard of the model folder (the worker's resident one when it
/// is the same), and its trainable parameters.
fn load_trainable(
    spec: &JobSpec,
    groups: &ProcessGroups,
    device: Device,
    models: &ResidentModels,
) -> Result<(ModelLease, Vec<(String, Tensor)>), TrainError> {
    let layout = groups.layout;
    let dtype = model_dtype(spec.model.dtype, device);
    let path = &spec.model.path;
    let model_error = |e| TrainError::from_model(path, "loading the model", e);
    let key =
        ModelKey::of(path, dtype, device, (layout.tp_rank, layout.tp)).map_err(model_error)?;
    let tp_comm = (layout.tp > 1).then(|| TensorParallel::new(groups.tp.clone()));
    let started = Instant::now();
    let lease = models
        .lease(key, tp_comm, |tp| {
            LoadedModel::load_as(Path::new(path), device, tp, dtype)
        })
        .map_err(model_error)?;
    let loaded = lease.model();
    let params = trainable::apply(&loaded.vs, &loaded.model.config.samtrain);
    if params.is_empty() {
        return Err(TrainError::config(
            "model.path",
            format!("{path}: the model's trainable-parameter policy leaves nothing to train"),
        ));
    }
    tracing::info!(
        dp_size = layout.dp,
        tp_size = layout.tp,
        ?device,
        ?dtype,
        reused = lease.reused,
        seconds = started.elapsed().as_secs_f64(),
        trainable = trainable::count(&params),
        "model ready"
    );
    Ok((lease, params))
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

/// The first predictions, for people to read beside the scores.
fn examples(predictions: &[samtrain_data::eval::Prediction]) -> Vec<EvalExample> {
    predictions
        .iter()
        .take(report::EXAMPLES)
        .map(|p| EvalExample {
            sample_id: p.sample_id.to_string(),
            prediction: p.pred_response.clone(),
            reference: p.gt_response.clone(),
        })
        .collect()
}
