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

use super::rss_bytes;
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
    let before = rss_bytes("VmHWM")?;
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
        "peak_rss_bytes": rss_bytes("VmHWM")?,
        "rss_before_bytes": before,
    });
    println!("{out}");
    Ok(())
}
