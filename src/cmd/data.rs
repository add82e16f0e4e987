//! `samtrain data`: MmLINK datasets from the command line: `validate`
//! checks every record and image of a dataset (local or object store) and
//! prints every problem; `synth` writes a synthetic dataset; `preview`
//! shows what a job's model receives for its first samples.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use samtrain_data::limits::InputLimits;
use samtrain_data::mmlink::{self, synth, LoadOptions, Policy};
use samtrain_data::preprocess::batch::IGNORE_INDEX;
use samtrain_data::preprocess::{Preprocessor, Visit};
use samtrain_model::{weights::CONFIG_FILE, SamConfig};
use samtrain_proto::spec::JobSpec;
use samtrain_worker::inputs;
use serde_json::{json, Value};

use crate::prepare;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Checks every record and every image; exits 0 only when all are clean.
    Validate(ValidateArgs),
    /// Writes a synthetic MmLINK dataset (PNG images, annotations.json, tokenizer.json).
    Synth(SynthArgs),
    /// Shows what a job's model receives for the first samples of a split:
    /// token ids, labels, the Q-Former's ids, each image's shape and
    /// statistics, and the decoded texts.
    Preview(PreviewArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SplitArg {
    /// `data.train`, as a training step receives it (augmentation included).
    Train,
    /// `data.eval`, as prediction receives it (the prompt alone, uncut).
    Eval,
}

/// The most samples one preview shows.
const MAX_PREVIEW_SAMPLES: usize = 10_000;

#[derive(Args)]
pub struct PreviewArgs {
    /// The job spec (TOML). Data and a model the spec synthesises or
    /// initialises are made first, as `samtrain local` does.
    job: PathBuf,
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// How many samples, from the dataset's first (1 to 10000).
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// The seed augmentation draws from; default the spec's training.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// The epoch whose augmentation is drawn (train split).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// One JSON object per sample and line, instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ValidateArgs {
    /// Dataset folder, annotations file, or URL (file://, s3://, gs://, az://).
    path: String,
    /// Print one JSON object {"records", "valid", "problems"} instead of lines.
    #[arg(long)]
    json: bool,
    /// A record listing more images is a problem (a job's
    /// `data.max_images_per_record`).
    #[arg(long, default_value_t = InputLimits::default().max_images_per_record as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_images_per_record: u64,
    /// An image of more pixels is a problem, found from its header (a job's
    /// `data.max_image_pixels`).
    #[arg(long, default_value_t = InputLimits::default().max_image_pixels,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    max_image_pixels: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    /// Group captioning: what the images have in common.
    Group,
    /// Storytelling: the last image's caption from the first ones.
    Story,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long, value_enum)]
    task: TaskArg,
    /// Number of samples (records).
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Images per sample, at least 2.
    #[arg(long, default_value_t = 4)]
    images: usize,
    /// A mixed set: each sample has between this many (at least 2) and
    /// `--images` images; 0: all have `--images`.
    #[arg(long, default_value_t = 0)]
    min_images: usize,
    /// Group captioning: at most this many distractors per image (1 to 3).
    #[arg(long, default_value_t = synth::MAX_DISTRACTORS)]
    max_distractors: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Validate(args) => validate(args),
        DataCommand::Preview(args) => preview(args),
        DataCommand::Synth(args) => {
            let task = match args.task {
                TaskArg::Group => synth::Task::Group,
                TaskArg::Story => synth::Task::Story,
            };
            let options = synth::SynthOptions {
                task,
                samples: args.samples,
                images: args.images,
                min_images: args.min_images,
                max_distractors: args.max_distractors,
                seed: args.seed,
            };
            let done = synth::synth(&args.out, &options)?;
            println!(
                "wrote {} records, {} images, a tokenizer of {} tokens to {}",
                done.records,
                done.images,
                done.vocabulary,
                args.out.display()
            );
            Ok(())
        }
    }
}

/// Prints the report; a dataset with problems is an error, so that the exit
/// status is 0 only for a clean dataset (stdout keeps only the report).
fn validate(args: ValidateArgs) -> Result<()> {
    // Skip, not Fail: validation reports every problem and the counts
    // rather than stopping at an error.
    let options = LoadOptions {
        policy: Policy::Skip,
        limits: InputLimits {
            max_images_per_record: args.max_images_per_record as usize,
            max_image_pixels: args.max_image_pixels,
        },
        ..LoadOptions::default()
    };
    let report = mmlink::load_blocking(&args.path, options)?.report;
    if args.json {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "record": p.record,
                    "index": p.index,
                    "field": p.field,
                    "file": p.file,
                    "message": p.message,
                })
            })
            .collect();
        let out = serde_json::json!({
            "records": report.records,
            "valid": report.valid,
            "problems": problems,
        });
        println!("{out}");
    } else {
        println!("{report}");
    }
    if !report.problems.is_empty() {
        bail!(
            "{}: {} problems in {} of {} records",
            report.annotations,
            report.problems.len(),
            report.skipped(),
            report.records
        );
    }
    Ok(())
}

/// Prints, per sample, what the model receives: one JSON object per line
/// with `--json`, else a readable summary.
fn preview(args: PreviewArgs) -> Result<()> {
    if !(1..=MAX_PREVIEW_SAMPLES).contains(&args.samples) {
        bail!(
            "--samples must be 1 to {MAX_PREVIEW_SAMPLES}, got {}",
            args.samples
        );
    }
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read {}", args.job.display()))?;
    let mut spec = JobSpec::from_toml(&text, args.job.to_str())?;
    if let Some(seed) = args.seed {
        spec.training.seed = seed;
    }
    prepare::prepare(&spec)?;
    let remote = inputs::Remote::of(&spec.data);
    let local = inputs::localize(&spec, &remote)?;
    let config_file = Path::new(&local.model.path).join(CONFIG_FILE);
    let config = SamConfig::from_file(&config_file)?;
    let training = args.split == SplitArg::Train;
    let location = if training {
        spec.data.train.clone()
    } else {
        spec.data
            .eval
            .clone()
            .context("--split eval: the spec has no data.eval")?
    };
    let set = inputs::load_dataset(
        &location,
        spec.data.bad_records,
        inputs::input_limits(&spec),
        &remote,
    )?;
    let text = inputs::text_config(&local);
    let image = inputs::image_config(&local, config.vision_config.image_size, training);
    let pre = Preprocessor::new(set.images.clone(), image, &text)?;
    let tokenizers = pre.tokenizers();
    for (index, record) in set.records.iter().take(args.samples).enumerate() {
        let sample = if training {
            let visit = Visit {
                epoch: args.epoch,
                sample: index as u64,
            };
            pre.sample(record, Some(visit))?
        } else {
            pre.prompt_sample(record)?
        };
        let (llm, labels) = (&sample.text.input_ids, &sample.text.labels);
        let supervised: Vec<i64> = labels
            .iter()
            .copied()
            .filter(|&l| l != IGNORE_INDEX)
            .collect();
        let qformer = &sample.text.qformer_input_ids;
        let side = i64::from(image.size);
        let images: Vec<Value> = sample
            .images
            .iter()
            .zip(&sample.augmented)
            .map(|(pixels, drawn)| {
                let (mean, std) = mean_std(pixels);
                let mut v = json!({"shape": [3, side, side], "mean": mean, "std": std});
                if let Some(d) = drawn {
                    let c = d.crop;
                    v["crop"] = json!([c.left, c.top, c.width, c.height]);
                    v["flip"] = json!(d.flip);
                }
                v
            })
            .collect();
        let out = json!({
            "index": index,
            "record": record.id.to_string(),
            "split": if training { "train" } else { "eval" },
            "llm_input_ids": llm,
            "labels": labels,
            "qformer_input_ids": qformer,
            "qformer_attention_mask": vec![1; qformer.len()],
            "images": images,
            "decoded": {
                "llm_input_ids": tokenizers.decode(false, llm),
                "labels": tokenizers.decode(false, &supervised),
                "qformer_input_ids": tokenizers.decode(true, qformer),
            },
        });
        if args.json {
            println!("{out}");
        } else {
            print_sample(&out);
        }
    }
    Ok(())
}

/// The mean and population standard deviation of `values`, in f64.
fn mean_std(values: &[f32]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

fn print_sample(s: &Value) {
    let d = &s["decoded"];
    println!(
        "sample {} (record {}, {})",
        s["index"], s["record"], s["split"]
    );
    println!("  llm input   {}", d["llm_input_ids"]);
    println!("  supervised  {}", d["labels"]);
    println!("  q-former    {}", d["qformer_input_ids"]);
    for (k, image) in s["images"].as_array().into_iter().flatten().enumerate() {
        let mut line = format!(
            "  image {k}     {} mean {:.4} std {:.4}",
            image["shape"],
            image["mean"].as_f64().unwrap_or(0.0),
            image["std"].as_f64().unwrap_or(0.0)
        );
        if let Some(crop) = image.get("crop") {
            line.push_str(&format!(" crop {crop} flip {}", image["flip"]));
        }
        println!("{line}");
    }
}
