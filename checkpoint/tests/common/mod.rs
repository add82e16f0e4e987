//! Shared by the checkpoint crate's integration tests: tensors to save and
//! compare (the S3 server and ports come from samtrain-testkit).

#![allow(dead_code)] // Each test binary uses part of this module.

use tch::{Kind, Tensor};

/// The raw bytes of a tensor: equal bytes mean equal bit for bit (NaN
/// payloads and signed zeros included).
pub fn raw(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut v = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    if t.numel() > 0 {
        t.copy_data_u8(&mut v, t.numel());
    }
    v
}

/// Asserts two named tensor lists are equal bit for bit, in the same order.
pub fn assert_same(found: &[(String, Tensor)], expected: &[(String, Tensor)]) {
    let names = |l: &[(String, Tensor)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(found), names(expected));
    for ((name, f), (_, e)) in found.iter().zip(expected) {
        assert_eq!(f.kind(), e.kind(), "{name}");
        assert_eq!(f.size(), e.size(), "{name}");
        assert!(raw(f) == raw(e), "{name} differs");
    }
}

pub fn copy(list: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    list.iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

/// Tensors with their names, in order.
pub type Named = Vec<(String, Tensor)>;

/// Values that depend only on `seed` and `salt`, not on a global RNG that
/// tests running in parallel would share.
pub fn values(shape: &[i64], seed: i64, salt: i64) -> Tensor {
    let n: i64 = shape.iter().product();
    let phase = (seed * 31 + salt) as f64 * 0.618;
    (Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) * 1.37 + phase)
        .sin()
        .reshape(shape)
        .to_kind(Kind::Float)
}

/// Parameters of several dtypes, odd values included, named as in the model
/// (split and replicated ones), and AdamW-like state for each float one.
pub fn model_state(seed: i64) -> (Named, Named) {
    let layer = "language_model.model.layers.0";
    let special = values(&[4, 8], seed, 1);
    let _ = special.get(0).get(0).fill_(f64::NAN);
    let _ = special.get(0).get(1).fill_(-0.0);
    let _ = special.get(0).get(2).fill_(f64::INFINITY);
    let params: Vec<(String, Tensor)> = vec![
        (
            format!("{layer}.self_attn.q_proj.weight"),
            values(&[8, 4], seed, 0),
        ),
        (format!("{layer}.self_attn.o_proj.weight"), special),
        (
            format!("{layer}.mlp.gate_proj.lora_B.weight"),
            values(&[8, 2], seed, 2).to_kind(Kind::BFloat16),
        ),
        (
            format!("{layer}.mlp.down_proj.lora_A.weight"),
            values(&[2, 8], seed, 3).to_kind(Kind::Half),
        ),
        (
            "language_model.model.norm.weight".into(),
            values(&[4], seed, 4).to_kind(Kind::Double),
        ),
        (
            "sam.guidance.scale".into(),
            Tensor::from(1.25f32 + seed as f32),
        ),
        (
            "sam.counter".into(),
            Tensor::from_slice(&[3i64, -7, i64::MAX, seed]),
        ),
    ];
    let mut optimizer = Vec::new();
    for (i, (name, t)) in params.iter().enumerate() {
        if t.is_floating_point() {
            optimizer.push((
                format!("exp_avg.{name}"),
                values(&t.size(), seed, 10 + i as i64),
            ));
            optimizer.push((
                format!("exp_avg_sq.{name}"),
                values(&t.size(), seed, 20 + i as i64).abs(),
            ));
        }
    }
    optimizer.push(("step".into(), Tensor::from(42i64)));
    (params, optimizer)
}

/// Rank `rank`'s share of a full tensor list at tensor-parallel size `size`.
pub fn shard(list: &[(String, Tensor)], rank: i64, size: i64) -> Vec<(String, Tensor)> {
    list.iter()
        .map(|(name, t)| {
            let param = name
                .split_once('.')
                .map(|(_, p)| p)
                .filter(|p| samtrain_comm::shard_dim(p).is_some());
            let dim =
                samtrain_comm::shard_dim(name).or_else(|| param.and_then(samtrain_comm::shard_dim));
            let part = match dim {
                Some(d) => {
                    let len = t.size()[d as usize] / size;
                    t.narrow(d, rank * len, len).contiguous()
                }
                None => t.copy(),
            };
            (name.clone(), part)
        })
        .collect()
}
