//! Reduced precision and the memory plan: frozen weights held in bf16 with
//! fp32 trainable masters, logits in bf16 against transformers, the plan's
//! tensor count against the built model, and the real InstructBLIP-Vicuna-7B
//! widths (at reduced depth) loaded from a folder, trained a step (with and
//! without activation checkpointing) and generating.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use samtrain_comm::LocalCollective;
use samtrain_model::generation::{generate, GenerationConfig, PenaltyScope};
use samtrain_model::parallel::TensorParallel;
use samtrain_model::plan::{plan, tensor_shapes, PlanInput};
use samtrain_model::rng;
use samtrain_model::tape::GradTape;
use samtrain_model::{trainable, weights, LoadedModel, SamConfig, SamInputs};
use tch::{Device, Kind, Tensor};

/// A small config touching every optional tensor: LoRA on every decoder
/// Linear, biases, grouped-query attention.
const SMALL: &str = r#"{
  "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
  "qformer_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "vocab_size": 40,
                     "max_position_embeddings": 32},
  "text_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 57,
                  "attention_bias": true, "mlp_bias": true},
  "num_query_tokens": 3,
  "samtrain": {"trainable": {"projection": true},
               "lora": {"rank": 2, "alpha": 4.0,
                        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}}
}"#;

/// The shipped InstructBLIP-Vicuna-7B config at its real widths, with one
/// ViT layer, two Q-Former layers and one decoder layer.
fn vicuna7b_reduced() -> SamConfig {
    let path = samtrain_testkit::workspace_root().join("examples/sam-vicuna7b/config.json");
    let mut config = SamConfig::from_file(&path).unwrap();
    config.vision_config.num_hidden_layers = 1;
    config.qformer_config.num_hidden_layers = 2;
    config.text_config.num_hidden_layers = 1;
    config
}

fn shapes_of(m: &LoadedModel) -> BTreeMap<String, Vec<i64>> {
    m.vs.variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect()
}

fn plan_input(tp: i64, dtype_bytes: u64) -> PlanInput {
    PlanInput {
        tp,
        batch: 2,
        images: 3,
        text_len: 16,
        dtype_bytes,
        activation_checkpointing: false,
    }
}

/// Frozen and trainable bytes of a built model, as the plan counts them.
fn measured(m: &LoadedModel) -> (u64, u64) {
    let (mut frozen, mut trainable) = (0, 0);
    for (_, t) in m.vs.variables() {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if t.requires_grad() {
            // fp32 weight, gradient and AdamW's two moments.
            trainable += 4 * bytes;
        } else {
            frozen += bytes;
        }
    }
    (frozen, trainable)
}

#[test]
fn plan_counts_every_tensor_of_the_built_model() {
    let config: SamConfig = serde_json::from_str(SMALL).unwrap();
    let listed: BTreeMap<String, Vec<i64>> = tensor_shapes(&config).into_iter().collect();
    let m = LoadedModel::init_as(&config, Device::Cpu, None, Kind::BFloat16).unwrap();
    assert_eq!(listed, shapes_of(&m));
    let p = plan(&config, &plan_input(1, 2));
    assert_eq!((p.frozen_bytes, p.trainable_bytes), measured(&m));

    // Each tensor-parallel rank's share, against a rank built at degree 2.
    let comm = LocalCollective::group(2).remove(1);
    let tp = TensorParallel::new(Arc::new(comm));
    let rank = LoadedModel::init_as(&config, Device::Cpu, Some(tp), Kind::BFloat16).unwrap();
    let p = plan(&config, &plan_input(2, 2));
    assert_eq!((p.frozen_bytes, p.trainable_bytes), measured(&rank));
    assert!(p.activation_bytes > 0);
}

#[test]
fn the_plan_counts_less_activation_memory_with_checkpointing() {
    let path = samtrain_testkit::workspace_root().join("examples/sam-vicuna7b/config.json");
    let mut config = SamConfig::from_file(&path).unwrap();
    for all in [false, true] {
        config.samtrain.trainable.all = all;
        let kept = plan(&config, &plan_input(2, 2));
        let recomputed = plan(
            &config,
            &PlanInput {
                activation_checkpointing: true,
                ..plan_input(2, 2)
            },
        );
        assert_eq!(kept.frozen_bytes, recomputed.frozen_bytes);
        // 32 decoder layers keep one hidden state each instead of ~20.
        assert!(
            recomputed.activation_bytes * 4 < kept.activation_bytes,
            "all trainable {all}: {} against {}",
            recomputed.activation_bytes,
            kept.activation_bytes
        );
    }
}

#[test]
fn bf16_keeps_frozen_weights_in_bf16_and_trainable_ones_in_fp32() {
    let config: SamConfig = serde_json::from_str(SMALL).unwrap();
    let m = LoadedModel::init_as(&config, Device::Cpu, None, Kind::BFloat16).unwrap();
    for (name, t) in m.vs.variables() {
        let expected = if trainable::is_trainable(&name, &config.samtrain) {
            Kind::Float
        } else {
            Kind::BFloat16
        };
        assert_eq!(t.kind(), expected, "{name}");
        assert_eq!(t.requires_grad(), expected == Kind::Float, "{name}");
    }
    assert_eq!(m.model.compute_kind(), Kind::BFloat16);
    assert!(LoadedModel::init_as(&config, Device::Cpu, None, Kind::Int64).is_err());
}

/// The largest |difference| between two logit tensors over the real positions.
fn logits_case(dtype: Kind) -> (f64, f64) {
    let f = common::Fixture::new(common::Spec {
        variant: "gqa",
        guidance: "zero",
        images: "3,2",
        seed: 41,
        ..Default::default()
    });
    let fp32 = f.reference("forward", &[]);
    let hf_low = f.reference("forward", &["--dtype", "bf16"]);
    let loaded = LoadedModel::load_as(&f.model, Device::Cpu, None, dtype).unwrap();
    let logits = tch::no_grad(|| loaded.model.forward(&common::inputs_from(&f.batch())))
        .unwrap()
        .to_kind(Kind::Float);
    let ours = common::max_diff_where(&logits, &fp32["logits"], &fp32["valid"]);
    let theirs = common::max_diff_where(&hf_low["logits"], &fp32["logits"], &fp32["valid"]);
    (ours, theirs)
}

/// bf16 logits are as close to the fp32 reference as transformers' own bf16
/// logits are. Measured on this fixture (logits of magnitude about 1): both
/// differ from fp32 by a few 1e-2; the bound is twice transformers' error.
#[test]
fn bf16_logits_are_as_close_to_fp32_as_transformers_bf16() {
    let (ours, theirs) = logits_case(Kind::BFloat16);
    eprintln!("bf16 vs fp32 reference: samtrain {ours:.3e}, transformers {theirs:.3e}");
    assert!(
        theirs > 0.0,
        "transformers' bf16 run should differ from fp32"
    );
    assert!(
        ours <= 2.0 * theirs,
        "samtrain bf16 {ours} vs transformers bf16 {theirs}"
    );
}

/// `[training] bf16` (autocast over fp32 weights, on by default on CUDA)
/// through every part of SAM: guidance's adaptive adjustment, the images'
/// scatter into their query slots, a step's backward on the tape; the loss
/// and gradients close to fp32's.
#[test]
fn bf16_autocast_trains_sam_with_guidance_close_to_fp32() {
    bf16_autocast_case(Device::Cpu);
}

/// The same on a GPU, whose autocast keeps more ops (LayerNorm among them)
/// in fp32 than the CPU's does, so that tensors of two dtypes meet.
#[test]
fn bf16_autocast_trains_sam_with_guidance_close_to_fp32_on_cuda() {
    if !samtrain_torchext::cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    bf16_autocast_case(Device::Cuda(0));
}

fn bf16_autocast_case(device: Device) {
    let mut config: SamConfig = serde_json::from_str(SMALL).unwrap();
    config.samtrain.guidance = true;
    config.samtrain.lora = None;
    config.samtrain.trainable.all = true;
    let m = LoadedModel::init_as(&config, device, None, Kind::Float).unwrap();
    let params = trainable::apply(&m.vs, &m.model.config.samtrain);
    // Two samples, one with a padded image slot.
    let (inputs, labels) = random_batch(&config, 2, 3, 8);
    let inputs = SamInputs {
        pixel_values: inputs.pixel_values.to_device(device),
        image_mask: Some(Tensor::from_slice2(&[[1i64, 1, 1], [1, 1, 0]]).to_device(device)),
        qformer_input_ids: inputs.qformer_input_ids.to_device(device),
        qformer_attention_mask: None,
        input_ids: inputs.input_ids.to_device(device),
        attention_mask: None,
        dropout: None,
    };
    let labels = labels.to_device(device);
    let step = |autocast: bool| {
        for (_, t) in &params {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mut tape = GradTape::default();
        let loss = if autocast {
            samtrain_torchext::autocast(device, Kind::BFloat16, || {
                m.model.loss(&inputs, &labels, Some(&mut tape))
            })
            .unwrap()
        } else {
            m.model.loss(&inputs, &labels, Some(&mut tape))
        }
        .unwrap();
        tape.backward(&loss.total, None).unwrap();
        let grads: Vec<Tensor> = params.iter().map(|(_, t)| t.grad().copy()).collect();
        (loss.total.double_value(&[]), grads)
    };
    let (fp32, fp32_grads) = step(false);
    let (bf16, bf16_grads) = step(true);
    assert!(
        (bf16 - fp32).abs() <= 2e-2 * fp32.abs(),
        "loss under bf16 autocast {bf16} vs fp32 {fp32}"
    );
    // Gradients that are zero in exact arithmetic (a key's bias moves no
    // softmax) are rounding noise in both: compared are those within a
    // thousandth of the largest norm.
    let norm = |t: &Tensor| t.norm().double_value(&[]);
    let largest = fp32_grads.iter().map(norm).fold(0.0, f64::max);
    let mut compared = 0;
    for (((name, _), a), b) in params.iter().zip(&bf16_grads).zip(&fp32_grads) {
        assert_eq!(a.kind(), Kind::Float, "{name}");
        assert!(a.isfinite().all().int64_value(&[]) == 1, "{name}");
        if norm(b) < 1e-3 * largest {
            continue;
        }
        let cos = (a * b).sum(Kind::Float).double_value(&[]) / (norm(a) * norm(b));
        assert!(
            cos > 0.95,
            "{name}: bf16 gradient's cosine with fp32's is {cos}"
        );
        compared += 1;
    }
    assert!(
        compared * 2 > params.len(),
        "{compared} of {} compared",
        params.len()
    );
}

/// A batch for `config`: `b` samples of `n` images and `t` text tokens.
fn random_batch(config: &SamConfig, b: i64, n: i64, t: i64) -> (SamInputs, Tensor) {
    let s = config.vision_config.image_size;
    let vocab = config.text_config.vocab_size;
    let input_ids = rng::integers(31, 3, vocab, &[b, t], Device::Cpu);
    let labels = input_ids.copy();
    let _ = labels.narrow(1, 0, t / 2).fill_(-100);
    let inputs = SamInputs {
        pixel_values: rng::normal(32, &[b, n, 3, s, s], Device::Cpu),
        image_mask: None,
        qformer_input_ids: rng::integers(
            33,
            1,
            config.qformer_config.vocab_size,
            &[b, 6],
            Device::Cpu,
        ),
        qformer_attention_mask: None,
        input_ids,
        attention_mask: None,
        dropout: None,
    };
    (inputs, labels)
}

#[test]
fn real_widths_load_in_bf16_train_a_step_and_generate() {
    let config = vicuna7b_reduced();
    let dir = tempfile::tempdir().unwrap();
    {
        // Written in bf16, as released 7B checkpoints are stored in 16 bits:
        // the file is about 1 GB where fp32 would need 2 GB of scratch disk.
        let fresh = LoadedModel::init_as(&config, Device::Cpu, None, Kind::BFloat16).unwrap();
        weights::save(&fresh.vs, &config, dir.path()).unwrap();
    }
    let m = LoadedModel::load_as(dir.path(), Device::Cpu, None, Kind::BFloat16).unwrap();
    let params = trainable::apply(&m.vs, &m.model.config.samtrain);
    // SAM's guidance only: 1408 + 1 + 2 * (768 * 768 + 768) parameters.
    assert_eq!(trainable::count(&params), 1_182_593);
    let p = plan(&config, &plan_input(1, 2));
    assert_eq!((p.frozen_bytes, p.trainable_bytes), measured(&m));

    let (inputs, labels) = random_batch(&config, 1, 2, 8);
    let losses = m.model.loss(&inputs, &labels, None).unwrap();
    let loss = losses.total.double_value(&[]);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    losses.total.backward();
    for (name, t) in &params {
        let g = t.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert_eq!(g.kind(), Kind::Float, "{name}");
        assert!(g.isfinite().all().int64_value(&[]) == 1, "{name}");
    }
    // The last exchange adds its bias straight into the Q-Former stream.
    let grad_norm = |name: &str| {
        let (_, t) = params.iter().find(|(n, _)| n == name).unwrap();
        t.grad().norm().double_value(&[])
    };
    assert!(grad_norm("sam.multiple_2_one.bias") > 0.0);

    // Activation checkpointing recomputes the same layers in backward.
    let kept: Vec<Tensor> = params.iter().map(|(_, t)| t.grad().copy()).collect();
    for (_, t) in &params {
        let _ = t.grad().zero_();
    }
    let mut tape = GradTape::with_checkpointing(true);
    let again = m.model.loss(&inputs, &labels, Some(&mut tape)).unwrap();
    assert_eq!(again.total.double_value(&[]), loss);
    tape.backward(&again.total, None).unwrap();
    for ((name, t), want) in params.iter().zip(&kept) {
        let d = (t.grad() - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        assert!(
            d <= 1e-3 * scale,
            "{name}: checkpointed gradient differs by {d} (of {scale})"
        );
    }

    let answers = tch::no_grad(|| {
        generate(
            &m.model,
            &inputs,
            &GenerationConfig {
                max_new_tokens: 3,
                num_beams: 1,
                repetition_penalty: 1.0,
                length_penalty: 1.0,
                eos_token_ids: Vec::new(),
                penalty_scope: PenaltyScope::Prompt,
            },
        )
    })
    .unwrap();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].len(), 3);
    assert!(answers[0]
        .iter()
        .all(|&id| (0..config.text_config.vocab_size).contains(&id)));
}
