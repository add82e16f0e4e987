//! From a job spec to what the model takes: the dataset's records (read and
//! checked under the spec's bad-record policy), the tokenizers, the
//! preprocessor, and padded batches moved to the training device as
//! `SamInputs` plus labels.
//!
//! Datasets, tokenizers and model folders may be local paths or object-store
//! URLs; [`Remote`] fetches the latter into the worker's on-disk cache
//! (`samtrain_data::remote`), opened only when a location is remote.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use samtrain_data::limits::InputLimits;
use samtrain_data::mmlink::{self, ImageCheck, LoadOptions, Policy, Record};
use samtrain_data::preprocess::{
    Augment, Batch, ImageConfig, ImageRoot, Loader, LoaderConfig, Preprocessor, ResizeMode, Side,
    TextConfig, Tokenizers,
};
use samtrain_data::remote::{self, ObjectCache};
use samtrain_data::sampler::{Position, Sampler, SamplerConfig, TailPolicy};
use samtrain_model::{SamConfig, SamInputs};
use samtrain_proto::spec::{
    Augmentation, BadRecords, DataSpec, ImageResize, JobSpec, Tail, TruncationSide,
};
use tch::{Device, Tensor};

use crate::error::DataError;

/// A dataset's valid records and where their images are.
pub struct Dataset {
    pub location: String,
    /// What `img_list` paths are relative to: a local folder, or a folder
    /// URL whose images the loader threads fetch through the cache.
    pub images: ImageRoot,
    pub records: Vec<Record>,
    /// Records left out for having problems (bad-record policy `skip`).
    pub skipped: usize,
    /// Whether this exact dataset (by its digest) was fully decoded
    /// before without an image problem, so that this load only checked that
    /// its images exist.
    pub validated_before: bool,
}

/// The worker's object cache, opened on first use.
pub struct Remote {
    dir: PathBuf,
    max_bytes: u64,
    retries: u32,
    cache: OnceLock<Arc<ObjectCache>>,
}

impl Remote {
    /// The cache settings of `[data]`.
    pub fn of(data: &DataSpec) -> Self {
        Self::new(
            data.cache_dir.as_deref(),
            data.cache_max_gib,
            data.fetch_retries,
        )
    }

    /// A cache in `dir` (default: `$SAMTRAIN_CACHE/objects`, else
    /// `~/.cache/samtrain/objects`) holding at most `max_gib` of images,
    /// retrying transient errors `retries` times.
    pub fn new(dir: Option<&str>, max_gib: f64, retries: u32) -> Self {
        let dir = dir.map(PathBuf::from).unwrap_or_else(|| {
            let base = std::env::var_os("SAMTRAIN_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/samtrain")))
                .unwrap_or_else(|| PathBuf::from(".samtrain-cache"));
            base.join("objects")
        });
        Self {
            dir,
            max_bytes: (max_gib * (1u64 << 30) as f64) as u64,
            retries,
            cache: OnceLock::new(),
        }
    }

    pub fn cache(&self) -> Result<&Arc<ObjectCache>, DataError> {
        if let Some(cache) = self.cache.get() {
            return Ok(cache);
        }
        let opened =
            ObjectCache::open(&self.dir, self.max_bytes, self.retries as usize).map_err(|e| {
                DataError {
                    location: e.url.clone(),
                    message: e.message.clone(),
                }
            })?;
        Ok(self.cache.get_or_init(|| opened))
    }

    /// What the cache fetched so far; none when nothing was remote.
    pub fn stats(&self) -> Option<samtrain_data::remote::CacheStats> {
        self.cache.get().map(|c| c.stats())
    }

    /// A local file for `location`: itself when local, else fetched.
    pub fn file(&self, location: &str) -> Result<PathBuf, DataError> {
        if !remote::is_remote(location) {
            return Ok(remote::local_path(location));
        }
        self.cache()?.fetch(location).map_err(remote_error)
    }

    /// A local model folder for `location`: itself when local, else its
    /// files fetched into the cache's model folder.
    pub fn model_folder(&self, location: &str) -> Result<PathBuf, DataError> {
        if !remote::is_remote(location) {
            return Ok(remote::local_path(location));
        }
        self.cache()?.fetch_model(location).map_err(remote_error)
    }
}

fn remote_error(e: remote::RemoteError) -> DataError {
    DataError {
        location: e.url,
        message: e.message,
    }
}

/// `spec` with its model folder and tokenizers as local paths (fetched into
/// the cache when they are URLs); datasets stay as they are, their images
/// are fetched by the loader. What a job records (its checkpoints' spec and
/// model path) stays the original.
pub fn localize(spec: &JobSpec, remote: &Remote) -> Result<JobSpec, DataError> {
    let mut local = spec.clone();
    let model = remote.model_folder(&spec.model.path)?;
    local.model.path = model.display().to_string();
    localize_tokenizers(&mut local, remote)?;
    Ok(local)
}

/// Replaces the spec's tokenizer URLs by local files, fetched through the
/// cache.
pub fn localize_tokenizers(spec: &mut JobSpec, remote: &Remote) -> Result<(), DataError> {
    for tokenizer in [
        &mut spec.data.llm_tokenizer,
        &mut spec.data.qformer_tokenizer,
    ] {
        if let Some(t) = tokenizer.as_mut() {
            *t = remote.file(t)?.display().to_string();
        }
    }
    Ok(())
}

/// The local folder of a dataset location: a folder, an annotations file
/// (its folder), or a `file://` URL of either.
fn local_root(location: &str) -> PathBuf {
    let path = remote::local_path(location);
    let names_file = path
        .extension()
        .is_some_and(|e| e == "json" || e == "jsonl")
        || path.is_file();
    if names_file {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path
    }
}

/// Reads and checks every record of `location` under `policy`.
///
/// A local dataset's images are decoded, except when a previous load of the
/// same dataset (equal digest: annotations, and each image's size and
/// modification time) decoded them all without a problem: then they are only
/// checked to exist, and a restart skips the full decode. A remote dataset's
/// images are only checked to exist, against one listing of its folder; the
/// loader threads of the ranks that use them fetch, decode and cache them.
pub fn load_dataset(
    location: &str,
    policy: BadRecords,
    limits: InputLimits,
    remote: &Remote,
) -> Result<Dataset, DataError> {
    let is_remote = remote::is_remote(location);
    let options = LoadOptions {
        policy: match policy {
            BadRecords::Fail => Policy::Fail,
            BadRecords::Skip => Policy::Skip,
        },
        images: if is_remote {
            ImageCheck::Exists
        } else {
            ImageCheck::Decode
        },
        validated: Some(remote.dir.join("validated")),
        limits,
    };
    let loaded = mmlink::load_blocking(location, options).map_err(|e| DataError {
        location: location.to_owned(),
        message: e.to_string(),
    })?;
    if loaded.records.is_empty() {
        return Err(DataError {
            location: location.to_owned(),
            message: format!("no valid records ({} skipped)", loaded.report.skipped()),
        });
    }
    let images = if is_remote {
        let trimmed = location.trim_end_matches('/');
        let url = if trimmed.ends_with(".json") || trimmed.ends_with(".jsonl") {
            trimmed.rsplit_once('/').map_or(trimmed, |(dir, _)| dir)
        } else {
            trimmed
        };
        ImageRoot::Remote {
            url: url.to_owned(),
            cache: remote.cache()?.clone(),
        }
    } else {
        ImageRoot::Local(local_root(location))
    };
    Ok(Dataset {
        location: location.to_owned(),
        images,
        skipped: loaded.report.skipped(),
        validated_before: loaded.validated_before,
        records: loaded.records,
    })
}

/// The tokenizer files of a spec: `data.llm_tokenizer`, default
/// `<model.path>/tokenizer.json`; the Q-Former's defaults to the LLM's.
pub fn tokenizer_paths(spec: &JobSpec) -> (PathBuf, Option<PathBuf>) {
    let llm = spec
        .data
        .llm_tokenizer
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&spec.model.path).join("tokenizer.json"));
    (llm, spec.data.qformer_tokenizer.as_ref().map(PathBuf::from))
}

/// The text settings of a spec: its tokenizers and lengths.
pub fn text_config(spec: &JobSpec) -> TextConfig {
    let (llm, qformer) = tokenizer_paths(spec);
    let mut text = text_config_from(
        &llm,
        qformer.as_deref(),
        spec.data.max_txt_len,
        spec.data.max_output_txt_len,
    );
    text.qformer_truncation = match spec.data.qformer_truncation {
        TruncationSide::Left => Side::Left,
        TruncationSide::Right => Side::Right,
    };
    text.bos_token = spec.data.bos_token.clone();
    text.eos_token = spec.data.eos_token.clone();
    text.pad_token = spec.data.pad_token.clone();
    if qformer.is_none() {
        text.qformer_pad_token = text.pad_token.clone();
    }
    text
}

/// The image settings of a spec for a model of `size` pixels: with
/// `training`, its augmentation.
/// The spec's bounds on images per record and pixels per image.
pub fn input_limits(spec: &JobSpec) -> InputLimits {
    InputLimits {
        max_images_per_record: spec.data.max_images_per_record,
        max_image_pixels: spec.data.max_image_pixels,
    }
}

pub fn image_config(spec: &JobSpec, size: i64, training: bool) -> ImageConfig {
    ImageConfig {
        max_pixels: spec.data.max_image_pixels,
        size: size as u32,
        resize: match spec.data.image_resize {
            ImageResize::Stretch => ResizeMode::Stretch,
            ImageResize::ShorterSideCrop => ResizeMode::ShorterSideCrop,
        },
        augment: match spec.data.augmentation {
            Augmentation::Sam if training => Some(Augment::sam(spec.training.seed)),
            _ => None,
        },
    }
}

/// SAM's text settings for these tokenizer files. With one tokenizer file
/// for both models (`qformer` absent) the Q-Former pads with the LLM's pad
/// token: BERT's `[PAD]` default would not be in an LLM vocabulary (padding
/// is masked, so its id never matters).
pub fn text_config_from(
    llm: &Path,
    qformer: Option<&Path>,
    max_txt_len: usize,
    max_output_txt_len: usize,
) -> TextConfig {
    let mut text = TextConfig::new(llm, qformer.unwrap_or(llm));
    text.max_txt_len = max_txt_len;
    text.max_output_txt_len = max_output_txt_len;
    if qformer.is_none() {
        text.qformer_pad_token = text.pad_token.clone();
    }
    text
}

/// Refuses tokenizers that produce ids past the model's embedding tables
/// (libtorch would fail deep inside the first forward pass, or read another
/// token's row on some devices). The Q-Former's tokenizer defaults to the
/// LLM's, which for a real model (LLaMA's 32 K ids against BERT's 30 K) is
/// the usual way to get here.
pub fn check_vocabulary(
    text: &TextConfig,
    qformer_named: bool,
    config: &SamConfig,
    model_dir: &Path,
) -> Result<(), DataError> {
    let tokenizers = Tokenizers::load(text)
        .map_err(|e| DataError::new(&text.llm_tokenizer.display().to_string(), e.to_string()))?;
    let (llm, qformer) = tokenizers.id_limits();
    let model_config = model_dir.join(samtrain_model::weights::CONFIG_FILE);
    let qformer_setting = if qformer_named {
        "data.qformer_tokenizer"
    } else {
        "data.qformer_tokenizer is not set, so the LLM's tokenizer is used; set it to the \
         Q-Former's (BERT's) tokenizer.json"
    };
    let checks = [
        (
            llm,
            config.text_config.vocab_size,
            &text.llm_tokenizer,
            "data.llm_tokenizer",
            "text_config.vocab_size",
        ),
        (
            qformer,
            config.qformer_config.vocab_size,
            &text.qformer_tokenizer,
            qformer_setting,
            "qformer_config.vocab_size",
        ),
    ];
    for (ids, rows, file, setting, table) in checks {
        if ids > rows {
            return Err(DataError::new(
                &file.display().to_string(),
                format!(
                    "the tokenizer's ids go up to {}, but {} has {table} = {rows}: every id needs \
                     a row of that embedding table ({setting})",
                    ids - 1,
                    model_config.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The training preprocessor of `dataset` for a model with `image_size`
/// pixel inputs.
pub fn preprocessor(
    spec: &JobSpec,
    dataset: &Dataset,
    image_size: i64,
) -> Result<Preprocessor, DataError> {
    let image = image_config(spec, image_size, true);
    Preprocessor::new(dataset.images.clone(), image, &text_config(spec)).map_err(|e| DataError {
        location: dataset.location.clone(),
        message: e.to_string(),
    })
}

/// The sampler of a training set of `num_samples` records under `spec`.
pub fn sampler_config(spec: &JobSpec, num_samples: usize) -> SamplerConfig {
    SamplerConfig {
        num_samples: num_samples as u64,
        seed: spec.training.seed,
        batch_size: spec.training.batch_size,
        tail: match spec.data.tail {
            Tail::Drop => TailPolicy::Drop,
            Tail::Pad => TailPolicy::Pad,
        },
        balance: spec.data.balance_images,
    }
}

/// The prefetching loader of one data-parallel rank's share of
/// `train_set`: `(rank, size)` of the data-parallel group, from `position`
/// on.
pub fn start_loader(
    spec: &JobSpec,
    train_set: Dataset,
    image_size: i64,
    (dp_rank, dp): (u64, u64),
    position: Position,
) -> Result<Loader, DataError> {
    let data_error = |e: &dyn std::fmt::Display| DataError::new(&spec.data.train, e.to_string());
    let pre = preprocessor(spec, &train_set, image_size)?;
    let images: Arc<[u32]> = train_set
        .records
        .iter()
        .map(|r| r.img_list.len() as u32)
        .collect();
    let sampler = Sampler::balanced(
        sampler_config(spec, train_set.records.len()),
        dp_rank,
        dp,
        position,
        Some(images),
    )
    .map_err(|e| data_error(&e))?;
    Loader::spawn(
        Arc::new(pre),
        Arc::from(train_set.records),
        sampler,
        LoaderConfig {
            workers: spec.data.loader_threads,
            depth: spec.data.prefetch,
        },
    )
    .map_err(|e| data_error(&e))
}

/// A batch as the model's inputs and labels, on `device`.
pub fn to_device(batch: &Batch, device: Device) -> (SamInputs, Tensor) {
    let d = |t: &Tensor| t.to_device(device);
    (
        SamInputs {
            pixel_values: d(&batch.pixel_values),
            image_mask: Some(d(&batch.image_mask)),
            qformer_input_ids: d(&batch.qformer_input_ids),
            qformer_attention_mask: Some(d(&batch.qformer_attention_mask)),
            input_ids: d(&batch.input_ids),
            attention_mask: Some(d(&batch.attention_mask)),
            dropout: None,
        },
        d(&batch.labels),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_roots() {
        assert_eq!(local_root("/d/set"), PathBuf::from("/d/set"));
        assert_eq!(
            local_root("file:///d/set/annotations.json"),
            PathBuf::from("/d/set")
        );
    }
}
