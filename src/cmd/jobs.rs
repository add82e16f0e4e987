//! The job commands: `submit`, `status`, `list`, `cancel` and `watch` talk
//! to the leading coordinator (found among `--coordinator` addresses).
//! Every flag also reads an env var (`SAMTRAIN_*`), which the Helm chart
//! sets.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::Coordinators;
use samtrain_coordinator::json::{event_json, job_json, state_name};
use samtrain_proto::v1;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum JobCommand {
    /// Submits a job spec (TOML); prints the job id.
    Submit(SubmitArgs),
    /// Shows one job.
    Status(JobArgs),
    /// Lists every job, oldest first.
    List(ListArgs),
    /// Cancels a job (its checkpoints are kept).
    Cancel(JobArgs),
    /// Follows a job until it ends; exits 0 only if it succeeded.
    Watch(JobArgs),
    /// Sets how many workers a job runs on; a running generation of another
    /// size changes at its next committed checkpoint (not a restart).
    Scale(ScaleArgs),
    /// Takes a worker out of service: it gets no new generation, and the
    /// one it trains in re-forms without it at its next checkpoint.
    Drain(DrainArgs),
}

#[derive(Args)]
pub struct ScaleArgs {
    /// The job id.
    job: String,
    /// The most workers the job runs on (a multiple of its `tp`).
    #[arg(long)]
    workers: u32,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
pub struct DrainArgs {
    /// The worker id (`samtrain status JOB` lists each rank's).
    worker: String,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
pub struct Remote {
    #[command(flatten)]
    coordinators: Coordinators,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The job spec.
    spec: std::path::PathBuf,
    /// Before submitting, read the train and eval datasets as a worker's
    /// first generation does (every record checked, every image decoded,
    /// under `data.bad_records`) and submit only if they pass.
    #[arg(long)]
    preflight: bool,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
pub struct JobArgs {
    /// The job id (`samtrain list` shows them).
    job: String,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    remote: Remote,
}

pub fn run(cmd: JobCommand) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        match cmd {
            JobCommand::Submit(args) => submit(args).await,
            JobCommand::Status(args) => status(args).await,
            JobCommand::List(args) => list(args).await,
            JobCommand::Cancel(args) => cancel(args).await,
            JobCommand::Watch(args) => watch(args).await,
            JobCommand::Scale(args) => scale(args).await,
            JobCommand::Drain(args) => drain(args).await,
        }
    })
}

/// A failed save, for people.
pub(crate) fn describe_failure(f: &v1::CheckpointFailed) -> String {
    match &f.checkpoint {
        Some(c) => format!(
            "checkpoint step {} not saved at {}: {}",
            c.step, c.url, f.reason
        ),
        None => format!("a checkpoint not saved: {}", f.reason),
    }
}

fn print_job(job: &v1::Job) {
    println!("job        {} ({})", job.id, job.name);
    println!("state      {}", state_name(job.state));
    println!(
        "generation {} ({} restarts, {} resizes)",
        job.generation, job.restarts, job.resizes
    );
    if job.world_size > 0 {
        println!(
            "world      {} ranks = dp {} x tp {} (at most {} workers)",
            job.world_size, job.dp, job.tp, job.max_workers
        );
    }
    let loss = job
        .loss
        .map(|l| format!(", loss {l:.4}"))
        .unwrap_or_default();
    println!("step       {} of {}{loss}", job.step, job.total_steps);
    if let Some(c) = &job.latest_checkpoint {
        println!("checkpoint step {} at {}", c.step, c.url);
    }
    if let Some(f) = &job.checkpoint_failure {
        println!("warning    {}", describe_failure(f));
    }
    let now = samtrain_coordinator::records::now_ms();
    for m in &job.members {
        let heard = m
            .last_report_unix_ms
            .map(|ms| {
                format!(
                    ", step {}, {:.3} s compute + {:.3} s comm per step, heard {:.1} s ago{}",
                    m.step,
                    m.compute_s,
                    m.comm_s,
                    (now - ms) as f64 / 1000.0,
                    if m.straggler { ", STRAGGLER" } else { "" }
                )
            })
            .unwrap_or_default();
        println!(
            "rank {:<5} {} at {}{heard}",
            m.rank, m.worker_id, m.advertise
        );
    }
    if let Some(scores) = &job.eval {
        println!("eval       {}", scores.describe(4));
    }
    for e in &job.eval_examples {
        println!(
            "example    {} -> {:?} (reference {:?})",
            e.sample_id, e.prediction, e.reference
        );
    }
    if !job.message.is_empty() {
        println!("message    {}", job.message);
    }
}

async fn submit(args: SubmitArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading the job spec {}", args.spec.display()))?;
    let source = args.spec.display().to_string();
    // Checked here first, so a bad spec is refused with every problem named
    // even when no coordinator answers; the coordinator checks it again.
    let spec = samtrain_proto::spec::JobSpec::from_toml(&text, Some(&source))?;
    refuse_local_preparation(&spec, &source)?;
    warn_if_over_memory(&spec, &source);
    if args.preflight {
        preflight(&spec).await?;
    }
    let id = args
        .remote
        .coordinators
        .client()
        .submit(&text, &source)
        .await?;
    if args.remote.json {
        println!("{}", json!({ "job_id": id }));
    } else {
        println!("{id}");
    }
    Ok(())
}

/// `submit --preflight`: the datasets' full check, from this machine, with
/// the spec's bad-record policy. Local paths are read here as they are
/// named, so they must be the paths the workers see too (a shared volume).
async fn preflight(spec: &samtrain_proto::spec::JobSpec) -> Result<()> {
    use samtrain_data::mmlink::{load, ImageCheck, LoadOptions, Policy};
    let policy = match spec.data.bad_records {
        samtrain_proto::spec::BadRecords::Fail => Policy::Fail,
        samtrain_proto::spec::BadRecords::Skip => Policy::Skip,
    };
    let sets = std::iter::once(("train", &spec.data.train))
        .chain(spec.data.eval.as_ref().map(|e| ("eval", e)));
    for (role, location) in sets {
        let options = LoadOptions {
            policy,
            images: ImageCheck::Decode,
            validated: None,
            limits: samtrain_worker::inputs::input_limits(spec),
        };
        let loaded = load(location, options)
            .await
            .with_context(|| format!("preflight: data.{role} = {location}"))?;
        eprintln!(
            "preflight: data.{role} {location}: {} records, {} used, {} left out (data.bad_records)",
            loaded.report.records,
            loaded.report.valid,
            loaded.report.skipped()
        );
    }
    Ok(())
}

/// `[data.synth]` and `[model] init` are made by the launcher before any
/// worker starts (`samtrain local`, `demo`, `train`); a cluster's workers
/// only read what exists, so a submitted spec that needs them would fail
/// on every worker. Refused here, with what to do instead.
fn refuse_local_preparation(spec: &samtrain_proto::spec::JobSpec, source: &str) -> Result<()> {
    let mut asks = Vec::new();
    if spec.data.synth.is_some() {
        asks.push("`[data.synth]` (synthesise the dataset)");
    }
    if spec.model.init.is_some() {
        asks.push("`[model] init` (initialise a new model folder)");
    }
    if !asks.is_empty() {
        bail!(
            "{source}: {} {} made by `samtrain local`, `samtrain demo` and `samtrain train`, not \
             by a cluster's workers; create them first (`samtrain data synth`, `samtrain model \
             init`), point `data.train`/`data.eval` and `model.path` at them, and drop those \
             settings",
            asks.join(" and "),
            if asks.len() > 1 { "are" } else { "is" }
        );
    }
    Ok(())
}

/// With `[parallel] worker_memory_gib` set and the model's config.json
/// readable from here, warns when the memory plan of one rank (at the
/// spec's batch, MmLINK's largest sample of 8 images and the longest text)
/// exceeds it. A warning, not a refusal: the plan's activations are an
/// estimate.
fn warn_if_over_memory(spec: &samtrain_proto::spec::JobSpec, source: &str) {
    use samtrain_model::plan::{gib, plan, PlanInput};
    let Some(limit) = spec.parallel.worker_memory_gib else {
        return;
    };
    let path = std::path::Path::new(&spec.model.path).join(samtrain_model::weights::CONFIG_FILE);
    let Ok(config) = samtrain_model::SamConfig::from_file(&path) else {
        tracing::info!(config = %path.display(), "no readable model config here; memory plan skipped");
        return;
    };
    let dtype = spec.model.dtype.unwrap_or(match spec.training.device {
        samtrain_proto::spec::DeviceKind::Cpu => samtrain_proto::spec::Dtype::Fp32,
        _ => samtrain_proto::spec::Dtype::Bf16,
    });
    let input = PlanInput {
        tp: i64::from(spec.parallel.tp),
        batch: spec.training.batch_size as i64,
        images: 8,
        text_len: (spec.data.max_txt_len + spec.data.max_output_txt_len) as i64,
        dtype_bytes: dtype.bytes(),
        activation_checkpointing: spec.training.activation_checkpointing,
    };
    let needed = plan(&config, &input).total();
    if needed as f64 > limit * (1u64 << 30) as f64 {
        eprintln!(
            "warning: {source}: each rank needs about {} (samtrain model plan --config {} --tp {} \
             --batch {} --images 8 --text-len {} --dtype {}{}), more than \
             parallel.worker_memory_gib = {limit}",
            gib(needed),
            path.display(),
            input.tp,
            input.batch,
            input.text_len,
            dtype.name(),
            if input.activation_checkpointing {
                " --activation-checkpointing"
            } else {
                ""
            }
        );
    }
}

async fn status(args: JobArgs) -> Result<()> {
    let job = args.remote.coordinators.client().get(&args.job).await?;
    if args.remote.json {
        println!("{}", job_json(&job));
    } else {
        print_job(&job);
    }
    Ok(())
}

async fn list(args: ListArgs) -> Result<()> {
    let jobs = args.remote.coordinators.client().list().await?;
    if args.remote.json {
        println!("{}", Value::Array(jobs.iter().map(job_json).collect()));
        return Ok(());
    }
    println!(
        "{:<28} {:<11} {:>13} {:>8}  MESSAGE",
        "JOB", "STATE", "STEP", "RESTARTS"
    );
    for j in &jobs {
        println!(
            "{:<28} {:<11} {:>13} {:>8}  {}",
            j.id,
            state_name(j.state),
            format!("{}/{}", j.step, j.total_steps),
            j.restarts,
            j.message
        );
    }
    Ok(())
}

async fn scale(args: ScaleArgs) -> Result<()> {
    let job = args
        .remote
        .coordinators
        .client()
        .scale(&args.job, args.workers)
        .await?;
    if args.remote.json {
        println!("{}", job_json(&job));
    } else {
        println!(
            "{}: at most {} workers (now {})",
            job.id, job.max_workers, job.world_size
        );
    }
    Ok(())
}

async fn drain(args: DrainArgs) -> Result<()> {
    let drained = args
        .remote
        .coordinators
        .client()
        .drain(&args.worker)
        .await?;
    if args.remote.json {
        println!(
            "{}",
            json!({"worker_id": drained.worker_id, "job_id": drained.job_id})
        );
    } else {
        match drained.job_id {
            Some(job) => println!(
                "drained {}; job {job} re-forms without it at its next checkpoint",
                drained.worker_id
            ),
            None => println!("drained {}", drained.worker_id),
        }
    }
    Ok(())
}

async fn cancel(args: JobArgs) -> Result<()> {
    let job = args.remote.coordinators.client().cancel(&args.job).await?;
    if args.remote.json {
        println!("{}", job_json(&job));
    } else {
        println!("cancelled {}", job.id);
    }
    Ok(())
}

/// One event as a line for people.
pub(crate) fn describe(event: &v1::job_event::Event) -> String {
    use v1::job_event::Event;
    match event {
        Event::Snapshot(j) => format!(
            "{}: {} at generation {}, step {}/{}{}",
            j.id,
            state_name(j.state),
            j.generation,
            j.step,
            j.total_steps,
            if j.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", j.message)
            }
        ),
        Event::StateChanged(s) => {
            let members: Vec<String> = s
                .members
                .iter()
                .map(|m| format!("{}@{}", m.rank, m.advertise))
                .collect();
            let members = if members.is_empty() {
                String::new()
            } else {
                format!(" [{}]", members.join(" "))
            };
            format!(
                "state {} (generation {}){members}: {}",
                state_name(s.state),
                s.generation,
                s.message
            )
        }
        Event::Progress(p) => format!(
            "step {}/{} loss {:.4} lr {:.2e} grad-norm {:.3} {:.1} samples/s {:.0} tokens/s",
            p.step, p.total_steps, p.loss, p.lr, p.grad_norm, p.samples_per_s, p.tokens_per_s
        ),
        Event::CheckpointCommitted(c) => format!("checkpoint step {} at {}", c.step, c.url),
        Event::CheckpointFailed(f) => describe_failure(f),
        Event::Straggler(g) => format!(
            "rank {} ({}) is a straggler: {:.3} s compute per step against a median of {:.3} s, for {} steps{}",
            g.rank,
            g.worker_id,
            g.compute_s,
            g.median_compute_s,
            g.steps,
            if g.replace { "; replaced at the next checkpoint" } else { "" }
        ),
        Event::Restarted(r) if r.resize => format!(
            "resize (generation {} -> {}): {}",
            r.ended_generation, r.next_generation, r.reason
        ),
        Event::Restarted(r) => format!(
            "restart {} (generation {} -> {}): {}",
            r.restarts, r.ended_generation, r.next_generation, r.reason
        ),
        Event::Finished(f) => {
            format!(
                "{} at step {}: {}{}",
                state_name(f.state),
                f.step,
                f.message,
                f.eval
                    .map(|scores| format!(" ({})", scores.describe(4)))
                    .unwrap_or_default()
            )
        }
    }
}

async fn watch(args: JobArgs) -> Result<()> {
    let mut client = args.remote.coordinators.client();
    // A broken stream (a failover) is opened again; its snapshot catches up.
    let mut failures = 0;
    loop {
        let mut stream = match client.watch(&args.job).await {
            Ok(s) => s,
            Err(e) if e.code().is_none() && failures < 30 => {
                failures += 1;
                tracing::warn!(error = %e, "no leader yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        failures = 0;
        loop {
            let event = match stream.message().await {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(status) => {
                    tracing::warn!(reason = status.message(), "watch broke; reconnecting");
                    break;
                }
            };
            let Some(body) = &event.event else { continue };
            if args.remote.json {
                println!("{}", event_json(&event));
            } else {
                println!("{}", describe(body));
            }
            let end = match body {
                v1::job_event::Event::Finished(f) => Some((f.state, f.message.clone())),
                v1::job_event::Event::Snapshot(j)
                    if matches!(
                        v1::JobState::try_from(j.state),
                        Ok(v1::JobState::Succeeded
                            | v1::JobState::Failed
                            | v1::JobState::Cancelled)
                    ) =>
                {
                    Some((j.state, j.message.clone()))
                }
                _ => None,
            };
            if let Some((state, message)) = end {
                if state == v1::JobState::Succeeded as i32 {
                    return Ok(());
                }
                bail!("job {} {}: {message}", args.job, state_name(state));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
