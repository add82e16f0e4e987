//! How much accelerator memory a SAM job needs per rank, from its
//! `config.json` alone, before anything is allocated: frozen weights in their
//! dtype, trainable weights with fp32 gradients and AdamW state, and an
//! activation estimate for one training step.
//!
//! The weights are counted exactly: [`tensor_shapes`] lists every tensor the
//! model creates (checked against the built model by the tests), and each
//! rank's share follows the one sharding rule ([`shard_dim`]). Activations are
//! an estimate: per transformer layer whose activations backward needs,
//! Korthikanti et al.'s `s b h (34 + 5 a s / h)` bytes at 2-byte precision
//! (tensor-parallel layers split all but the norms' share), scaled to the
//! dtype. The vision encoder runs without a graph when nothing in it trains,
//! so it counts one layer's working memory instead. With activation
//! checkpointing a layer keeps only its input, `s b h` elements, and one
//! layer at a time holds its whole working memory while it is recomputed.

use samtrain_comm::shard_dim;

use crate::config::SamConfig;
use crate::trainable::is_trainable;

/// What the plan is for.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// Tensor-parallel degree.
    pub tp: i64,
    /// Samples per rank and step (the micro-batch).
    pub batch: i64,
    /// Images per sample.
    pub images: i64,
    /// Text tokens per sample (instruction plus answer).
    pub text_len: i64,
    /// Bytes per element of the frozen weights and activations (2 for
    /// bf16/fp16, 4 for fp32).
    pub dtype_bytes: u64,
    /// `[training] activation_checkpointing`.
    pub activation_checkpointing: bool,
}

/// One rank's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub frozen_params: u64,
    pub trainable_params: u64,
    /// Frozen weights in the job's dtype.
    pub frozen_bytes: u64,
    /// Trainable fp32 weights, fp32 gradients and AdamW's two fp32 moments.
    pub trainable_bytes: u64,
    /// One training step's activations (an estimate).
    pub activation_bytes: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.frozen_bytes + self.trainable_bytes + self.activation_bytes
    }
}

/// fp32 weight, fp32 gradient, AdamW's first and second moments.
const TRAINABLE_BYTES_PER_PARAM: u64 = 16;

/// The plan of one tensor-parallel rank (every rank holds the same sizes).
pub fn plan(config: &SamConfig, input: &PlanInput) -> MemoryPlan {
    let tp = input.tp.max(1);
    let (mut frozen, mut trainable) = (0u64, 0u64);
    for (name, mut shape) in tensor_shapes(config) {
        if let Some(dim) = shard_dim(&name) {
            shape[dim as usize] /= tp;
        }
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        if is_trainable(&name, &config.samtrain) {
            trainable += n;
        } else {
            frozen += n;
        }
    }
    MemoryPlan {
        frozen_params: frozen,
        trainable_params: trainable,
        frozen_bytes: frozen * input.dtype_bytes,
        trainable_bytes: trainable * TRAINABLE_BYTES_PER_PARAM,
        activation_bytes: activations(config, input),
    }
}

/// Korthikanti et al.'s activation bytes of one transformer layer at 2-byte
/// precision: sequence `s`, batch `b`, width `h`, heads `a`, split over `t`.
fn layer_activations(s: i64, b: i64, h: i64, a: i64, t: i64) -> f64 {
    let (s, b, h, a, t) = (s as f64, b as f64, h as f64, a as f64, t as f64);
    s * b * h * (10.0 + 24.0 / t + 5.0 * a * s / (h * t))
}

/// The activation bytes (at 2-byte precision) of a stack of `layers`
/// identical layers over sequence `s`, batch `b`, width `h`, heads `a`.
fn stack_activations(layers: i64, s: i64, b: i64, h: i64, a: i64, t: i64, recompute: bool) -> f64 {
    let one = layer_activations(s, b, h, a, t);
    if recompute && layers > 0 {
        // Each layer's input, plus one layer's working memory in backward.
        (layers * s * b * h * 2) as f64 + one
    } else {
        layers as f64 * one
    }
}

fn activations(config: &SamConfig, input: &PlanInput) -> u64 {
    let (v, q, t) = (
        &config.vision_config,
        &config.qformer_config,
        &config.text_config,
    );
    let tp = input.tp.max(1);
    let images = input.batch * input.images;
    let scale = input.dtype_bytes as f64 / 2.0;
    let recompute = input.activation_checkpointing;
    // The decoder: every layer, over visual tokens plus text.
    let llm_seq = input.images * config.num_query_tokens + input.text_len;
    let llm = stack_activations(
        t.num_hidden_layers,
        llm_seq,
        input.batch,
        t.hidden_size,
        t.num_attention_heads,
        tp,
        recompute,
    );
    // The Q-Former per image; with guidance its layers run a second time
    // (the W-former), so twice the layers keep activations.
    let passes = if config.samtrain.guidance { 2 } else { 1 };
    let qformer = stack_activations(
        passes * q.num_hidden_layers,
        config.num_query_tokens + input.text_len,
        images,
        q.hidden_size,
        q.num_attention_heads,
        1,
        recompute,
    );
    // The vision encoder: its output (kept for cross-attention) and one
    // layer's working memory, unless it trains and keeps every layer.
    let patches = v.num_positions();
    let vision_layers = if config.samtrain.trainable.all {
        v.num_hidden_layers
    } else {
        1
    };
    let vision = stack_activations(
        vision_layers,
        patches,
        images,
        v.hidden_size,
        v.num_attention_heads,
        1,
        recompute && config.samtrain.trainable.all,
    ) + (patches * images * v.hidden_size * 2) as f64;
    // fp32 logits of the answer tokens (at most every text token), with their
    // softmax for the loss's backward.
    let logits = (input.batch * input.text_len * t.vocab_size * 4 * 2) as f64;
    ((llm + qformer + vision) * scale + logits) as u64
}

/// Every tensor the model creates, with its full (unsharded) shape, in the
/// checkpoint's names.
pub fn tensor_shapes(config: &SamConfig) -> Vec<(String, Vec<i64>)> {
    let mut out = Vec::new();
    let mut add = |name: String, shape: &[i64]| out.push((name, shape.to_vec()));
    let linear = |add: &mut dyn FnMut(String, &[i64]), p: &str, i: i64, o: i64, bias: bool| {
        add(format!("{p}.weight"), &[o, i]);
        if bias {
            add(format!("{p}.bias"), &[o]);
        }
    };
    let norm = |add: &mut dyn FnMut(String, &[i64]), p: &str, d: i64| {
        add(format!("{p}.weight"), &[d]);
        add(format!("{p}.bias"), &[d]);
    };

    let v = &config.vision_config;
    let d = v.hidden_size;
    add("vision_model.embeddings.class_embedding".into(), &[1, 1, d]);
    add(
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[d, 3, v.patch_size, v.patch_size],
    );
    add("vision_model.embeddings.patch_embedding.bias".into(), &[d]);
    add(
        "vision_model.embeddings.position_embedding".into(),
        &[1, v.num_positions(), d],
    );
    for i in 0..v.num_hidden_layers {
        let l = format!("vision_model.encoder.layers.{i}");
        linear(
            &mut add,
            &format!("{l}.self_attn.qkv"),
            d,
            3 * d,
            v.qkv_bias,
        );
        linear(&mut add, &format!("{l}.self_attn.projection"), d, d, true);
        norm(&mut add, &format!("{l}.layer_norm1"), d);
        linear(
            &mut add,
            &format!("{l}.mlp.fc1"),
            d,
            v.intermediate_size,
            true,
        );
        linear(
            &mut add,
            &format!("{l}.mlp.fc2"),
            v.intermediate_size,
            d,
            true,
        );
        norm(&mut add, &format!("{l}.layer_norm2"), d);
    }
    norm(&mut add, "vision_model.post_layernorm", d);

    let q = &config.qformer_config;
    let d = q.hidden_size;
    add(
        "query_tokens".into(),
        &[1, config.num_query_tokens, q.hidden_size],
    );
    let e = "qformer.embeddings";
    add(format!("{e}.word_embeddings.weight"), &[q.vocab_size, d]);
    add(
        format!("{e}.position_embeddings.weight"),
        &[q.max_position_embeddings, d],
    );
    norm(&mut add, &format!("{e}.layernorm"), d);
    for i in 0..q.num_hidden_layers {
        let l = format!("qformer.encoder.layer.{i}");
        let block = |add: &mut dyn FnMut(String, &[i64]), p: String, kv: i64| {
            linear(add, &format!("{p}.attention.query"), d, d, true);
            linear(add, &format!("{p}.attention.key"), kv, d, true);
            linear(add, &format!("{p}.attention.value"), kv, d, true);
            linear(add, &format!("{p}.output.dense"), d, d, true);
            norm(add, &format!("{p}.output.LayerNorm"), d);
        };
        block(&mut add, format!("{l}.attention"), d);
        if i % q.cross_attention_frequency == 0 {
            block(
                &mut add,
                format!("{l}.crossattention"),
                q.encoder_hidden_size,
            );
        }
        for (inter, output) in [
            ("intermediate", "output"),
            ("intermediate_query", "output_query"),
        ] {
            let i_size = q.intermediate_size;
            linear(&mut add, &format!("{l}.{inter}.dense"), d, i_size, true);
            linear(&mut add, &format!("{l}.{output}.dense"), i_size, d, true);
            norm(&mut add, &format!("{l}.{output}.LayerNorm"), d);
        }
    }

    let t = &config.text_config;
    let d = t.hidden_size;
    linear(
        &mut add,
        "language_projection",
        q.hidden_size,
        t.hidden_size,
        true,
    );
    add(
        "language_model.model.embed_tokens.weight".into(),
        &[t.vocab_size, d],
    );
    let (qd, kvd) = (
        t.num_attention_heads * t.head_dim(),
        t.kv_heads() * t.head_dim(),
    );
    let lora = config.samtrain.lora.as_ref();
    for i in 0..t.num_hidden_layers {
        let l = format!("language_model.model.layers.{i}");
        add(format!("{l}.input_layernorm.weight"), &[d]);
        add(format!("{l}.post_attention_layernorm.weight"), &[d]);
        let modules = [
            ("self_attn.q_proj", d, qd, t.attention_bias),
            ("self_attn.k_proj", d, kvd, t.attention_bias),
            ("self_attn.v_proj", d, kvd, t.attention_bias),
            ("self_attn.o_proj", qd, d, t.attention_bias),
            ("mlp.gate_proj", d, t.intermediate_size, t.mlp_bias),
            ("mlp.up_proj", d, t.intermediate_size, t.mlp_bias),
            ("mlp.down_proj", t.intermediate_size, d, t.mlp_bias),
        ];
        for (module, i_dim, o_dim, bias) in modules {
            let p = format!("{l}.{module}");
            linear(&mut add, &p, i_dim, o_dim, bias);
            let leaf = module.rsplit('.').next().unwrap_or(module);
            if let Some(lora) = lora.filter(|c| c.target_modules.iter().any(|m| m == leaf)) {
                add(format!("{p}.lora_A.weight"), &[lora.rank, i_dim]);
                add(format!("{p}.lora_B.weight"), &[o_dim, lora.rank]);
            }
        }
    }
    add("language_model.model.norm.weight".into(), &[d]);
    add("language_model.lm_head.weight".into(), &[t.vocab_size, d]);

    let (vd, qd) = (config.vision_config.hidden_size, q.hidden_size);
    linear(&mut add, "sam.adaptive_adjustment", vd, 1, true);
    linear(&mut add, "sam.one_2_multiple", qd, qd, true);
    linear(&mut add, "sam.multiple_2_one", qd, qd, true);
    out
}

/// `bytes` in GiB with two decimals, for people.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
