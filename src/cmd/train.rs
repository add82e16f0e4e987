//! `samtrain train JOB.toml [--rank R --peers host:port,...]`: a static
//! launch without a coordinator, as torchrun with a fixed world. Each
//! process is given its rank and every rank's address; it listens on its
//! own, joins the world's data- and tensor-parallel groups over the TCP
//! ring, and trains. Without `--peers` it is a one-process job. Rank 0 first
//! creates the data and model folder the spec asks for (`[data.synth]`,
//! `[model] init`), as `samtrain local` does.
//!
//! The exit code follows Kubeflow's `ExitCode` restart policy: 1 for a
//! permanent failure (bad spec, bad data), 128 for one a restart may mend
//! (a dead peer, an abort, an unreachable store).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use samtrain_collective::{ProcessGroups, Secret};
use samtrain_proto::spec::JobSpec;
use samtrain_worker::device::resolve_device;
use samtrain_worker::launch::{join_groups, Membership};
use samtrain_worker::{train, ResidentModels, TrainJob};

use crate::prepare;

#[derive(Args)]
pub struct TrainArgs {
    /// The job spec (TOML).
    job: PathBuf,
    /// This process's rank in the world.
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Every rank's `host:port`, in rank order, comma-separated; this rank
    /// listens on its own entry.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Print a final JSON line: step, samples consumed, checkpoint, eval.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read {}", args.job.display()))?;
    let spec = JobSpec::from_toml(&text, args.job.to_str())?;
    // Rank 0 makes what `[data.synth]` and `[model] init` ask for before it
    // joins the groups; the other ranks cannot get past joining (which
    // needs rank 0) until it is there, so nobody reads half-made files.
    if args.rank == 0 {
        prepare::prepare(&spec)?;
    }
    // The flag that ends this run's collectives: the watchdog raises it
    // when one is pending past the timeout, and the trainer stops.
    let ended = Arc::new(AtomicBool::new(false));
    let (groups, watchdog) = if args.peers.is_empty() {
        if args.rank != 0 || spec.parallel.tp != 1 {
            bail!(
                "a job without --peers is one process: rank 0 and parallel.tp = 1 (got rank {}, tp {})",
                args.rank,
                spec.parallel.tp
            );
        }
        (ProcessGroups::in_process(1, 1)?.remove(0), None)
    } else {
        let world = args.peers.len() as u32;
        let own = args
            .peers
            .get(args.rank as usize)
            .with_context(|| format!("--rank {} is not in the {world} --peers", args.rank))?;
        let listener = TcpListener::bind(own)
            .with_context(|| format!("cannot listen on {own} (rank {})", args.rank))?;
        let device = resolve_device(spec.training.device, args.rank)?;
        let member = Membership {
            rank: args.rank,
            peers: &args.peers,
            generation: 0,
            secret: ring_secret(&spec.name),
            ended: ended.clone(),
        };
        let (groups, watchdog) = join_groups(member, &spec, device, listener)
            .with_context(|| format!("rank {} joining the process groups", args.rank))?;
        (groups, Some(watchdog))
    };
    let outcome = train(TrainJob {
        spec,
        groups,
        abort: ended,
        events: Box::new(|_| {}),
        models: ResidentModels::default(),
    });
    match outcome {
        Ok(o) => {
            if args.json {
                let line = serde_json::json!({
                    "rank": args.rank,
                    "step": o.final_step,
                    "samples_consumed": o.samples_consumed,
                    "checkpoint": o.checkpoint,
                    "resumed_from": o.resumed_from,
                    "skipped_records": o.skipped_records,
                    "eval": o.eval,
                });
                println!("{line}");
            }
            Ok(())
        }
        Err(e) => {
            let kind = if e.retriable() {
                "retriable"
            } else {
                "permanent"
            };
            let why = watchdog
                .as_ref()
                .and_then(|w| w.fired())
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            tracing::error!(rank = args.rank, error = %e, kind, watchdog = %why, "training failed");
            eprintln!("error (rank {}, {kind}): {e}{why}", args.rank);
            Err(super::Exit(e.exit_code()).into())
        }
    }
}

/// The ranks' shared secret: `SAMTRAIN_RING_SECRET`, the same on every rank.
/// Without it the job's name stands in, which keeps ranks of different jobs
/// apart but keeps nobody out, so it is said.
fn ring_secret(job_name: &str) -> Secret {
    match std::env::var("SAMTRAIN_RING_SECRET") {
        Ok(s) if !s.is_empty() => Secret::new(s.into_bytes()),
        _ => {
            tracing::warn!("SAMTRAIN_RING_SECRET is not set: any host that reaches the ranks' ports can join their groups");
            Secret::new(job_name.as_bytes())
        }
    }
}
