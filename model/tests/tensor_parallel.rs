//! Tensor parallelism of degree 2 (two ranks on threads, an in-process
//! collective) gives the logits and gradients of degree 1; activation
//! checkpointing gives the gradients of keeping the activations, alone and
//! with tensor parallelism, over accumulated backward passes. The
//! Q-Former's dropout is on throughout.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use samtrain_comm::{shard_dim, LocalCollective};
use samtrain_model::parallel::TensorParallel;
use samtrain_model::rng;
use samtrain_model::tape::GradTape;
use samtrain_model::{trainable, weights, DropoutKeys, LoadedModel, SamConfig, SamInputs};
use tch::{Device, Tensor};

const CONFIG: &str = r#"{
  "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
  "qformer_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": 40,
                     "max_position_embeddings": 32},
  "text_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 57,
                  "attention_bias": true, "mlp_bias": true},
  "num_query_tokens": 3,
  "samtrain": {"trainable": {"all": true},
               "lora": {"rank": 2, "alpha": 4.0,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"]}}
}"#;

/// A random model whose zero-initialised tensors (exchange, LoRA B, biases)
/// are made non-zero, so every path carries signal.
fn write_model(dir: &Path) -> SamConfig {
    let config: SamConfig = serde_json::from_str(CONFIG).unwrap();
    let m = LoadedModel::init(&config, Device::Cpu, None).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.vs.variables() {
            if name.starts_with("sam.") || name.contains("lora_B") || name.ends_with("bias") {
                t.shallow_clone().copy_(
                    &(rng::normal(rng::derive_named(11, &name), &t.size(), t.device()) * 0.1),
                );
            }
        }
    });
    weights::save(&m.vs, &config, dir).unwrap();
    config
}

/// The inputs every rank trains on, the same on every call.
fn batch(config: &SamConfig) -> (SamInputs, Tensor) {
    let s = config.vision_config.image_size;
    let input_ids = rng::integers(71, 3, 50, &[2, 8], Device::Cpu);
    let attention_mask = Tensor::from_slice2(&[[1i64; 8], [1, 1, 1, 1, 1, 1, 0, 0]]);
    let labels = input_ids.masked_fill(&attention_mask.eq(0), -100);
    let _ = labels.narrow(1, 0, 3).fill_(-100);
    let inputs = SamInputs {
        pixel_values: rng::normal(72, &[2, 2, 3, s, s], Device::Cpu),
        image_mask: Some(Tensor::from_slice2(&[[1i64, 1], [1, 0]])),
        qformer_input_ids: rng::integers(73, 1, 40, &[2, 4], Device::Cpu),
        qformer_attention_mask: None,
        input_ids,
        attention_mask: Some(attention_mask),
        // The Q-Former's dropout is on (0.1, the default): every rank and
        // every recomputation must draw the same masks.
        dropout: Some(DropoutKeys {
            seed: 7,
            samples: Tensor::from_slice(&[3i64, 8]),
        }),
    };
    (inputs, labels)
}

struct RankResult {
    logits: Tensor,
    loss: f64,
    grads: BTreeMap<String, Tensor>,
}

/// A deep copy, so that ranks on threads share no tensor storage.
fn copy_batch((inputs, labels): &(SamInputs, Tensor)) -> (SamInputs, Tensor) {
    let opt = |t: &Option<Tensor>| t.as_ref().map(Tensor::copy);
    let inputs = SamInputs {
        pixel_values: inputs.pixel_values.copy(),
        image_mask: opt(&inputs.image_mask),
        qformer_input_ids: inputs.qformer_input_ids.copy(),
        qformer_attention_mask: opt(&inputs.qformer_attention_mask),
        input_ids: inputs.input_ids.copy(),
        attention_mask: opt(&inputs.attention_mask),
        dropout: inputs.dropout.as_ref().map(|d| DropoutKeys {
            seed: d.seed,
            samples: d.samples.copy(),
        }),
    };
    (inputs, labels.copy())
}

/// How a rank trains.
#[derive(Clone, Copy)]
struct Setup {
    checkpointing: bool,
    /// Backward passes accumulated into the gradients (micro-batches).
    passes: usize,
    /// Every tensor trains; else SAM's policy (guidance and LoRA only), where
    /// the ViT and the first Q-Former pass carry no gradient.
    all_trainable: bool,
}

const PLAIN: Setup = Setup {
    checkpointing: false,
    passes: 1,
    all_trainable: true,
};

fn run_rank(
    dir: &Path,
    data: (SamInputs, Tensor),
    comm: Option<LocalCollective>,
    setup: Setup,
) -> RankResult {
    let tp = comm.clone().map(|c| TensorParallel::new(Arc::new(c)));
    let m = LoadedModel::load(dir, Device::Cpu, tp).unwrap();
    let mut options = m.model.config.samtrain.clone();
    options.trainable.all = setup.all_trainable;
    let params = trainable::apply(&m.vs, &options);
    let (inputs, labels) = data;
    let logits = tch::no_grad(|| m.model.forward(&inputs)).unwrap();
    let mut loss = 0.0;
    for _ in 0..setup.passes {
        let mut tape = GradTape::with_checkpointing(setup.checkpointing);
        let losses = m.model.loss(&inputs, &labels, Some(&mut tape)).unwrap();
        tape.backward(
            &losses.total,
            comm.as_ref().map(|c| c as &dyn samtrain_comm::Collective),
        )
        .unwrap();
        loss = losses.total.double_value(&[]);
    }
    let grads = params
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad();
            assert!(g.defined(), "{n} has no gradient");
            (n, g.copy())
        })
        .collect();
    RankResult {
        logits,
        loss,
        grads,
    }
}

/// The ranks of a degree-2 group, each on its own thread.
fn run_group(dir: &Path, data: &(SamInputs, Tensor), setup: Setup) -> Vec<RankResult> {
    LocalCollective::group(2)
        .into_iter()
        .map(|comm| {
            let dir = dir.to_path_buf();
            let data = copy_batch(data);
            std::thread::spawn(move || run_rank(&dir, data, Some(comm), setup))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect()
}

/// Checks the ranks' sharded gradients against one process's; returns how
/// many sharded tensors were compared.
fn assert_same_as_single(single: &RankResult, ranks: &[RankResult]) -> usize {
    for (rank, r) in ranks.iter().enumerate() {
        let d = (&r.logits - &single.logits).abs().max().double_value(&[]);
        assert!(d < 1e-5, "rank {rank} logits differ by {d}");
        assert!((r.loss - single.loss).abs() < 1e-5, "rank {rank} loss");
    }
    let mut sharded = 0;
    for (name, want) in &single.grads {
        let got = match shard_dim(name) {
            Some(dim) => {
                sharded += 1;
                Tensor::cat(&[&ranks[0].grads[name], &ranks[1].grads[name]], dim)
            }
            None => {
                let d = (&ranks[0].grads[name] - &ranks[1].grads[name]).abs().max();
                assert!(
                    d.double_value(&[]) < 1e-6,
                    "{name}: replicated gradients differ across ranks"
                );
                ranks[0].grads[name].shallow_clone()
            }
        };
        let d = (&got - want).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: gradient differs by {d}");
    }
    sharded
}

#[test]
fn degree_two_equals_degree_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_model(dir.path());
    let data = batch(&config);
    let single = run_rank(dir.path(), copy_batch(&data), None, PLAIN);
    let ranks = run_group(dir.path(), &data, PLAIN);
    let sharded = assert_same_as_single(&single, &ranks);
    // q, k, v, o, gate, up, down weights, their column-parallel biases, LoRA.
    assert!(
        sharded >= 2 * (7 + 5 + 7),
        "only {sharded} sharded tensors compared"
    );
}

#[test]
fn checkpointing_gives_the_gradients_of_keeping_activations() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_model(dir.path());
    let data = batch(&config);
    for all_trainable in [true, false] {
        let kept = Setup {
            all_trainable,
            ..PLAIN
        };
        let recomputed = Setup {
            checkpointing: true,
            ..kept
        };
        let want = run_rank(dir.path(), copy_batch(&data), None, kept);
        let got = run_rank(dir.path(), copy_batch(&data), None, recomputed);
        assert!((want.loss - got.loss).abs() < 1e-9);
        assert_eq!(want.grads.len(), got.grads.len());
        for (name, g) in &want.grads {
            let d = (g - &got.grads[name]).abs().max().double_value(&[]);
            assert!(
                d < 1e-6,
                "{name} (all trainable: {all_trainable}): gradient differs by {d}"
            );
        }
    }
}

#[test]
fn checkpointing_at_degree_two_accumulates_the_gradients_of_degree_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_model(dir.path());
    let data = batch(&config);
    let twice = Setup { passes: 2, ..PLAIN };
    let single = run_rank(dir.path(), copy_batch(&data), None, twice);
    let ranks = run_group(
        dir.path(),
        &data,
        Setup {
            checkpointing: true,
            ..twice
        },
    );
    // Two passes' gradients are twice one pass's: the replicated LoRA `A`s,
    // reduced over the ranks, must count each pass once.
    assert_same_as_single(&single, &ranks);
}
