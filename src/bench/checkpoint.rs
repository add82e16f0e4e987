//! `samtrain bench checkpoint`: save and load throughput of samtrain's
//! checkpoints, and the time a save blocks training (the copy of the
//! tensors to CPU memory), on a set of f32 tensors of a given total size.
//! `benches/checkpoint_torch.py` times torch.save / torch.load of the same
//! tensors; `benches/run_checkpoint.sh` runs both (docs/PERFORMANCE.md).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use samtrain_checkpoint::{CheckpointOptions, Checkpointer, SaveStatus, ShardState};
use tch::{Kind, Tensor};

use crate::bench::{median, synchronize, BenchDevice};

#[derive(Args)]
pub struct CheckpointArgs {
    /// Total size of the tensors: a number of bytes, or with a unit
    /// (`512MiB`, `1GiB`, `100MB`).
    #[arg(long, value_parser = parse_size)]
    bytes: u64,
    /// Where to write: a local path, `file://`, `s3://`, `gs://`, `az://`.
    /// It must hold no checkpoints (the bench keeps only its newest).
    #[arg(long)]
    url: String,
    /// How many tensors the bytes are split into.
    #[arg(long, default_value_t = 16)]
    tensors: usize,
    /// Timed save-and-load rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the tensors live while training.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    device: BenchDevice,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// `1GiB`, `512MiB`, `100MB`, `4096`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: f64 = number.parse().map_err(|_| format!("no number in {s:?}"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((number * scale) as u64)
}

/// The shapes of `count` f32 tensors of `bytes` in all: rows of 1024.
fn shapes(bytes: u64, count: usize) -> Vec<[i64; 2]> {
    let rows = (bytes / 4 / 1024 / count as u64).max(1) as i64;
    vec![[rows, 1024]; count]
}

pub fn run(args: CheckpointArgs) -> Result<()> {
    ensure!(args.tensors > 0, "--tensors must be positive");
    ensure!(args.rounds > 0, "--rounds must be positive");
    let device = args.device.resolve()?;
    let mut options = CheckpointOptions::new(&args.url);
    options.keep = 1;
    let ck = Checkpointer::open(options).with_context(|| format!("opening {}", args.url))?;
    ensure!(
        ck.list()?.is_empty(),
        "{} holds checkpoints; the bench deletes old ones, so give it an empty location",
        args.url
    );
    tch::manual_seed(0);
    let tensors: Vec<(String, Tensor)> = shapes(args.bytes, args.tensors)
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            (
                format!("language_model.model.layers.{i}.mlp.up_proj.weight"),
                Tensor::randn(shape, (Kind::Float, device)),
            )
        })
        .collect();
    let bytes: u64 = tensors.iter().map(|(_, t)| (t.numel() * 4) as u64).sum();

    let (mut staging, mut save, mut load, mut latest) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let state = ShardState {
            step: round as u64 + 1,
            tp_rank: 0,
            tp_size: 1,
            writer: true,
            // Shallow clones: the same memory, as the trainer's parameters.
            tensors: tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            optimizer: Vec::new(),
            meta: serde_json::json!({ "round": round }),
        };
        let start = Instant::now();
        let ticket = ck.save(state)?;
        let outcome = ticket.wait();
        save.push(start.elapsed());
        staging.push(ticket.staging());
        if let SaveStatus::Failed(message) = outcome.status {
            bail!("save of round {round} failed: {message}");
        }

        let start = Instant::now();
        let info = ck
            .latest()?
            .context("the checkpoint just saved is not found")?;
        latest.push(start.elapsed());
        let start = Instant::now();
        // Onto the device the tensors came from, as torch.load's
        // map_location does on the other side.
        let loaded = ck.load_onto(&info, 0, 1, device)?;
        synchronize(device);
        load.push(start.elapsed());
        ensure!(
            loaded.tensors.len() == tensors.len(),
            "loaded {} tensors",
            loaded.tensors.len()
        );
        if round == 0 {
            for ((_, a), (name, b)) in loaded.tensors.iter().zip(&tensors) {
                ensure!(
                    a.device() == device && a.equal(b),
                    "{name} differs after the round trip"
                );
            }
        }
    }

    let ms = |d: &[Duration]| median(d.iter().map(|d| d.as_secs_f64() * 1e3));
    let gbps = |t_ms: f64| bytes as f64 / 1e9 / (t_ms / 1e3);
    let (staging_ms, save_ms, latest_ms, load_ms) =
        (ms(&staging), ms(&save), ms(&latest), ms(&load));
    if args.json {
        let out = serde_json::json!({
            "side": "samtrain",
            "bytes": bytes,
            "tensors": args.tensors,
            "rounds": args.rounds,
            "device": args.device.to_string(),
            "url": args.url,
            "staging_ms": staging_ms,
            "save_ms": save_ms,
            "save_gbps": gbps(save_ms),
            "latest_ms": latest_ms,
            "load_ms": load_ms,
            "load_gbps": gbps(load_ms),
        });
        println!("{out}");
    } else {
        println!(
            "checkpoint: {} tensors, {:.1} MiB of f32 on {}, to {}, median of {} rounds",
            args.tensors,
            bytes as f64 / (1 << 20) as f64,
            args.device,
            args.url,
            args.rounds
        );
        println!("  training blocked (staging) {staging_ms:.1} ms");
        println!(
            "  save (staging, upload, commit) {save_ms:.1} ms, {:.2} GB/s",
            gbps(save_ms)
        );
        println!("  latest (reads and checks every file) {latest_ms:.1} ms");
        println!("  load {load_ms:.1} ms, {:.2} GB/s", gbps(load_ms));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn shapes_add_up_to_the_size() {
        let s = shapes(64 << 20, 16);
        assert_eq!(s.len(), 16);
        assert_eq!(s.iter().map(|[r, c]| r * c * 4).sum::<i64>(), 64 << 20);
    }
}
