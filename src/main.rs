//! The `samtrain` binary: one program for every role. This file parses the
//! command line and hands each subcommand to its module:
//! - [`cmd`]: one module per subcommand;
//! - [`bench`]: the benchmarks (`samtrain bench ...`);
//! - [`prepare`], [`loss_plot`]: what `local` and `demo` share: creating the
//!   data and model a spec asks for, and the loss curve;
//! - [`allocator`]: the C heap's settings, made before anything else.

mod allocator;
mod bench;
mod cmd;
mod loss_plot;
mod prepare;

use clap::{Parser, Subcommand};
use cmd::{
    certs, coordinator, data, demo, etcd, eval, jobs, ledger, local, model, predict, train, worker,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "samtrain",
    version,
    about = "Distributed fine-tuning of SAM multi-image multimodal LLMs"
)]
struct Cli {
    /// Logs as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    /// Sends this process's tracing spans (rendezvous, generation, load,
    /// steps, saves, evaluation) to an OpenTelemetry collector over
    /// OTLP/HTTP, as `http://collector:4318`. Processes that `local` and
    /// `demo` start inherit it.
    #[arg(long, global = true, env = "SAMTRAIN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a model folder: create, run, inspect.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The main job: two local workers train a small SAM from scratch on
    /// synthetic MmLINK data, then score it on a held-out split.
    Demo(demo::DemoArgs),
    /// Runs a job spec on this machine: a coordinator and N worker processes.
    Local(local::LocalArgs),
    /// A training process of the cluster: registers with the coordinator
    /// and trains the generations it is assigned.
    Worker(worker::WorkerArgs),
    /// Timings of the model, to compare with transformers (docs/PERFORMANCE.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Scores a pred.json with SAM's protocol (ROUGE-L, CIDEr, BLEU-4).
    Eval(eval::EvalArgs),
    /// Proves from a checkpoint's sample ledger that every sample of each
    /// epoch was trained once, across kills and resizes.
    Ledger(ledger::LedgerArgs),
    /// MmLINK datasets: validate one, or synthesise one.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Trains a job spec: one process, or one rank of a static world (--peers).
    Train(train::TrainArgs),
    /// Answers an MmLINK set with a model folder or checkpoint (pred.json) and scores it.
    Predict(predict::PredictArgs),
    /// Runs a coordinator: the gRPC API, leader election (with etcd) and
    /// the health probes. Without --etcd it runs embedded, in memory.
    Coordinator(coordinator::CoordinatorArgs),
    /// Makes a CA and the certificates to serve the API over TLS (and
    /// mutual TLS), for a cluster without its own.
    Certs(certs::CertsArgs),
    /// Sets up an etcd for samtrain: `enable-auth`.
    #[command(subcommand)]
    Etcd(etcd::EtcdCommand),
    #[command(flatten)]
    Jobs(jobs::JobCommand),
}

fn main() -> anyhow::Result<()> {
    let heap = allocator::tune();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Jobs(_)
            | Command::Data(_)
            | Command::Eval(_)
            | Command::Model(_)
            | Command::Ledger(_)
    ) {
        end_quietly_on_closed_pipe();
    }
    let exporter = init_tracing(&cli)?;
    match heap {
        allocator::Tuning::Applied => tracing::debug!("C heap thresholds set for training"),
        allocator::Tuning::Skipped(why) => tracing::debug!(%why, "C heap left at its settings"),
    }
    let result = match cli.command {
        Command::Model(cmd) => model::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Local(args) => local::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Eval(args) => eval::run(args),
        Command::Ledger(args) => ledger::run(args),
        Command::Data(cmd) => data::run(cmd),
        Command::Train(args) => train::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Certs(args) => certs::run(args),
        Command::Etcd(cmd) => etcd::run(cmd),
        Command::Jobs(cmd) => jobs::run(cmd),
    };
    if let Some(&cmd::Exit(code)) = result.as_ref().err().and_then(|e| e.downcast_ref()) {
        // The command said why; the spans still queued go before the
        // process does.
        drop(exporter);
        std::process::exit(code);
    }
    result
}

/// Logs to stderr (text or JSON, filtered by `RUST_LOG`, `info` by
/// default) and, with `--otlp-endpoint`, spans of level info and above to
/// the collector; the exporter sends what is left when dropped.
fn init_tracing(cli: &Cli) -> anyhow::Result<Option<samtrain_telemetry::Exporter>> {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if cli.log_json {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    let (spans, exporter) = match &cli.otlp_endpoint {
        Some(endpoint) => {
            let service = format!("samtrain-{}", cli.command.name());
            let (layer, exporter) = samtrain_telemetry::start(endpoint, &service)?;
            // Children (`local`'s workers) inherit the endpoint. Set before
            // the command's threads start (the exporter's reads nothing of
            // the environment).
            std::env::set_var("SAMTRAIN_OTLP_ENDPOINT", endpoint);
            (Some(layer.with_filter(LevelFilter::INFO)), Some(exporter))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    Ok(exporter)
}

impl Command {
    /// The subcommand's name, which names the process's service in traces.
    fn name(&self) -> &'static str {
        match self {
            Command::Model(_) => "model",
            Command::Demo(_) => "demo",
            Command::Local(_) => "local",
            Command::Worker(_) => "worker",
            Command::Bench(_) => "bench",
            Command::Eval(_) => "eval",
            Command::Ledger(_) => "ledger",
            Command::Data(_) => "data",
            Command::Train(_) => "train",
            Command::Predict(_) => "predict",
            Command::Coordinator(_) => "coordinator",
            Command::Certs(_) => "certs",
            Command::Etcd(_) => "etcd",
            Command::Jobs(_) => "jobs",
        }
    }
}

/// Commands whose output is read through pipes (`samtrain list | head`)
/// end quietly when the reader goes away, as Unix tools do, instead of
/// panicking in `println!`. Rust ignores SIGPIPE; the long-running commands
/// keep it ignored, so that a closed child pipe cannot kill a coordinator
/// or a worker.
///
/// Not SIGPIPE's default action: a TLS connection the coordinator closes
/// raises it too (vectored socket writes do not pass `MSG_NOSIGNAL`), and
/// that must be an error the command reports, not a silent death. The
/// handler ends the process only when stdout is the pipe that broke.
fn end_quietly_on_closed_pipe() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut stdout = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll, signal and raise are async-signal-safe; a pipe
        // whose reader is gone polls as POLLERR.
        unsafe {
            if libc::poll(&mut stdout, 1, 0) == 1 && stdout.revents & libc::POLLERR != 0 {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
    }
    // SAFETY: installs the handler before any other thread exists; it
    // calls only async-signal-safe functions.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_sigpipe as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}
