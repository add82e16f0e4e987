//! The trainable-parameter policy: which tensors get gradients.
//!
//! Everything the policy leaves out is frozen with `requires_grad = false`,
//! so libtorch allocates no gradient buffers for it.

use tch::nn::VarStore;
use tch::Tensor;

use crate::config::SamOptions;

/// Whether the tensor `name` trains under `options`.
pub fn is_trainable(name: &str, options: &SamOptions) -> bool {
    let t = &options.trainable;
    t.all
        || name.starts_with("sam.")
        || name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || (t.qformer && (name.starts_with("qformer.") || name == "query_tokens"))
        || (t.projection && name.starts_with("language_projection."))
}

/// Freezes and unfreezes the variables of `vs`; returns the trainable ones,
/// sorted by name.
pub fn apply(vs: &VarStore, options: &SamOptions) -> Vec<(String, Tensor)> {
    let mut trainable: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| {
            let on = is_trainable(&name, options);
            let t = t.set_requires_grad(on);
            on.then_some((name, t))
        })
        .collect();
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    trainable
}

/// Total number of elements.
pub fn count(params: &[(String, Tensor)]) -> i64 {
    params.iter().map(|(_, t)| t.numel() as i64).sum()
}
