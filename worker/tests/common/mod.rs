//! What the worker's tests share: a synthetic MmLINK set, a tiny model
//! folder that reads its tokenizer, job specs, and ranks run on threads
//! with the in-process collective.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use samtrain_checkpoint::{CheckpointOptions, Checkpointer};
use samtrain_collective::ProcessGroups;
use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_model::{rng, weights, LoadedModel, SamConfig};
use samtrain_proto::spec::JobSpec;
use samtrain_worker::{train, ResidentModels, TrainError, TrainEvent, TrainJob, TrainOutcome};
use tch::{Device, Tensor};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub model: PathBuf,
}

/// A model whose every part trains (so sharded LLM weights train too) and
/// whose zero-initialised tensors are made non-zero.
pub fn fixture(samples: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let made = synth(
        &data,
        &SynthOptions {
            task: Task::Group,
            samples,
            images: 2,
            min_images: 0,
            max_distractors: samtrain_data::mmlink::synth::MAX_DISTRACTORS,
            seed: 5,
        },
    )
    .unwrap();
    let vocab = made.vocabulary + 3;
    let config = format!(
        r#"{{
  "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "image_size": 16, "patch_size": 8}},
  "qformer_config": {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": {vocab},
                     "max_position_embeddings": 64}},
  "text_config": {{"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": {vocab},
                  "max_position_embeddings": 256}},
  "num_query_tokens": 3,
  "samtrain": {{"trainable": {{"all": true}}, "init_seed": 3}}
}}"#
    );
    let config: SamConfig = serde_json::from_str(&config).unwrap();
    let m = LoadedModel::init(&config, Device::Cpu, None).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.vs.variables() {
            if name.starts_with("sam.") {
                t.shallow_clone().copy_(
                    &(rng::normal(rng::derive_named(11, &name), &t.size(), t.device()) * 0.1),
                );
            }
        }
    });
    let model = dir.path().join("model");
    weights::save(&m.vs, &config, &model).unwrap();
    std::fs::copy(data.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    Fixture { dir, data, model }
}

impl Fixture {
    /// A spec over the fixture; `extra` is appended (more TOML tables).
    pub fn spec(&self, ckpt: &str, training: &str, extra: &str) -> JobSpec {
        let text = format!(
            r#"
name = "test"
[model]
path = "{}"
[data]
train = "{}"
max_txt_len = 24
max_output_txt_len = 12
loader_threads = 1
prefetch = 2
[training]
lr = 1e-3
weight_decay = 0.1
max_grad_norm = 1.0
threads = 1
log_every = 1
{training}
[checkpoint]
url = "{}"
every_steps = 5
keep = 0
{extra}
"#,
            self.model.display(),
            self.data.display(),
            self.dir.path().join(ckpt).display(),
        );
        JobSpec::from_toml(&text, None).unwrap()
    }

    pub fn ckpt(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// Runs `dp x tp` ranks on threads, each loading its model; a rank aborts
/// after step `stop_after`.
pub fn run_threads(
    spec: &JobSpec,
    dp: usize,
    tp: usize,
    stop_after: Option<u64>,
) -> Vec<Result<TrainOutcome, TrainError>> {
    let fresh = resident_models(dp * tp);
    run_threads_with(spec, dp, tp, stop_after, &fresh)
}

/// One model slot per rank (clones of one slot would share it).
pub fn resident_models(ranks: usize) -> Vec<ResidentModels> {
    (0..ranks).map(|_| ResidentModels::default()).collect()
}

/// [`run_threads`] where rank `r` keeps its model in `models[r]`, as a
/// worker process does between generations.
pub fn run_threads_with(
    spec: &JobSpec,
    dp: usize,
    tp: usize,
    stop_after: Option<u64>,
    models: &[ResidentModels],
) -> Vec<Result<TrainOutcome, TrainError>> {
    let groups = ProcessGroups::in_process((dp * tp) as i64, tp as i64).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .zip(models.iter().cloned())
        .map(|(groups, models)| {
            let spec = spec.clone();
            std::thread::spawn(move || {
                let abort = Arc::new(AtomicBool::new(false));
                let flag = abort.clone();
                train(TrainJob {
                    spec,
                    groups,
                    abort,
                    events: Box::new(move |e| {
                        if let (TrainEvent::Progress(m), Some(stop)) = (&e, stop_after) {
                            if m.step == stop {
                                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }),
                    models,
                })
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The trainable tensors of the newest checkpoint at `url`, unsharded.
pub fn final_weights(url: &str) -> Vec<(String, Tensor)> {
    let c = Checkpointer::open(CheckpointOptions::new(url)).unwrap();
    let info = c.latest().unwrap().expect("a committed checkpoint");
    let mut t = c.load(&info, 0, 1).unwrap().tensors;
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The largest absolute difference between two sets of named tensors.
pub fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// How far training moved the trainable tensors of `trained` from the
/// model folder's values.
pub fn moved(model: &Path, trained: &[(String, Tensor)]) -> f64 {
    let mut initial = std::collections::HashMap::new();
    for file in weights::weight_files(model).unwrap() {
        initial.extend(Tensor::read_safetensors(&file).unwrap());
    }
    trained
        .iter()
        .map(|(n, t)| (t - &initial[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}
