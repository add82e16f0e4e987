//! SAM: InstructBLIP with bidirectional semantic guidance between the images
//! of one sample (Wu et al., ACM MM 2024).
//!
//! Per image, the vision encoder gives patch features `E_j`. The adaptive
//! adjustment scores each patch (`Linear(V -> 1)`), softmaxes the scores over
//! the sample's images and fuses them into one context `I_hat`. The W-former
//! is a second pass through the same Q-Former layers that cross-attends to
//! `I_hat`. At the last layer the two streams exchange: `w += one_2_multiple(h)`
//! before the W-former's last layer, `h += multiple_2_one(w_out)` before the
//! Q-Former's own. Both exchange Linears start at zero, so SAM starts equal
//! to InstructBLIP. The query outputs of every image are projected to the
//! LLM's width and put, in image order, before the text.
//!
//! Unlike SAM's own code, one batch may mix samples with different numbers
//! of images: `image_mask` marks the real slots (real images first), padded
//! slots get no vision compute, no share of `I_hat`, no attention and no
//! rotary position.

use std::sync::Arc;

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::config::SamConfig;
use crate::error::{ModelError, Result};
use crate::llama::{DecoderInput, Llama, LoraTargets};
use crate::nn::{additive_key_mask, cast, normal_var, Dropout, Linear};
use crate::parallel::TensorParallel;
use crate::qformer::QFormer;
use crate::rng;
use crate::tape::{self, GradTape};
use crate::vision::VisionModel;
use crate::vision_cache::VisionCache;

/// One batch of model inputs (see `samtrain model forward`).
#[derive(Debug)]
pub struct SamInputs {
    /// `[B, N, 3, H, W]`.
    pub pixel_values: Tensor,
    /// `[B, N]`, 1 for a real image; all ones when absent.
    pub image_mask: Option<Tensor>,
    /// `[B, Tq]`: the instruction for the Q-Former.
    pub qformer_input_ids: Tensor,
    pub qformer_attention_mask: Option<Tensor>,
    /// `[B, T]`: the text for the LLM, padded on the right.
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    /// Set while training: the Q-Former's dropout is on, its masks drawn
    /// from these keys. `None` evaluates.
    pub dropout: Option<DropoutKeys>,
}

/// What a training pass's dropout masks are a function of: a seed (the
/// job's, for one epoch) and each sample's identity (its dataset index), so
/// that a sample gets the same masks whatever its batch, rank or micro-batch
/// and after a restart.
#[derive(Debug)]
pub struct DropoutKeys {
    pub seed: u64,
    /// `[B]` int64.
    pub samples: Tensor,
}

/// The LLM's input sequence: visual tokens then text.
#[derive(Debug)]
pub struct Sequence {
    /// `[B, N * Q + T, D]`.
    pub embeds: Tensor,
    /// `[B, N * Q + T]`, 1 where a position is real.
    pub key_mask: Tensor,
    /// Rotary positions: real positions count up, padding takes none.
    pub positions: Tensor,
    /// The visual tokens `[B, N * Q, D]` (zero in padded slots).
    pub visual: Tensor,
    /// Real images per sample `[B]`.
    pub images_per_sample: Tensor,
}

impl Sequence {
    /// What the decoder reads besides the embeddings, for the whole sequence.
    pub fn decoder_input(&self) -> DecoderInput<'_> {
        DecoderInput {
            positions: &self.positions,
            key_mask: &self.key_mask,
        }
    }
}

/// The loss of one forward pass.
#[derive(Debug)]
pub struct Losses {
    /// The LM loss: what to differentiate.
    pub total: Tensor,
    /// Answer tokens it averaged over.
    pub tokens: i64,
}

#[derive(Debug)]
struct Guidance {
    adaptive_adjustment: Linear,
    one_2_multiple: Linear,
    multiple_2_one: Linear,
}

/// The whole network.
#[derive(Debug)]
pub struct SamModel {
    pub config: SamConfig,
    vision: VisionModel,
    query_tokens: Tensor,
    qformer: QFormer,
    projection: Linear,
    llm: Llama,
    guidance: Guidance,
    /// The dtype activations are computed in: that of the frozen weights.
    compute: Kind,
    /// Where the frozen ViT's outputs are kept between epochs and runs.
    vision_cache: std::sync::RwLock<Option<Arc<VisionCache>>>,
}

/// The passes through the Q-Former's layers; each draws its own dropout
/// masks.
#[derive(Debug, Clone, Copy)]
enum Pass {
    Embed,
    /// Over each image (InstructBLIP's pass, and SAM's last layer).
    Images,
    /// SAM's pass over the fused image of each sample.
    Fused,
    /// SAM's exchange: the last layer over each image, reading the fused one.
    Exchange,
}

impl SamModel {
    /// Builds the network on `p` (usually a `VarStore`'s root) with fresh
    /// weights in `p`'s dtype, which is also the compute dtype;
    /// `weights::load` then fills them from a checkpoint.
    pub fn new(p: &Path, config: &SamConfig, tp: Option<TensorParallel>) -> Result<Self> {
        let (v, q, t) = (
            &config.vision_config,
            &config.qformer_config,
            &config.text_config,
        );
        let lora = config.samtrain.lora.as_ref().map(|l| LoraTargets {
            modules: &l.target_modules,
            rank: l.rank,
            alpha: l.alpha,
        });
        let s = p / "sam";
        Ok(Self {
            vision: VisionModel::new(&(p / "vision_model"), v),
            query_tokens: normal_var(
                p,
                "query_tokens",
                &[1, config.num_query_tokens, q.hidden_size],
            ),
            qformer: QFormer::new(&(p / "qformer"), q),
            projection: Linear::new(
                &(p / "language_projection"),
                q.hidden_size,
                t.hidden_size,
                true,
            ),
            llm: Llama::new(&(p / "language_model"), t, tp, lora.as_ref())?,
            guidance: Guidance {
                adaptive_adjustment: Linear::new(
                    &(&s / "adaptive_adjustment"),
                    v.hidden_size,
                    1,
                    true,
                ),
                one_2_multiple: Linear::zeros(
                    &(&s / "one_2_multiple"),
                    q.hidden_size,
                    q.hidden_size,
                ),
                multiple_2_one: Linear::zeros(
                    &(&s / "multiple_2_one"),
                    q.hidden_size,
                    q.hidden_size,
                ),
            },
            config: config.clone(),
            compute: p.kind(),
            vision_cache: Default::default(),
        })
    }

    /// The dtype activations are computed in.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Keeps the vision encoder's outputs in `cache` (`None`: encodes every
    /// image every time). Only a frozen encoder uses it: one that trains
    /// (`samtrain.trainable.all`) changes its outputs at every step.
    pub fn set_vision_cache(&self, cache: Option<Arc<VisionCache>>) {
        *self.vision_cache.write().unwrap_or_else(|e| e.into_inner()) = cache;
    }

    /// The vision cache, while the encoder is frozen.
    fn frozen_vision_cache(&self) -> Option<Arc<VisionCache>> {
        if self.config.samtrain.trainable.all {
            return None;
        }
        self.vision_cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn llm(&self) -> &Llama {
        &self.llm
    }

    /// Hands the model the tensor-parallel communicator of a new generation.
    /// The slice this rank holds cannot change: the new group must have the
    /// same rank and size as the one the model was built for.
    pub fn rebind_tensor_parallel(&mut self, tp: Option<TensorParallel>) -> Result<()> {
        let place = |t: Option<&TensorParallel>| t.map(|t| (t.rank(), t.world_size()));
        let (was, now) = (place(self.llm.tensor_parallel()), place(tp.as_ref()));
        if was.unwrap_or((0, 1)) != now.unwrap_or((0, 1)) {
            return Err(ModelError::Input {
                name: "tensor_parallel".into(),
                message: format!(
                    "the model holds the slice of rank {was:?} (rank, size) but the new group is {now:?}"
                ),
            });
        }
        self.llm.set_tensor_parallel(tp);
        Ok(())
    }

    /// The LLM input sequence for a batch. With a tape (tensor-parallel
    /// training), the visual tokens are cut: the vision side's backward
    /// pass runs once, as a segment of its own.
    pub fn sequence<'a>(
        &'a self,
        inputs: &SamInputs,
        mut tape: Option<&mut GradTape<'a>>,
    ) -> Result<Sequence> {
        let images = check_inputs(inputs, &self.config)?;
        let (b, n) = (images.size()[0], images.size()[1]);
        let slots = self.visual_tokens(inputs, &images, tape.as_deref_mut())?;
        let visual = match tape {
            Some(t) => t.cut(slots),
            None => slots,
        };
        let d = self.config.text_config.hidden_size;
        let qn = self.config.num_query_tokens;
        let text = self.llm.embed(&inputs.input_ids);
        let text_mask = match &inputs.attention_mask {
            Some(m) => m.to_kind(Kind::Int64),
            None => inputs.input_ids.ones_like(),
        };
        let embeds = Tensor::cat(
            &[visual.view([b, n * qn, d]), text.to_kind(visual.kind())],
            1,
        );
        let key_mask = Tensor::cat(
            &[images.repeat_interleave_self_int(qn, 1, None), text_mask],
            1,
        );
        let positions = (key_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        Ok(Sequence {
            embeds,
            key_mask,
            positions,
            visual: visual.view([b, n * qn, d]),
            images_per_sample: images.sum_dim_intlist(1, false, Kind::Int64),
        })
    }

    /// Logits `[B, N * Q + T, vocab]` for every position.
    pub fn forward(&self, inputs: &SamInputs) -> Result<Tensor> {
        let seq = self.sequence(inputs, None)?;
        let hidden = self
            .llm
            .forward(&seq.embeds, &seq.decoder_input(), None, None);
        Ok(self.llm.logits(&hidden))
    }

    /// Next-token cross-entropy on the answer tokens (`labels` `[B, T]`
    /// aligned with `input_ids`, -100 where there is no loss), averaged over
    /// every answer token of the batch.
    pub fn loss<'a>(
        &'a self,
        inputs: &SamInputs,
        labels: &Tensor,
        mut tape: Option<&mut GradTape<'a>>,
    ) -> Result<Losses> {
        if labels.size() != inputs.input_ids.size() {
            return Err(ModelError::Input {
                name: "labels".into(),
                message: format!(
                    "shape {:?} differs from input_ids {:?}",
                    labels.size(),
                    inputs.input_ids.size()
                ),
            });
        }
        let seq = self.sequence(inputs, tape.as_deref_mut())?;
        let t = labels.size()[1];
        let visual_len = seq.visual.size()[1];
        let seq_len = visual_len + t;
        // The position that predicts each answer token, in the flattened
        // [B * (N Q + T)] sequence: the token before it, and for text token 0
        // the last *real* visual token, which is not the last slot when a
        // sample has padded image slots.
        let labelled = labels.ne(-100).view([-1]).nonzero().squeeze_dim(1);
        let tokens = labelled.size()[0];
        let sample = labelled.divide_scalar_mode(t, "floor");
        let column = labelled.remainder(t);
        let last_real =
            (&seq.images_per_sample * self.config.num_query_tokens - 1).index_select(0, &sample);
        let predictor = last_real.where_self(&column.eq(0), &(&column + (visual_len - 1)));
        let rows = sample * seq_len + predictor;
        let hidden = self
            .llm
            .forward_rows(&seq.embeds, &seq.decoder_input(), &rows, tape);
        let logits = self.llm.logits(&hidden).to_kind(Kind::Float);
        let targets = labels.reshape([-1]).index_select(0, &labelled);
        Ok(Losses {
            total: logits.cross_entropy_for_logits(&targets),
            tokens,
        })
    }

    /// Visual tokens `[B * N, Q, D]`, zero in padded slots. With a tape
    /// (training), each ViT and Q-Former layer is offered to it for
    /// activation checkpointing; the tensors several layers read are shared
    /// through it.
    fn visual_tokens<'a>(
        &'a self,
        inputs: &SamInputs,
        images: &Tensor,
        mut tape: Option<&mut GradTape<'a>>,
    ) -> Result<Tensor> {
        let (b, n) = (images.size()[0], images.size()[1]);
        let device = inputs.pixel_values.device();
        let size = inputs.pixel_values.size();
        let real = images.reshape([-1]).nonzero().squeeze_dim(1);
        let sample_of = real.divide_scalar_mode(n, "floor");
        let pixels = inputs
            .pixel_values
            .reshape([b * n, size[2], size[3], size[4]])
            .index_select(0, &real);
        let pixels = pixels.to_kind(self.compute);
        let e = match self.frozen_vision_cache() {
            // Frozen: nothing of the encoder goes on the tape.
            Some(cache) => cache.encode(&pixels, |p| self.vision.forward(p, None)),
            None => self.vision.forward(&pixels, tape.as_deref_mut()),
        };
        let e = tape::share(&mut tape, e);
        let qn = self.config.num_query_tokens;
        let qf_mask = match &inputs.qformer_attention_mask {
            Some(m) => m.to_kind(Kind::Int64),
            None => inputs.qformer_input_ids.ones_like(),
        };
        let self_mask = additive_key_mask(
            &Tensor::cat(&[Tensor::ones([b, qn], (Kind::Int64, device)), qf_mask], 1),
            e.kind(),
        );
        let queries = cast(&self.query_tokens, self.compute).expand([b, -1, -1], false);
        // Dropout rows: the samples, and each real image of a sample.
        let (per_sample, per_image) = match &inputs.dropout {
            Some(k) => {
                let samples = k.samples.to_device(device);
                let images = rng::combine(&samples.index_select(0, &sample_of), &real.remainder(n));
                (
                    Some(Dropout::new(k.seed, samples)),
                    Some(Dropout::new(k.seed, images)),
                )
            }
            None => (None, None),
        };
        let w0 = self.qformer.embed(
            &queries,
            &inputs.qformer_input_ids,
            per_sample
                .as_ref()
                .map(|d| d.at(&[Pass::Embed as u64]))
                .as_ref(),
        );
        let w0 = tape::share(&mut tape, w0);
        let per_image_mask = self_mask.index_select(0, &sample_of);
        // One Q-Former layer over `x`, cross-attending to `image`; `rows`
        // are the dropout rows of `x`, and `pass` tells apart the calls of
        // one layer.
        let layer = |tape: &mut Option<&mut GradTape<'a>>,
                     (l, pass): (usize, Pass),
                     x,
                     mask: &Tensor,
                     image: &Tensor,
                     rows: Option<&Dropout>| {
            let (mask, image) = (mask.shallow_clone(), image.shallow_clone());
            let dropout = rows.map(|d| d.at(&[pass as u64, l as u64]));
            tape::checkpoint(tape, x, move |x, _| {
                self.qformer
                    .layer(l, x, &mask, &image, qn, dropout.as_ref())
            })
        };
        let (per_sample, per_image) = (per_sample.as_ref(), per_image.as_ref());
        let mut h = w0.index_select(0, &sample_of);
        let last = self.qformer.num_layers() - 1;
        let guided = self.config.samtrain.guidance;
        let shared_layers = if guided { last } else { last + 1 };
        for l in 0..shared_layers {
            let at = (l, Pass::Images);
            h = layer(&mut tape, at, h, &per_image_mask, &e, per_image);
        }
        if guided {
            let h_shared = tape::share(&mut tape, h);
            let i_hat = self.fused_context(&e, &real, b, n);
            let i_hat = tape::share(&mut tape, i_hat);
            let mut w = w0;
            for l in 0..last {
                w = layer(
                    &mut tape,
                    (l, Pass::Fused),
                    w,
                    &self_mask,
                    &i_hat,
                    per_sample,
                );
            }
            let w = w.index_select(0, &sample_of) + self.guidance.one_2_multiple.forward(&h_shared);
            let i_hat = i_hat.index_select(0, &sample_of);
            let at = (last, Pass::Exchange);
            let w_out = layer(&mut tape, at, w, &per_image_mask, &i_hat, per_image);
            // Not `+=`: the exchange Linear's backward still needs `h` as it was.
            let guided = h_shared + self.guidance.multiple_2_one.forward(&w_out);
            let at = (last, Pass::Images);
            h = layer(&mut tape, at, guided, &per_image_mask, &e, per_image);
        }
        let tokens = self.projection.forward(&h.narrow(1, 0, qn));
        let d = tokens.size()[2];
        Ok(Tensor::zeros([b * n, qn, d], (tokens.kind(), device)).index_copy(0, &real, &tokens))
    }

    /// SAM's adaptive adjustment: `I_hat = sum_j softmax_j(score_j) * E_j`
    /// over the real images of each sample, `[B, P, V]`.
    fn fused_context(&self, e: &Tensor, real: &Tensor, b: i64, n: i64) -> Tensor {
        let (p, v) = (e.size()[1], e.size()[2]);
        let scores = self.guidance.adaptive_adjustment.forward(e).squeeze_dim(-1);
        // Each buffer takes the dtype of what is copied into it: under CUDA's
        // autocast the Linear's scores are bf16 while `e`, a LayerNorm's
        // output, stays fp32, and index_copy wants one dtype.
        let all_scores = Tensor::full(
            [b * n, p],
            f64::NEG_INFINITY,
            (scores.kind(), scores.device()),
        )
        .index_copy(0, real, &scores)
        .view([b, n, p]);
        let weights = all_scores.softmax(1, e.kind()).unsqueeze(-1);
        let features = Tensor::zeros([b * n, p, v], (e.kind(), e.device()))
            .index_copy(0, real, e)
            .view([b, n, p, v]);
        (weights * features).sum_dim_intlist(1, false, e.kind())
    }
}

/// Checks shapes and the image mask; returns the mask as int64 `[B, N]`.
fn check_inputs(inputs: &SamInputs, config: &SamConfig) -> Result<Tensor> {
    let bad = |name: &str, message: String| ModelError::Input {
        name: name.into(),
        message,
    };
    let px = inputs.pixel_values.size();
    let image = config.vision_config.image_size;
    if px.len() != 5 || px[2] != 3 || px[3] != image || px[4] != image {
        return Err(bad(
            "pixel_values",
            format!("expected [B, N, 3, {image}, {image}], found {px:?}"),
        ));
    }
    let (b, n) = (px[0], px[1]);
    let check_2d = |name: &str, t: &Tensor, cols: Option<i64>| -> Result<()> {
        let s = t.size();
        if s.len() != 2 || s[0] != b || cols.is_some_and(|c| s[1] != c) {
            return Err(bad(
                name,
                format!(
                    "expected [{b}, {}], found {s:?}",
                    cols.map_or("T".into(), |c| c.to_string())
                ),
            ));
        }
        Ok(())
    };
    check_2d("input_ids", &inputs.input_ids, None)?;
    check_2d("qformer_input_ids", &inputs.qformer_input_ids, None)?;
    let t = inputs.input_ids.size()[1];
    let tq = inputs.qformer_input_ids.size()[1];
    if t < 1 {
        return Err(bad("input_ids", "needs at least one token".into()));
    }
    if let Some(m) = &inputs.attention_mask {
        check_2d("attention_mask", m, Some(t))?;
    }
    if let Some(m) = &inputs.qformer_attention_mask {
        check_2d("qformer_attention_mask", m, Some(tq))?;
    }
    let max_q = config.qformer_config.max_position_embeddings;
    if tq > max_q {
        return Err(bad(
            "qformer_input_ids",
            format!("{tq} tokens exceed the Q-Former's {max_q} positions"),
        ));
    }
    check_ids(
        "input_ids",
        &inputs.input_ids,
        config.text_config.vocab_size,
    )?;
    check_ids(
        "qformer_input_ids",
        &inputs.qformer_input_ids,
        config.qformer_config.vocab_size,
    )?;
    let images = match &inputs.image_mask {
        Some(m) => {
            check_2d("image_mask", m, Some(n))?;
            m.to_kind(Kind::Int64)
        }
        None => Tensor::ones([b, n], (Kind::Int64, inputs.pixel_values.device())),
    };
    let counts = images.sum_dim_intlist(1, false, Kind::Int64);
    if counts.min().int64_value(&[]) < 1 {
        return Err(bad(
            "image_mask",
            "every sample needs at least one image".into(),
        ));
    }
    // Real images first: a slot is real exactly when its index is below the count.
    let slots = Tensor::arange(n, (Kind::Int64, images.device())).unsqueeze(0);
    if slots
        .lt_tensor(&counts.unsqueeze(1))
        .to_kind(Kind::Int64)
        .ne_tensor(&images)
        .any()
        .int64_value(&[])
        != 0
    {
        return Err(bad(
            "image_mask",
            "must be 1s followed by 0s in each sample (real images first)".into(),
        ));
    }
    Ok(images)
}

fn check_ids(name: &str, ids: &Tensor, vocab: i64) -> Result<()> {
    if ids.numel() == 0 {
        return Ok(());
    }
    let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
    if lo < 0 || hi >= vocab {
        return Err(ModelError::Input {
            name: name.into(),
            message: format!("token ids must lie in [0, {vocab}), found [{lo}, {hi}]"),
        });
    }
    Ok(())
}
