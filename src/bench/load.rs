//! `samtrain bench load`: how long loading a model folder takes and how much
//! host memory it peaks at, for comparison with transformers'
//! `from_pretrained(..., dtype=...)` (`benches/load_transformers.py`, run
//! beside it by `benches/run_load.sh`). One load per process, so that the
//! peak resident set (`VmHWM`) is the load's own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use samtrain_model::LoadedModel;
use tch::Device;

#[derive(Args)]
pub struct LoadArgs {
    /// A model folder (config.json and safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The dtype of the frozen weights: fp32, bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    dtype: samtrain_proto::spec::Dtype,
}

pub fn run(args: &LoadArgs) -> Result<()> {
    let kind = samtrain_worker::device::model_dtype(Some(args.dtype), Device::Cpu);
    let before = peak_rss_bytes()?;
    let start = Instant::now();
    let loaded = LoadedModel::load_as(&args.model, Device::Cpu, None, kind)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let params: i64 = loaded
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let out = serde_json::json!({
        "impl": "samtrain",
        "dtype": args.dtype.name(),
        "parameters": params,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes()?,
        "rss_before_bytes": before,
    });
    println!("{out}");
    Ok(())
}

/// The process's peak resident set so far (`VmHWM` of /proc/self/status).
fn peak_rss_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib * 1024)
}
