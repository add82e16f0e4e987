//! The language model: a LLaMA-family decoder (Vicuna in InstructBLIP) with
//! RMSNorm, rotary position embeddings, SwiGLU and grouped-query attention,
//! a key/value cache for generation, and Megatron-style tensor parallelism
//! of its attention and MLP.
//!
//! Tensor names follow transformers' `LlamaForCausalLM` under the
//! `language_model.` prefix: `model.embed_tokens`, `model.layers.N.*`,
//! `model.norm`, `lm_head`. Under tensor parallelism each rank holds its
//! slice of the heads and of the MLP's inner width (see `samtrain_comm::shard_dim`).

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::nn::{attention, cast, merge_heads, min_value, split_heads, Embedding, Linear, RmsNorm};
use crate::parallel::TensorParallel;
use crate::tape::GradTape;

/// Keys and values of past positions, one pair per layer, for generation.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows `index` of the batch (beam search reorders its beams).
    pub fn select(&mut self, index: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let merged = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((merged.0.shallow_clone(), merged.1.shallow_clone()));
        merged
    }
}

/// Rotary position embedding (rotate-half convention, as transformers).
#[derive(Debug)]
struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    fn new(c: &TextConfig, device: tch::Device) -> Self {
        let dim = c.head_dim();
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / dim as f64;
        let inv_freq = Tensor::from(c.rope_theta())
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        Self { inv_freq }
    }

    /// cos and sin `[batch, 1, seq, head_dim]` for positions `[batch, seq]`.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Heads held by this rank.
    heads: i64,
    kv_heads: i64,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// What the decoder needs besides the input embeddings.
pub struct DecoderInput<'a> {
    /// Rotary positions `[batch, seq]` of the new positions.
    pub positions: &'a Tensor,
    /// 0/1 over every key, cached ones first: `[batch, past + seq]`.
    pub key_mask: &'a Tensor,
}

/// The decoder and its language-model head.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    tp: Option<TensorParallel>,
}

/// Which Linears of the decoder carry LoRA adapters, and their size.
#[derive(Debug, Clone)]
pub struct LoraTargets<'a> {
    pub modules: &'a [String],
    pub rank: i64,
    pub alpha: f64,
}

impl Llama {
    /// Builds the decoder; under tensor parallelism `tp` says which slice of
    /// the heads and MLP width this rank holds.
    pub fn new(
        p: &Path,
        c: &TextConfig,
        tp: Option<TensorParallel>,
        lora: Option<&LoraTargets>,
    ) -> Result<Self> {
        let world = tp.as_ref().map_or(1, |t| t.world_size());
        let (heads, kv_heads) = (c.num_attention_heads, c.kv_heads());
        if heads % world != 0 || kv_heads % world != 0 || c.intermediate_size % world != 0 {
            return Err(ModelError::Input {
                name: "tensor_parallel".into(),
                message: format!(
                    "degree {world} must divide num_attention_heads {heads}, num_key_value_heads \
                     {kv_heads} and intermediate_size {}",
                    c.intermediate_size
                ),
            });
        }
        let (d, hd) = (c.hidden_size, c.head_dim());
        let inner = c.intermediate_size / world;
        let (lh, lkv) = (heads / world, kv_heads / world);
        let m = p / "model";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let f = &l / "mlp";
                let mut layer = DecoderLayer {
                    input_layernorm: RmsNorm::new(&(&l / "input_layernorm"), d, c.rms_norm_eps),
                    self_attn: SelfAttention {
                        q_proj: Linear::new(&(&a / "q_proj"), d, lh * hd, c.attention_bias),
                        k_proj: Linear::new(&(&a / "k_proj"), d, lkv * hd, c.attention_bias),
                        v_proj: Linear::new(&(&a / "v_proj"), d, lkv * hd, c.attention_bias),
                        o_proj: Linear::new(&(&a / "o_proj"), lh * hd, d, c.attention_bias),
                        heads: lh,
                        kv_heads: lkv,
                    },
                    post_attention_layernorm: RmsNorm::new(
                        &(&l / "post_attention_layernorm"),
                        d,
                        c.rms_norm_eps,
                    ),
                    mlp: Mlp {
                        gate_proj: Linear::new(&(&f / "gate_proj"), d, inner, c.mlp_bias),
                        up_proj: Linear::new(&(&f / "up_proj"), d, inner, c.mlp_bias),
                        down_proj: Linear::new(&(&f / "down_proj"), inner, d, c.mlp_bias),
                    },
                };
                if let Some(lora) = lora {
                    layer.attach_lora(&a, &f, lora);
                }
                layer
            })
            .collect();
        Ok(Self {
            embed_tokens: Embedding::new(&(&m / "embed_tokens"), c.vocab_size, d),
            layers,
            norm: RmsNorm::new(&(&m / "norm"), d, c.rms_norm_eps),
            lm_head: Linear::new(&(p / "lm_head"), d, c.vocab_size, false),
            rotary: Rotary::new(c, p.device()),
            tp,
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(ids)
    }

    pub fn tensor_parallel(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// Replaces the communicator of tensor parallelism (see
    /// [`crate::SamModel::rebind_tensor_parallel`]).
    pub(crate) fn set_tensor_parallel(&mut self, tp: Option<TensorParallel>) {
        self.tp = tp;
    }

    /// The embedding matrix (SEA's targets are means of its rows).
    pub fn embedding_weight(&self) -> &Tensor {
        &self.embed_tokens.weight
    }

    /// Runs the decoder over `x` `[batch, seq, hidden]` and returns the final
    /// normalised hidden states. With a cache, its keys come first and the new
    /// ones are appended. With a tape (training), each layer is offered to it
    /// for activation checkpointing, and under tensor parallelism the graph
    /// is cut where Megatron's `f` operator sits.
    pub fn forward<'a>(
        &'a self,
        x: &Tensor,
        input: &DecoderInput,
        cache: Option<&mut KvCache>,
        tape: Option<&mut GradTape<'a>>,
    ) -> Tensor {
        self.run(x, input, cache, tape, None)
    }

    /// The final normalised hidden states `[rows, hidden]` of the positions
    /// `rows` only (indices into the flattened `[batch * seq]` positions),
    /// as a training loss needs them. Every layer but the last runs over
    /// every position, whose keys and values the next layer's attention
    /// reads; the last runs its attention over every position too, then its
    /// output projection and MLP at `rows` alone: nothing after it reads
    /// the other positions. The states equal [`Self::forward`]'s at `rows`.
    pub fn forward_rows<'a>(
        &'a self,
        x: &Tensor,
        input: &DecoderInput,
        rows: &Tensor,
        tape: Option<&mut GradTape<'a>>,
    ) -> Tensor {
        self.run(x, input, None, tape, Some(rows))
    }

    fn run<'a>(
        &'a self,
        x: &Tensor,
        input: &DecoderInput,
        mut cache: Option<&mut KvCache>,
        mut tape: Option<&mut GradTape<'a>>,
        rows: Option<&Tensor>,
    ) -> Tensor {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mask = causal_mask(input.key_mask, x.size()[1], past, x.kind());
        let (cos, sin) = self.rotary.cos_sin(input.positions, x.kind());
        let last = self.layers.len().saturating_sub(1);
        let mut h = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let rows = rows.filter(|_| i == last);
            h = match (cache.as_deref_mut(), tape.as_deref_mut()) {
                (None, Some(t)) => {
                    let (cos, sin, mask) = (
                        cos.shallow_clone(),
                        sin.shallow_clone(),
                        mask.shallow_clone(),
                    );
                    let rows = rows.map(Tensor::shallow_clone);
                    t.checkpoint(h, move |x, t| {
                        let ctx = LayerContext {
                            cos: &cos,
                            sin: &sin,
                            mask: &mask,
                            rows: rows.as_ref(),
                        };
                        self.layer(layer, x, &ctx, None, t)
                    })
                }
                (cache, t) => {
                    let ctx = LayerContext {
                        cos: &cos,
                        sin: &sin,
                        mask: &mask,
                        rows,
                    };
                    self.layer(layer, &h, &ctx, cache.map(|c| (c, i)), t)
                }
            };
        }
        if let (Some(rows), true) = (rows, self.layers.is_empty()) {
            h = flat_rows(&h, rows);
        }
        self.norm.forward(&h)
    }

    /// One decoder layer (the `i`th when it appends to a cache). With
    /// `ctx.rows`, its output is those rows of the flattened positions.
    fn layer(
        &self,
        layer: &DecoderLayer,
        h: &Tensor,
        ctx: &LayerContext,
        cache: Option<(&mut KvCache, usize)>,
        mut tape: Option<&mut GradTape<'_>>,
    ) -> Tensor {
        let a = &layer.self_attn;
        let residual = self.cut(&mut tape, h.shallow_clone());
        let normed = layer.input_layernorm.forward(&residual);
        let x = self.enter(&mut tape, normed, [&a.q_proj, &a.k_proj, &a.v_proj]);
        let out = a.forward(&x, ctx.cos, ctx.sin, ctx.mask, cache);
        let (residual, out) = match ctx.rows {
            Some(rows) => (flat_rows(&residual, rows), flat_rows(&out, rows)),
            None => (residual, out),
        };
        let h = residual + self.exit(&a.o_proj, out);
        let f = &layer.mlp;
        let residual = self.cut(&mut tape, h);
        let normed = layer.post_attention_layernorm.forward(&residual);
        let x = self.enter(&mut tape, normed, [&f.gate_proj, &f.up_proj]);
        let inner = f.forward(&x);
        residual + self.exit(&f.down_proj, inner)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }

    /// Cuts the residual stream on the tape (tensor-parallel training only).
    fn cut(&self, tape: &mut Option<&mut GradTape<'_>>, h: Tensor) -> Tensor {
        match (&self.tp, tape.as_deref_mut()) {
            (Some(_), Some(t)) => t.cut(h),
            _ => h,
        }
    }

    /// Megatron's `f` before column-parallel layers: identity forward; its
    /// backward all-reduce is done by the tape, which cuts the graph here.
    /// A LoRA `A` of these layers is replicated but meets only this rank's
    /// slice of `B`, so its gradient is a partial sum: the tape reduces it.
    fn enter<const N: usize>(
        &self,
        tape: &mut Option<&mut GradTape<'_>>,
        x: Tensor,
        layers: [&Linear; N],
    ) -> Tensor {
        match (&self.tp, tape.as_deref_mut()) {
            (Some(_), Some(t)) => {
                for lora in layers.iter().filter_map(|l| l.lora.as_ref()) {
                    t.reduce_grad_of(&lora.a);
                }
                t.branch(x)
            }
            _ => x,
        }
    }

    /// A row-parallel layer applied to this rank's slice `x` of its input,
    /// then Megatron's `g` (all-reduce forward, identity backward). The bias
    /// and the LoRA up-projection are applied once, after the sum; LoRA's
    /// rank-r down-projection is itself a partial sum and is reduced too.
    fn exit(&self, layer: &Linear, x: Tensor) -> Tensor {
        let reduce = |partial: Tensor| match &self.tp {
            Some(tp) => tp.reduce_forward(&partial),
            None => partial,
        };
        let y = reduce(x.linear::<Tensor>(&cast(&layer.weight, x.kind()), None));
        let y = match &layer.bias {
            Some(b) => y + cast(b, x.kind()),
            None => y,
        };
        match &layer.lora {
            Some(lora) => y + lora.up(&reduce(lora.down(&x))),
            None => y,
        }
    }
}

impl DecoderLayer {
    fn attach_lora(&mut self, attn: &Path, mlp: &Path, lora: &LoraTargets) {
        let a = &mut self.self_attn;
        let m = &mut self.mlp;
        let targets: [(&str, &Path, &mut Linear); 7] = [
            ("q_proj", attn, &mut a.q_proj),
            ("k_proj", attn, &mut a.k_proj),
            ("v_proj", attn, &mut a.v_proj),
            ("o_proj", attn, &mut a.o_proj),
            ("gate_proj", mlp, &mut m.gate_proj),
            ("up_proj", mlp, &mut m.up_proj),
            ("down_proj", mlp, &mut m.down_proj),
        ];
        for (name, parent, linear) in targets {
            if lora.modules.iter().any(|m| m == name) {
                linear.attach_lora(&(parent / name), lora.rank, lora.alpha);
            }
        }
    }
}

impl SelfAttention {
    /// Returns the attention output before `o_proj` (this rank's heads).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let q = apply_rotary(&split_heads(&self.q_proj.forward(x), self.heads), cos, sin);
        let k = apply_rotary(
            &split_heads(&self.k_proj.forward(x), self.kv_heads),
            cos,
            sin,
        );
        let v = split_heads(&self.v_proj.forward(x), self.kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let groups = self.heads / self.kv_heads;
        let (k, v) = if groups > 1 {
            (
                k.repeat_interleave_self_int(groups, 1, None),
                v.repeat_interleave_self_int(groups, 1, None),
            )
        } else {
            (k, v)
        };
        merge_heads(&attention(&q, &k, &v, Some(mask)))
    }
}

impl Mlp {
    /// Returns the input of `down_proj` (this rank's slice of the inner width).
    fn forward(&self, x: &Tensor) -> Tensor {
        self.gate_proj.forward(x).silu() * self.up_proj.forward(x)
    }
}

/// What a decoder layer reads besides its input: the rotary tables, the
/// attention mask, and the positions whose output is wanted (all when
/// `None`).
struct LayerContext<'t> {
    cos: &'t Tensor,
    sin: &'t Tensor,
    mask: &'t Tensor,
    rows: Option<&'t Tensor>,
}

/// Rows `rows` of `x` `[batch, seq, width]` flattened to `[batch * seq, width]`.
fn flat_rows(x: &Tensor, rows: &Tensor) -> Tensor {
    let width = x.size()[2];
    x.reshape([-1, width]).index_select(0, rows)
}

/// Additive mask `[batch, 1, seq, past + seq]`: a query sees the keys at or
/// before its own position whose `key_mask` is 1.
fn causal_mask(key_mask: &Tensor, seq: i64, past: i64, kind: Kind) -> Tensor {
    let device = key_mask.device();
    let total = past + seq;
    let query_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
    let key_pos = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let future = key_pos.gt_tensor(&query_pos).unsqueeze(0).unsqueeze(0);
    let hidden = key_mask.eq(0).unsqueeze(1).unsqueeze(1);
    let blocked = future.logical_or(&hidden);
    Tensor::zeros(blocked.size(), (kind, device)).masked_fill(&blocked, min_value(kind))
}
