//! Model sizes, read from a Hugging Face InstructBLIP `config.json`.
//!
//! The field names and defaults are those of transformers' `InstructBlipConfig`
//! (vision, Q-Former and a LLaMA-family text config), so a checkpoint from the
//! hub loads as it is. samtrain's own options live under a `samtrain` key that
//! transformers ignores.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The vision encoder (EVA-CLIP ViT in InstructBLIP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub hidden_act: String,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            hidden_act: "gelu".into(),
        }
    }
}

impl VisionConfig {
    /// Patch tokens plus the class token.
    pub fn num_positions(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// The Q-Former (a BERT with cross-attention to the image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: i64,
    pub encoder_hidden_size: i64,
    pub hidden_act: String,
    pub pad_token_id: Option<i64>,
    /// BERT's dropout on the embeddings and on each block's output, while
    /// training (SAM trains with the Q-Former in training mode).
    pub hidden_dropout_prob: f64,
    /// BERT's dropout on the attention probabilities, while training.
    pub attention_probs_dropout_prob: f64,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            hidden_act: "gelu".into(),
            pad_token_id: Some(0),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }
}

/// Rotary embedding parameters as transformers 5 writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: f64,
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_rope_type() -> String {
    "default".into()
}

/// The LLaMA-family decoder (Vicuna in InstructBLIP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    /// transformers 4.x kept the base here; 5.x moved it into `rope_parameters`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<i64>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 2048,
            rope_theta: None,
            rope_parameters: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            pad_token_id: None,
        }
    }
}

impl TextConfig {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Every end-of-sequence id (the field may be a number or a list).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
            _ => Vec::new(),
        }
    }
}

/// samtrain's own model options (absent in a plain InstructBLIP checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamOptions {
    /// Run SAM's bidirectional semantic guidance (the W-former pass). Off, the
    /// model is InstructBLIP applied to each image.
    pub guidance: bool,
    /// Seed for the tensors a checkpoint does not carry (SAM's extras, LoRA).
    pub init_seed: i64,
    /// Which parameters train; everything else is frozen and has no gradient.
    pub trainable: Trainable,
    /// LoRA adapters on the decoder, when set.
    pub lora: Option<LoraConfig>,
    /// Read only to refuse it: configs written before SEA's loss was
    /// removed carry `0.0`, which loads; a positive weight asks for a loss
    /// samtrain does not have (see [`SamConfig::validate`]).
    #[serde(skip_serializing)]
    pub sea_weight: Option<f64>,
}

impl Default for SamOptions {
    fn default() -> Self {
        Self {
            guidance: true,
            init_seed: 0,
            trainable: Trainable::default(),
            lora: None,
            sea_weight: None,
        }
    }
}

/// The trainable-parameter policy. SAM's default trains only the guidance
/// (the adaptive-adjustment and the two exchange Linears, about 1.18 M
/// parameters at full size); LoRA adapters train whenever they exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Trainable {
    /// The Q-Former and the query tokens.
    pub qformer: bool,
    /// The Linear from the Q-Former to the LLM's width.
    pub projection: bool,
    /// Every parameter: a small model trained from scratch.
    pub all: bool,
}

/// LoRA on the decoder's Linears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    /// Names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Vec<String>,
}

/// The whole model's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default = "default_query_tokens")]
    pub num_query_tokens: i64,
    #[serde(default)]
    pub image_token_index: Option<i64>,
    #[serde(default)]
    pub samtrain: SamOptions,
}

fn default_query_tokens() -> i64 {
    32
}

impl SamConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: SamConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Config {
                path: path.to_path_buf(),
                message: source.to_string(),
            })?;
        config.validate().map_err(|message| ModelError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks the sizes fit together; the message names every offending field.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let q = &self.qformer_config;
        let t = &self.text_config;
        let lora_ok = self.samtrain.lora.as_ref().is_none_or(|l| {
            l.rank > 0
                && l.target_modules.iter().all(|m| {
                    [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                    .contains(&m.as_str())
                })
        });
        let checks: [(bool, String); 13] = [
            (
                lora_ok,
                format!(
                    "samtrain.lora {:?}: rank must be positive and target_modules among \
                     q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                    self.samtrain.lora
                ),
            ),
            (
                self.samtrain.sea_weight.unwrap_or(0.0) == 0.0,
                "samtrain.sea_weight: SEA's alignment loss is not part of samtrain: it labels \
                 each visual token with the word of its image patch, and SAM's visual tokens \
                 are Q-Former queries, which have no patch; remove the setting"
                    .into(),
            ),
            (
                v.hidden_size % v.num_attention_heads == 0,
                format!(
                    "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                    v.hidden_size, v.num_attention_heads
                ),
            ),
            (
                v.image_size % v.patch_size == 0,
                format!(
                    "vision_config.image_size {} is not a multiple of patch_size {}",
                    v.image_size, v.patch_size
                ),
            ),
            (
                q.hidden_size % q.num_attention_heads == 0,
                format!(
                    "qformer_config.hidden_size {} is not a multiple of num_attention_heads {}",
                    q.hidden_size, q.num_attention_heads
                ),
            ),
            (
                q.encoder_hidden_size == v.hidden_size,
                format!(
                    "qformer_config.encoder_hidden_size {} differs from vision_config.hidden_size {}",
                    q.encoder_hidden_size, v.hidden_size
                ),
            ),
            (
                q.cross_attention_frequency > 0,
                "qformer_config.cross_attention_frequency must be positive".into(),
            ),
            (
                q.num_hidden_layers > 0,
                "qformer_config.num_hidden_layers must be positive".into(),
            ),
            (
                (0.0..1.0).contains(&q.hidden_dropout_prob),
                format!(
                    "qformer_config.hidden_dropout_prob {} is not in [0, 1)",
                    q.hidden_dropout_prob
                ),
            ),
            (
                (0.0..1.0).contains(&q.attention_probs_dropout_prob),
                format!(
                    "qformer_config.attention_probs_dropout_prob {} is not in [0, 1)",
                    q.attention_probs_dropout_prob
                ),
            ),
            (
                t.num_attention_heads % t.kv_heads() == 0,
                format!(
                    "text_config.num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    t.num_attention_heads,
                    t.kv_heads()
                ),
            ),
            (
                t.head_dim() % 2 == 0,
                format!("text_config head_dim {} must be even for rotary embeddings", t.head_dim()),
            ),
            (
                ["silu"].contains(&t.hidden_act.as_str())
                    && ["gelu"].contains(&v.hidden_act.as_str())
                    && ["gelu"].contains(&q.hidden_act.as_str()),
                format!(
                    "unsupported activation (vision {:?}, qformer {:?}, text {:?}): expected gelu, gelu, silu",
                    v.hidden_act, q.hidden_act, t.hidden_act
                ),
            ),
        ];
        let problems: Vec<String> = checks
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, message)| message)
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}
