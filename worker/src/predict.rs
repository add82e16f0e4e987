//! Prediction for evaluation: beam search (SAM's settings by default) over
//! an MmLINK set, written as SAM's `pred.json` (`[{"sample_id",
//! "pred_response", "gt_response"}]`) and scored with SAM's protocol
//! (`samtrain_data::eval`).
//!
//! The model sees each record's prompt as SAM's `generate` gives it
//! (images through the evaluation transform, the Q-Former's instruction cut
//! as in training, `BOS + instruction` for the LLM uncut) and generates the
//! answer; the repetition penalty counts only generated tokens, as SAM's
//! own (LAVIS) generation does.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use samtrain_data::eval::{self, Evaluation, Prediction, SampleId, Summary};
use samtrain_data::mmlink::{Record, RecordId};
use samtrain_data::preprocess::{collate, ImageConfig, Preprocessor, TextConfig};
use samtrain_model::generation::{generate, GenerationConfig, PenaltyScope};
use samtrain_model::SamModel;
use samtrain_proto::spec::{EvaluationSpec, JobSpec};
use tch::Device;
use tokenizers::Tokenizer;

use crate::checkpointing::CheckpointMeta;
use crate::error::{PredictError, TrainError};
use crate::inputs::{self, to_device};

/// Everything prediction needs besides the model.
pub struct Predictor {
    pre: Preprocessor,
    decoder: Tokenizer,
    image_size: u32,
    settings: EvaluationSpec,
}

impl Predictor {
    /// `images`: what the dataset's image paths are relative to; `image`:
    /// the evaluation transform (its augmentation, if any, is not used).
    pub fn new(
        images: impl Into<samtrain_data::preprocess::ImageRoot>,
        text: &TextConfig,
        image: ImageConfig,
        settings: EvaluationSpec,
    ) -> Result<Self, PredictError> {
        let pre = Preprocessor::new(images, image, text)
            .map_err(|e| PredictError::eval(e.to_string()))?;
        let decoder = Tokenizer::from_file(&text.llm_tokenizer).map_err(|e| {
            PredictError::eval(format!("tokenizer {}: {e}", text.llm_tokenizer.display()))
        })?;
        Ok(Predictor {
            pre,
            decoder,
            image_size: image.size,
            settings,
        })
    }

    /// The records evaluated: all, or the first `max_samples`.
    pub fn selected<'a>(&self, records: &'a [Record]) -> &'a [Record] {
        match self.settings.max_samples {
            0 => records,
            n => &records[..n.min(records.len())],
        }
    }

    /// Generates an answer for every selected record, in record order. Under
    /// tensor parallelism every rank of the tp group calls this together.
    pub fn predict(
        &self,
        model: &SamModel,
        device: Device,
        records: &[Record],
    ) -> Result<Vec<Prediction>, PredictError> {
        let config = GenerationConfig {
            max_new_tokens: self.settings.max_new_tokens as i64,
            num_beams: self.settings.num_beams as i64,
            repetition_penalty: self.settings.repetition_penalty,
            penalty_scope: PenaltyScope::Generated,
            ..GenerationConfig::default()
        };
        let eos = model.config.text_config.eos_token_ids();
        let mut out = Vec::new();
        for chunk in self
            .selected(records)
            .chunks(self.settings.batch_size.max(1))
        {
            let mut samples = Vec::with_capacity(chunk.len());
            for record in chunk {
                let sample = self
                    .pre
                    .prompt_sample(record)
                    .map_err(|e| PredictError::eval(e.to_string()))?;
                samples.push(sample);
            }
            let batch = collate(
                &samples,
                self.image_size,
                self.pre.tokenizers().pad_id(),
                self.pre.tokenizers().qformer_pad_id(),
            )
            .map_err(|e| PredictError::eval(e.to_string()))?;
            let (inputs, _) = to_device(&batch, device);
            // The model's tensor-parallel all-reduce unwinds on a dead peer.
            let generated = catch_unwind(AssertUnwindSafe(|| generate(model, &inputs, &config)))
                .map_err(PredictError::from_panic)?
                .map_err(|e| PredictError::model("", e))?;
            for (record, ids) in chunk.iter().zip(generated) {
                let end = ids
                    .iter()
                    .position(|t| eos.contains(t))
                    .unwrap_or(ids.len());
                let ids: Vec<u32> = ids[..end].iter().map(|&t| t as u32).collect();
                let text = self.decoder.decode(&ids, true).map_err(|e| {
                    PredictError::eval(format!("decoding the answer to record {}: {e}", record.id))
                })?;
                out.push(Prediction {
                    sample_id: sample_id(&record.id),
                    pred_response: text.trim().to_owned(),
                    gt_response: record.output.clone(),
                });
            }
            tracing::debug!(done = out.len(), "predicted");
        }
        Ok(out)
    }
}

fn sample_id(id: &RecordId) -> SampleId {
    match id {
        RecordId::Int(i) => SampleId::Integer((*i).into()),
        RecordId::Str(s) => SampleId::Text(s.clone()),
    }
}

/// SAM's `pred.json`.
pub fn to_json(predictions: &[Prediction]) -> serde_json::Value {
    serde_json::Value::Array(
        predictions
            .iter()
            .map(|p| {
                serde_json::json!({
                    "sample_id": p.sample_id,
                    "pred_response": p.pred_response,
                    "gt_response": p.gt_response,
                })
            })
            .collect(),
    )
}

/// Writes `pred.json` at `path`.
pub fn write_predictions(path: &Path, predictions: &[Prediction]) -> Result<(), PredictError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| PredictError::eval(format!("cannot create {}: {e}", dir.display())))?;
    }
    let text = serde_json::to_string_pretty(&to_json(predictions)).expect("JSON serialises");
    std::fs::write(path, text)
        .map_err(|e| PredictError::eval(format!("cannot write {}: {e}", path.display())))
}

/// Scores predictions; with `out_dir`, writes `eval.json` and
/// `eval_score.json` there.
pub fn score(
    predictions: &[Prediction],
    out_dir: Option<&Path>,
) -> Result<Evaluation, PredictError> {
    let evaluation = eval::evaluate(predictions).map_err(|e| PredictError::eval(e.to_string()))?;
    if let Some(dir) = out_dir {
        eval::write_outputs(&evaluation, dir).map_err(|e| PredictError::eval(e.to_string()))?;
    }
    Ok(evaluation)
}

/// A model ready to predict, and where it came from.
pub struct PredictModel {
    pub loaded: samtrain_model::LoadedModel,
    /// The model folder its frozen tensors come from.
    pub model_path: std::path::PathBuf,
    /// The job spec of the checkpoint, when loaded from one.
    pub spec: Option<samtrain_proto::spec::JobSpec>,
    /// The checkpoint's step, when loaded from one.
    pub step: Option<u64>,
}

/// Loads `location` for prediction: a model folder (it holds
/// `config.json`), one step folder of a checkpoint location
/// (`.../step-00001000`), or a checkpoint location, meaning its newest
/// committed checkpoint. A checkpoint gives the model folder recorded in its
/// metadata plus the checkpoint's trainable tensors (resharded to one rank).
pub fn load_model(location: &str, device: Device) -> Result<PredictModel, PredictError> {
    let local = Path::new(location);
    if local.join(samtrain_model::weights::CONFIG_FILE).is_file() {
        let loaded = samtrain_model::LoadedModel::load(local, device, None)
            .map_err(|e| PredictError::model(location, e))?;
        return Ok(PredictModel {
            loaded,
            model_path: local.to_path_buf(),
            spec: None,
            step: None,
        });
    }
    let store_error = |source| PredictError::store(location, source);
    let (ckpt, info) = checkpoint_at_location(location)?;
    let state = ckpt.load(&info, 0, 1).map_err(store_error)?;
    let bad = |message: String| PredictError::Location {
        url: info.url.clone(),
        message,
    };
    let meta: CheckpointMeta = serde_json::from_value(state.meta)
        .map_err(|e| bad(format!("meta.json is not samtrain's training state: {e}")))?;
    let spec = samtrain_proto::spec::JobSpec::from_toml(&meta.spec, Some("meta.json"))
        .map_err(|e| bad(e.to_string()))?;
    // The model folder and tokenizers the job named, as local files
    // (fetched into the cache when they are URLs).
    let spec =
        inputs::localize(&spec, &inputs::Remote::of(&spec.data)).map_err(|e| bad(e.to_string()))?;
    let model_path = std::path::PathBuf::from(&spec.model.path);
    let dtype = crate::device::model_dtype(spec.model.dtype, device);
    let loaded = samtrain_model::LoadedModel::load_as(&model_path, device, None, dtype)
        .map_err(|e| PredictError::model(&meta.model_path, e))?;
    let vars: std::collections::HashMap<String, tch::Tensor> =
        loaded.vs.variables().into_iter().collect();
    for (name, value) in &state.tensors {
        let var = vars.get(name).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` is not in the model {}",
                meta.model_path
            ))
        })?;
        if var.size() != value.size() {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?}, the model {:?}",
                value.size(),
                var.size()
            )));
        }
        tch::no_grad(|| var.shallow_clone().copy_(value));
    }
    tracing::info!(url = %info.url, step = meta.step, model = %meta.model_path, tensors = state.tensors.len(), "checkpoint loaded for prediction");
    Ok(PredictModel {
        loaded,
        model_path,
        spec: Some(spec),
        step: Some(meta.step),
    })
}

/// The committed checkpoint a location names: a step folder, or the
/// newest under a checkpoint location.
pub fn checkpoint_at_location(
    location: &str,
) -> Result<
    (
        samtrain_checkpoint::Checkpointer,
        samtrain_checkpoint::CheckpointInfo,
    ),
    PredictError,
> {
    use samtrain_checkpoint::format::parse_step;
    use samtrain_checkpoint::{CheckpointOptions, Checkpointer};
    let store_error = |source| PredictError::store(location, source);
    let trimmed = location.trim_end_matches('/');
    let step_folder = trimmed
        .rsplit_once('/')
        .and_then(|(parent, folder)| Some((parent, parse_step(folder)?)));
    let found = match step_folder {
        Some((parent, step)) => {
            let ckpt = Checkpointer::open(CheckpointOptions::new(parent)).map_err(store_error)?;
            let info = ckpt
                .list()
                .map_err(store_error)?
                .into_iter()
                .find(|c| c.step == step)
                .ok_or_else(|| PredictError::Location {
                    url: location.to_owned(),
                    message: format!("no committed checkpoint of step {step} in {parent}"),
                })?;
            // No separate verification: loading checks every checksum.
            (ckpt, info)
        }
        None => {
            let ckpt = Checkpointer::open(CheckpointOptions::new(location)).map_err(store_error)?;
            let info =
                ckpt.latest()
                    .map_err(store_error)?
                    .ok_or_else(|| PredictError::Location {
                        url: location.to_owned(),
                        message: "neither a model folder (no config.json), a step folder, nor a \
                              location with a committed checkpoint"
                            .into(),
                    })?;
            (ckpt, info)
        }
    };
    Ok(found)
}

/// Answers every selected record of the set at `location` with `model`,
/// under the job's data and evaluation settings. Under tensor parallelism
/// every rank of the tp group calls this together.
pub fn predict_set(
    spec: &JobSpec,
    remote: &inputs::Remote,
    location: &str,
    model: &SamModel,
    device: Device,
) -> Result<Vec<Prediction>, TrainError> {
    let set = inputs::load_dataset(
        location,
        spec.data.bad_records,
        inputs::input_limits(spec),
        remote,
    )?;
    let text = inputs::text_config(spec);
    inputs::check_vocabulary(
        &text,
        spec.data.qformer_tokenizer.is_some(),
        &model.config,
        Path::new(&spec.model.path),
    )?;
    let image = inputs::image_config(spec, model.config.vision_config.image_size, false);
    let predictor = Predictor::new(set.images, &text, image, spec.evaluation.clone())?;
    let started = Instant::now();
    let predictions = predictor.predict(model, device, &set.records)?;
    tracing::info!(
        location,
        samples = predictions.len(),
        seconds = started.elapsed().as_secs_f64(),
        "predicted"
    );
    Ok(predictions)
}

/// Scores `predictions`; with `out_dir`, writes `pred.json`, `eval.json`
/// and `eval_score.json` there.
pub fn score_into(
    predictions: &[Prediction],
    out_dir: Option<&Path>,
) -> Result<Summary, PredictError> {
    if let Some(dir) = out_dir {
        write_predictions(&dir.join("pred.json"), predictions)?;
    }
    let s = score(predictions, out_dir)?.summary;
    tracing::info!(
        samples = predictions.len(),
        rouge = s.rouge,
        cider = s.cider,
        bleu4 = s.bleu4,
        "evaluation"
    );
    Ok(s)
}
