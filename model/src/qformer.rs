//! The Q-Former: a BERT whose learned query tokens read the image through
//! cross-attention, with the instruction text sharing their self-attention
//! (InstructBLIP). SAM runs its layers twice, so the layers are exposed one
//! at a time.
//!
//! Tensor names follow transformers' `InstructBlipQFormerModel`:
//! `qformer.embeddings.*`, `qformer.encoder.layer.N.{attention,crossattention,
//! intermediate,output,intermediate_query,output_query}.*`.

use tch::nn::Path;
use tch::Tensor;

use crate::config::QFormerConfig;
use crate::nn::{
    attention, attention_dropout, gelu, merge_heads, split_heads, Dropout, Embedding, LayerNorm,
    Linear,
};

/// The dropout probabilities of one training pass and its masks' stream.
struct LayerDropout<'a> {
    masks: &'a Dropout,
    hidden: f64,
    attention: f64,
}

/// Where in a layer a mask is drawn: each place has its own stream.
#[derive(Clone, Copy)]
enum Site {
    SelfProbs,
    SelfOutput,
    CrossProbs,
    CrossOutput,
    QueryOutput,
    TextOutput,
}

impl LayerDropout<'_> {
    fn at(&self, site: Site) -> Dropout {
        self.masks.at(&[site as u64])
    }
}

/// `x` after the hidden-state dropout of `site`, while training.
fn hidden_dropout(x: &Tensor, training: Option<&LayerDropout>, site: Site) -> Tensor {
    match training {
        Some(d) => d.at(site).apply(x, d.hidden),
        None => x.shallow_clone(),
    }
}

/// BERT attention block: multi-head attention, output dense, residual, norm.
#[derive(Debug)]
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: i64,
}

impl AttentionBlock {
    fn new(p: &Path, c: &QFormerConfig, kv_dim: i64) -> Self {
        let d = c.hidden_size;
        let a = p / "attention";
        let o = p / "output";
        Self {
            query: Linear::new(&(&a / "query"), d, d, true),
            key: Linear::new(&(&a / "key"), kv_dim, d, true),
            value: Linear::new(&(&a / "value"), kv_dim, d, true),
            dense: Linear::new(&(&o / "dense"), d, d, true),
            norm: LayerNorm::new(&(&o / "LayerNorm"), d, c.layer_norm_eps),
            heads: c.num_attention_heads,
        }
    }

    /// `context` is the sequence attended to: `x` itself, or the image.
    /// `sites` are the streams of the probabilities' and the output's masks.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        mask: Option<&Tensor>,
        training: Option<&LayerDropout>,
        sites: (Site, Site),
    ) -> Tensor {
        let q = split_heads(&self.query.forward(x), self.heads);
        let k = split_heads(&self.key.forward(context), self.heads);
        let v = split_heads(&self.value.forward(context), self.heads);
        let out = match training {
            Some(d) if d.attention > 0.0 => {
                attention_dropout(&q, &k, &v, mask, &d.at(sites.0), d.attention)
            }
            _ => attention(&q, &k, &v, mask),
        };
        let out = self.dense.forward(&merge_heads(&out));
        self.norm
            .forward(&(hidden_dropout(&out, training, sites.1) + x))
    }
}

/// BERT feed-forward: dense, GELU, dense, residual, norm.
#[derive(Debug)]
struct FeedForward {
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl FeedForward {
    fn new(p: &Path, c: &QFormerConfig, intermediate: &str, output: &str) -> Self {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        Self {
            intermediate: Linear::new(&(p / intermediate / "dense"), d, i, true),
            output: Linear::new(&(p / output / "dense"), i, d, true),
            norm: LayerNorm::new(&(p / output / "LayerNorm"), d, c.layer_norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, training: Option<&LayerDropout>, site: Site) -> Tensor {
        let h = self.output.forward(&gelu(&self.intermediate.forward(x)));
        self.norm.forward(&(hidden_dropout(&h, training, site) + x))
    }
}

#[derive(Debug)]
struct Layer {
    attention: AttentionBlock,
    crossattention: Option<AttentionBlock>,
    /// Feed-forward of the instruction-text positions.
    text_ffn: FeedForward,
    /// Feed-forward of the query positions.
    query_ffn: FeedForward,
}

/// The Q-Former, its embeddings and layers.
#[derive(Debug)]
pub struct QFormer {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl QFormer {
    pub fn new(p: &Path, c: &QFormerConfig) -> Self {
        let d = c.hidden_size;
        let e = p / "embeddings";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = p / "encoder" / "layer" / i;
                Layer {
                    attention: AttentionBlock::new(&(&l / "attention"), c, d),
                    crossattention: (i % c.cross_attention_frequency == 0).then(|| {
                        AttentionBlock::new(&(&l / "crossattention"), c, c.encoder_hidden_size)
                    }),
                    text_ffn: FeedForward::new(&l, c, "intermediate", "output"),
                    query_ffn: FeedForward::new(&l, c, "intermediate_query", "output_query"),
                }
            })
            .collect();
        Self {
            word_embeddings: Embedding::new(&(&e / "word_embeddings"), c.vocab_size, d),
            position_embeddings: Embedding::new(
                &(&e / "position_embeddings"),
                c.max_position_embeddings,
                d,
            ),
            embed_norm: LayerNorm::new(&(&e / "layernorm"), d, c.layer_norm_eps),
            layers,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_dropout<'a>(&self, masks: Option<&'a Dropout>) -> Option<LayerDropout<'a>> {
        masks.map(|masks| LayerDropout {
            masks,
            hidden: self.hidden_dropout,
            attention: self.attention_dropout,
        })
    }

    /// Queries `[n, Q, D]` followed by the embedded instruction `[n, T]`,
    /// normalised: the input of layer 0, in the queries' dtype. `dropout`
    /// (training) has one key per row.
    pub fn embed(&self, queries: &Tensor, input_ids: &Tensor, dropout: Option<&Dropout>) -> Tensor {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (tch::Kind::Int64, input_ids.device()));
        let text = self.word_embeddings.forward(input_ids)
            + self.position_embeddings.forward(&positions).unsqueeze(0);
        let x = Tensor::cat(&[queries.shallow_clone(), text.to_kind(queries.kind())], 1);
        let x = self.embed_norm.forward(&x);
        match dropout {
            Some(d) => d.apply(&x, self.hidden_dropout),
            None => x,
        }
    }

    /// One layer. The first `query_len` positions are the queries: only they
    /// cross-attend to `image` `[n, P, V]` and they have their own
    /// feed-forward; `self_mask` is the additive mask over the whole sequence.
    /// `dropout` (training) has one key per row and a stream of this call's
    /// own.
    pub fn layer(
        &self,
        index: usize,
        x: &Tensor,
        self_mask: &Tensor,
        image: &Tensor,
        query_len: i64,
        dropout: Option<&Dropout>,
    ) -> Tensor {
        let layer = &self.layers[index];
        let training = self.layer_dropout(dropout);
        let training = training.as_ref();
        let self_sites = (Site::SelfProbs, Site::SelfOutput);
        let h = layer
            .attention
            .forward(x, x, Some(self_mask), training, self_sites);
        let seq = h.size()[1];
        let mut queries = h.narrow(1, 0, query_len);
        if let Some(cross) = &layer.crossattention {
            let sites = (Site::CrossProbs, Site::CrossOutput);
            queries = cross.forward(&queries, image, None, training, sites);
        }
        let queries = layer
            .query_ffn
            .forward(&queries, training, Site::QueryOutput);
        if seq > query_len {
            let text = layer.text_ffn.forward(
                &h.narrow(1, query_len, seq - query_len),
                training,
                Site::TextOutput,
            );
            Tensor::cat(&[queries, text], 1)
        } else {
            queries
        }
    }
}
