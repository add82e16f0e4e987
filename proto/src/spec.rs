//! The job spec: what a user submits, in TOML, and what every worker of the
//! job trains by. It travels inside the gRPC API as its TOML text, so the
//! coordinator (which never links libtorch) and the workers read one format.
//!
//! [`JobSpec::from_toml`] parses and checks it: a syntax or type error names
//! its line and column; otherwise every semantic problem is listed at once,
//! each with its field path (`training.lr`), so a user fixes them in one go
//! and nothing is scheduled until the spec is clean.

use serde::{Deserialize, Serialize};

/// A whole job. Fields left out take the defaults documented on each type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Lower-case letters, digits and `-`, at most 63 characters (it names
    /// the job in the store's keys and in Kubernetes objects).
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default)]
    pub parallel: ParallelSpec,
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub restart: RestartSpec,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    #[serde(default)]
    pub logging: LoggingSpec,
}

/// Where a job's training is recorded besides the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSpec {
    /// A folder or an object-store URL (`s3://`, `gs://`, `az://`,
    /// `file://`) where world rank 0 writes TensorBoard event files: the
    /// training scalars every `training.log_every` steps, checkpoint
    /// timings, and the final evaluation's scores and example predictions.
    pub tensorboard: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A model folder (`config.json` plus Hugging Face InstructBLIP
    /// safetensors, `sam.safetensors` optional), as every worker sees it.
    pub path: String,
    /// A `config.json` to create the model folder from, with freshly
    /// initialised weights, when `path` holds no model yet (training from
    /// scratch, as the demo does). `samtrain local` does it before the
    /// workers start.
    #[serde(default)]
    pub init: Option<String>,
    /// The dtype the frozen weights are held and computed in; trainable
    /// tensors, their gradients and the optimizer stay fp32. Default: bf16
    /// on CUDA, fp32 on the CPU.
    #[serde(default)]
    pub dtype: Option<Dtype>,
    /// A folder where the frozen vision encoder's outputs are kept, by the
    /// image's pixels and the weights' digest: later epochs and restarts
    /// skip the encoder for images it has seen. Unused when the encoder
    /// trains (`samtrain.trainable.all`).
    #[serde(default)]
    pub vision_cache: Option<String>,
    /// The most the vision cache's folder may hold, in GiB: past it the
    /// oldest entries are removed. Default 64 (a ViT-g output is about
    /// 1.4 MB in fp32).
    #[serde(default = "default_vision_cache_max_gib")]
    pub vision_cache_max_gib: f64,
}

fn default_vision_cache_max_gib() -> f64 {
    64.0
}

impl ModelSpec {
    /// `vision_cache_max_gib` in bytes.
    pub fn vision_cache_max_bytes(&self) -> u64 {
        (self.vision_cache_max_gib * (1u64 << 30) as f64) as u64
    }
}

/// A floating-point format for the frozen weights (`[model] dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    /// The name a spec and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Bf16 | Dtype::Fp16 => 2,
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" | "float32" => Ok(Dtype::Fp32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "float16" => Ok(Dtype::Fp16),
            other => Err(format!("unknown dtype {other:?}: fp32, bf16 or fp16")),
        }
    }
}

/// What happens to a record that fails its checks while data loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRecords {
    /// Stop the job with an error naming the file, record and field.
    #[default]
    Fail,
    /// Leave the record out and count it in the job's report.
    Skip,
}

/// The end of an epoch, as torch's `drop_last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tail {
    #[default]
    Drop,
    Pad,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The training set: an MmLINK folder or annotations file.
    pub train: String,
    /// A held-out set; when given, the job ends with predict + eval on it.
    #[serde(default)]
    pub eval: Option<String>,
    /// The LLM's `tokenizer.json`; default `<model.path>/tokenizer.json`.
    #[serde(default)]
    pub llm_tokenizer: Option<String>,
    /// The Q-Former's `tokenizer.json`; default the LLM's.
    #[serde(default)]
    pub qformer_tokenizer: Option<String>,
    #[serde(default = "default_max_txt_len")]
    pub max_txt_len: usize,
    #[serde(default = "default_max_output_txt_len")]
    pub max_output_txt_len: usize,
    /// Which end of a long instruction the Q-Former's tokenizer cuts:
    /// `left` (SAM's `truncation_side="left"`, the default) keeps its end.
    #[serde(default)]
    pub qformer_truncation: TruncationSide,
    /// The LLM prompt's first token. SAM sets its LLaMA tokenizer's BOS to
    /// `</s>`, so that is the default; `<s>` is LLaMA's own.
    #[serde(default = "default_eos_token")]
    pub bos_token: String,
    /// Ends every answer; generation stops at the model's `eos_token_id`.
    #[serde(default = "default_eos_token")]
    pub eos_token: String,
    /// Pads the LLM's batches (and the Q-Former's when both share one
    /// tokenizer file); added to the tokenizer when it lacks it, as SAM adds
    /// `[PAD]`. Padding is masked, so only the vocabulary's size matters.
    #[serde(default = "default_pad_token")]
    pub pad_token: String,
    /// How an image is squared for evaluation and prediction (and for
    /// training without augmentation): `stretch` to the model's size, as
    /// SAM's evaluation processor does (the default), or
    /// `shorter_side_crop`.
    #[serde(default)]
    pub image_resize: ImageResize,
    /// Training images: `sam`, SAM's random resized crop (50-100% of the
    /// area) and horizontal flip (the default), drawn from (seed, epoch,
    /// sample, image); or `none`, the evaluation transform.
    #[serde(default)]
    pub augmentation: Augmentation,
    #[serde(default)]
    pub bad_records: BadRecords,
    #[serde(default)]
    pub tail: Tail,
    /// Share each global batch among the data-parallel ranks by their
    /// samples' images rather than in blocks, so that no rank waits on one
    /// that drew the most images (same samples per step, same epoch).
    #[serde(default)]
    pub balance_images: bool,
    /// Preprocessing threads per worker.
    #[serde(default = "default_loader_threads")]
    pub loader_threads: usize,
    /// Batches prepared ahead of the training step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// A record listing more images than this is a bad record (SAM's data
    /// has 1 to 8): the images of one sample are decoded together.
    #[serde(default = "default_max_images_per_record")]
    pub max_images_per_record: usize,
    /// An image of more pixels than this is a bad image, refused from its
    /// header before it is decoded (a small file can decode to gigabytes).
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Where objects of `s3://`, `gs://`, `az://` or `http(s)://` datasets,
    /// tokenizers and model folders are cached on the worker; default
    /// `$SAMTRAIN_CACHE/objects`, or `~/.cache/samtrain/objects`.
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// The most the cached images may take, in GiB; the least recently used
    /// go first. Model files are kept regardless.
    #[serde(default = "default_cache_max_gib")]
    pub cache_max_gib: f64,
    /// How many times a transient object-store error (connection, throttling,
    /// 5xx) is retried, with exponential backoff and jitter, before the
    /// fetch fails; at most 20.
    #[serde(default = "default_fetch_retries")]
    pub fetch_retries: u32,
    /// Synthesise `train` and `eval` (MmLINK format) when they do not
    /// exist yet; `samtrain local` does it before the workers start.
    #[serde(default)]
    pub synth: Option<SynthSpec>,
}

/// How an image becomes the model's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageResize {
    #[default]
    Stretch,
    ShorterSideCrop,
}

/// Training-time image augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augmentation {
    #[default]
    Sam,
    None,
}

fn default_eos_token() -> String {
    "</s>".into()
}

fn default_pad_token() -> String {
    "[PAD]".into()
}

/// The end of a sequence a tokenizer cuts when it is too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationSide {
    /// Cut the start, keep the end (SAM's tokenizers).
    #[default]
    Left,
    Right,
}

/// A synthetic MmLINK dataset (`samtrain data synth`): the train set takes
/// `seed`, the held-out set `seed + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthSpec {
    /// `group` (group captioning) or `story` (storytelling).
    pub task: String,
    pub train_samples: usize,
    #[serde(default)]
    pub eval_samples: usize,
    /// Images per sample.
    pub images: usize,
    /// A mixed set: each sample has between this many (2 or more) and
    /// `images`; 0 (the default): every sample has `images`.
    #[serde(default)]
    pub min_images: usize,
    /// Group captioning: at most this many distractors per image (1 to 3).
    #[serde(default = "default_max_distractors")]
    pub max_distractors: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_max_distractors() -> usize {
    3
}

fn default_max_txt_len() -> usize {
    128
}
fn default_max_output_txt_len() -> usize {
    256
}
fn default_loader_threads() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}
fn default_max_images_per_record() -> usize {
    64
}
fn default_max_image_pixels() -> u64 {
    50_000_000
}
/// `[data] cache_max_gib` when a spec names none.
pub const DEFAULT_CACHE_MAX_GIB: f64 = 100.0;

fn default_cache_max_gib() -> f64 {
    DEFAULT_CACHE_MAX_GIB
}
/// `[data] fetch_retries` when a spec names none.
pub const DEFAULT_FETCH_RETRIES: u32 = 5;

fn default_fetch_retries() -> u32 {
    DEFAULT_FETCH_RETRIES
}

/// Where a worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// CUDA when the worker has a GPU, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSpec {
    /// Optimizer steps in all.
    pub steps: u64,
    /// Samples per data-parallel rank per micro-batch.
    pub batch_size: u64,
    /// Micro-batches per optimizer step; the global batch is
    /// `batch_size x grad_accum x data-parallel size`.
    pub grad_accum: u64,
    /// Peak learning rate, reached after `warmup_steps`, then cosine decay
    /// to `min_lr` at `steps`.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip gradients to this global norm; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Seeds the sample order and every random draw of training.
    pub seed: u64,
    pub device: DeviceKind,
    /// bf16 autocast on CUDA (the CPU always computes in float32).
    pub bf16: bool,
    /// Recompute each ViT, Q-Former and LLM layer in backward instead of
    /// keeping its activations: less memory for about one more forward pass.
    pub activation_checkpointing: bool,
    /// Steps between progress logs and reports.
    pub log_every: u64,
    /// libtorch's intra-op threads per worker; 0 leaves libtorch's default.
    pub threads: u32,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-4,
            min_lr: 0.0,
            warmup_steps: 0,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            device: DeviceKind::Auto,
            bf16: true,
            activation_checkpointing: false,
            log_every: 10,
            threads: 0,
        }
    }
}

/// What the coordinator does with a rank flagged as a straggler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StragglerPolicy {
    /// An event in `watch` and a field in `status`; nothing else.
    #[default]
    Flag,
    /// Also drain its worker at the next committed checkpoint: the
    /// generation re-forms without it (with a free worker in its place,
    /// if one waits).
    Replace,
}

/// The collective backend between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL on CUDA, the TCP ring on the CPU.
    #[default]
    Auto,
    Ring,
    Nccl,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSpec {
    /// Tensor-parallel degree (keep it within one node). The data-parallel
    /// degree is the number of workers divided by `tp`.
    pub tp: u32,
    /// The job waits for at least this many workers, and after a failure
    /// goes on with any number between the two (a multiple of `tp`).
    pub min_workers: u32,
    pub max_workers: u32,
    pub backend: Backend,
    /// A collective that waits longer than this on a peer fails the
    /// generation (a stuck or dead peer), in seconds.
    pub collective_timeout_s: f64,
    /// After the first `min_workers` have joined, how long rendezvous waits
    /// for more (up to `max_workers`), in seconds: torchrun's "last call".
    pub last_call_s: f64,
    /// The accelerator memory each worker has, in GiB. When set, `samtrain
    /// submit` warns if `samtrain model plan` says a rank needs more.
    pub worker_memory_gib: Option<f64>,
    /// A rank whose compute time per step (the step outside collectives)
    /// exceeds this factor times the median of the other ranks' is slow...
    pub straggler_factor: f64,
    /// ...and is flagged a straggler once it has been slow for this many
    /// steps in a row (as its progress reports, every
    /// `training.log_every` steps, say).
    pub straggler_steps: u64,
    pub straggler_policy: StragglerPolicy,
    /// Sum each gradient bucket over the data-parallel group as soon as
    /// backward has produced it, while backward goes on (torch DDP's
    /// overlap); off, the buckets are summed after backward.
    pub overlap_grad_reduce: bool,
    /// Let a tensor-parallel group span nodes. Off (the default), each
    /// group of `tp` ranks is placed inside one node (workers with the same
    /// `--node`), where its per-layer all-reduces stay on fast links; on,
    /// ranks follow registration order across nodes.
    pub tp_across_nodes: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            min_workers: 1,
            max_workers: 1,
            backend: Backend::Auto,
            collective_timeout_s: 60.0,
            last_call_s: 1.0,
            worker_memory_gib: None,
            straggler_factor: 1.5,
            straggler_steps: 50,
            straggler_policy: StragglerPolicy::Flag,
            overlap_grad_reduce: true,
            tp_across_nodes: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// `file://`, `s3://`, `gs://`, `az://` URL or a local path.
    pub url: String,
    /// Optimizer steps between checkpoints (the last step is always saved).
    #[serde(default = "default_every_steps")]
    pub every_steps: u64,
    /// Committed checkpoints kept, newest first; 0 keeps all.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_every_steps() -> u64 {
    100
}
fn default_keep() -> usize {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSpec {
    /// Generations that may end in a failure before the job fails.
    pub max_restarts: u32,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec { max_restarts: 3 }
    }
}

/// Generation settings of the final predict + eval (SAM's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSpec {
    pub num_beams: usize,
    pub max_new_tokens: usize,
    pub repetition_penalty: f64,
    /// Samples per generation batch.
    pub batch_size: usize,
    /// Evaluate at most this many samples; 0 means all.
    pub max_samples: usize,
    /// A local folder for `pred.json`, `eval.json` and `eval_score.json`;
    /// left out, the scores are only reported.
    pub output: Option<String>,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            num_beams: 5,
            max_new_tokens: 256,
            repetition_penalty: 1.5,
            batch_size: 8,
            max_samples: 0,
            output: None,
        }
    }
}

/// One thing wrong with a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    /// The field's path, `training.lr`; empty for the whole document.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A spec that cannot run, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec{}:\n  {}", .source_name.as_ref().map(|s| format!(" {s}")).unwrap_or_default(), .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct SpecError {
    /// The file the spec came from, when known.
    pub source_name: Option<String>,
    pub problems: Vec<SpecProblem>,
}

impl JobSpec {
    /// Parses and checks a spec. `source_name` (a file name) only labels
    /// the error.
    pub fn from_toml(text: &str, source_name: Option<&str>) -> Result<JobSpec, SpecError> {
        let fail = |problems| SpecError {
            source_name: source_name.map(str::to_owned),
            problems,
        };
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            fail(vec![SpecProblem {
                field: String::new(),
                message: e.to_string().trim_end().replace('\n', "\n  "),
            }])
        })?;
        let problems = spec.problems();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(fail(problems))
        }
    }

    /// The spec as TOML, as it travels in the API.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a job spec always serialises to TOML")
    }

    /// Every semantic problem, in field order.
    pub fn problems(&self) -> Vec<SpecProblem> {
        let mut p = Problems::default();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !self.name.starts_with('-')
            && !self.name.ends_with('-');
        p.check(
            name_ok,
            "name",
            format!(
                "`{}` must be 1 to 63 lower-case letters, digits or `-`, not starting or ending with `-`",
                self.name
            ),
        );
        p.check(
            !self.model.path.is_empty(),
            "model.path",
            "must not be empty",
        );
        let cache_gib = self.model.vision_cache_max_gib;
        p.check(
            cache_gib.is_finite() && cache_gib > 0.0 && cache_gib <= MAX_VISION_CACHE_GIB,
            "model.vision_cache_max_gib",
            format!("must be more than 0 and at most {MAX_VISION_CACHE_GIB}, got {cache_gib:?}"),
        );

        let d = &self.data;
        p.check(!d.train.is_empty(), "data.train", "must not be empty");
        if let Some(eval) = &d.eval {
            p.check(
                !eval.is_empty(),
                "data.eval",
                "must not be empty when given",
            );
        }
        p.within(d.max_txt_len, 2, MAX_TEXT_TOKENS, "data.max_txt_len");
        p.within(
            d.max_output_txt_len,
            2,
            MAX_TEXT_TOKENS,
            "data.max_output_txt_len",
        );
        p.within(d.loader_threads, 1, MAX_THREADS, "data.loader_threads");
        p.within(d.prefetch, 1, 1024, "data.prefetch");
        p.within(
            d.max_images_per_record,
            1,
            1024,
            "data.max_images_per_record",
        );
        p.within(
            d.max_image_pixels,
            1,
            1_000_000_000,
            "data.max_image_pixels",
        );
        for (token, field) in [
            (&d.bos_token, "data.bos_token"),
            (&d.eos_token, "data.eos_token"),
            (&d.pad_token, "data.pad_token"),
        ] {
            p.check(
                !token.is_empty() && token.len() <= 64,
                field,
                "must be a token of 1 to 64 bytes",
            );
        }
        p.check(
            d.cache_max_gib.is_finite() && d.cache_max_gib > 0.0 && d.cache_max_gib <= 1e6,
            "data.cache_max_gib",
            format!(
                "must be more than 0 and at most 1000000, got {:?}",
                d.cache_max_gib
            ),
        );
        p.check(
            d.fetch_retries <= 20,
            "data.fetch_retries",
            format!("must be at most 20, got {}", d.fetch_retries),
        );
        if let Some(synth) = &d.synth {
            p.check(
                matches!(synth.task.as_str(), "group" | "story"),
                "data.synth.task",
                format!("must be `group` or `story`, got `{}`", synth.task),
            );
            p.within(
                synth.train_samples,
                1,
                MAX_SYNTH_SAMPLES,
                "data.synth.train_samples",
            );
            p.within(
                synth.eval_samples,
                0,
                MAX_SYNTH_SAMPLES,
                "data.synth.eval_samples",
            );
            p.check(
                synth.eval_samples >= 1 || d.eval.is_none(),
                "data.synth.eval_samples",
                "must be at least 1 when data.eval is given",
            );
            p.within(synth.images, 2, 16, "data.synth.images");
            if synth.min_images != 0 {
                p.within(synth.min_images, 2, synth.images, "data.synth.min_images");
            }
            p.within(synth.max_distractors, 1, 3, "data.synth.max_distractors");
        }

        let t = &self.training;
        p.within(t.steps, 1, MAX_STEPS, "training.steps");
        p.within(t.batch_size, 1, MAX_BATCH, "training.batch_size");
        p.within(t.grad_accum, 1, MAX_BATCH, "training.grad_accum");
        p.positive(t.lr, "training.lr");
        p.check(
            t.lr <= 10.0,
            "training.lr",
            format!("must be at most 10, got {:?}", t.lr),
        );
        p.check(
            t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr,
            "training.min_lr",
            format!(
                "must be between 0 and training.lr ({:?}), got {:?}",
                t.lr, t.min_lr
            ),
        );
        p.check(
            t.warmup_steps <= t.steps,
            "training.warmup_steps",
            format!(
                "must not exceed training.steps ({}), got {}",
                t.steps, t.warmup_steps
            ),
        );
        p.check(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "training.weight_decay",
            format!("must be 0 or more, got {:?}", t.weight_decay),
        );
        for (beta, field) in [(t.beta1, "training.beta1"), (t.beta2, "training.beta2")] {
            p.check(
                (0.0..1.0).contains(&beta),
                field,
                format!("must be in [0, 1), got {beta:?}"),
            );
        }
        p.positive(t.eps, "training.eps");
        p.check(
            t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0,
            "training.max_grad_norm",
            format!("must be 0 (off) or more, got {:?}", t.max_grad_norm),
        );
        p.within(t.log_every, 1, MAX_STEPS, "training.log_every");
        p.within(t.threads, 0, MAX_THREADS as u32, "training.threads");

        let par = &self.parallel;
        p.within(par.tp, 1, MAX_WORKERS, "parallel.tp");
        p.within(par.min_workers, 1, MAX_WORKERS, "parallel.min_workers");
        p.within(par.max_workers, 1, MAX_WORKERS, "parallel.max_workers");
        p.check(
            par.max_workers >= par.min_workers,
            "parallel.max_workers",
            format!(
                "must be at least parallel.min_workers ({}), got {}",
                par.min_workers, par.max_workers
            ),
        );
        if par.tp >= 1 {
            p.check(
                par.min_workers >= par.tp,
                "parallel.min_workers",
                format!(
                    "must be at least parallel.tp ({}): a tensor-parallel group needs that many workers, got {}",
                    par.tp, par.min_workers
                ),
            );
            p.check(
                par.max_workers % par.tp == 0,
                "parallel.max_workers",
                format!(
                    "must be a multiple of parallel.tp ({}), got {}",
                    par.tp, par.max_workers
                ),
            );
        }
        p.positive(par.collective_timeout_s, "parallel.collective_timeout_s");
        p.check(
            par.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S,
            "parallel.collective_timeout_s",
            format!(
                "must be at most {MAX_COLLECTIVE_TIMEOUT_S} (a day), got {:?}",
                par.collective_timeout_s
            ),
        );
        p.check(
            par.straggler_factor.is_finite()
                && (MIN_STRAGGLER_FACTOR..=MAX_STRAGGLER_FACTOR).contains(&par.straggler_factor),
            "parallel.straggler_factor",
            format!(
                "must be from {MIN_STRAGGLER_FACTOR} to {MAX_STRAGGLER_FACTOR}, got {:?}",
                par.straggler_factor
            ),
        );
        p.within(
            par.straggler_steps,
            1,
            MAX_STEPS,
            "parallel.straggler_steps",
        );
        p.check(
            par.last_call_s.is_finite() && (0.0..=MAX_LAST_CALL_S).contains(&par.last_call_s),
            "parallel.last_call_s",
            format!(
                "must be from 0 to {MAX_LAST_CALL_S} (an hour), got {:?}",
                par.last_call_s
            ),
        );
        if let Some(gib) = par.worker_memory_gib {
            p.check(
                gib.is_finite() && gib > 0.0 && gib <= 65536.0,
                "parallel.worker_memory_gib",
                format!("must be more than 0 and at most 65536, got {gib:?}"),
            );
        }

        let c = &self.checkpoint;
        p.check(!c.url.is_empty(), "checkpoint.url", "must not be empty");
        p.store_scheme(&c.url, "checkpoint.url");
        p.within(c.every_steps, 1, MAX_STEPS, "checkpoint.every_steps");
        p.within(c.keep, 0, 10_000, "checkpoint.keep");
        p.within(self.restart.max_restarts, 0, 10_000, "restart.max_restarts");

        let e = &self.evaluation;
        p.within(e.num_beams, 1, MAX_BEAMS, "evaluation.num_beams");
        p.within(
            e.max_new_tokens,
            1,
            MAX_TEXT_TOKENS,
            "evaluation.max_new_tokens",
        );
        p.check(
            e.repetition_penalty.is_finite()
                && e.repetition_penalty > 0.0
                && e.repetition_penalty <= 100.0,
            "evaluation.repetition_penalty",
            format!(
                "must be more than 0 and at most 100, got {:?}",
                e.repetition_penalty
            ),
        );
        p.within(e.batch_size, 1, MAX_BATCH as usize, "evaluation.batch_size");
        p.within(
            e.max_samples,
            0,
            MAX_SYNTH_SAMPLES * 100,
            "evaluation.max_samples",
        );
        if let Some(output) = &e.output {
            p.check(
                !output.is_empty(),
                "evaluation.output",
                "must not be empty when given",
            );
        }
        if let Some(tb) = &self.logging.tensorboard {
            p.check(
                !tb.is_empty(),
                "logging.tensorboard",
                "must not be empty when given",
            );
            p.store_scheme(tb, "logging.tensorboard");
        }
        p.0
    }

    /// The data-parallel degree for `workers` workers.
    pub fn data_parallel_size(&self, workers: u32) -> u32 {
        workers / self.parallel.tp.max(1)
    }
}

// Upper bounds of the spec's numbers: far above any real job, and low
// enough that no value overflows a duration, asks evaluation for more
// memory than a machine has, or keeps a job or a scheduler waiting forever.
const MAX_STEPS: u64 = 1_000_000_000;
const MAX_BATCH: u64 = 65_536;
const MAX_TEXT_TOKENS: usize = 32_768;
const MAX_THREADS: usize = 1024;
/// Bounds of `parallel.straggler_factor`: below 1.1 noise alone flags
/// ranks.
const MIN_STRAGGLER_FACTOR: f64 = 1.1;
const MAX_STRAGGLER_FACTOR: f64 = 100.0;
/// The most workers (and the largest tensor-parallel degree) a job may ask for.
pub const MAX_WORKERS: u32 = 65_536;
const MAX_SYNTH_SAMPLES: usize = 10_000_000;
const MAX_BEAMS: usize = 64;
const MAX_COLLECTIVE_TIMEOUT_S: f64 = 86_400.0;
const MAX_LAST_CALL_S: f64 = 3_600.0;
const MAX_VISION_CACHE_GIB: f64 = 1_048_576.0;

#[derive(Default)]
struct Problems(Vec<SpecProblem>);

impl Problems {
    /// `value` must lie in `lo..=hi`.
    fn within<T: PartialOrd + std::fmt::Display>(&mut self, value: T, lo: T, hi: T, field: &str) {
        let message = format!("must be from {lo} to {hi}, got {value}");
        self.check(lo <= value && value <= hi, field, message);
    }

    /// A URL's scheme, when it has one, must be an object store's.
    fn store_scheme(&mut self, location: &str, field: &str) {
        if let Some((scheme, _)) = location.split_once("://") {
            self.check(
                matches!(
                    scheme,
                    "file" | "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure"
                ),
                field,
                format!("scheme `{scheme}` is not one of file, s3, gs, az"),
            );
        }
    }

    fn check(&mut self, ok: bool, field: &str, message: impl Into<String>) {
        if !ok {
            self.0.push(SpecProblem {
                field: field.to_owned(),
                message: message.into(),
            });
        }
    }

    fn positive(&mut self, value: f64, field: &str) {
        self.check(
            value.is_finite() && value > 0.0,
            field,
            format!("must be more than 0, got {value:?}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "demo"
[model]
path = "models/sam"
[data]
train = "data/train"
[checkpoint]
url = "file:///tmp/ckpt"
"#;

    #[test]
    fn minimal_spec_takes_defaults_and_round_trips() {
        let spec = JobSpec::from_toml(MINIMAL, None).unwrap();
        assert_eq!(spec.training.steps, 100);
        assert_eq!(spec.parallel.tp, 1);
        assert_eq!(spec.checkpoint.keep, 3);
        assert_eq!(spec.restart.max_restarts, 3);
        assert_eq!(spec.evaluation.num_beams, 5);
        let again = JobSpec::from_toml(&spec.to_toml(), None).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn every_problem_is_named() {
        let text = format!(
            "{MINIMAL}\n[training]\nlr = -1.0\nsteps = 0\n[parallel]\ntp = 2\nmin_workers = 1\nmax_workers = 3\n"
        )
        .replace("\"demo\"", "\"Demo_1\"");
        let err = JobSpec::from_toml(&text, Some("job.toml")).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "training.steps",
                "training.lr",
                "training.min_lr",
                "parallel.min_workers",
                "parallel.max_workers",
            ]
        );
        let message = err.to_string();
        assert!(
            message.starts_with("invalid job spec job.toml:"),
            "{message}"
        );
        assert!(
            message.contains("training.lr: must be more than 0, got -1"),
            "{message}"
        );
    }

    /// Numbers that would overflow a duration, exhaust memory at evaluation
    /// or never end are refused with their field named.
    #[test]
    fn input_limits_are_bounded_and_default_to_generous_caps() {
        let spec = JobSpec::from_toml(MINIMAL, None).unwrap();
        assert_eq!(
            (spec.data.max_images_per_record, spec.data.max_image_pixels),
            (64, 50_000_000)
        );
        let text = MINIMAL.replace(
            "[data]\n",
            "[data]\nmax_images_per_record = 100000\nmax_image_pixels = 0\n",
        );
        let err = JobSpec::from_toml(&text, None).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["data.max_images_per_record", "data.max_image_pixels"]
        );
    }

    #[test]
    fn every_number_has_an_upper_bound() {
        let text = format!(
            "{MINIMAL}\n[training]\nsteps = 9223372036854775807\nbatch_size = 100000000\n\
             [parallel]\ncollective_timeout_s = 1e300\nlast_call_s = 1e300\n\
             [evaluation]\nnum_beams = 1000000\nmax_new_tokens = 100000000\n"
        )
        .replace("/tmp/ckpt\"", "/tmp/ckpt\"\nkeep = 1000000")
        .replace("models/sam\"", "models/sam\"\nvision_cache_max_gib = 1e300");
        let err = JobSpec::from_toml(&text, None).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "model.vision_cache_max_gib",
                "training.steps",
                "training.batch_size",
                "parallel.collective_timeout_s",
                "parallel.last_call_s",
                "checkpoint.keep",
                "evaluation.num_beams",
                "evaluation.max_new_tokens",
            ]
        );
        let message = err.to_string();
        assert!(
            message.contains("evaluation.num_beams: must be from 1 to 64, got 1000000"),
            "{message}"
        );
        // Floats print short: 1e300, not three hundred digits.
        assert!(
            message.contains("parallel.last_call_s: must be from 0 to 3600 (an hour), got 1e300"),
            "{message}"
        );
        // The largest values still pass.
        let text = format!(
            "{MINIMAL}\n[training]\nsteps = 1000000000\n[parallel]\n\
             collective_timeout_s = 86400\nlast_call_s = 3600\n[evaluation]\nnum_beams = 64\n"
        );
        JobSpec::from_toml(&text, None).unwrap();
    }

    #[test]
    fn unknown_fields_and_types_name_their_place() {
        let err =
            JobSpec::from_toml(&format!("{MINIMAL}\n[training]\nstepz = 3\n"), None).unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
        let err = JobSpec::from_toml(&MINIMAL.replace("\"data/train\"", "3"), None).unwrap_err();
        assert!(err.to_string().contains("train"), "{err}");
    }
}
