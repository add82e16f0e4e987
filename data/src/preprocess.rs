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
pub use image::{Augment, ImageConfig, ResizeMode};
pub use prefetch::{Fetched, Loader, LoaderConfig};
pub use text::{Side, TextConfig, TextSample, Tokenizers};

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
    #[error("record {record}: field `{field}`: {source}")]
    Fetch {
        record: RecordId,
        field: String,
        #[source]
        source: crate::remote::RemoteError,
    },
    #[error("record {record}: field `{field}`: image {} {message}", path.display())]
    ImageTooLarge {
        record: RecordId,
        field: String,
        path: PathBuf,
        message: String,
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

/// Which visit of a sample a training batch makes: the epoch and the
/// sample's index in the dataset. Augmentation draws from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visit {
    pub epoch: u64,
    pub sample: u64,
}

/// Everything needed to turn records into batches: where the images live,
/// the image settings and the loaded tokenizers. Shared by the loader's
/// threads.
pub struct Preprocessor {
    images: ImageRoot,
    image: ImageConfig,
    text: Tokenizers,
}

/// Where the `img_list` paths of a dataset are relative to.
#[derive(Clone)]
pub enum ImageRoot {
    /// A local folder.
    Local(PathBuf),
    /// A folder URL in object storage; images are fetched through the
    /// cache on the loader threads that need them.
    Remote {
        url: String,
        cache: std::sync::Arc<crate::remote::ObjectCache>,
    },
}

impl From<PathBuf> for ImageRoot {
    fn from(path: PathBuf) -> Self {
        ImageRoot::Local(path)
    }
}

impl From<&PathBuf> for ImageRoot {
    fn from(path: &PathBuf) -> Self {
        ImageRoot::Local(path.clone())
    }
}

impl From<&std::path::Path> for ImageRoot {
    fn from(path: &std::path::Path) -> Self {
        ImageRoot::Local(path.to_path_buf())
    }
}

/// The URL of image `relative` of the dataset folder `url`.
fn image_url(url: &str, relative: &str) -> String {
    format!("{}/{relative}", url.trim_end_matches('/'))
}

impl ImageRoot {
    /// Fetches every image of `records` into the cache at once, when
    /// remote. Failures are left for [`Self::file`] to report with the
    /// record and field.
    fn prefetch(&self, records: &[&Record]) {
        if let ImageRoot::Remote { url, cache } = self {
            let urls: Vec<String> = records
                .iter()
                .flat_map(|r| r.img_list.iter().map(|rel| image_url(url, rel)))
                .collect();
            drop(cache.fetch_all(&urls));
        }
    }

    /// The local file of image `relative` of `record`, fetched if remote.
    fn file(
        &self,
        relative: &str,
        record: &Record,
        field: &str,
    ) -> Result<PathBuf, PreprocessError> {
        match self {
            ImageRoot::Local(root) => Ok(root.join(relative)),
            ImageRoot::Remote { url, cache } => {
                cache
                    .fetch(&image_url(url, relative))
                    .map_err(|source| PreprocessError::Fetch {
                        record: record.id.clone(),
                        field: field.to_owned(),
                        source,
                    })
            }
        }
    }
}

impl Preprocessor {
    /// `images` is where the dataset's `img_list` paths are relative to.
    pub fn new(
        images: impl Into<ImageRoot>,
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
            images: images.into(),
            image,
            text: Tokenizers::load(text)?,
        })
    }

    /// The loaded tokenizers.
    pub fn tokenizers(&self) -> &Tokenizers {
        &self.text
    }

    /// One record's images and training text, not yet padded. `visit` is
    /// set in training: it selects the images' augmentation, when
    /// configured.
    pub fn sample(&self, record: &Record, visit: Option<Visit>) -> Result<Sample, PreprocessError> {
        self.assemble(record, visit, || self.text.encode(record))
    }

    /// One record as generation receives it: its images unaugmented and its
    /// whole prompt ([`Tokenizers::encode_prompt`]).
    pub fn prompt_sample(&self, record: &Record) -> Result<Sample, PreprocessError> {
        self.assemble(record, None, || self.text.encode_prompt(record))
    }

    /// A record's images (augmented when `visit` is set and configured),
    /// then its `text`.
    fn assemble(
        &self,
        record: &Record,
        visit: Option<Visit>,
        text: impl FnOnce() -> Result<TextSample, PreprocessError>,
    ) -> Result<Sample, PreprocessError> {
        let images = record
            .img_list
            .iter()
            .enumerate()
            .map(|(k, rel)| {
                let field = format!("img_list[{k}]");
                let file = self.images.file(rel, record, &field)?;
                let draw = visit.map(|v| image::Draw {
                    epoch: v.epoch,
                    sample: v.sample,
                    image: k as u64,
                });
                image::load(&file, &record.id, &field, &self.image, draw)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (images, augmented) = images.into_iter().unzip();
        Ok(Sample {
            id: record.id.clone(),
            images,
            augmented,
            text: text()?,
        })
    }

    /// Records to one padded batch; the first failing record's error. A
    /// remote dataset's images of the whole batch are fetched at once first.
    pub fn batch<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a Record, Option<Visit>)>,
    ) -> Result<Batch, PreprocessError> {
        let records: Vec<(&Record, Option<Visit>)> = records.into_iter().collect();
        let only_records: Vec<&Record> = records.iter().map(|(r, _)| *r).collect();
        self.images.prefetch(&only_records);
        let samples = records
            .into_iter()
            .map(|(r, visit)| self.sample(r, visit))
            .collect::<Result<Vec<_>, _>>()?;
        collate(
            &samples,
            self.image.size,
            self.text.pad_id(),
            self.text.qformer_pad_id(),
        )
    }
}
