//! The job's final predict + eval, and a checkpoint loaded back for
//! prediction: SAM's `pred.json` records, scores, the trained tensors.

mod common;

use common::{final_weights, fixture, run_threads};
use samtrain_worker::predict::load_model;
use tch::Device;

#[test]
fn job_ends_with_predict_and_eval() {
    let f = fixture(12);
    let out = f.dir.path().join("eval-out");
    let spec = f.spec(
        "ck",
        "steps = 2\nbatch_size = 2",
        &format!(
            "[evaluation]\nnum_beams = 2\nmax_new_tokens = 4\nmax_samples = 5\nbatch_size = 3\noutput = \"{}\"",
            out.display()
        ),
    );
    let mut spec = spec;
    spec.data.eval = Some(f.data.display().to_string());
    let outcome = run_threads(&spec, 1, 1, None).remove(0).unwrap();
    let scores = outcome.eval.expect("rank 0 scores");
    for s in [scores.rouge, scores.cider, scores.bleu4] {
        assert!((0.0..=1000.0).contains(&s), "{scores:?}");
    }
    let pred: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pred.json")).unwrap()).unwrap();
    let records = pred.as_array().unwrap();
    assert_eq!(records.len(), 5);
    for r in records {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["gt_response", "pred_response", "sample_id"]);
        assert!(!r["gt_response"].as_str().unwrap().is_empty());
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(written["cider"].as_f64().unwrap(), scores.cider);

    // The checkpoint loads back on the model folder its meta names.
    let m = load_model(&f.ckpt("ck"), Device::Cpu).unwrap();
    assert_eq!(m.step, Some(2));
    assert_eq!(m.model_path, f.model);
    let vars: std::collections::HashMap<_, _> = m.loaded.vs.variables().into_iter().collect();
    for (name, t) in final_weights(&f.ckpt("ck")) {
        assert!(vars[&name].equal(&t), "{name} not restored");
    }
}

/// A tokenizer that produces ids past the model's embedding table is
/// refused before training, naming the tokenizer, the model's config and
/// the setting to change.
#[test]
fn a_tokenizer_larger_than_the_embedding_table_is_refused() {
    use samtrain_model::{weights, LoadedModel, SamConfig};
    let f = fixture(4);
    let mut config = SamConfig::from_file(&f.model.join("config.json")).unwrap();
    config.qformer_config.vocab_size = 5;
    let small = f.dir.path().join("small-vocab");
    let m = LoadedModel::init(&config, Device::Cpu, None).unwrap();
    weights::save(&m.vs, &config, &small).unwrap();
    std::fs::copy(f.model.join("tokenizer.json"), small.join("tokenizer.json")).unwrap();
    let mut spec = f.spec("v", "steps = 1\nbatch_size = 2", "");
    spec.model.path = small.display().to_string();
    let err = match run_threads(&spec, 1, 1, None).remove(0) {
        Ok(_) => panic!("the job should be refused"),
        Err(e) => e.to_string(),
    };
    for part in [
        "tokenizer.json",
        &small.join("config.json").display().to_string(),
        "qformer_config.vocab_size = 5",
        "data.qformer_tokenizer is not set",
    ] {
        assert!(err.contains(part), "missing {part:?} in: {err}");
    }
}

/// One step folder of a checkpoint location loads that step, not the
/// newest; a step the location lacks is an error that names it.
#[test]
fn a_step_folder_loads_that_step() {
    let f = fixture(4);
    let mut spec = f.spec("steps", "steps = 2\nbatch_size = 2", "");
    spec.checkpoint.every_steps = 1;
    run_threads(&spec, 1, 1, None).remove(0).unwrap();
    let root = f.ckpt("steps");
    let load = |folder: &str| load_model(&format!("{root}/{folder}"), Device::Cpu);
    assert_eq!(load("step-00000001").unwrap().step, Some(1));
    assert_eq!(load("step-00000002/").unwrap().step, Some(2));
    let err = match load("step-00000007") {
        Ok(_) => panic!("step 7 was never written"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no committed checkpoint of step 7"), "{err}");
}
