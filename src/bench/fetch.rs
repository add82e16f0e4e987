//! `samtrain bench fetch`: how many images per second a worker's loader
//! delivers from a job's training set, as the trainer builds it (the
//! dataset read and checked, then the loader threads fetching through the
//! object cache, decoding, resizing and collating one epoch of batches).
//! Run once with an empty cache and once with the cache it filled, it gives
//! the cold and warm rates of a dataset in a bucket
//! (`benches/run_fetch.sh`), to set against what a training step consumes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use samtrain_data::sampler::Position;
use samtrain_worker::inputs::{self, Remote};

#[derive(Args)]
pub struct FetchArgs {
    /// A job spec: its `[data]` section is read (train set, tokenizers,
    /// loader threads, prefetch depth, cache) and its batch size.
    #[arg(long)]
    spec: PathBuf,
    /// The model's image size (pixels per side).
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(i64).range(1..=4096))]
    image_size: i64,
}

pub fn run(args: &FetchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading {}", args.spec.display()))?;
    let source = args.spec.display().to_string();
    let spec = samtrain_proto::spec::JobSpec::from_toml(&text, Some(&source))?;
    let remote = Remote::of(&spec.data);
    let mut local = spec.clone();
    inputs::localize_tokenizers(&mut local, &remote)?;
    // Every record once: the epoch's last batch is padded, not dropped.
    local.data.tail = samtrain_proto::spec::Tail::Pad;
    let started = Instant::now();
    let dataset = inputs::load_dataset(
        &spec.data.train,
        spec.data.bad_records,
        inputs::input_limits(&spec),
        &remote,
    )?;
    let read_s = started.elapsed().as_secs_f64();
    let records = dataset.records.len();
    let images: usize = dataset.records.iter().map(|r| r.img_list.len()).sum();
    let steps = (records as u64).div_ceil(spec.training.batch_size);
    let loader = inputs::start_loader(
        &local,
        dataset,
        args.image_size,
        (0, 1),
        Position::default(),
    )?;
    let started = Instant::now();
    let mut delivered = 0usize;
    for fetched in loader.take(steps as usize) {
        let batch = fetched.batch?;
        delivered += batch.image_mask.sum(tch::Kind::Int64).int64_value(&[]) as usize;
    }
    let epoch_s = started.elapsed().as_secs_f64();
    ensure!(
        delivered >= images,
        "an epoch delivered {delivered} of {images} images"
    );
    let stats = remote.cache()?.stats();
    let out = serde_json::json!({
        "dataset": spec.data.train,
        "records": records,
        "images": delivered,
        "loader_threads": spec.data.loader_threads,
        "read_s": read_s,
        "epoch_s": epoch_s,
        "images_per_s": delivered as f64 / epoch_s.max(1e-9),
        "cache": {
            "fetched": stats.fetched,
            "hits": stats.hits,
            "bytes_fetched": stats.bytes_fetched,
        },
    });
    println!("{out}");
    Ok(())
}
