//! `samtrain demo`: the main job for a newcomer, on one machine's CPU. It
//! runs the job of `examples/demo.toml` (built into the binary) through the
//! local cluster: a synthetic MmLINK group-captioning set (three images per
//! sample, the answer names the object they share), a small SAM trained
//! from scratch by two data-parallel worker processes under a coordinator,
//! checkpoints, then predict + eval on a held-out split. It scores the
//! untrained model on the same split first, so the gain is plain to see,
//! and beside CIDEr, BLEU-4 and ROUGE-L it reports how often an answer
//! names the shared object (`mmlink::content`), against the baseline of
//! always giving the most frequent training answer, with example answers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use samtrain_data::eval::Prediction;
use samtrain_data::mmlink::{self, content};
use samtrain_proto::spec::{DeviceKind, JobSpec};
use samtrain_proto::Scores;
use samtrain_worker::inputs::Remote;
use samtrain_worker::predict::{load_model, predict_set, score_into};
use serde_json::json;
use tch::Device;

use super::local::{self, LocalOptions};
use crate::prepare;

const DEMO_SPEC: &str = include_str!("../../examples/demo.toml");
const DEMO_MODEL: &str = include_str!("../../examples/demo-model.json");
/// The folder `examples/demo.toml` writes under; `--out` replaces it.
const SPEC_ROOT: &str = "target/demo";
/// More worker processes than this would each get a sliver of the demo's
/// small batch.
const MAX_DEMO_WORKERS: i64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DemoDevice {
    Cpu,
    Cuda,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where the data, model, checkpoints, scores and logs go.
    #[arg(long, default_value = SPEC_ROOT)]
    out: PathBuf,
    /// Training steps (default: the spec's).
    #[arg(long)]
    steps: Option<u64>,
    /// Worker processes (two data-parallel ranks by default), sharing the
    /// demo's global batch of 16 samples: 1, 2, 4 or 8.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_DEMO_WORKERS))]
    workers: u32,
    /// Where the workers train: `cpu` (the spec's), or `cuda`, one GPU per
    /// worker.
    #[arg(long, value_enum, default_value_t = DemoDevice::Cpu)]
    device: DemoDevice,
    /// Start over: delete `--out` first instead of resuming what is there.
    #[arg(long)]
    fresh: bool,
    /// Print one JSON object, the final state and both models' scores, as
    /// the last line.
    #[arg(long)]
    json: bool,
    /// Serve the coordinator's dashboard (`/ui`) and `/metrics` on this
    /// loopback address while the demo trains (as `samtrain local
    /// --http-listen`; default: a free port, printed).
    #[arg(long, alias = "metrics-listen", default_value = "127.0.0.1:0")]
    http_listen: std::net::SocketAddr,
}

pub fn run(args: DemoArgs) -> Result<()> {
    if args.fresh && args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("removing {}", args.out.display()))?;
    }
    let spec = demo_spec(&args)?;
    prepare::prepare(&spec)?;
    if !args.json {
        println!(
            "samtrain demo: {} workers train a small SAM on {} (3 images per sample), {} steps",
            args.workers, spec.data.train, spec.training.steps
        );
    }
    let (untrained, untrained_predictions) = untrained_scores(&spec, &args.out)?;
    let untrained_accuracy = shared_object_accuracy(&untrained_predictions);
    if !args.json {
        println!(
            "untrained model on the held-out split: CIDEr {:.2}, BLEU-4 {:.2}, ROUGE-L {:.2}, \
             shared object named {:.1}%",
            untrained.cider,
            untrained.bleu4,
            untrained.rouge,
            untrained_accuracy * 100.0
        );
    }
    let result = local::run_job(
        &spec,
        "examples/demo.toml",
        &LocalOptions {
            workers: Some(args.workers),
            etcd: Vec::new(),
            run_dir: Some(args.out.join("run")),
            json: args.json,
            http_listen: args.http_listen,
        },
    )?;
    let trained_predictions = match &spec.evaluation.output {
        Some(dir) if result.eval.is_some() => {
            samtrain_data::eval::read_predictions(&Path::new(dir).join("pred.json"))?
        }
        _ => Vec::new(),
    };
    let trained_accuracy =
        (!trained_predictions.is_empty()).then(|| shared_object_accuracy(&trained_predictions));
    let baseline = most_frequent_answer_accuracy(&spec, &untrained_predictions)?;
    let examples: Vec<_> = trained_predictions
        .iter()
        .take(EXAMPLES)
        .map(|p| json!({"answer": p.gt_response, "prediction": p.pred_response}))
        .collect();
    if args.json {
        let mut line = result.to_json();
        let mut untrained_eval = json!(untrained);
        untrained_eval["shared_object_accuracy"] = json!(untrained_accuracy);
        line["untrained_eval"] = untrained_eval;
        line["shared_object_accuracy"] = json!(trained_accuracy);
        line["most_frequent_answer_accuracy"] = json!(baseline);
        line["examples"] = json!(examples);
        line["model"] = json!(spec.model.path);
        println!("{line}");
    } else {
        local::report(&result, false);
        let trained = |score: fn(&Scores) -> f64| result.eval.as_ref().map_or(f64::NAN, score);
        println!("held-out scores     untrained   trained");
        println!(
            "  CIDEr             {:>9.2} {:>9.2}",
            untrained.cider,
            trained(|s| s.cider)
        );
        println!(
            "  BLEU-4            {:>9.2} {:>9.2}",
            untrained.bleu4,
            trained(|s| s.bleu4)
        );
        println!(
            "  ROUGE-L           {:>9.2} {:>9.2}",
            untrained.rouge,
            trained(|s| s.rouge)
        );
        println!(
            "  shared object     {:>8.1}% {:>8.1}%   (always the most frequent training answer: {:.1}%)",
            untrained_accuracy * 100.0,
            trained_accuracy.map_or(f64::NAN, |a| a * 100.0),
            baseline * 100.0
        );
        if !examples.is_empty() {
            println!("examples from the held-out split (trained model):");
            for p in trained_predictions.iter().take(EXAMPLES) {
                println!("  answer:    {}", p.gt_response);
                println!("  predicted: {}", p.pred_response);
            }
        }
        if let Some(dir) = &spec.evaluation.output {
            println!("predictions and per-sample scores: {dir}");
        }
    }
    if result.state != samtrain_proto::v1::JobState::Succeeded {
        return Err(super::Exit(1).into());
    }
    Ok(())
}

/// `examples/demo.toml` with its paths under `--out`, and its model config
/// written there.
fn demo_spec(args: &DemoArgs) -> Result<JobSpec> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args.out.to_str().context("--out must be valid UTF-8")?;
    let model_config = args.out.join("demo-model.json");
    std::fs::write(&model_config, DEMO_MODEL)
        .with_context(|| format!("cannot write {}", model_config.display()))?;
    let text = DEMO_SPEC.replace(SPEC_ROOT, out);
    let mut spec = JobSpec::from_toml(&text, Some("examples/demo.toml"))?;
    spec.model.init = Some(model_config.display().to_string());
    // The job waits for exactly the workers the demo starts, and they share
    // the spec's global batch, so that any number of them learns the same
    // task in the same steps (a rank's batch is the global one's share).
    let global_batch = spec.training.batch_size * u64::from(spec.parallel.max_workers);
    anyhow::ensure!(
        global_batch % u64::from(args.workers) == 0,
        "--workers {} does not divide the demo's global batch of {global_batch} samples",
        args.workers
    );
    spec.training.batch_size = global_batch / u64::from(args.workers);
    spec.parallel.min_workers = args.workers;
    spec.parallel.max_workers = args.workers;
    if args.device == DemoDevice::Cuda {
        let gpus = samtrain_torchext::cuda::require().context("--device cuda")?;
        anyhow::ensure!(
            gpus >= i64::from(args.workers),
            "--device cuda needs a GPU per worker: {} worker(s), {gpus} GPU(s) seen by libtorch \
             (pass --workers {})",
            args.workers,
            gpus.max(1)
        );
        spec.training.device = DeviceKind::Cuda;
    }
    if let Some(steps) = args.steps {
        spec.training.steps = steps;
        spec.training.warmup_steps = spec.training.warmup_steps.min(steps);
        spec.checkpoint.every_steps = spec.checkpoint.every_steps.min(steps);
    }
    if let Some(problems) = Some(spec.problems()).filter(|p| !p.is_empty()) {
        anyhow::bail!(samtrain_proto::spec::SpecError {
            source_name: Some("samtrain demo".into()),
            problems
        });
    }
    Ok(spec)
}

/// Example predictions shown next to their answers.
const EXAMPLES: usize = 3;

/// The share of predictions that name the shared object of their sample.
fn shared_object_accuracy(predictions: &[Prediction]) -> f64 {
    content::content_accuracy(
        predictions
            .iter()
            .map(|p| (p.pred_response.as_str(), p.gt_response.as_str())),
    )
}

/// What always giving the most frequent training answer's object scores on
/// the held-out answers.
fn most_frequent_answer_accuracy(spec: &JobSpec, held_out: &[Prediction]) -> Result<f64> {
    let options = mmlink::LoadOptions {
        images: mmlink::ImageCheck::Exists,
        ..mmlink::LoadOptions::default()
    };
    let train = mmlink::load_blocking(&spec.data.train, options)?;
    let references: Vec<&str> = held_out.iter().map(|p| p.gt_response.as_str()).collect();
    Ok(content::most_frequent_accuracy(
        train.records.iter().map(|r| r.output.as_str()),
        &references,
    ))
}

/// Scores and predictions of the freshly initialised model on the held-out
/// split, with the job's own evaluation settings.
fn untrained_scores(
    spec: &JobSpec,
    out: &Path,
) -> Result<(samtrain_data::eval::Summary, Vec<Prediction>)> {
    let eval = spec
        .data
        .eval
        .as_deref()
        .context("the demo spec has a held-out split")?;
    let device = match spec.training.device {
        DeviceKind::Cuda => Device::Cuda(0),
        DeviceKind::Cpu | DeviceKind::Auto => Device::Cpu,
    };
    let m = load_model(&spec.model.path, device)?;
    let remote = Remote::of(&spec.data);
    let predictions = predict_set(spec, &remote, eval, &m.loaded.model, device)?;
    let summary = score_into(&predictions, Some(&out.join("untrained")))?;
    Ok((summary, predictions))
}
