//! Generation: greedy and beam search over the LLM with a key/value cache,
//! written to pick the same tokens as transformers' `generate` (version 5)
//! on the same prompt.
//!
//! The prompt is the model's whole input sequence: visual tokens, then text.
//! All samples of a batch decode together. Right padding of the text and
//! padded image slots stay in the cache as masked keys, every new token is
//! appended after the longest prompt, and its rotary position continues its
//! own sample's count of real positions; so each sample sees exactly its own
//! prompt, as if it had been run alone with the padding cut off.
//!
//! The repetition penalty covers the tokens generated so far and, by default,
//! the prompt as transformers sees it: its real text ids and the image
//! placeholder id (transformers' InstructBLIP puts one placeholder id per
//! visual token in the prompt). SAM's own code passes only embeddings, so
//! only generated tokens are penalised there: [`PenaltyScope::Generated`].
//! As in transformers, greedy search penalises the raw logits, beam search
//! the log-probabilities.

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::llama::{DecoderInput, KvCache, Llama};
use crate::sam::{SamInputs, SamModel};

/// Decoding settings; the defaults are SAM's (beam 5, repetition penalty 1.5).
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: i64,
    /// 1 is greedy search.
    pub num_beams: i64,
    pub repetition_penalty: f64,
    pub length_penalty: f64,
    /// Empty: the model config's EOS ids.
    pub eos_token_ids: Vec<i64>,
    pub penalty_scope: PenaltyScope,
}

/// Which ids the repetition penalty counts as already seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PenaltyScope {
    /// The prompt's text ids, the image placeholder id and the generated
    /// tokens, as transformers' `generate` on InstructBLIP.
    #[default]
    Prompt,
    /// Only the generated tokens, as SAM's (LAVIS) code.
    Generated,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            num_beams: 5,
            repetition_penalty: 1.5,
            length_penalty: 1.0,
            eos_token_ids: Vec::new(),
            penalty_scope: PenaltyScope::Prompt,
        }
    }
}

/// transformers' stand-in for minus infinity in beam scores. Keeping its exact
/// value keeps the float32 score arithmetic, and so every tie-break, the same.
const NEG: f64 = -1.0e9;

/// The new tokens of every sample (EOS included when generated).
pub fn generate(
    model: &SamModel,
    inputs: &SamInputs,
    config: &GenerationConfig,
) -> Result<Vec<Vec<i64>>> {
    check_config(config)?;
    let eos = if config.eos_token_ids.is_empty() {
        model.config.text_config.eos_token_ids()
    } else {
        config.eos_token_ids.clone()
    };
    let batch = inputs.input_ids.size().first().copied().unwrap_or(0);
    if config.max_new_tokens == 0 {
        return Ok(vec![Vec::new(); batch.max(0) as usize]);
    }
    let vocab = model.config.text_config.vocab_size;
    let keep = beams_to_keep(config.num_beams, eos.len());
    if config.num_beams > 1 && keep > config.num_beams * vocab {
        return Err(ModelError::Input {
            name: "generation.num_beams".into(),
            message: format!(
                "{} beams need {keep} candidates per step, more than the {} that {} beams over a \
                 vocabulary of {vocab} offer",
                config.num_beams,
                config.num_beams * vocab,
                config.num_beams
            ),
        });
    }
    tch::no_grad(|| {
        let (mut decoder, logits) =
            Decoder::prefill(model, inputs, config.num_beams, config.penalty_scope)?;
        if config.num_beams == 1 {
            greedy(&mut decoder, logits, config, &eos)
        } else {
            beam_search(&mut decoder, logits, config, &eos)
        }
    })
}

fn check_config(c: &GenerationConfig) -> Result<()> {
    let bad = |field: &str, message: String| {
        Err(ModelError::Input {
            name: format!("generation.{field}"),
            message,
        })
    };
    if c.max_new_tokens < 0 {
        return bad(
            "max_new_tokens",
            format!("must be at least 0, found {}", c.max_new_tokens),
        );
    }
    if c.num_beams < 1 {
        return bad(
            "num_beams",
            format!("must be at least 1, found {}", c.num_beams),
        );
    }
    if !(c.repetition_penalty.is_finite() && c.repetition_penalty > 0.0) {
        return bad(
            "repetition_penalty",
            format!("must be a positive number, found {}", c.repetition_penalty),
        );
    }
    if !c.length_penalty.is_finite() {
        return bad(
            "length_penalty",
            format!("must be finite, found {}", c.length_penalty),
        );
    }
    Ok(())
}

/// Candidates kept per sample and step: enough that `num_beams` of them are
/// still running even when every EOS id is among the best (transformers' rule).
fn beams_to_keep(num_beams: i64, eos_ids: usize) -> i64 {
    (1 + eos_ids as i64).max(2) * num_beams
}

/// The decoder's state between steps, one row per beam of every sample
/// (`rows = batch * beams`, the beams of a sample next to each other).
struct Decoder<'a> {
    llm: &'a Llama,
    cache: KvCache,
    /// `[rows, cached]`: the prompt's mask, then a 1 per fed token.
    key_mask: Tensor,
    /// `[rows]`: the rotary position of the next token to feed.
    next_position: Tensor,
    /// `[rows, vocab]`: the ids of the prompt's real text.
    prompt_ids: Tensor,
    kind: Kind,
    batch: i64,
    vocab: i64,
}

impl<'a> Decoder<'a> {
    /// Runs the batch's prompts through the decoder (one row per sample) and
    /// copies each row's cache to its `beams` rows; returns the next-token
    /// logits `[rows, vocab]` (float32) taken at each sample's last real
    /// position.
    fn prefill(
        model: &'a SamModel,
        inputs: &SamInputs,
        beams: i64,
        scope: PenaltyScope,
    ) -> Result<(Self, Tensor)> {
        let llm = model.llm();
        let seq = model.sequence(inputs, None)?;
        let (batch, len, width) = seq.embeds.size3()?;
        let device = seq.embeds.device();
        let mut cache = KvCache::default();
        let hidden = llm.forward(&seq.embeds, &seq.decoder_input(), Some(&mut cache), None);
        // Index times mask peaks at the last real position (right padding,
        // and padded slots are not the end of the prompt).
        let last = (Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0) * &seq.key_mask)
            .argmax(1, false);
        let last_hidden = hidden
            .gather(
                1,
                &last.view([batch, 1, 1]).expand([batch, 1, width], false),
                false,
            )
            .squeeze_dim(1);
        let logits = llm.logits(&last_hidden).to_kind(Kind::Float);
        let vocab = logits.size()[1];

        let rows =
            Tensor::arange(batch, (Kind::Int64, device)).repeat_interleave_self_int(beams, 0, None);
        if beams > 1 {
            cache.select(&rows);
        }
        let decoder = Self {
            llm,
            cache,
            key_mask: seq.key_mask.index_select(0, &rows),
            next_position: seq
                .key_mask
                .sum_dim_intlist(1, false, Kind::Int64)
                .index_select(0, &rows),
            prompt_ids: prompt_id_set(inputs, model, vocab, scope, device).index_select(0, &rows),
            kind: seq.embeds.kind(),
            batch,
            vocab,
        };
        Ok((decoder, logits.index_select(0, &rows)))
    }

    /// Feeds one token per row `[rows]`; returns the next logits `[rows, vocab]`.
    fn step(&mut self, tokens: &Tensor) -> Tensor {
        let rows = tokens.size()[0];
        let x = self.llm.embed(&tokens.view([rows, 1])).to_kind(self.kind);
        let new_key = Tensor::ones([rows, 1], (self.key_mask.kind(), self.key_mask.device()));
        self.key_mask = Tensor::cat(&[&self.key_mask, &new_key], 1);
        let positions = self.next_position.view([rows, 1]);
        let hidden = self.llm.forward(
            &x,
            &DecoderInput {
                positions: &positions,
                key_mask: &self.key_mask,
            },
            Some(&mut self.cache),
            None,
        );
        self.next_position = &self.next_position + 1;
        self.llm.logits(&hidden.squeeze_dim(1)).to_kind(Kind::Float)
    }

    /// Gives row `i` the cached keys of row `source[i]`. The masks and
    /// positions need no reordering: a sample's beams share its prompt.
    fn reorder(&mut self, source: &Tensor) {
        self.cache.select(source);
    }

    /// Every id a row has seen: its prompt's text and `generated` `[rows, t]`.
    fn seen(&self, generated: &Tensor) -> Tensor {
        if generated.size()[1] == 0 {
            return self.prompt_ids.shallow_clone();
        }
        self.prompt_ids.scatter_value(1, generated, 1)
    }
}

/// `[batch, vocab]` bool: the prompt ids the penalty counts as seen.
fn prompt_id_set(
    inputs: &SamInputs,
    model: &SamModel,
    vocab: i64,
    scope: PenaltyScope,
    device: Device,
) -> Tensor {
    let b = inputs.input_ids.size()[0];
    if scope == PenaltyScope::Generated {
        return Tensor::zeros([b, vocab], (Kind::Bool, device));
    }
    let ids = inputs.input_ids.to_device(device).to_kind(Kind::Int64);
    let ids = match model.config.image_token_index {
        Some(placeholder) if (0..vocab).contains(&placeholder) => Tensor::cat(
            &[
                ids,
                Tensor::full([b, 1], placeholder, (Kind::Int64, device)),
            ],
            1,
        ),
        _ => ids,
    };
    let ids_mask = inputs.attention_mask.as_ref().map(|m| {
        let m = m.to_device(device);
        let extra = ids.size()[1] - m.size()[1];
        let ones = Tensor::ones([b, extra], (m.kind(), device));
        Tensor::cat(&[m, ones], 1)
    });
    // Padding goes to an extra column that is dropped afterwards.
    let ids = match &ids_mask {
        Some(m) => ids.masked_fill(&m.eq(0), vocab),
        None => ids,
    };
    Tensor::zeros([b, vocab + 1], (Kind::Bool, device))
        .scatter_value(1, &ids, 1)
        .narrow(1, 0, vocab)
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: seen ids get
/// `s * penalty` where `s < 0`, else `s / penalty`.
fn penalise(scores: &Tensor, seen: &Tensor, penalty: f64) -> Tensor {
    // transformers adds no processor at 1.0 (scaling by 1 would change nothing).
    if penalty == 1.0 {
        return scores.shallow_clone();
    }
    let penalised = (scores * penalty).where_self(&scores.lt(0.0), &(scores / penalty));
    penalised.where_self(seen, scores)
}

/// transformers' `_sample` without sampling: the argmax of the penalised
/// logits, until EOS (kept) or `max_new_tokens`.
fn greedy(
    d: &mut Decoder,
    mut logits: Tensor,
    c: &GenerationConfig,
    eos: &[i64],
) -> Result<Vec<Vec<i64>>> {
    let batch = d.batch as usize;
    let mut answers = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut generated = Tensor::empty([d.batch, 0], (Kind::Int64, logits.device()));
    for step in 0..c.max_new_tokens {
        let scores = penalise(&logits, &d.seen(&generated), c.repetition_penalty);
        let next = scores.argmax(-1, false);
        let host = Vec::<i64>::try_from(&next.to_device(Device::Cpu))?;
        for ((answer, finished), &token) in answers.iter_mut().zip(done.iter_mut()).zip(&host) {
            if !*finished {
                answer.push(token);
                *finished = eos.contains(&token);
            }
        }
        if done.iter().all(|&f| f) || step + 1 == c.max_new_tokens {
            break;
        }
        // Finished samples keep decoding alongside (their tokens are ignored):
        // cheaper than reshaping the cache every time one stops.
        generated = Tensor::cat(&[&generated, &next.unsqueeze(1)], 1);
        logits = d.step(&next);
    }
    Ok(answers)
}

/// `tensor[b, index[b, j], ...]` for `index` `[batch, n]`: transformers'
/// `_gather_beams`.
fn gather_beams(tensor: &Tensor, index: &Tensor) -> Tensor {
    let mut index = index.shallow_clone();
    while index.dim() < tensor.dim() {
        index = index.unsqueeze(-1);
    }
    tensor.take_along_dim(&index, 1)
}

/// transformers' `_beam_search` (version 5, `early_stopping=False`, no
/// sampling), vectorised over the batch the same way, so that scores, their
/// float32 rounding and the order of candidates agree. Finished hypotheses
/// score `sum of log-probs / generated_length ** length_penalty`, where the
/// length counts every new token including the EOS.
fn beam_search(
    d: &mut Decoder,
    mut logits: Tensor,
    c: &GenerationConfig,
    eos: &[i64],
) -> Result<Vec<Vec<i64>>> {
    let (b, k, v, max_new) = (d.batch, c.num_beams, d.vocab, c.max_new_tokens);
    let device = logits.device();
    let keep = beams_to_keep(k, eos.len());
    let long = (Kind::Int64, device);
    let float = (Kind::Float, device);
    let boolean = (Kind::Bool, device);
    let eos_ids = Tensor::from_slice(eos).to_device(device);
    // Only the best `k` of the `keep` candidates may become finished hypotheses.
    let top_k_mask = Tensor::arange(keep, long).lt(k).unsqueeze(0);
    let batch_offset = (Tensor::arange(b, long) * k).unsqueeze(1);

    // Token sequences `[batch, beams, max_new]`, -1 where nothing was generated.
    let mut running = Tensor::full([b, k, max_new], -1, long);
    let mut finished = Tensor::full([b, k, max_new], -1, long);
    // Only beam 0 is live at first, so the first step does not pick the same
    // token in every beam.
    let mut running_scores = Tensor::cat(
        &[
            Tensor::zeros([b, 1], float),
            Tensor::full([b, k - 1], NEG, float),
        ],
        1,
    );
    let mut finished_scores = Tensor::full([b, k], NEG, float);
    let mut is_finished = Tensor::zeros([b, k], boolean);
    // Per sample: can a running beam still beat the worst finished one?
    let mut improvable = Tensor::ones([b, 1], boolean);

    for cur in 0..max_new {
        let generated = running.narrow(2, 0, cur).reshape([b * k, cur]);
        let log_probs = logits.log_softmax(-1, Kind::Float);
        let log_probs = penalise(&log_probs, &d.seen(&generated), c.repetition_penalty);
        let totals = (log_probs.view([b, k, v]) + running_scores.unsqueeze(-1)).reshape([b, k * v]);
        let (top_scores, top_index) = totals.topk(keep, -1, true, true);
        let source_beam = top_index.divide_scalar_mode(v, "floor");
        let tokens = top_index.remainder(v);
        let top_sequences = gather_beams(&running, &source_beam);
        top_sequences.select(2, cur).copy_(&tokens);
        let source_row = &source_beam + &batch_offset;

        // Candidates that end here: an EOS, or the length limit.
        let ends = if cur + 1 >= max_new {
            Tensor::ones([b, keep], boolean)
        } else {
            Tensor::isin(&tokens, &eos_ids, false, false)
        };

        // The best `k` candidates that go on become the running beams.
        let going_on = &top_scores + ends.to_kind(Kind::Float) * NEG;
        let (_, next) = going_on.topk(k, -1, true, true);
        running = gather_beams(&top_sequences, &next);
        running_scores = gather_beams(&going_on, &next);
        let source_rows = gather_beams(&source_row, &next);

        // Candidates that end among the best `k` compete with the finished
        // hypotheses for the `k` places.
        let just_finished = ends.logical_and(&top_k_mask);
        // Every new token counts, the EOS too.
        let length = ((cur + 1) as f64).powf(c.length_penalty);
        let candidate_scores = &top_scores / length
            + improvable.logical_not().to_kind(Kind::Float) * NEG
            + just_finished.logical_not().to_kind(Kind::Float) * NEG;
        let merged_scores = Tensor::cat(&[&finished_scores, &candidate_scores], 1);
        let (_, best) = merged_scores.topk(k, -1, true, true);
        finished = gather_beams(&Tensor::cat(&[&finished, &top_sequences], 1), &best);
        finished_scores = gather_beams(&merged_scores, &best);
        is_finished = gather_beams(&Tensor::cat(&[&is_finished, &just_finished], 1), &best);

        // transformers' heuristic for `early_stopping=False`: the best running
        // beam, scored at its current length, against the worst finished one.
        let best_possible = running_scores.narrow(1, 0, 1) / length;
        let worst_finished = finished_scores
            .amin(1, true)
            .expand([b, k], false)
            .where_self(&is_finished, &Tensor::full([b, k], NEG, float));
        improvable =
            improvable.logical_and(&best_possible.gt_tensor(&worst_finished).any_dim(-1, true));
        let go_on = improvable.any().int64_value(&[]) != 0 && ends.all().int64_value(&[]) == 0;
        if !go_on {
            break;
        }
        d.reorder(&source_rows.view([-1]));
        logits = d.step(&running.select(2, cur).reshape([-1]));
    }

    let best = Vec::<Vec<i64>>::try_from(&finished.select(1, 0).to_device(Device::Cpu))?;
    Ok(best
        .into_iter()
        .map(|tokens| tokens.into_iter().take_while(|&t| t >= 0).collect())
        .collect())
}
