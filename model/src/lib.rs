//! The SAM network on libtorch (tch): InstructBLIP's vision encoder,
//! Q-Former and LLaMA decoder, SAM's bidirectional semantic guidance,
//! tensor parallelism of the decoder, Hugging Face weight I/O, the
//! trainable-parameter policy and generation.
//!
//! One file per part, tensor names equal to the checkpoint's:
//! - [`vision`], [`qformer`], [`llama`]: the three networks;
//! - [`sam`]: the whole model, guidance and the LM loss;
//! - [`parallel`]: the `Collective` interface and Megatron's operators;
//! - [`tape`]: the backward pass in segments, for tensor parallelism and
//!   activation checkpointing;
//! - [`plan`]: the memory a configuration needs per rank, before loading;
//! - [`rng`]: random tensors that are a function of a seed, not of
//!   libtorch's process-wide generator (initialisation, dropout);
//! - [`weights`], [`tensor_file`], [`trainable`], [`generation`]: loading
//!   (tensor by tensor) and saving, which parameters train, greedy and beam
//!   search.

pub mod config;
pub mod error;
pub mod generation;
pub mod llama;
pub mod nn;
pub mod parallel;
pub mod plan;
pub mod qformer;
pub mod rng;
pub mod sam;
pub mod tape;
pub mod tensor_file;
pub mod trainable;
pub mod vision;
pub mod vision_cache;
pub mod weights;

pub use config::SamConfig;
pub use error::{ModelError, Result};
pub use sam::{DropoutKeys, SamInputs, SamModel};

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::parallel::TensorParallel;

/// The dtype frozen weights are held in when a job names none: bf16 on CUDA
/// (half of fp32's memory, and what tensor cores run), fp32 on the CPU, where
/// bf16 matrix products are slow and parity with transformers is exact.
pub fn default_dtype(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// A model with its variables: what a caller usually wants.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: SamModel,
}

impl LoadedModel {
    /// [`LoadedModel::load_as`] in the device's [`default_dtype`].
    pub fn load(dir: &Path, device: Device, tp: Option<TensorParallel>) -> Result<Self> {
        Self::load_as(dir, device, tp, default_dtype(device))
    }

    /// Reads `dir/config.json`, builds the model on `device` with its frozen
    /// weights in `dtype` (fp32, bf16 or fp16) and loads its weights tensor by
    /// tensor, then applies the trainable-parameter policy.
    pub fn load_as(
        dir: &Path,
        device: Device,
        tp: Option<TensorParallel>,
        dtype: Kind,
    ) -> Result<Self> {
        let config = SamConfig::from_file(&dir.join(weights::CONFIG_FILE))?;
        let shard = tp.as_ref().map(|t| (t.rank(), t.world_size()));
        let provided = weights::checkpoint_names(dir)?;
        let loaded = nn::skipping_init(provided, || Self::init_as(&config, device, tp, dtype))?;
        weights::load(&loaded.vs, dir, shard)?;
        Ok(loaded)
    }

    /// [`LoadedModel::init_as`] in the device's [`default_dtype`].
    pub fn init(config: &SamConfig, device: Device, tp: Option<TensorParallel>) -> Result<Self> {
        Self::init_as(config, device, tp, default_dtype(device))
    }

    /// A freshly initialised model (seeded by `config.samtrain.init_seed`)
    /// whose frozen weights are in `dtype` and whose trainable ones are fp32
    /// master copies: the optimizer, gradients and checkpoints stay fp32.
    pub fn init_as(
        config: &SamConfig,
        device: Device,
        tp: Option<TensorParallel>,
        dtype: Kind,
    ) -> Result<Self> {
        if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(ModelError::Input {
                name: "dtype".into(),
                message: format!("{dtype:?} is not one of fp32, bf16, fp16"),
            });
        }
        let mut vs = VarStore::new(device);
        // With no variables yet this only sets the dtype new ones take.
        vs.set_kind(dtype);
        let model = nn::seeded_init(config.samtrain.init_seed as u64, || {
            SamModel::new(&vs.root(), config, tp)
        })?;
        for (_, mut t) in trainable::apply(&vs, &config.samtrain) {
            if t.kind() != Kind::Float {
                tch::no_grad(|| t.set_data(&t.to_kind(Kind::Float)));
            }
        }
        Ok(Self { vs, model })
    }
}
