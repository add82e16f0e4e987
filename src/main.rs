//! The `samtrain` binary: one program for every role. This file parses the
//! command line and hands each subcommand to its module.

mod bench;
mod bench_allreduce;
mod bench_checkpoint;
mod control_cmd;
mod data_cmd;
mod demo;
mod eval_cmd;
mod local;
mod loss_plot;
mod model_cmd;
mod predict_cmd;
mod prepare;
mod train_cmd;
mod worker_cmd;

use clap::{Parser, Subcommand};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a model folder: create, run, inspect.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// The main job: two local workers train a small SAM from scratch on
    /// synthetic MmLINK data, then score it on a held-out split.
    Demo(demo::DemoArgs),
    /// Runs a job spec on this machine: a coordinator and N worker processes.
    Local(local::LocalArgs),
    /// A training process of the cluster: registers with the coordinator
    /// and trains the generations it is assigned.
    Worker(worker_cmd::WorkerArgs),
    /// Timings of the model, to compare with transformers (docs/PERFORMANCE.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Scores a pred.json with SAM's protocol (ROUGE-L, CIDEr, BLEU-4).
    Eval(eval_cmd::EvalArgs),
    /// MmLINK datasets: validate one, or synthesise one.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Trains a job spec: one process, or one rank of a static world (--peers).
    Train(train_cmd::TrainArgs),
    /// Answers an MmLINK set with a model folder or checkpoint (pred.json) and scores it.
    Predict(predict_cmd::PredictArgs),
    #[command(flatten)]
    Control(control_cmd::ControlCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Local(args) => local::run(args),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Train(args) => train_cmd::run(args),
        Command::Predict(args) => predict_cmd::run(args),
        Command::Control(cmd) => control_cmd::run(cmd),
    }
}
