//! The Q-Former's dropout: on only with dropout keys, drawn from the keys
//! alone (a sample's outputs do not depend on its batch-mates, its position
//! or the batch's padding, and the same keys give the same outputs), and
//! absent when the probabilities are 0.

use samtrain_model::{rng, DropoutKeys, LoadedModel, SamConfig, SamInputs};
use tch::{Device, Kind, Tensor};

fn config(dropout: f64) -> SamConfig {
    let text = format!(
        r#"{{
  "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "image_size": 16, "patch_size": 8}},
  "qformer_config": {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": 40,
                     "max_position_embeddings": 32, "hidden_dropout_prob": {dropout},
                     "attention_probs_dropout_prob": {dropout}}},
  "text_config": {{"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 57}},
  "num_query_tokens": 3,
  "samtrain": {{"trainable": {{"all": true}}, "init_seed": 5}}
}}"#
    );
    serde_json::from_str(&text).unwrap()
}

/// A model whose exchange layers are non-zero, so SAM's passes all matter.
fn model(dropout: f64) -> LoadedModel {
    let m = LoadedModel::init(&config(dropout), Device::Cpu, None).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.vs.variables() {
            if name.starts_with("sam.") {
                let values = rng::normal(rng::derive_named(9, &name), &t.size(), t.device());
                t.shallow_clone().copy_(&(values * 0.2));
            }
        }
    });
    m
}

const Q: i64 = 3;

/// Sample A (two images, 6 text and 5 instruction tokens) and sample B
/// (one image, 4 text and 3 instruction tokens), batched with padding.
fn pair(keys: Option<[i64; 2]>) -> SamInputs {
    let pixels = rng::normal(1, &[2, 2, 3, 16, 16], Device::Cpu);
    let ids = rng::integers(2, 3, 57, &[2, 6], Device::Cpu);
    let qformer = rng::integers(3, 1, 40, &[2, 5], Device::Cpu);
    SamInputs {
        pixel_values: pixels,
        image_mask: Some(Tensor::from_slice2(&[[1i64, 1], [1, 0]])),
        qformer_input_ids: qformer,
        qformer_attention_mask: Some(Tensor::from_slice2(&[[1i64; 5], [1, 1, 1, 0, 0]])),
        input_ids: ids,
        attention_mask: Some(Tensor::from_slice2(&[[1i64; 6], [1, 1, 1, 1, 0, 0]])),
        dropout: keys.map(|k| DropoutKeys {
            seed: 77,
            samples: Tensor::from_slice(&k),
        }),
    }
}

/// Sample B of [`pair`] alone, unpadded.
fn b_alone(key: Option<i64>) -> SamInputs {
    let pair = pair(None);
    SamInputs {
        pixel_values: pair.pixel_values.narrow(0, 1, 1).narrow(1, 0, 1),
        image_mask: None,
        qformer_input_ids: pair.qformer_input_ids.narrow(0, 1, 1).narrow(1, 0, 3),
        qformer_attention_mask: None,
        input_ids: pair.input_ids.narrow(0, 1, 1).narrow(1, 0, 4),
        attention_mask: None,
        dropout: key.map(|k| DropoutKeys {
            seed: 77,
            samples: Tensor::from_slice(&[k]),
        }),
    }
}

/// B's visual tokens of its one image and its 4 text positions.
fn b_logits(logits: &Tensor, in_pair: bool) -> Tensor {
    let (row, text_start) = if in_pair { (1, 2 * Q) } else { (0, Q) };
    let l = logits.get(row);
    Tensor::cat(&[l.narrow(0, 0, Q), l.narrow(0, text_start, 4)], 0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn dropout_follows_the_keys_not_the_batch() {
    let m = model(0.1);
    let forward = |inputs: &SamInputs| m.model.forward(inputs).unwrap().to_kind(Kind::Double);
    let eval = forward(&pair(None));
    let trained = forward(&pair(Some([10, 20])));
    assert!(max_diff(&eval, &trained) > 1e-3, "dropout changed nothing");
    assert!(
        forward(&pair(Some([10, 20]))).equal(&trained),
        "not reproducible"
    );
    let other = forward(&pair(Some([11, 20])));
    assert!(max_diff(&b_logits(&other, true), &b_logits(&trained, true)) < 1e-6);
    assert!(
        max_diff(&other.get(0), &trained.get(0)) > 1e-3,
        "A's key unused"
    );

    // B alone, unpadded, at another position: B's masks all the same.
    let alone = forward(&b_alone(Some(20)));
    let d = max_diff(&b_logits(&alone, false), &b_logits(&trained, true));
    assert!(d < 1e-5, "B's outputs depend on its batch by {d}");
    let d = max_diff(
        &b_logits(&forward(&b_alone(Some(21))), false),
        &b_logits(&trained, true),
    );
    assert!(d > 1e-3, "B's key unused");
}

#[test]
fn zero_probabilities_train_as_evaluation() {
    let m = model(0.0);
    let eval = m.model.forward(&pair(None)).unwrap();
    let trained = m.model.forward(&pair(Some([10, 20]))).unwrap();
    assert!(eval.equal(&trained));
}
