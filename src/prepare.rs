//! What a job spec asks to exist before its workers start: a synthetic
//! MmLINK train and held-out set (`[data.synth]`) and a model folder with
//! freshly initialised weights (`[model] init`). Done once, by the launcher,
//! so that workers never race to create them; anything already there is
//! left as it is, which is what lets a rerun resume.

use std::path::Path;

use anyhow::{bail, Context, Result};
use samtrain_data::mmlink::synth::{synth, SynthOptions, Task};
use samtrain_model::{weights, LoadedModel, SamConfig};
use samtrain_proto::spec::{JobSpec, SynthSpec};
use tch::Device;

/// Creates the data and model the spec asks for, where missing.
pub fn prepare(spec: &JobSpec) -> Result<()> {
    if let Some(s) = &spec.data.synth {
        synthesize(Path::new(&spec.data.train), s, s.train_samples, s.seed)?;
        if let Some(eval) = &spec.data.eval {
            synthesize(Path::new(eval), s, s.eval_samples, s.seed + 1)?;
        }
    }
    if let Some(init) = &spec.model.init {
        let dir = Path::new(&spec.model.path);
        if !dir.join(weights::CONFIG_FILE).exists() {
            let config = SamConfig::from_file(Path::new(init))
                .with_context(|| format!("model.init: reading {init}"))?;
            let m = LoadedModel::init(&config, Device::Cpu, None)?;
            weights::save(&m.vs, &config, dir)
                .with_context(|| format!("model.path: writing {}", dir.display()))?;
            tracing::info!(model = %dir.display(), config = %init, "initialised a new model folder");
        }
    }
    Ok(())
}

fn synthesize(dir: &Path, s: &SynthSpec, samples: usize, seed: u64) -> Result<()> {
    if dir.join("annotations.json").exists() {
        return Ok(());
    }
    let task = match s.task.as_str() {
        "group" => Task::Group,
        "story" => Task::Story,
        other => bail!("data.synth.task: `{other}` is not `group` or `story`"),
    };
    // Written beside the target and renamed into place, so that an
    // interrupted synthesis is never mistaken for a finished dataset.
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    let options = SynthOptions {
        task,
        samples,
        images: s.images,
        min_images: s.min_images,
        max_distractors: s.max_distractors,
        seed,
    };
    let made = synth(&partial, &options)?;
    std::fs::rename(&partial, dir)
        .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    tracing::info!(data = %dir.display(), records = made.records, "synthesised a dataset");
    Ok(())
}
