//! `samtrain bench restart`: what a restart costs a worker to have its model
//! ready, cold (the folder read again, as a new process would) against
//! resident (the model kept from the previous generation: fingerprint the
//! folder, rebind, reset the trainable tensors). Everything else a restart
//! does (re-forming the groups, reading the checkpoint, the dataset) is the
//! same on both paths.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use samtrain_model::LoadedModel;
use samtrain_worker::resident::{ModelKey, ResidentModels};
use tch::{Device, Kind};

#[derive(Args)]
pub struct RestartArgs {
    /// A model folder (config.json and safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Restarts timed after the first load.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

pub fn run(args: &RestartArgs) -> Result<()> {
    let path = args.model.display().to_string();
    let load = |tp| LoadedModel::load_as(&args.model, Device::Cpu, tp, Kind::BFloat16);
    let key = || ModelKey::of(&path, Kind::BFloat16, Device::Cpu, (0, 1));
    let mut cold = Vec::new();
    let mut resident = Vec::new();
    let models = ResidentModels::default();
    for _ in 0..=args.rounds {
        // A new process: nothing resident.
        let start = Instant::now();
        drop(ResidentModels::default().lease(key()?, None, load)?);
        cold.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let lease = models.lease(key()?, None, load)?;
        resident.push(start.elapsed().as_secs_f64());
        drop(lease);
    }
    // The first resident lease loaded the model; the rest reused it.
    anyhow::ensure!(
        models.loads() == 1,
        "the resident model was loaded {} times",
        models.loads()
    );
    let out = serde_json::json!({
        "model": path,
        "cold_median_s": super::median(cold.iter().copied().skip(1)),
        "resident_median_s": super::median(resident.iter().copied().skip(1)),
        "cold_s": cold,
        "resident_s": resident,
    });
    println!("{out}");
    Ok(())
}
