//! `samtrain worker`: one training process of the cluster. It registers
//! with the coordinator (holding its own lease), waits for an assignment,
//! joins the generation's process groups, trains, reports, and waits for
//! the next generation; it exits on SIGTERM or SIGINT (revoking its lease at
//! once) or, with `--exit-when-idle`, when no job needs it.
//!
//! The coordinator is never on the per-step path: progress reports are
//! best effort, and training goes on while the coordinator fails over.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use samtrain_coordinator::agent::{
    Agent, AgentOptions, Assignment, NodeMembership, ObjectFetches, Outcome, Progress, Reporter,
    SaveTiming,
};
use samtrain_coordinator::health;
use samtrain_coordinator::metrics::MetricsEndpoint;
use samtrain_coordinator::MAX_SLOTS;

use super::{Coordinators, EtcdFlags};
use samtrain_collective::Secret;
use samtrain_proto::spec::DeviceKind;
use samtrain_proto::{v1, Scores};
use samtrain_worker::device::resolve_device;
use samtrain_worker::error::panic_message;
use samtrain_worker::launch::{join_groups, Membership};
use samtrain_worker::write_roots::WriteRoots;
use samtrain_worker::{train, ResidentModels, TrainEvent, TrainJob};
use tracing::Instrument;

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    coordinators: Coordinators,
    /// The host name or address peers reach this worker's collectives at
    /// (default: this machine's host name).
    #[arg(long, env = "SAMTRAIN_ADVERTISE")]
    advertise: Option<String>,
    /// The port this worker's collectives listen on; 0 takes a free one.
    #[arg(long, env = "SAMTRAIN_COLLECTIVE_PORT", default_value_t = 29500)]
    collective_port: u16,
    /// HTTP health endpoint (`/healthz`, `/readyz`, `/metrics`); none when
    /// left out.
    #[arg(long, env = "SAMTRAIN_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    #[command(flatten)]
    metrics: super::MetricsFlags,
    /// etcd endpoints, comma-separated: the worker then holds its lease in
    /// etcd itself; without them it keeps it through the coordinator.
    #[arg(long, env = "SAMTRAIN_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    #[arg(long, env = "SAMTRAIN_ETCD_PREFIX", default_value = "/samtrain")]
    etcd_prefix: String,
    #[command(flatten)]
    etcd_flags: EtcdFlags,
    /// A readable name; the worker's id starts with it (default: host name).
    #[arg(long, env = "SAMTRAIN_NAME")]
    name: Option<String>,
    /// The machine this worker runs on (in Kubernetes, the node's name):
    /// workers with the same node share fast links, and each
    /// tensor-parallel group is placed inside one node. Default: the host
    /// of --advertise.
    #[arg(long, env = "SAMTRAIN_NODE")]
    node: Option<String>,
    /// Where to train: `auto`, `cpu` or `cuda`; overrides the job's
    /// `training.device` unless `auto`.
    #[arg(long, env = "SAMTRAIN_DEVICE", default_value = "auto")]
    device: String,
    /// Ranks this node runs: `gpus` (the default) is one per visible GPU
    /// (one on a machine without), or a number (CPU ranks, for tests).
    /// Above one, this process supervises one rank process per slot, each
    /// a worker of this node pinned to its GPU, and starts again any that
    /// dies.
    #[arg(long, env = "SAMTRAIN_SLOTS", default_value = "gpus")]
    slots: String,
    /// Exit once no job needs this worker (what `samtrain local` uses).
    #[arg(long)]
    exit_when_idle: bool,
    /// Local folders or object-store URL prefixes (comma-separated) under
    /// which jobs may make this worker write: checkpoints, evaluation
    /// output, the object cache. An assignment naming another place fails
    /// with the field named. Default: anywhere.
    #[arg(long, env = "SAMTRAIN_ALLOW_WRITE", value_delimiter = ',')]
    allow_write: Vec<String>,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let device = match args.device.as_str() {
        "auto" => DeviceKind::Auto,
        "cpu" => DeviceKind::Cpu,
        "cuda" => DeviceKind::Cuda,
        other => anyhow::bail!("--device must be auto, cpu or cuda, not `{other}`"),
    };
    let host = match args.advertise.clone() {
        Some(host) => host,
        None => host_name()?,
    };
    let slots = slot_count(&args.slots, device)?;
    if slots > 1 {
        let name = match args.name.clone() {
            Some(name) => name,
            None => host_name()?,
        };
        let node = args.node.clone().unwrap_or_else(|| host.clone());
        // The node's agent has no collectives: port 0 says so.
        let mut agent = agent_options(&args, name.clone(), format!("{host}:0"));
        agent.node = node.clone();
        return super::slots::supervise(&super::slots::SlotPlan {
            slots,
            name,
            node,
            collective_port: args.collective_port,
            health_listen: args.health_listen,
            exit_when_idle: args.exit_when_idle,
            agent,
            metrics_token: args.metrics.token()?,
        });
    }
    // Bound once, before registering, so the advertised port is the real one
    // and stays the same for every generation this worker joins.
    let listener = bind_collective(&host, args.collective_port)?;
    let port = listener.local_addr()?.port();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match runtime.block_on(serve(args, device, host, port, listener)) {
        Err(e) if e.is::<Stuck>() => {
            // The stuck thread cannot be joined; leaving the process is
            // the only way to free its device, so the runtime is not waited
            // for either. 128: retried by Kubeflow's ExitCode policy and
            // restarted by `samtrain local`.
            tracing::error!(error = %e, "exiting so that this worker is replaced");
            runtime.shutdown_background();
            Err(super::Exit(128).into())
        }
        other => other,
    }
}

/// How many ranks `--slots` asks for on this machine.
fn slot_count(slots: &str, device: DeviceKind) -> Result<u32> {
    let n = match slots {
        "gpus" if device == DeviceKind::Cpu => 1,
        "gpus" => samtrain_torchext::cuda::device_count().max(1) as u32,
        n => n.parse::<u32>().map_err(|_| {
            anyhow::anyhow!("--slots must be `gpus` or a number of ranks, not `{n}`")
        })?,
    };
    if !(1..=MAX_SLOTS).contains(&n) {
        anyhow::bail!("--slots must be from 1 to {MAX_SLOTS}, got {n}");
    }
    // On a GPU, one rank per GPU: NCCL cannot put two ranks on one.
    let gpus = samtrain_torchext::cuda::device_count().max(0) as u32;
    if n > 1 && device != DeviceKind::Cpu && gpus > 0 && n > gpus {
        anyhow::bail!(
            "--slots {n} but this machine has {gpus} GPUs: one rank per GPU (or --device cpu)"
        );
    }
    Ok(n)
}

/// The training thread did not stop after its generation ended.
#[derive(Debug)]
struct Stuck {
    generation: u64,
    grace: Duration,
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the training thread of generation {} did not stop within {:?} after the generation ended",
            self.generation, self.grace
        )
    }
}

impl std::error::Error for Stuck {}

async fn serve(
    args: WorkerArgs,
    device: DeviceKind,
    host: String,
    port: u16,
    listener: TcpListener,
) -> Result<()> {
    let name = match args.name.clone() {
        Some(name) => name,
        None => host_name()?,
    };
    // Read before registering, so that a bad token file fails at once.
    let metrics_token = args.metrics.token()?;
    let mut options = agent_options(&args, name, format!("{host}:{port}"));
    options.node_membership = NodeMembership::from_env().map_err(anyhow::Error::msg)?;
    let mut agent = Agent::register(options)
        .await
        .context("registering with the coordinator")?;
    tracing::info!(worker = agent.worker_id(), advertise = %format!("{host}:{port}"), "registered");
    let metrics = MetricsEndpoint {
        render: agent.metrics(),
        token: metrics_token,
    };
    let _health = match args.health_listen {
        Some(listen) => Some(
            health::serve(
                listen,
                agent.readiness(),
                health::Routes {
                    metrics: Some(metrics),
                    ui: None,
                },
            )
            .await
            .with_context(|| format!("cannot serve health probes on {listen}"))?,
        ),
        None => None,
    };

    let roots = WriteRoots::new(&args.allow_write);
    let result = tokio::select! {
        r = work(&mut agent, device, &listener, &roots) => r,
        signal = stop_signal() => {
            tracing::info!(signal = signal?, "stopping");
            Ok(())
        }
    };
    agent.shutdown().await;
    result
}

/// How this worker (or its node's agent) reaches the control plane.
fn agent_options(args: &WorkerArgs, name: String, advertise: String) -> AgentOptions {
    AgentOptions {
        coordinators: args.coordinators.addresses.clone(),
        name,
        advertise,
        device: args.device.clone(),
        node: args.node.clone().unwrap_or_default(),
        etcd: args.etcd.clone(),
        etcd_access: args.etcd_flags.access(),
        etcd_prefix: args.etcd_prefix.clone(),
        exit_when_idle: args.exit_when_idle,
        lease_ttl: None,
        credentials: args.coordinators.credentials(),
        node_membership: None,
    }
}

/// Generation after generation until no job needs this worker.
async fn work(
    agent: &mut Agent,
    device: DeviceKind,
    listener: &TcpListener,
    roots: &WriteRoots,
) -> Result<()> {
    // The model stays loaded from one generation to the next (see
    // samtrain_worker::resident): a restart re-forms the groups only.
    let models = ResidentModels::default();
    while let Some(mut assignment) = agent.next_assignment().await? {
        if device != DeviceKind::Auto {
            assignment.spec.training.device = device;
        }
        if let Err(message) = roots.check(&assignment.spec) {
            tracing::error!(job = %assignment.job_id, %message, "assignment refused");
            let refused = Outcome::Failed {
                retriable: false,
                message,
            };
            agent
                .report_outcome(&assignment, refused)
                .await
                .context("reporting the refusal to the coordinator")?;
            continue;
        }
        // Every log line of the generation, here and in its training
        // thread, names the job, the generation and this worker's rank.
        let span = assignment.span();
        generation(agent, &assignment, listener, &models, span.clone())
            .instrument(span)
            .await?;
    }
    Ok(())
}

/// Trains one generation in its own thread (inside `span`) and reports
/// how it ended.
async fn generation(
    agent: &Agent,
    assignment: &Assignment,
    listener: &TcpListener,
    models: &ResidentModels,
    span: tracing::Span,
) -> Result<()> {
    tracing::info!(
        job = %assignment.job_id,
        generation = assignment.generation,
        rank = assignment.rank,
        world_size = assignment.world_size,
        "assigned"
    );
    let listener = listener
        .try_clone()
        .context("sharing the collective listener")?;
    let reporter = agent.reporter();
    let job = assignment.clone();
    let models = models.clone();
    // A plain thread, not tokio's blocking pool: the data crate's
    // blocking loaders refuse to run inside an async runtime's context.
    let (done, mut result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("train-g{}", job.generation))
        .spawn(move || {
            let outcome = span.in_scope(|| run_generation(&job, listener, reporter, models));
            let _ = done.send(outcome);
        })
        .context("starting the training thread")?;
    // The control loop never waits on the training thread for good: once
    // the generation has ended (the coordinator ended it, the watchdog
    // aborted its groups, the lease was lost) the thread has `grace` to
    // return before the worker gives up on it.
    let grace = Duration::from_secs_f64(assignment.spec.parallel.collective_timeout_s)
        .max(Duration::from_secs(10));
    let mut ended_at: Option<tokio::time::Instant> = None;
    let outcome = loop {
        tokio::select! {
            r = &mut result => break r.unwrap_or_else(|_| Outcome::Failed {
                retriable: true,
                message: "the training thread ended without an outcome".to_owned(),
            }),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if ended_at.is_none() && assignment.ended.load(Ordering::SeqCst) {
            ended_at = Some(tokio::time::Instant::now());
        }
        if ended_at.is_some_and(|t| t.elapsed() > grace) {
            let stuck = Stuck {
                generation: assignment.generation,
                grace,
            };
            let failed = Outcome::Failed {
                retriable: true,
                message: format!("rank {}: {stuck}", assignment.rank),
            };
            agent
                .report_outcome(assignment, failed)
                .await
                .context("reporting the outcome to the coordinator")?;
            return Err(stuck.into());
        }
    };
    if let Outcome::Failed { retriable, message } = &outcome {
        tracing::warn!(job = %assignment.job_id, generation = assignment.generation, retriable, %message, "generation failed");
    }
    agent
        .report_outcome(assignment, outcome)
        .await
        .context("reporting the outcome to the coordinator")?;
    Ok(())
}

/// Joins the process groups of one generation and trains; never panics.
fn run_generation(
    a: &Assignment,
    listener: TcpListener,
    reporter: Reporter,
    models: ResidentModels,
) -> Outcome {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let device =
            resolve_device(a.spec.training.device, a.rank).map_err(|e| Outcome::Failed {
                retriable: e.retriable(),
                message: e.to_string(),
            })?;
        let member = Membership {
            rank: a.rank,
            peers: &a.peers,
            generation: a.generation,
            secret: Secret::new(a.ring_secret.as_bytes()),
            ended: a.ended.clone(),
        };
        let (groups, watchdog) =
            join_groups(member, &a.spec, device, listener).map_err(|e| Outcome::Failed {
                retriable: true,
                message: format!("rank {} joining generation {}: {e}", a.rank, a.generation),
            })?;
        let total_steps = a.spec.training.steps;
        let events = move |event: TrainEvent| match event {
            TrainEvent::Progress(m) => reporter.progress(Progress {
                step: m.step,
                total_steps,
                loss: m.loss,
                lr: m.lr,
                grad_norm: m.grad_norm,
                samples_per_s: m.samples_per_s,
                tokens_per_s: m.tokens_per_s,
                compute_s: m.compute_s,
                comm_s: m.comm_s,
                data_s: m.data_s,
                objects: m.objects.map(|o| ObjectFetches {
                    fetched: o.fetched,
                    bytes: o.bytes_fetched,
                    hits: o.hits,
                }),
            }),
            TrainEvent::Checkpoint { checkpoint, save } => reporter.checkpoint(
                checkpoint,
                SaveTiming {
                    bytes: save.bytes,
                    blocked_s: save.blocked_s,
                    upload_s: save.upload_s,
                },
            ),
            TrainEvent::CheckpointFailed { checkpoint, reason } => {
                reporter.checkpoint_failed(checkpoint, reason)
            }
            TrainEvent::Started {
                load_s: Some(load_s),
                ..
            } => reporter.resumed(load_s),
            TrainEvent::Started { .. } => {}
        };
        train(TrainJob {
            spec: a.spec.clone(),
            groups,
            abort: a.ended.clone(),
            events: Box::new(events),
            models,
        })
        .map_err(|e| Outcome::Failed {
            retriable: e.retriable(),
            message: match watchdog.fired() {
                Some(why) => format!("{e} ({why})"),
                None => e.to_string(),
            },
        })
    }));
    match result {
        Ok(Ok(outcome)) => Outcome::Completed {
            eval: outcome.eval.map(|s| Scores {
                rouge: s.rouge,
                cider: s.cider,
                bleu4: s.bleu4,
            }),
            examples: outcome
                .examples
                .into_iter()
                .map(|e| v1::EvalExample {
                    sample_id: e.sample_id,
                    prediction: e.prediction,
                    reference: e.reference,
                })
                .collect(),
            step: outcome.final_step,
            checkpoint: outcome.checkpoint,
        },
        Ok(Err(failed)) => failed,
        // The model's tensor-parallel all-reduce panics when a peer fails
        // mid-forward; a new generation may mend that, so it is retriable.
        Err(panic) => Outcome::Failed {
            retriable: true,
            message: format!("training panicked: {}", panic_message(panic.as_ref())),
        },
    }
}

/// SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn stop_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|_| "SIGINT").context("waiting for SIGINT"),
    }
}

fn host_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read this machine's host name; pass --advertise and --name")?;
    Ok(name.trim().to_owned())
}

/// The collective listener, on the advertised host's address when it is
/// one of this machine's (so `--advertise 127.0.0.1` is not reachable from
/// the network), else on every interface (behind NAT the advertised name
/// may resolve to an address the machine does not hold).
fn bind_collective(host: &str, port: u16) -> Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let local = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|addr| TcpListener::bind(addr).ok());
    if let Some(listener) = local {
        return Ok(listener);
    }
    tracing::warn!(%host, "the advertised host is not an address of this machine; the collective port listens on every interface");
    TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("cannot listen on port {port}"))
}
