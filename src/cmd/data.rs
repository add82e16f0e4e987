//! `samtrain data`: MmLINK datasets from the command line: `validate`
//! checks every record and image of a dataset (local or object store) and
//! prints every problem; `synth` writes a synthetic dataset.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use samtrain_data::mmlink::{self, synth, LoadOptions, Policy};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Checks every record and every image; exits 0 only when all are clean.
    Validate(ValidateArgs),
    /// Writes a synthetic MmLINK dataset (PNG images, annotations.json, tokenizer.json).
    Synth(SynthArgs),
}

#[derive(Args)]
pub struct ValidateArgs {
    /// Dataset folder, annotations file, or URL (file://, s3://, gs://, az://).
    path: String,
    /// Print one JSON object {"records", "valid", "problems"} instead of lines.
    #[arg(long)]
    json: bool,
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
        DataCommand::Synth(args) => {
            let task = match args.task {
                TaskArg::Group => synth::Task::Group,
                TaskArg::Story => synth::Task::Story,
            };
            let options = synth::SynthOptions {
                task,
                samples: args.samples,
                images: args.images,
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
