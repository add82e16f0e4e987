//! `samtrain bench ...`: timings on this machine, each made to be compared
//! with its PyTorch peer run beside it (results and method in
//! docs/PERFORMANCE.md):
//! - [`train_step`]: one training step, against transformers
//!   (`benches/train_step.py`);
//! - [`checkpoint`]: checkpoint save and load, against torch.save/torch.load;
//! - [`allreduce`]: all-reduce between local processes, against Gloo;
//! - [`load`]: loading a model folder in a reduced dtype, against
//!   transformers' `from_pretrained`;
//! - [`restart`]: a worker's model ready after a restart, cold against
//!   resident;
//! - [`fetch`]: the images per second a worker's loader delivers, from a
//!   bucket with a cold and a warm cache.

pub mod allreduce;
pub mod checkpoint;
pub mod fetch;
pub mod load;
pub mod restart;
mod step_saves;
pub mod train_step;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use tch::Device;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Times one training step: forward, backward, AdamW step and the gradients dropped,
    /// with every parameter trainable, on a fixed random batch.
    TrainStep(train_step::TrainStepArgs),
    /// Times saving and loading a checkpoint of a given size, and how long
    /// a save blocks training.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Times all-reduce between local processes over a collective backend.
    Allreduce(allreduce::AllreduceArgs),
    /// Loads a model folder once and prints seconds and peak host memory.
    Load(load::LoadArgs),
    /// Times a worker's model ready after a restart, cold and resident.
    Restart(restart::RestartArgs),
    /// Times one epoch of a job's training set through a worker's loader.
    Fetch(fetch::FetchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TrainStep(args) => train_step::run(&args),
        BenchCommand::Checkpoint(args) => checkpoint::run(args),
        BenchCommand::Allreduce(args) => allreduce::run(args),
        BenchCommand::Load(args) => load::run(&args),
        BenchCommand::Restart(args) => restart::run(&args),
        BenchCommand::Fetch(args) => fetch::run(&args),
    }
}

/// Where a benchmark's tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchDevice {
    Cpu,
    /// The first GPU.
    Cuda,
}

impl BenchDevice {
    /// The tch device, or an error when `cuda` is asked for and libtorch
    /// sees no GPU.
    pub(crate) fn resolve(self) -> Result<Device> {
        match self {
            BenchDevice::Cpu => Ok(Device::Cpu),
            BenchDevice::Cuda => {
                samtrain_torchext::cuda::require().context("--device cuda")?;
                Ok(Device::Cuda(0))
            }
        }
    }
}

impl std::fmt::Display for BenchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
        })
    }
}

/// Waits for every kernel queued on `device`, so that a clock read after
/// it counts the work, not only its launch.
pub(crate) fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A memory figure of this process from /proc/self/status, in bytes:
/// `VmRSS` (resident now) or `VmHWM` (the peak so far).
pub(crate) fn rss_bytes(field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(kib * 1024)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
