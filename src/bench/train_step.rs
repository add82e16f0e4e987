//! `samtrain bench train-step`: one training step of a model folder
//! (forward, backward, the trainer's AdamW, the gradients dropped as a
//! one-rank trainer drops them, every parameter trainable) on a fixed random batch, to compare with the same model in transformers
//! (`benches/train_step.py`, `benches/run_train_step.sh`, and on a GPU
//! `benches/run_gpu.sh`); with `--save-every`, saving a checkpoint every
//! few steps as training does ([`super::step_saves`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Args, ValueEnum};
use samtrain_model::tape::GradTape;
use samtrain_model::{trainable, LoadedModel, SamConfig, SamInputs};
use samtrain_worker::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

use super::{median, mib, rss_bytes, step_saves, synchronize, BenchDevice};

#[derive(Args)]
pub struct TrainStepArgs {
    /// Model folder (`config.json`, `model.safetensors`, `sam.safetensors`).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: i64,
    /// Images per sample.
    #[arg(long, default_value_t = 1)]
    images: i64,
    /// Text tokens per sample (the LLM's sequence is images * query tokens + this).
    #[arg(long, default_value_t = 64)]
    text_len: i64,
    /// Instruction tokens per sample for the Q-Former.
    #[arg(long, default_value_t = 16)]
    qformer_len: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (first-use allocations, caches).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Where the model trains.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
    /// Mixed precision of the forward pass and loss (autocast, as
    /// `[training] bf16` does on CUDA); weights, gradients and AdamW's
    /// state stay fp32 either way.
    #[arg(long, value_enum, default_value_t = Autocast::Off)]
    autocast: Autocast,
    /// libtorch's intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Seed of the random batch.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Recompute each layer in backward instead of keeping its activations
    /// (`[training] activation_checkpointing`).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Zeroes the gradients after each step, keeping their buffers, as
    /// the trainer does under data parallelism, instead of dropping them as
    /// it does for one rank (and torch's `zero_grad()` does).
    #[arg(long)]
    keep_grads: bool,
    /// Saves the trained state (parameters and AdamW's moments, as a
    /// samtrain checkpoint in `--save-to`) after every this many steps, to
    /// time what a save costs the steps around it.
    #[arg(long, requires = "save_to")]
    save_every: Option<usize>,
    /// The checkpoint folder of `--save-every`'s saves.
    #[arg(long)]
    save_to: Option<PathBuf>,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// The forward pass's precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Autocast {
    /// fp32 throughout.
    Off,
    Bf16,
    /// No loss scaling, on either side: the timing is the same with it.
    Fp16,
}

impl Autocast {
    fn kind(self) -> Option<Kind> {
        match self {
            Autocast::Off => None,
            Autocast::Bf16 => Some(Kind::BFloat16),
            Autocast::Fp16 => Some(Kind::Half),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Autocast::Off => "off",
            Autocast::Bf16 => "bf16",
            Autocast::Fp16 => "fp16",
        }
    }
}

// AdamW as on the Python side: `torch.optim.AdamW(lr=1e-4, weight_decay=0.01)`
// (betas 0.9 and 0.999 and eps 1e-8, torch's defaults). samtrain's decays
// matrices only, torch's every tensor: one multiply fused into the same
// pass either way.
const LEARNING_RATE: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;

/// Wall-clock time of each phase of one step.
struct StepTimes {
    forward: Duration,
    backward: Duration,
    optimizer: Duration,
}

impl StepTimes {
    fn total(&self) -> Duration {
        self.forward + self.backward + self.optimizer
    }
}

pub fn run(args: &TrainStepArgs) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be positive");
    ensure!(
        args.save_every.is_none_or(|n| (1..=1000).contains(&n)),
        "--save-every must be from 1 to 1000"
    );
    ensure!(
        args.text_len >= 2,
        "--text-len must be at least 2 (half of it is supervised)"
    );
    tch::set_num_threads(args.threads);
    let device = args.device.resolve()?;
    // fp32 weights on every device (`load` would pick bf16 on CUDA): the
    // reduced precision, if any, is autocast's, as in PyTorch's AMP.
    let m = LoadedModel::load_as(&args.model, device, None, Kind::Float)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let config = &m.model.config;
    // Every parameter trains, as in the transformers run it is compared with,
    // whatever the folder's own policy says.
    let mut options = config.samtrain.clone();
    options.trainable.all = true;
    let params = trainable::apply(&m.vs, &options);
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: WEIGHT_DECAY,
        },
    );
    let (inputs, labels) = random_batch(config, args, device);
    let rss_before_steps = rss_bytes("VmRSS")?;

    let mut saves = match (args.save_every, &args.save_to) {
        (Some(every), Some(dir)) => Some(step_saves::Saves::open(every, dir)?),
        _ => None,
    };
    let mut times = Vec::with_capacity(args.steps);
    let mut first_loss = None;
    for step in 0..args.warmup + args.steps {
        let start = Instant::now();
        let mut tape = GradTape::with_checkpointing(args.activation_checkpointing);
        let losses = match args.autocast.kind() {
            None => m.model.loss(&inputs, &labels, Some(&mut tape))?,
            Some(kind) => samtrain_torchext::autocast(device, kind, || {
                m.model.loss(&inputs, &labels, Some(&mut tape))
            })??,
        };
        // On a GPU the clock is read once the queued kernels have run.
        synchronize(device);
        let forward = start.elapsed();
        tape.backward(&losses.total, None)?;
        synchronize(device);
        let backward = start.elapsed();
        if let Some(saves) = &mut saves {
            saves.settled(opt.settle_loan());
        }
        opt.step(LEARNING_RATE)?;
        if args.keep_grads {
            opt.zero_grad();
        } else {
            opt.drop_grads()?;
        }
        synchronize(device);
        if let Some(saves) = &mut saves {
            saves.after_step(step, step >= args.warmup, &params, &mut opt)?;
        }
        let done = start.elapsed();
        // Read after the clock stops: the value is only a cross-check that both
        // sides compute the same loss on the same batch.
        first_loss.get_or_insert_with(|| losses.total.double_value(&[]));
        if step >= args.warmup {
            times.push(StepTimes {
                forward,
                backward: backward - forward,
                optimizer: done - backward,
            });
        }
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median_of = |phase: fn(&StepTimes) -> Duration| median(times.iter().map(|t| ms(phase(t))));
    let median_ms = median_of(StepTimes::total);
    let min_ms = times
        .iter()
        .map(|t| ms(t.total()))
        .fold(f64::INFINITY, f64::min);
    let (forward_ms, backward_ms, optimizer_ms) = (
        median_of(|t| t.forward),
        median_of(|t| t.backward),
        median_of(|t| t.optimizer),
    );
    let peak_rss = rss_bytes("VmHWM")?;
    let parameters = trainable::count(&params);
    // What `samtrain model plan` expects a step to add to the loaded model:
    // fp32 gradients, AdamW's two moments and the activations.
    let mut planned = config.clone();
    planned.samtrain.trainable.all = true;
    let plan = samtrain_model::plan::plan(
        &planned,
        &samtrain_model::plan::PlanInput {
            tp: 1,
            batch: args.batch,
            images: args.images,
            text_len: args.text_len,
            dtype_bytes: 4,
            activation_checkpointing: args.activation_checkpointing,
        },
    );
    let planned_step_bytes = plan.trainable_params * 12 + plan.activation_bytes;
    let first_loss = first_loss.expect("--steps is positive, so a step ran");
    let saved = saves.map(step_saves::Saves::finish).transpose()?;
    // Training's pace: every step as it ran, and the wait for the last
    // uploads, which the steps would have carried had training gone on.
    let mean_ms = (times.iter().map(|t| ms(t.total())).sum::<f64>()
        + saved.as_ref().map_or(0.0, |s| ms(s.final_flush)))
        / times.len() as f64;
    if args.json {
        let out = serde_json::json!({
            "device": args.device.to_string(),
            "autocast": args.autocast.name(),
            "median_ms": median_ms,
            "mean_ms": mean_ms,
            "min_ms": min_ms,
            "steps": args.steps,
            "threads": args.threads,
            "batch": args.batch,
            "parameters": parameters,
            "images": args.images,
            "text_len": args.text_len,
            "qformer_len": args.qformer_len,
            "guidance": config.samtrain.guidance,
            "forward_ms": forward_ms,
            "backward_ms": backward_ms,
            "optimizer_ms": optimizer_ms,
            "first_loss": first_loss,
            "activation_checkpointing": args.activation_checkpointing,
            "rss_before_steps_bytes": rss_before_steps,
            "peak_rss_bytes": peak_rss,
            "planned_step_bytes": planned_step_bytes,
            "save": saved.as_ref().map(|c| serde_json::json!({
                "every": args.save_every,
                "bytes": c.bytes,
                "saves": c.saves,
                "blocked_ms": c.blocked_ms,
                "settle_ms": c.settle_ms,
                "copied_bytes": c.copied,
                "final_flush_ms": ms(c.final_flush),
            })),
        });
        println!("{out}");
    } else {
        println!(
            "train step on {} (autocast {}): {} parameters, batch {} x {} image(s), text {}, \
             instruction {}, guidance {}, activation checkpointing {}, {} threads, {} steps \
             after {} warm-up",
            args.device,
            args.autocast.name(),
            parameters,
            args.batch,
            args.images,
            args.text_len,
            args.qformer_len,
            if config.samtrain.guidance {
                "on"
            } else {
                "off"
            },
            if args.activation_checkpointing {
                "on"
            } else {
                "off"
            },
            args.threads,
            args.steps,
            args.warmup
        );
        println!("  median {median_ms:.1} ms, min {min_ms:.1} ms");
        println!(
            "  medians by phase: forward {forward_ms:.1} ms, backward {backward_ms:.1} ms, \
             optimizer {optimizer_ms:.1} ms"
        );
        println!("  loss at the first step {first_loss:.6}");
        if let Some(c) = &saved {
            println!(
                "  saves ({:.0} MiB, {} timed): blocked {:.1} ms each, {:.1} of them settling \
                 the loan (copying {:.1} MiB the upload had not read by the next update); mean \
                 step with the last upload's wait {mean_ms:.1} ms",
                mib(c.bytes),
                c.saves,
                c.blocked_ms,
                c.settle_ms,
                mib(c.copied),
            );
        }
        println!(
            "  resident memory: {:.0} MiB before the steps, peak {:.0} MiB; \
             the memory plan expects a step to add {:.0} MiB",
            mib(rss_before_steps),
            mib(peak_rss),
            mib(planned_step_bytes)
        );
    }
    Ok(())
}

/// A seeded random batch and its labels (the first half of each text is
/// not supervised), on `device`. The draws are those of
/// `benches/train_step.py`, in the same order from the same libtorch CPU
/// generator, so both sides see the same numbers on every device.
fn random_batch(config: &SamConfig, args: &TrainStepArgs, device: Device) -> (SamInputs, Tensor) {
    tch::manual_seed(args.seed);
    let (b, size) = (args.batch, config.vision_config.image_size);
    let cpu = (Kind::Int64, Device::Cpu);
    let pixel_values = Tensor::randn([b, args.images, 3, size, size], (Kind::Float, Device::Cpu));
    // Ids from 3 up, below the last id: never pad, bos or eos, nor the image
    // placeholder transformers reserves at the end of the vocabulary.
    let qformer_input_ids = Tensor::randint_low(
        3,
        config.qformer_config.vocab_size - 1,
        [b, args.qformer_len],
        cpu,
    );
    let input_ids = Tensor::randint_low(
        3,
        config.text_config.vocab_size - 1,
        [b, args.text_len],
        cpu,
    );
    let labels = input_ids.copy();
    let _ = labels.narrow(1, 0, args.text_len / 2).fill_(-100);
    (
        SamInputs {
            pixel_values: pixel_values.to_device(device),
            image_mask: None,
            qformer_input_ids: qformer_input_ids.to_device(device),
            qformer_attention_mask: None,
            input_ids: input_ids.to_device(device),
            attention_mask: None,
            dropout: None,
        },
        labels.to_device(device),
    )
}
