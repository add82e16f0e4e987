//! Throughput of the preprocessing loader: samples per second that the
//! prefetch threads deliver from synthetic PNGs, with no training step to
//! hide behind.
//!
//! `cargo run --release -p samtrain-data --example preprocess_bench -- --threads 2`
//! Options: `--threads N` (default 1), `--images N` (default 200),
//! `--batch N` (default 4), `--epochs N` (default 3), `--size N` (default 224).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use image::{Rgb, RgbImage};
use samtrain_data::mmlink::{Record, RecordId};
use samtrain_data::preprocess::{ImageConfig, Loader, LoaderConfig, Preprocessor, TextConfig};
use samtrain_data::sampler::{Position, Sampler, SamplerConfig, TailPolicy};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::Tokenizer;

/// xorshift64*: enough randomness for pictures, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Args {
    threads: usize,
    images: usize,
    batch: u64,
    epochs: u64,
    size: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        images: 200,
        batch: 4,
        epochs: 3,
        size: 224,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--threads" => args.threads = number(&value)? as usize,
            "--images" => args.images = number(&value)? as usize,
            "--batch" => args.batch = number(&value)?,
            "--epochs" => args.epochs = number(&value)?,
            "--size" => args.size = number(&value)? as u32,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(args)
}

/// A picture of random rectangles, sized like web photos (320 to 640 px).
fn picture(rng: &mut Rng) -> RgbImage {
    let (w, h) = (320 + rng.below(321) as u32, 240 + rng.below(241) as u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([rng.next() as u8, 128, 64]));
    for _ in 0..12 {
        let (x0, y0) = (
            rng.below(u64::from(w)) as u32,
            rng.below(u64::from(h)) as u32,
        );
        let (x1, y1) = (
            (x0 + 1 + rng.below(200) as u32).min(w),
            (y0 + 1 + rng.below(200) as u32).min(h),
        );
        let c = Rgb([rng.next() as u8, rng.next() as u8, rng.next() as u8]);
        for y in y0..y1 {
            for x in x0..x1 {
                img.put_pixel(x, y, c);
            }
        }
    }
    img
}

fn write_tokenizer(
    dir: &Path,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<s>", "</s>", "<unk>", "[PAD]"].iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for k in 0..1000 {
        vocab.insert(format!("w{k}"), (4 + k).into());
    }
    let vocab_path = dir.join("vocab.json");
    std::fs::write(&vocab_path, serde_json::to_string(&vocab)?)?;
    let vocab_str = vocab_path.to_str().ok_or("temp path is not UTF-8")?;
    let mut tokenizer = Tokenizer::new(WordLevel::from_file(vocab_str, "<unk>".into())?);
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false)?;
    Ok(path)
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let mut rng = Rng(0x5eed_5eed_5eed_5eed);
    let made = Instant::now();
    for i in 0..args.images {
        picture(&mut rng).save(dir.path().join(format!("{i}.png")))?;
    }
    // Records of 1 to 4 images that together use every picture once.
    let mut records = Vec::new();
    let mut next = 0;
    while next < args.images {
        let count = (1 + rng.below(4) as usize).min(args.images - next);
        let text = |rng: &mut Rng, n: u64| {
            (0..n)
                .map(|_| format!("w{}", rng.below(1000)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        records.push(Record {
            id: RecordId::Int(records.len() as i64),
            img_list: (next..next + count).map(|k| format!("{k}.png")).collect(),
            instruction: text(&mut rng, 60),
            output: text(&mut rng, 20),
        });
        next += count;
    }
    let tokenizer = write_tokenizer(dir.path())?;
    let mut text = TextConfig::new(&tokenizer, &tokenizer);
    text.pad_token = "[PAD]".into();
    text.qformer_pad_token = "[PAD]".into();
    let image = ImageConfig {
        size: args.size,
        ..ImageConfig::default()
    };
    let preprocessor = Arc::new(Preprocessor::new(dir.path(), image, &text)?);
    let n = records.len() as u64;
    let records: Arc<[Record]> = records.into();
    println!(
        "{} images in {} records written in {:.1} s",
        args.images,
        n,
        made.elapsed().as_secs_f64()
    );

    let sampler = Sampler::new(
        SamplerConfig {
            num_samples: n,
            seed: 0,
            batch_size: args.batch,
            tail: TailPolicy::Drop,
            balance: false,
        },
        0,
        1,
        Position::default(),
    )?;
    let steps = (n / args.batch) * args.epochs;
    let loader = Loader::spawn(
        preprocessor,
        records.clone(),
        sampler,
        LoaderConfig {
            workers: args.threads,
            depth: 2 * args.threads,
        },
    )?;
    let start = Instant::now();
    let (mut samples, mut images) = (0usize, 0usize);
    for fetched in loader.take(steps as usize) {
        fetched.batch?;
        samples += fetched.indices.len();
        images += fetched
            .indices
            .iter()
            .map(|&i| records[i].img_list.len())
            .sum::<usize>();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "threads {}: {samples} samples ({images} images, {} px) in {secs:.2} s: \
         {:.1} samples/s, {:.1} images/s",
        args.threads,
        args.size,
        samples as f64 / secs,
        images as f64 / secs
    );
    Ok(())
}
