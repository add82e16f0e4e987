//! `samtrain ledger LOCATION`: proves from a checkpoint's sample ledger that
//! training saw every sample of each epoch exactly once, across the kills,
//! restarts and resizes it went through, or says which samples it repeated
//! or left out (`samtrain_data::ledger`). LOCATION is a checkpoint location
//! (its newest committed checkpoint) or one step folder of it. Exits 1 when
//! the ledger shows a problem.

use anyhow::{Context, Result};
use clap::Args;
use samtrain_data::ledger;
use samtrain_worker::checkpointing::CheckpointMeta;
use samtrain_worker::predict::checkpoint_at_location;
use serde_json::json;

#[derive(Args)]
pub struct LedgerArgs {
    /// A checkpoint location (`file://`, `s3://`... or a path), or one of
    /// its step folders.
    location: String,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LedgerArgs) -> Result<()> {
    let (ckpt, info) = checkpoint_at_location(&args.location)?;
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
        std::process::exit(1)
    }
}
