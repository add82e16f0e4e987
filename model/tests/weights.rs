//! Checkpoint I/O: round trips, sharded checkpoints, absent SAM tensors,
//! and errors that name the tensor at fault.

use std::collections::BTreeMap;
use std::path::Path;

mod common;

use common::{config, inputs, CONFIG};
use samtrain_model::rng;
use samtrain_model::weights::{self, MODEL_FILE, SAM_FILE};
use samtrain_model::{LoadedModel, ModelError, SamConfig, SamInputs};
use tch::{Device, Kind, Tensor};

fn logits(dir: &Path) -> Tensor {
    let m = LoadedModel::load(dir, Device::Cpu, None).unwrap();
    tch::no_grad(|| m.model.forward(&inputs())).unwrap()
}

fn saved_model(dir: &Path, seed: i64) -> LoadedModel {
    let mut c = config();
    c.samtrain.init_seed = seed;
    let m = LoadedModel::init(&c, Device::Cpu, None).unwrap();
    // Make the exchange non-zero so that losing SAM's tensors would show.
    tch::no_grad(|| {
        for (name, t) in m.vs.variables() {
            if name.starts_with("sam.") {
                t.shallow_clone().copy_(
                    &(rng::normal(rng::derive_named(seed as u64, &name), &t.size(), t.device())
                        * 0.2),
                );
            }
        }
    });
    weights::save(&m.vs, &c, dir).unwrap();
    m
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn save_then_load_round_trips_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let original = saved_model(dir.path(), 1);
    let loaded = LoadedModel::load(dir.path(), Device::Cpu, None).unwrap();
    let a = original.vs.variables();
    let b = loaded.vs.variables();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} changed in the round trip");
    }
    // SAM's own tensors live beside the InstructBLIP file, not in it.
    let hf = tensors(&dir.path().join(MODEL_FILE));
    let sam = tensors(&dir.path().join(SAM_FILE));
    assert!(hf.keys().all(|k| !k.starts_with("sam.")));
    assert_eq!(sam.len(), 6, "{:?}", sam.keys().collect::<Vec<_>>());
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 2);
    let expected = logits(dir.path());
    // Split model.safetensors in two shards with an index, as the hub does.
    let all = tensors(&dir.path().join(MODEL_FILE));
    let (first, second): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let named: Vec<(&str, &Tensor)> = part.iter().map(|(_, (n, t))| (n.as_str(), *t)).collect();
        Tensor::write_safetensors(&named, dir.path().join(file)).unwrap();
        for (n, _) in &named {
            map.insert(n.to_string(), file.into());
        }
    }
    std::fs::remove_file(dir.path().join(MODEL_FILE)).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join(weights::INDEX_FILE), index.to_string()).unwrap();
    assert!(logits(dir.path()).equal(&expected));
}

#[test]
fn absent_sam_tensors_start_sam_as_instructblip() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 3);
    std::fs::remove_file(dir.path().join(SAM_FILE)).unwrap();
    let m = LoadedModel::load(dir.path(), Device::Cpu, None).unwrap();
    let report = weights::load(&m.vs, dir.path(), None).unwrap();
    assert_eq!(report.initialised.len(), 6);
    let vars = m.vs.variables();
    for name in ["sam.one_2_multiple.weight", "sam.multiple_2_one.bias"] {
        assert_eq!(
            vars[name].abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "{name}"
        );
    }
    // With zero exchange, guidance changes nothing.
    let guided = tch::no_grad(|| m.model.forward(&inputs())).unwrap();
    let mut plain_config = config();
    plain_config.samtrain.guidance = false;
    let plain = LoadedModel::init(&plain_config, Device::Cpu, None).unwrap();
    weights::load(&plain.vs, dir.path(), None).unwrap();
    let unguided = tch::no_grad(|| plain.model.forward(&inputs())).unwrap();
    let d = (&guided - &unguided).abs().max().double_value(&[]);
    assert!(
        d < 1e-6,
        "zero-initialised guidance moved the logits by {d}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 4);
    let mut bigger = config();
    bigger.text_config.intermediate_size = 48;
    let m = LoadedModel::init(&bigger, Device::Cpu, None).unwrap();
    let err = weights::load(&m.vs, dir.path(), None).unwrap_err();
    match &err {
        ModelError::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert!(
                name.starts_with("language_model.model.layers.0.mlp."),
                "{name}"
            );
            assert!(
                expected.contains(&48) && found.contains(&40),
                "{expected:?} {found:?}"
            );
        }
        other => panic!("expected a shape error, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("expected shape") && message.contains("model.safetensors"),
        "{message}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 5);
    let path = dir.path().join(MODEL_FILE);
    let kept: Vec<(String, Tensor)> = tensors(&path)
        .into_iter()
        .filter(|(n, _)| n != "language_projection.bias")
        .collect();
    Tensor::write_safetensors(&kept, &path).unwrap();
    let Err(err) = LoadedModel::load(dir.path(), Device::Cpu, None) else {
        panic!("a checkpoint without language_projection.bias loaded");
    };
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "language_projection.bias"),
        "{err}"
    );
}

#[test]
fn bad_config_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut c: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    c["vision_config"]["num_attention_heads"] = 3.into();
    c["text_config"]["num_key_value_heads"] = 3.into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, c.to_string()).unwrap();
    let message = SamConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        message.contains("vision_config.hidden_size 16"),
        "{message}"
    );
    assert!(message.contains("num_key_value_heads 3"), "{message}");
    assert!(message.contains("config.json"), "{message}");

    // A positive SEA weight asks for a loss samtrain does not have; the 0.0
    // that older configs carry loads.
    let mut c: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    c["samtrain"] = serde_json::json!({"sea_weight": 0.5});
    std::fs::write(&path, c.to_string()).unwrap();
    let message = SamConfig::from_file(&path).unwrap_err().to_string();
    assert!(message.contains("samtrain.sea_weight"), "{message}");
    c["samtrain"] = serde_json::json!({"sea_weight": 0.0});
    std::fs::write(&path, c.to_string()).unwrap();
    assert!(SamConfig::from_file(&path).is_ok());
}

#[test]
fn bad_inputs_get_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 6);
    let m = LoadedModel::load(dir.path(), Device::Cpu, None).unwrap();
    let cases: Vec<(&str, SamInputs)> = vec![
        (
            "pixel_values",
            SamInputs {
                pixel_values: Tensor::zeros([2, 2, 3, 9, 8], (Kind::Float, Device::Cpu)),
                ..inputs()
            },
        ),
        (
            "image_mask",
            SamInputs {
                image_mask: Some(Tensor::from_slice2(&[[1i64, 1], [0, 1]])),
                ..inputs()
            },
        ),
        (
            "image_mask",
            SamInputs {
                image_mask: Some(Tensor::from_slice2(&[[1i64, 1], [0, 0]])),
                ..inputs()
            },
        ),
        (
            "input_ids",
            SamInputs {
                input_ids: Tensor::from_slice2(&[[1i64, 99], [1, 2]]),
                ..inputs()
            },
        ),
        (
            "attention_mask",
            SamInputs {
                attention_mask: Some(Tensor::ones([2, 4], (Kind::Int64, Device::Cpu))),
                ..inputs()
            },
        ),
    ];
    for (field, bad) in cases {
        match m.model.forward(&bad) {
            Err(ModelError::Input { name, .. }) => assert_eq!(name, field),
            Err(other) => panic!("{field}: unexpected error {other}"),
            Ok(_) => panic!("{field}: bad input accepted"),
        }
    }
}

#[test]
fn saved_config_names_every_part_for_transformers() {
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path(), 7);
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(c["model_type"], "instructblip");
    assert_eq!(
        c["vision_config"]["model_type"],
        "instructblip_vision_model"
    );
    assert_eq!(c["qformer_config"]["model_type"], "instructblip_qformer");
    assert_eq!(c["text_config"]["model_type"], "llama");
}
