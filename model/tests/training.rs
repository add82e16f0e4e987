//! What training relies on: the trainable-parameter policy (frozen tensors
//! get no gradient buffers) and LoRA starting as a no-op.

mod common;

use samtrain_model::config::{LoraConfig, Trainable};
use samtrain_model::tape::GradTape;
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

/// The loss computes the last decoder layer's output projection and MLP only
/// at the positions that predict an answer token. It must equal the mean
/// cross-entropy over a full forward pass's logits read at those positions:
/// the token before each answer token, and for text token 0 the last real
/// visual token (samples here have 3 and 2 real images, so the second's
/// last slot is padding). With a checkpointing tape too, whose recomputed
/// last layer gives that subset again.
#[test]
fn the_loss_equals_cross_entropy_over_a_full_forward_pass() {
    let f = reference_model();
    let batch = f.batch();
    let model = load_with(&f.model, |c| c.samtrain.trainable.all = true);
    let inputs = common::inputs_from(&batch);
    let labels = batch["labels"].copy();
    // Supervise text token 0 of the first sample as well, so that the
    // visual-token predictor is exercised.
    let _ = labels.get(0).get(0).fill_(5);
    let q = model.model.config.num_query_tokens;

    let logits = tch::no_grad(|| model.model.forward(&inputs)).unwrap();
    let (b, t) = (labels.size()[0], labels.size()[1]);
    let visual = logits.size()[1] - t;
    let images: Vec<i64> = Vec::try_from(
        inputs
            .image_mask
            .as_ref()
            .expect("the fixture pads image slots")
            .sum_dim_intlist(1, false, tch::Kind::Int64),
    )
    .unwrap();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for s in 0..b {
        for j in 0..t {
            let label = labels.int64_value(&[s, j]);
            if label == -100 {
                continue;
            }
            let position = if j == 0 {
                images[s as usize] * q - 1
            } else {
                visual + j - 1
            };
            rows.push(logits.get(s).get(position));
            targets.push(label);
        }
    }
    assert!(rows.len() > b as usize, "{} supervised tokens", rows.len());
    let expected = tch::Tensor::stack(&rows, 0)
        .cross_entropy_for_logits(&tch::Tensor::from_slice(&targets))
        .double_value(&[]);

    let plain = tch::no_grad(|| model.model.loss(&inputs, &labels, None)).unwrap();
    assert_eq!(plain.tokens, targets.len() as i64);
    let got = plain.total.double_value(&[]);
    assert!(
        (got - expected).abs() < 1e-6,
        "loss {got}, full forward {expected}"
    );

    let mut tape = GradTape::with_checkpointing(true);
    let taped = model.model.loss(&inputs, &labels, Some(&mut tape)).unwrap();
    assert_eq!(
        taped.total.double_value(&[]),
        got,
        "with a checkpointing tape"
    );
    tape.backward(&taped.total, None).unwrap();
    let plain = model.model.loss(&inputs, &labels, None).unwrap();
    let direct: Vec<(String, tch::Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.grad().defined())
        .map(|(n, v)| {
            let g = v.grad().copy();
            let _ = v.grad().zero_();
            (n, g)
        })
        .collect();
    assert!(!direct.is_empty());
    plain.total.backward();
    for (name, taped_grad) in direct {
        let v = &model.vs.variables()[&name];
        let d = (v.grad() - &taped_grad).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{name}: gradients differ by {d}");
    }
}
