//! What training relies on: the trainable-parameter policy (frozen tensors
//! get no gradient buffers), LoRA starting as a no-op, and SEA's loss
//! against a Python computation.

mod common;

use samtrain_model::config::{LoraConfig, Trainable};
use samtrain_model::sam::SeaTargets;
use samtrain_model::{trainable, weights, LoadedModel, SamConfig};
use std::path::Path;

use tch::{Device, Kind, Tensor};

fn reference_model() -> common::Fixture {
    common::Fixture::new(common::Spec {
        variant: "gqa",
        seed: 31,
        guidance: "random",
        images: "3,2",
        text_len: 8,
        qformer_len: 5,
        ..Default::default()
    })
}

fn load_with(path: &Path, edit: impl FnOnce(&mut SamConfig)) -> LoadedModel {
    let mut config = SamConfig::from_file(&path.join("config.json")).unwrap();
    edit(&mut config);
    let m = LoadedModel::init(&config, Device::Cpu, None).unwrap();
    weights::load(&m.vs, path, None).unwrap();
    m
}

#[test]
fn policy_decides_which_tensors_get_gradients() {
    let f = reference_model();
    let batch = f.batch();
    /// A policy, whether LoRA is on, and which tensors must train.
    type Case = (Trainable, bool, fn(&str) -> bool);
    let cases: [Case; 3] = [
        (Trainable::default(), false, |n| n.starts_with("sam.")),
        (
            Trainable {
                qformer: true,
                projection: true,
                all: false,
            },
            false,
            |n| {
                n.starts_with("sam.")
                    || n.starts_with("qformer.")
                    || n == "query_tokens"
                    || n.starts_with("language_projection.")
            },
        ),
        (Trainable::default(), true, |n| {
            n.starts_with("sam.") || n.contains(".lora_")
        }),
    ];
    for (policy, lora, expected) in cases {
        let model = load_with(&f.model, |c| {
            c.samtrain.trainable = policy.clone();
            c.samtrain.lora = lora.then(|| LoraConfig {
                rank: 2,
                alpha: 4.0,
                target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            });
        });
        let losses = model
            .model
            .loss(&common::inputs_from(&batch), &batch["labels"], None, None)
            .unwrap();
        losses.total.backward();
        let mut trained = 0;
        for (name, t) in model.vs.variables() {
            let want = expected(&name);
            assert_eq!(t.requires_grad(), want, "{name}: requires_grad");
            assert_eq!(t.grad().defined(), want, "{name}: gradient buffer");
            trained += want as usize;
        }
        let listed = trainable::apply(&model.vs, &model.model.config.samtrain);
        assert_eq!(listed.len(), trained);
        if lora {
            // 2 layers x 3 targets x (A, B) beside the 6 SAM tensors.
            assert_eq!(trained, 6 + 12);
        }
    }
}

#[test]
fn lora_starts_as_a_no_op() {
    let f = reference_model();
    let batch = f.batch();
    let plain = load_with(&f.model, |_| {});
    let with_lora = load_with(&f.model, |c| {
        c.samtrain.lora = Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into(), "k_proj".into(), "gate_proj".into()],
        })
    });
    let a = tch::no_grad(|| plain.model.forward(&common::inputs_from(&batch))).unwrap();
    let b = tch::no_grad(|| with_lora.model.forward(&common::inputs_from(&batch))).unwrap();
    assert!(a.equal(&b), "zero-initialised LoRA B changed the logits");
}

#[test]
fn sea_loss_matches_reference() {
    let f = reference_model();
    let mut batch = f.batch();
    // Six labelled visual tokens; labels of one to three subword ids.
    let token_index = Tensor::from_slice(&[0i64, 3, 7, 12, 21, 26]);
    let label_ids = Tensor::from_slice2(&[
        [5i64, -1, -1],
        [6, 7, -1],
        [8, 9, 10],
        [11, -1, -1],
        [12, 13, -1],
        [14, 15, 16],
    ]);
    batch.insert("sea_token_index".into(), token_index.shallow_clone());
    batch.insert("sea_label_ids".into(), label_ids.shallow_clone());
    let named: Vec<(&str, &Tensor)> = batch.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &f.inputs).unwrap();
    let logit_scale = (1.0f64 / 0.07).ln().to_string();
    let expected = f.reference("sea-loss", &["--logit-scale", &logit_scale]);
    let model = load_with(&f.model, |c| c.samtrain.sea_weight = 0.5);
    let targets = SeaTargets {
        token_index,
        label_ids,
    };
    let losses = model
        .model
        .loss(
            &common::inputs_from(&batch),
            &batch["labels"],
            Some(&targets),
            None,
        )
        .unwrap();
    let sea = losses
        .sea
        .as_ref()
        .expect("SEA loss computed")
        .double_value(&[]);
    let want = expected["sea_loss"].double_value(&[0]);
    assert!(
        (sea - want).abs() < 1e-5,
        "SEA loss {sea}, reference {want}"
    );
    let total = losses.total.double_value(&[]);
    let lm = losses.lm.double_value(&[]);
    assert!((total - (lm + 0.5 * sea)).abs() < 1e-6);
    losses.total.backward();
    let scale = model.model.sea_logit_scale().unwrap();
    assert!(scale.grad().defined() && scale.grad().abs().double_value(&[]) > 0.0);
    assert_eq!(scale.kind(), Kind::Float);
}
