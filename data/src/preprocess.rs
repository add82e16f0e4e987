//! Images and text to model-ready batches, prepared ahead of the training step.
//!
//! - [`image`]: decode, resize, crop and normalise one image as SAM's
//!   vision encoder expects it;
//! - [`text`]: the LLM's prompt-plus-answer sequence with the loss masked off
//!   the prompt, and the Q-Former's instruction;
//! - [`batch`]: samples with different numbers of images and lengths to one
//!   padded [`Batch`];
//! - [`prefetch`]: background threads that build batches in sampler order.

pub mod batch;
pub mod image;
pub mod prefetch;
pub mod text;

use std::path::PathBuf;

pub use batch::{collate, Batch, Sample};
pub use image::{ImageConfig, ResizeMode};
pub use prefetch::{Fetched, Loader, LoaderConfig};
pub use text::{TextConfig, TextSample, Tokenizers};

use crate::mmlink::{Record, RecordId};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("record {record}: field `{field}`: image {path}: {source}")]
    Image {
        record: RecordId,
        field: String,
        path: PathBuf,
        // Boxed: the image crate's error is large and would bloat every
        // `Result` of this module.
        source: Box<::image::ImageError>,
    },
    #[error("record {record}: field `{field}`: image {path} has no pixels ({width}x{height})")]
    EmptyImage {
        record: RecordId,
        field: String,
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error(
        "tokenizer {path}: special token `{token}` (setting `{setting}`) is not in its vocabulary"
    )]
    SpecialToken {
        path: PathBuf,
        setting: &'static str,
        token: String,
    },
    #[error("record {record}: field `{field}`: tokenizer {path}: {message}")]
    Tokenize {
        record: RecordId,
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("preprocess setting `{setting}`: {message}")]
    Config {
        setting: &'static str,
        message: String,
    },
    #[error("building the batch tensors: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("loader: the sampler covers {sampler} samples but the dataset has {records} records")]
    DatasetSize { sampler: u64, records: usize },
    #[error("loader: a preprocessing thread panicked on samples {indices:?}: {message}")]
    WorkerPanic {
        indices: Vec<usize>,
        message: String,
    },
}

/// Everything needed to turn records into batches: where the images live,
/// the image settings and the loaded tokenizers. Shared by the loader's
/// threads.
pub struct Preprocessor {
    root: PathBuf,
    image: ImageConfig,
    text: Tokenizers,
}

impl Preprocessor {
    /// `root` is the dataset folder that `img_list` paths are relative to.
    pub fn new(
        root: impl Into<PathBuf>,
        image: ImageConfig,
        text: &TextConfig,
    ) -> Result<Self, PreprocessError> {
        if image.size == 0 {
            return Err(PreprocessError::Config {
                setting: "image.size",
                message: "must be at least 1 pixel".into(),
            });
        }
        Ok(Preprocessor {
            root: root.into(),
            image,
            text: Tokenizers::load(text)?,
        })
    }

    /// One record's images and text, not yet padded.
    pub fn sample(&self, record: &Record) -> Result<Sample, PreprocessError> {
        let images = record
            .img_list
            .iter()
            .enumerate()
            .map(|(k, rel)| {
                image::load(
                    &self.root.join(rel),
                    &record.id,
                    &format!("img_list[{k}]"),
                    &self.image,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sample {
            id: record.id.clone(),
            images,
            text: self.text.encode(record)?,
        })
    }

    /// Records to one padded batch; the first failing record's error.
    pub fn batch<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<Batch, PreprocessError> {
        let samples = records
            .into_iter()
            .map(|r| self.sample(r))
            .collect::<Result<Vec<_>, _>>()?;
        collate(
            &samples,
            self.image.size,
            self.text.pad_id(),
            self.text.qformer_pad_id(),
        )
    }
}
