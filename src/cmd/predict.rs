//! `samtrain predict --checkpoint URL_OR_MODEL_DIR --data PATH --out
//! pred.json`: answers for an MmLINK set in SAM's `pred.json` format, scored
//! with SAM's protocol (`eval.json` and `eval_score.json` beside it).
//!
//! A checkpoint location means its newest committed checkpoint, or the one
//! of a step folder given instead: the model folder recorded in its
//! metadata plus the checkpoint's trainable tensors; its job's tokenizers
//! and evaluation settings are the defaults.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use samtrain_data::preprocess::ImageConfig;
use samtrain_proto::spec::{
    BadRecords, DeviceKind, EvaluationSpec, DEFAULT_CACHE_MAX_GIB, DEFAULT_FETCH_RETRIES,
};
use samtrain_worker::device::resolve_device;
use samtrain_worker::inputs::{self, text_config_from};
use samtrain_worker::predict::{load_model, score, write_predictions, Predictor};

#[derive(Args)]
pub struct PredictArgs {
    /// A model folder, a checkpoint location (`file://`, `s3://`... or a
    /// path) for its newest checkpoint, or one of its step folders
    /// (`.../step-00001000`).
    #[arg(long)]
    checkpoint: String,
    /// The MmLINK set to answer (a folder or annotations file).
    #[arg(long)]
    data: String,
    /// Where `pred.json` goes; the scores go to its folder.
    #[arg(long)]
    out: PathBuf,
    /// The LLM's `tokenizer.json` (default: the job's, or `<model>/tokenizer.json`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    num_beams: Option<usize>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Samples per generation batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Answer at most this many samples; 0 means all.
    #[arg(long)]
    max_samples: Option<usize>,
    /// `auto`, `cpu` or `cuda`.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let kind = match args.device.as_str() {
        "auto" => DeviceKind::Auto,
        "cpu" => DeviceKind::Cpu,
        "cuda" => DeviceKind::Cuda,
        other => anyhow::bail!("--device must be auto, cpu or cuda, not `{other}`"),
    };
    let device = resolve_device(kind, 0)?;
    let m = load_model(&args.checkpoint, device)?;
    let (mut settings, text) = match &m.spec {
        Some(spec) => (spec.evaluation.clone(), inputs::text_config(spec)),
        None => {
            let tok = m.model_path.join("tokenizer.json");
            (
                EvaluationSpec::default(),
                text_config_from(&tok, None, 128, 256),
            )
        }
    };
    let text = match &args.tokenizer {
        Some(tok) => text_config_from(tok, None, text.max_txt_len, text.max_output_txt_len),
        None => text,
    };
    settings.num_beams = args.num_beams.unwrap_or(settings.num_beams);
    settings.max_new_tokens = args.max_new_tokens.unwrap_or(settings.max_new_tokens);
    settings.repetition_penalty = args
        .repetition_penalty
        .unwrap_or(settings.repetition_penalty);
    settings.batch_size = args.batch_size.unwrap_or(settings.batch_size);
    settings.max_samples = args.max_samples.unwrap_or(settings.max_samples);
    let remote = match &m.spec {
        Some(spec) => inputs::Remote::of(&spec.data),
        None => inputs::Remote::new(None, DEFAULT_CACHE_MAX_GIB, DEFAULT_FETCH_RETRIES),
    };
    let set = inputs::load_dataset(
        &args.data,
        BadRecords::Fail,
        samtrain_data::limits::InputLimits::default(),
        &remote,
    )?;
    let qformer_named = m
        .spec
        .as_ref()
        .is_some_and(|s| s.data.qformer_tokenizer.is_some());
    inputs::check_vocabulary(&text, qformer_named, &m.loaded.model.config, &m.model_path)?;
    let image_size = m.loaded.model.config.vision_config.image_size;
    let image = match &m.spec {
        Some(spec) => inputs::image_config(spec, image_size, false),
        None => ImageConfig {
            size: image_size as u32,
            ..ImageConfig::default()
        },
    };
    let predictor = Predictor::new(set.images, &text, image, settings)?;
    let predictions = predictor.predict(&m.loaded.model, device, &set.records)?;
    write_predictions(&args.out, &predictions)?;
    let dir = args
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let evaluation = score(&predictions, Some(&dir))?;
    println!(
        "{}",
        serde_json::json!({
            "pred": args.out,
            "samples": predictions.len(),
            "checkpoint_step": m.step,
            "eval": evaluation.summary,
        })
    );
    Ok(())
}
