//! The small layers every part of SAM is made of, created on a tch `VarStore`
//! path so that each tensor's name is its Hugging Face checkpoint name.
//!
//! Fresh tensors get transformers' initialisation (normal(0, 0.02) weights,
//! zero biases, unit norms); a checkpoint load overwrites them.
//!
//! Mixed precision: frozen weights may be held in bf16 or fp16 while trainable
//! ones keep fp32 master copies. Every layer computes in the dtype of its
//! input and casts its own tensors to it (a no-op when they agree), so the
//! cast of a trainable weight is part of the graph and its gradient arrives
//! in fp32.

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::rng;

/// Standard deviation of transformers' default weight initialisation.
pub const INIT_STD: f64 = 0.02;

const NORMAL: Init = Init::Randn {
    mean: 0.0,
    stdev: INIT_STD,
};

/// Low-rank adapter `scale * B A x` beside a frozen weight (LoRA).
#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// `y = x W^T + b`, optionally plus a LoRA term.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        Self {
            weight: var(p, "weight", &[out_dim, in_dim], NORMAL),
            bias: bias.then(|| var(p, "bias", &[out_dim], Init::Const(0.0))),
            lora: None,
        }
    }

    /// A linear whose weight and bias start at zero: SAM's exchange layers,
    /// which makes SAM equal to InstructBLIP at initialisation.
    pub fn zeros(p: &Path, in_dim: i64, out_dim: i64) -> Self {
        Self {
            weight: var(p, "weight", &[out_dim, in_dim], Init::Const(0.0)),
            bias: Some(var(p, "bias", &[out_dim], Init::Const(0.0))),
            lora: None,
        }
    }

    /// Adds a LoRA adapter: `A` random (Kaiming-uniform, as PEFT does), `B`
    /// zero, so the layer's output is unchanged until training moves `B`.
    pub fn attach_lora(&mut self, p: &Path, rank: i64, alpha: f64) {
        let (out_dim, in_dim) = self.weight.size2().expect("linear weight is 2-d");
        let bound = 1.0 / (in_dim as f64).sqrt();
        self.lora = Some(Lora {
            a: var(
                &(p / "lora_A"),
                "weight",
                &[rank, in_dim],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            b: var(
                &(p / "lora_B"),
                "weight",
                &[out_dim, rank],
                Init::Const(0.0),
            ),
            scale: alpha / rank as f64,
        });
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let bias = self.bias.as_ref().map(|b| cast(b, kind));
        let y = x.linear(&cast(&self.weight, kind), bias.as_ref());
        match &self.lora {
            Some(l) => y + l.up(&l.down(x)),
            None => y,
        }
    }
}

impl Lora {
    /// `A x`: the rank-r projection.
    pub fn down(&self, x: &Tensor) -> Tensor {
        x.linear::<Tensor>(&cast(&self.a, x.kind()), None)
    }

    /// `scale * B u`.
    pub fn up(&self, u: &Tensor) -> Tensor {
        u.linear::<Tensor>(&cast(&self.b, u.kind()), None) * self.scale
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: var(p, "weight", &[dim], Init::Const(1.0)),
            bias: var(p, "bias", &[dim], Init::Const(0.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        let (weight, bias) = (cast(&self.weight, x.kind()), cast(&self.bias, x.kind()));
        x.layer_norm([dim], Some(&weight), Some(&bias), self.eps, true)
    }
}

/// LLaMA's RMSNorm, computed in float32 as transformers does.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: var(p, "weight", &[dim], Init::Const(1.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (x32 * (variance + self.eps).rsqrt()).to_kind(kind);
        normed * cast(&self.weight, kind)
    }
}

#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: &Path, count: i64, dim: i64) -> Self {
        Self {
            weight: var(p, "weight", &[count, dim], NORMAL),
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// What building a model needs to know beyond its config: the names a
/// checkpoint is about to fill, and the seed fresh variables derive from.
#[derive(Default, Clone)]
struct Build {
    provided: Option<std::collections::HashSet<String>>,
    seed: u64,
}

thread_local! {
    /// The build under way on this thread (see [`skipping_init`] and
    /// [`seeded_init`]).
    static BUILD: std::cell::RefCell<Build> = std::cell::RefCell::new(Build::default());
}

/// Runs `f` with the thread's build settings changed by `set`, and restores
/// them however `f` ends.
fn with_build<T>(set: impl FnOnce(&mut Build), f: impl FnOnce() -> T) -> T {
    let saved = BUILD.with(|b| {
        let mut b = b.borrow_mut();
        let saved = b.clone();
        set(&mut b);
        saved
    });
    struct Restore(Option<Build>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let saved = self.0.take().expect("restored once");
            BUILD.with(|b| *b.borrow_mut() = saved);
        }
    }
    let _restore = Restore(Some(saved));
    f()
}

/// Runs `build` with the variables named in `provided` left uninitialised:
/// a load overwrites them at once, and initialising billions of parameters
/// at random first would cost the CPU seconds for nothing. Variables a
/// checkpoint does not carry (SAM's own, LoRA) are initialised as usual.
pub fn skipping_init<T>(
    provided: std::collections::HashSet<String>,
    build: impl FnOnce() -> T,
) -> T {
    with_build(|b| b.provided = Some(provided), build)
}

/// Runs `build` with fresh variables drawn from `seed`: each variable's
/// values are a function of the seed and its name alone (see
/// [`crate::rng`]), whatever the thread, the order of creation or what
/// other threads draw.
pub fn seeded_init<T>(seed: u64, build: impl FnOnce() -> T) -> T {
    with_build(|b| b.seed = seed, build)
}

/// A variable `name` under `p`, initialised by `init` unless a checkpoint is
/// about to fill it.
pub fn var(p: &Path, name: &str, dims: &[i64], init: Init) -> Tensor {
    let full = p.path(name);
    let (provided, seed) = BUILD.with(|b| {
        let b = b.borrow();
        let provided = b.provided.as_ref().is_some_and(|n| n.contains(&full));
        (provided, b.seed)
    });
    if provided {
        return p.add(name, Tensor::empty(dims, (p.kind(), p.device())), true);
    }
    let seed = rng::derive_named(seed, &full);
    let values = match init {
        Init::Randn { mean, stdev } => rng::normal(seed, dims, p.device()) * stdev + mean,
        Init::Uniform { lo, up } => rng::uniform(seed, dims, p.device()) * (up - lo) + lo,
        other => return p.var(name, dims, other),
    };
    let v = p.var(name, dims, Init::Const(0.0));
    tch::no_grad(|| v.shallow_clone().copy_(&values));
    v
}

/// `t` in `kind`: the tensor itself when it already is, else a cast that
/// stays in the autograd graph.
pub fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// A normal(0, 0.02) tensor of any shape (query tokens, class embedding).
pub fn normal_var(p: &Path, name: &str, dims: &[i64]) -> Tensor {
    var(p, name, dims, NORMAL)
}

/// Exact (erf) GELU, transformers' `"gelu"`.
pub fn gelu(x: &Tensor) -> Tensor {
    x.gelu("none")
}

/// Dropout whose masks are a function of a seed and a key per row of the
/// tensors it drops (see [`rng::uniform_rows`]): a sample keyed by its
/// identity gets the same mask on any rank, in any batch, after a restart,
/// and when activation checkpointing recomputes its layer.
#[derive(Debug)]
pub struct Dropout {
    seed: u64,
    /// `[R]` int64: one key per row.
    rows: Tensor,
}

impl Dropout {
    pub fn new(seed: u64, rows: Tensor) -> Self {
        Self { seed, rows }
    }

    /// The stream of one place in the network, named by `parts`.
    pub fn at(&self, parts: &[u64]) -> Self {
        Self {
            seed: rng::derive(self.seed, parts),
            rows: self.rows.shallow_clone(),
        }
    }

    /// `x` `[R, ...]` with each element zeroed with probability `p` and the
    /// others scaled by `1 / (1 - p)`.
    pub fn apply(&self, x: &Tensor, p: f64) -> Tensor {
        if p <= 0.0 {
            return x.shallow_clone();
        }
        let keep = rng::uniform_rows(self.seed, &self.rows, &x.size()[1..]).ge(p);
        x * keep.to_kind(x.kind()) * (1.0 / (1.0 - p))
    }
}

/// [`attention`] with dropout on the attention probabilities, as BERT
/// trains: computed in full (the fused kernel would draw its own mask).
pub fn attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout: &Dropout,
    p: f64,
) -> Tensor {
    let scores = q.matmul(&k.transpose(-2, -1)) / (q.size()[3] as f64).sqrt();
    let scores = match mask {
        Some(m) => scores + m,
        None => scores,
    };
    dropout
        .apply(&scores.softmax(-1, scores.kind()), p)
        .matmul(v)
}

/// Multi-head attention over `[batch, heads, seq, head_dim]` tensors with an
/// optional additive mask broadcastable to `[batch, heads, q, k]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let head_dim = q.size()[3];
    Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        mask,
        0.0,
        false,
        1.0 / (head_dim as f64).sqrt(),
        false,
    )
}

/// `[batch, seq, heads * head_dim]` to `[batch, heads, seq, head_dim]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let (b, s, d) = x.size3().expect("split_heads takes a 3-d tensor");
    x.view([b, s, heads, d / heads]).transpose(1, 2)
}

/// The inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, s, d) = x.size4().expect("merge_heads takes a 4-d tensor");
    x.transpose(1, 2).contiguous().view([b, s, h * d])
}

/// Turns a 0/1 key mask `[batch, keys]` into an additive mask
/// `[batch, 1, 1, keys]`: 0 where visible, the dtype's minimum where hidden
/// (finite, so a fully hidden row never turns into NaN).
pub fn additive_key_mask(mask: &Tensor, kind: Kind) -> Tensor {
    let hidden = mask.eq(0).unsqueeze(1).unsqueeze(1);
    Tensor::zeros(hidden.size(), (kind, mask.device())).masked_fill(&hidden, min_value(kind))
}

/// The most negative finite value of a float kind.
pub fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}
