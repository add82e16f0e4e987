//! A record's text as SAM's training step takes it (LAVIS's
//! `blip2_vicuna_instruct`): the LLM sees `BOS + instruction + answer + EOS`
//! with the loss only on the answer and EOS; the Q-Former sees the
//! instruction alone.
//!
//! Truncation follows SAM's code, where both lengths count the BOS the
//! LLaMA tokenizer adds: the instruction keeps its *last*
//! `max_txt_len - 1` tokens (SAM tokenizes it with `truncation_side="left"`),
//! the answer plus EOS keeps its *first* `max_output_txt_len - 1` tokens
//! (SAM tokenizes `answer + eos` with its own BOS, truncates on the right,
//! and drops that BOS when it concatenates), so a cut answer loses its EOS as
//! in SAM. The Q-Former's instruction is cut to `max_txt_len` tokens, its
//! own special tokens included, on the left as SAM's tokenizer does
//! (`truncation_side="left"`: a long storytelling prompt keeps its end,
//! where the question is) unless `qformer_truncation` says otherwise.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::PreprocessError;
use crate::mmlink::Record;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextConfig {
    /// The LLM's `tokenizer.json`.
    pub llm_tokenizer: PathBuf,
    /// The Q-Former's `tokenizer.json` (BERT's); may be the same file.
    pub qformer_tokenizer: PathBuf,
    #[serde(default = "default_max_txt_len")]
    pub max_txt_len: usize,
    #[serde(default = "default_max_output_txt_len")]
    pub max_output_txt_len: usize,
    #[serde(default = "default_bos")]
    pub bos_token: String,
    #[serde(default = "default_eos")]
    pub eos_token: String,
    /// Fills the LLM's padding; never attended to nor trained on. Added to
    /// the tokenizer when it lacks it, as SAM adds `[PAD]`.
    #[serde(default = "default_pad")]
    pub pad_token: String,
    /// The Q-Former's padding; added the same way.
    #[serde(default = "default_qformer_pad")]
    pub qformer_pad_token: String,
    /// Which end of a long instruction the Q-Former's tokenizer cuts.
    #[serde(default)]
    pub qformer_truncation: Side,
}

/// An end of a token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Cut the start, keep the end (SAM).
    #[default]
    Left,
    Right,
}

fn default_max_txt_len() -> usize {
    128
}
fn default_max_output_txt_len() -> usize {
    256
}
/// SAM's LLM tokenizer takes `</s>` as BOS, EOS and UNK (its
/// `add_special_tokens` calls), so its prompts start with `</s>`.
fn default_bos() -> String {
    "</s>".into()
}
fn default_eos() -> String {
    "</s>".into()
}
/// SAM adds `[PAD]` to LLaMA's tokenizer (id 32000, the extra row of
/// InstructBLIP-Vicuna's embedding table).
fn default_pad() -> String {
    "[PAD]".into()
}
fn default_qformer_pad() -> String {
    "[PAD]".into()
}

impl TextConfig {
    /// SAM's settings for the given tokenizer files.
    pub fn new(llm_tokenizer: impl Into<PathBuf>, qformer_tokenizer: impl Into<PathBuf>) -> Self {
        TextConfig {
            llm_tokenizer: llm_tokenizer.into(),
            qformer_tokenizer: qformer_tokenizer.into(),
            max_txt_len: default_max_txt_len(),
            max_output_txt_len: default_max_output_txt_len(),
            bos_token: default_bos(),
            eos_token: default_eos(),
            pad_token: default_pad(),
            qformer_pad_token: default_qformer_pad(),
            qformer_truncation: Side::default(),
        }
    }
}

/// One record's token ids, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSample {
    pub qformer_input_ids: Vec<i64>,
    /// `BOS + instruction + answer + EOS`.
    pub input_ids: Vec<i64>,
    /// `input_ids` with -100 on BOS and the instruction.
    pub labels: Vec<i64>,
}

/// The two tokenizers and the resolved special ids.
pub struct Tokenizers {
    config: TextConfig,
    llm: Tokenizer,
    qformer: Tokenizer,
    bos: i64,
    eos: i64,
    pad: i64,
    qformer_pad: i64,
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, PreprocessError> {
    Tokenizer::from_file(path).map_err(|e| PreprocessError::TokenizerLoad {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Adds `token` to `tokenizer` as a special token when its vocabulary lacks
/// it: it takes the next id, as transformers' `add_special_tokens` does.
fn add_if_absent(
    tokenizer: &mut Tokenizer,
    path: &Path,
    token: &str,
) -> Result<(), PreprocessError> {
    if tokenizer.token_to_id(token).is_none() {
        tokenizer
            .add_special_tokens([tokenizers::AddedToken::from(token, true)])
            .map_err(|e| PreprocessError::TokenizerLoad {
                path: path.to_path_buf(),
                message: format!("adding the special token `{token}`: {e}"),
            })?;
    }
    Ok(())
}

fn special_id(
    tokenizer: &Tokenizer,
    path: &Path,
    setting: &'static str,
    token: &str,
) -> Result<i64, PreprocessError> {
    tokenizer
        .token_to_id(token)
        .map(i64::from)
        .ok_or_else(|| PreprocessError::SpecialToken {
            path: path.to_path_buf(),
            setting,
            token: token.to_string(),
        })
}

impl Tokenizers {
    pub fn load(config: &TextConfig) -> Result<Self, PreprocessError> {
        if config.max_txt_len < 1 {
            return Err(PreprocessError::Config {
                setting: "max_txt_len",
                message: "must be at least 1 (it counts the BOS)".into(),
            });
        }
        if config.max_output_txt_len < 2 {
            return Err(PreprocessError::Config {
                setting: "max_output_txt_len",
                message: "must be at least 2 (it counts a BOS, and one answer token is needed for a loss)"
                    .into(),
            });
        }
        let tokenizer_error =
            |path: &PathBuf, e: tokenizers::Error| PreprocessError::TokenizerLoad {
                path: path.clone(),
                message: e.to_string(),
            };
        let mut llm = load_tokenizer(&config.llm_tokenizer)?;
        // Padding and truncation are done here, the same way for every
        // tokenizer file, so any settings the file carries are switched off.
        llm.with_padding(None);
        llm.with_truncation(None)
            .map_err(|e| tokenizer_error(&config.llm_tokenizer, e))?;
        add_if_absent(&mut llm, &config.llm_tokenizer, &config.pad_token)?;
        let mut qformer = load_tokenizer(&config.qformer_tokenizer)?;
        qformer.with_padding(None);
        add_if_absent(
            &mut qformer,
            &config.qformer_tokenizer,
            &config.qformer_pad_token,
        )?;
        qformer
            .with_truncation(Some(TruncationParams {
                direction: match config.qformer_truncation {
                    Side::Left => TruncationDirection::Left,
                    Side::Right => TruncationDirection::Right,
                },
                max_length: config.max_txt_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tokenizer_error(&config.qformer_tokenizer, e))?;
        let llm_path = &config.llm_tokenizer;
        Ok(Tokenizers {
            bos: special_id(&llm, llm_path, "bos_token", &config.bos_token)?,
            eos: special_id(&llm, llm_path, "eos_token", &config.eos_token)?,
            pad: special_id(&llm, llm_path, "pad_token", &config.pad_token)?,
            qformer_pad: special_id(
                &qformer,
                &config.qformer_tokenizer,
                "qformer_pad_token",
                &config.qformer_pad_token,
            )?,
            config: config.clone(),
            llm,
            qformer,
        })
    }

    /// One more than the largest id each tokenizer can produce, LLM and
    /// Q-Former: the embedding rows a model needs for them.
    pub fn id_limits(&self) -> (i64, i64) {
        let limit = |t: &Tokenizer| {
            t.get_vocab(true)
                .values()
                .max()
                .map_or(0, |&id| i64::from(id) + 1)
        };
        (limit(&self.llm), limit(&self.qformer))
    }

    /// `ids` as text, special tokens shown: the LLM's tokenizer, or the
    /// Q-Former's with `qformer`. Ids the tokenizer does not know are left
    /// out.
    pub fn decode(&self, qformer: bool, ids: &[i64]) -> String {
        let tokenizer = if qformer { &self.qformer } else { &self.llm };
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        tokenizer.decode(&ids, false).unwrap_or_default()
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    pub fn qformer_pad_id(&self) -> i64 {
        self.qformer_pad
    }

    /// The prompt generation starts from: `BOS + instruction`, whole. SAM
    /// cuts the instruction to `max_txt_len` in training but not when it
    /// generates.
    pub fn prompt(&self, record: &Record) -> Result<Vec<i64>, PreprocessError> {
        let path = &self.config.llm_tokenizer;
        let instruction = self
            .llm
            .encode(record.instruction.as_str(), false)
            .map_err(|e| self.tokenize_error(record, "instruction", path, e))?;
        Ok(std::iter::once(self.bos)
            .chain(instruction.get_ids().iter().map(|&t| i64::from(t)))
            .collect())
    }

    /// What a training step receives: the prompt with the instruction cut
    /// to its last `max_txt_len - 1` tokens, then the answer and EOS.
    pub fn encode(&self, record: &Record) -> Result<TextSample, PreprocessError> {
        let mut prompt = self.prompt(record)?;
        let cut = (prompt.len() - 1).saturating_sub(self.config.max_txt_len - 1);
        prompt.drain(1..1 + cut);
        let answer = self
            .llm
            .encode(record.output.as_str(), false)
            .map_err(|e| self.tokenize_error(record, "output", &self.config.llm_tokenizer, e))?;
        let target: Vec<i64> = answer
            .get_ids()
            .iter()
            .map(|&t| i64::from(t))
            .chain(std::iter::once(self.eos))
            .take(self.config.max_output_txt_len - 1)
            .collect();

        let labels = std::iter::repeat_n(-100, prompt.len())
            .chain(target.iter().copied())
            .collect();
        let mut input_ids = prompt;
        input_ids.extend(target);
        Ok(TextSample {
            qformer_input_ids: self.qformer_ids(record)?,
            input_ids,
            labels,
        })
    }

    /// What generation receives: the whole prompt, no answer, and the
    /// Q-Former's instruction as in training.
    pub fn encode_prompt(&self, record: &Record) -> Result<TextSample, PreprocessError> {
        let input_ids = self.prompt(record)?;
        Ok(TextSample {
            qformer_input_ids: self.qformer_ids(record)?,
            labels: vec![-100; input_ids.len()],
            input_ids,
        })
    }

    /// The Q-Former's instruction, with its tokenizer's special tokens and
    /// truncation.
    fn qformer_ids(&self, record: &Record) -> Result<Vec<i64>, PreprocessError> {
        let path = &self.config.qformer_tokenizer;
        let qformer = self
            .qformer
            .encode(record.instruction.as_str(), true)
            .map_err(|e| self.tokenize_error(record, "instruction", path, e))?;
        Ok(qformer.get_ids().iter().map(|&t| i64::from(t)).collect())
    }

    fn tokenize_error(
        &self,
        record: &Record,
        field: &'static str,
        path: &Path,
        e: tokenizers::Error,
    ) -> PreprocessError {
        PreprocessError::Tokenize {
            record: record.id.clone(),
            field,
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}
