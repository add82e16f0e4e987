//! `samtrain ledger LOCATION` (or `--job JOB`): proves from a checkpoint's
//! sample ledger that training saw every sample of each epoch exactly once,
//! across the kills, restarts and resizes it went through, or says which
//! samples it repeated or left out (`samtrain_data::ledger`). LOCATION is a
//! checkpoint location (its newest committed checkpoint) or one step folder
//! of it; with `--job`, the coordinator says the job's `checkpoint.url`.
//! Exits 1 when the ledger shows a problem.

use anyhow::{bail, Context, Result};
use clap::Args;
use samtrain_data::ledger;
use samtrain_worker::checkpointing::CheckpointMeta;
use samtrain_worker::predict::checkpoint_at_location;
use serde_json::json;

#[derive(Args)]
pub struct LedgerArgs {
    /// A checkpoint location (`file://`, `s3://`... or a path), or one of
    /// its step folders.
    #[arg(required_unless_present = "job", conflicts_with = "job")]
    location: Option<String>,
    /// A job id: its checkpoints, as the coordinator knows the job's spec.
    #[arg(long)]
    job: Option<String>,
    #[command(flatten)]
    coordinators: super::Coordinators,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LedgerArgs) -> Result<()> {
    let location = match (&args.location, &args.job) {
        (Some(location), _) => location.clone(),
        (None, Some(job)) => job_checkpoints(&args.coordinators, job)?,
        (None, None) => bail!("name a checkpoint location or --job"),
    };
    let (ckpt, info) = checkpoint_at_location(&location)?;
    let state = ckpt
        .load(&info, 0, 1)
        .with_context(|| format!("reading the checkpoint {}", info.url))?;
    let meta: CheckpointMeta = serde_json::from_value(state.meta)
        .with_context(|| format!("{}: meta.json is not samtrain's training state", info.url))?;
    let verdict = ledger::verify(&meta.ledger);
    if args.json {
        println!(
            "{}",
            json!({
                "checkpoint": info.url,
                "step": meta.step,
                "segments": meta.ledger,
                "verdict": verdict,
                "exactly_once": verdict.exactly_once(),
            })
        );
    } else {
        let n = meta.ledger.len();
        println!(
            "checkpoint {} (step {}): {n} segment{} of training at one layout",
            info.url,
            meta.step,
            if n == 1 { "" } else { "s" }
        );
        for s in &meta.ledger {
            println!(
                "  steps {}..={}: dp {} x batch {}, epoch {} position {} -> epoch {} position {}",
                s.first_step,
                s.last_step,
                s.dp,
                s.sampler.batch_size,
                s.from.epoch,
                s.from.consumed,
                s.to.epoch,
                s.to.consumed
            );
        }
        for e in &verdict.epochs {
            let repeats = e.trained - e.distinct;
            println!(
                "epoch {}{}: {} of {} samples trained{}",
                e.epoch,
                if e.complete { "" } else { " (in progress)" },
                e.distinct,
                e.samples,
                if repeats == 0 {
                    ", each once".to_owned()
                } else {
                    format!(", {repeats} more than once")
                }
            );
        }
        if verdict.exactly_once() {
            println!("every sample trained at most once per epoch, as the global order gives it");
        }
        for p in &verdict.problems {
            println!("problem: {p}");
        }
    }
    if verdict.exactly_once() {
        Ok(())
    } else {
        Err(super::Exit(1).into())
    }
}

/// The `checkpoint.url` of `job`'s spec, as the coordinator holds it.
fn job_checkpoints(coordinators: &super::Coordinators, job: &str) -> Result<String> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let record = runtime.block_on(coordinators.client().get(job))?;
    let spec = samtrain_proto::spec::JobSpec::from_toml(&record.spec_toml, Some(job))
        .with_context(|| format!("the spec of job {job}"))?;
    Ok(spec.checkpoint.url)
}
