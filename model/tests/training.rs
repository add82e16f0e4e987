//! What training relies on: the trainable-parameter policy (frozen tensors
//! get no gradient buffers) and LoRA starting as a no-op.

mod common;

use samtrain_model::config::{LoraConfig, Trainable};
use samtrain_model::{trainable, weights, LoadedModel, SamConfig};
use std::path::Path;

use tch::Device;

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
            .loss(&common::inputs_from(&batch), &batch["labels"], None)
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
