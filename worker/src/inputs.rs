//! From a job spec to what the model takes: the dataset's records (read and
//! checked under the spec's bad-record policy), the tokenizers, the
//! preprocessor, and padded batches moved to the training device as
//! `SamInputs` plus labels.

use std::path::{Path, PathBuf};

use samtrain_data::mmlink::{self, ImageCheck, LoadOptions, Policy, Record};
use samtrain_data::preprocess::{Batch, ImageConfig, Preprocessor, TextConfig};
use samtrain_model::SamInputs;
use samtrain_proto::spec::{BadRecords, JobSpec};
use tch::{Device, Tensor};

use crate::error::DataError;

/// A dataset's valid records and where their images are.
pub struct Dataset {
    pub location: String,
    /// The folder `img_list` paths are relative to.
    pub root: PathBuf,
    pub records: Vec<Record>,
    /// Records left out for having problems (bad-record policy `skip`).
    pub skipped: usize,
}

/// The local folder of a dataset location: a folder, an annotations file
/// (its folder), or a `file://` URL of either. Preprocessing reads images
/// from the local file system, so other object-store URLs are refused here
/// with a message saying so.
pub fn local_root(location: &str) -> Result<PathBuf, DataError> {
    let path = match location.split_once("://") {
        None => PathBuf::from(location),
        Some(("file", rest)) => PathBuf::from(rest),
        Some((scheme, _)) => {
            return Err(DataError {
                location: location.to_owned(),
                message: format!(
                    "training reads images from a local folder; `{scheme}://` datasets must be \
                     copied to one first (samtrain data validate checks them in place)"
                ),
            })
        }
    };
    let names_file = path
        .extension()
        .is_some_and(|e| e == "json" || e == "jsonl")
        || path.is_file();
    Ok(if names_file {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        path
    })
}

/// Reads and checks every record and image of `location` under `policy`.
pub fn load_dataset(location: &str, policy: BadRecords) -> Result<Dataset, DataError> {
    let root = local_root(location)?;
    let options = LoadOptions {
        policy: match policy {
            BadRecords::Fail => Policy::Fail,
            BadRecords::Skip => Policy::Skip,
        },
        images: ImageCheck::Decode,
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
    Ok(Dataset {
        location: location.to_owned(),
        root,
        skipped: loaded.report.skipped(),
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
    text_config_from(
        &llm,
        qformer.as_deref(),
        spec.data.max_txt_len,
        spec.data.max_output_txt_len,
    )
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

/// The preprocessor of `dataset` for a model with `image_size` pixel inputs.
pub fn preprocessor(
    spec: &JobSpec,
    dataset: &Dataset,
    image_size: i64,
) -> Result<Preprocessor, DataError> {
    let image = ImageConfig {
        size: image_size as u32,
        ..ImageConfig::default()
    };
    Preprocessor::new(&dataset.root, image, &text_config(spec)).map_err(|e| DataError {
        location: dataset.location.clone(),
        message: e.to_string(),
    })
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
        },
        d(&batch.labels),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_roots() {
        assert_eq!(local_root("/d/set").unwrap(), PathBuf::from("/d/set"));
        assert_eq!(
            local_root("file:///d/set/annotations.json").unwrap(),
            PathBuf::from("/d/set")
        );
        let err = local_root("s3://bucket/set").unwrap_err().to_string();
        assert!(
            err.contains("s3://bucket/set") && err.contains("local folder"),
            "{err}"
        );
    }
}
