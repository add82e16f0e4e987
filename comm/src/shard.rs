//! Which tensors tensor parallelism splits, and along which dimension, by
//! their checkpoint names (Megatron-LM's layout for the LLaMA decoder). The
//! model shards its layers, and the checkpoint crate its tensors, by this
//! one rule.

/// Which dimension of a checkpoint tensor is split across tensor-parallel
/// ranks, by its name; `None` means every rank holds all of it.
pub fn shard_dim(name: &str) -> Option<i64> {
    if !name.starts_with("language_model.model.layers.") {
        return None;
    }
    const COLUMN: [&str; 5] = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
    const ROW: [&str; 2] = ["o_proj", "down_proj"];
    let mut parts = name.rsplit('.');
    let leaf = parts.next()?;
    let second = parts.next()?;
    let (module, tensor) = if second == "lora_A" || second == "lora_B" {
        (parts.next()?, second)
    } else {
        (second, leaf)
    };
    let column = COLUMN.contains(&module);
    let row = ROW.contains(&module);
    match tensor {
        "weight" if column => Some(0),
        "weight" if row => Some(1),
        "bias" if column => Some(0),
        // LoRA on a column-parallel layer: A replicated (its gradient reduced
        // by the tape), B split by rows; on a row-parallel layer: A split by
        // columns, B replicated (applied after the all-reduce of A x).
        "lora_B" if column => Some(0),
        "lora_A" if row => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_dims_follow_megatron() {
        let l = "language_model.model.layers.3";
        assert_eq!(shard_dim(&format!("{l}.self_attn.q_proj.weight")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.self_attn.v_proj.bias")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.self_attn.o_proj.weight")), Some(1));
        assert_eq!(shard_dim(&format!("{l}.self_attn.o_proj.bias")), None);
        assert_eq!(shard_dim(&format!("{l}.mlp.up_proj.weight")), Some(0));
        assert_eq!(shard_dim(&format!("{l}.mlp.down_proj.weight")), Some(1));
        assert_eq!(shard_dim(&format!("{l}.mlp.gate_proj.lora_A.weight")), None);
        assert_eq!(
            shard_dim(&format!("{l}.mlp.gate_proj.lora_B.weight")),
            Some(0)
        );
        assert_eq!(
            shard_dim(&format!("{l}.mlp.down_proj.lora_A.weight")),
            Some(1)
        );
        assert_eq!(shard_dim(&format!("{l}.mlp.down_proj.lora_B.weight")), None);
        assert_eq!(shard_dim(&format!("{l}.input_layernorm.weight")), None);
        assert_eq!(shard_dim("language_model.lm_head.weight"), None);
    }
}
