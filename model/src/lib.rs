//! The SAM network on libtorch (tch): InstructBLIP's vision encoder,
//! Q-Former and LLaMA decoder, SAM's bidirectional semantic guidance,
//! tensor parallelism of the decoder, Hugging Face weight I/O, the
//! trainable-parameter policy and generation.
//!
//! One file per part, tensor names equal to the checkpoint's:
//! - [`vision`], [`qformer`], [`llama`]: the three networks;
//! - [`sam`]: the whole model, guidance, the LM and SEA losses;
//! - [`parallel`]: the `Collective` interface and Megatron's operators;
//! - [`weights`], [`trainable`], [`generation`]: loading and saving, which
//!   parameters train, greedy and beam search.

pub mod config;
pub mod error;
pub mod generation;
pub mod llama;
pub mod nn;
pub mod parallel;
pub mod qformer;
pub mod sam;
pub mod trainable;
pub mod vision;
pub mod weights;

pub use config::SamConfig;
pub use error::{ModelError, Result};
pub use sam::{SamInputs, SamModel};

use std::path::Path;

use tch::nn::VarStore;
use tch::Device;

use crate::parallel::TensorParallel;

/// A model with its variables: what a caller usually wants.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: SamModel,
}

impl LoadedModel {
    /// Reads `dir/config.json`, builds the model on `device` and loads its
    /// weights, then applies the trainable-parameter policy.
    pub fn load(dir: &Path, device: Device, tp: Option<TensorParallel>) -> Result<Self> {
        let config = SamConfig::from_file(&dir.join(weights::CONFIG_FILE))?;
        let shard = tp.as_ref().map(|t| (t.rank(), t.world_size()));
        let loaded = Self::init(&config, device, tp)?;
        weights::load(&loaded.vs, dir, shard)?;
        Ok(loaded)
    }

    /// A freshly initialised model (seeded by `config.samtrain.init_seed`).
    pub fn init(config: &SamConfig, device: Device, tp: Option<TensorParallel>) -> Result<Self> {
        tch::manual_seed(config.samtrain.init_seed);
        let vs = VarStore::new(device);
        let model = SamModel::new(&vs.root(), config, tp)?;
        trainable::apply(&vs, &config.samtrain);
        Ok(Self { vs, model })
    }
}
