//! Random tensors that are a pure function of a seed, not of libtorch's
//! generator.
//!
//! libtorch's default generator is one per process. Threads that seed it and
//! draw from it (the ranks of an in-process group, the tests of one binary)
//! interleave, so what each thread gets depends on scheduling, and a rank
//! cannot reproduce its draws after a restart without replaying everyone's.
//! samtrain's random tensors are instead computed from a seed and each
//! element's index by a counter-based hash, with integer tensor operations on
//! the tensor's own device: the same seed gives the same numbers on any
//! thread, rank, device or restart, and nothing is shared.
//!
//! The hash is two rounds of Chris Wellons' `lowbias32` integer mixer, keyed
//! by two words derived from the seed. Products are kept below 2^63 (see
//! [`mul32`]) so that no step relies on signed overflow.

use tch::{Device, Kind, Tensor};

/// SplitMix64's step: spreads a seed over 64 bits. Used on the host to
/// derive keys and sub-seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A sub-seed of `seed` for one purpose, named by `parts` (a variable's
/// name, a layer index, a sample's position): independent streams that do
/// not depend on the order they are asked for.
pub fn derive(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed), |s, &p| mix64(s ^ mix64(p)))
}

/// [`derive`] with a name: FNV-1a of the bytes, then mixed in.
pub fn derive_named(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    });
    derive(seed, &[fnv])
}

/// Elements hashed per pass: bounds the int64 temporaries (8 bytes each,
/// a few alive at once) when a large tensor is filled.
const CHUNK: i64 = 1 << 24;

/// `(x * c) mod 2^32` for `0 <= x < 2^32`, without int64 overflow: `x` is
/// split in 16-bit halves, so no product exceeds 2^48.
fn mul32(x: &Tensor, c: u32) -> Tensor {
    let c = c as i64;
    let lo = x.bitwise_and(0xFFFF) * c;
    let hi = (x.bitwise_right_shift_tensor_scalar(16) * c)
        .bitwise_and(0xFFFF)
        .bitwise_left_shift_tensor_scalar(16);
    (lo + hi).bitwise_and(0xFFFF_FFFFi64)
}

/// Wellons' `lowbias32` on int64 tensors holding 32-bit values.
fn lowbias32(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = mul32(&x, 0x7FEB_352D);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = mul32(&x, 0x846C_A68B);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// The two 32-bit keys of `seed`.
fn keys(seed: u64) -> (i64, i64) {
    let key = mix64(seed);
    ((key & 0xFFFF_FFFF) as i64, (key >> 32) as i64)
}

/// 32-bit hashes, as int64, of `index` (values below 2^32) under `seed`.
fn hash(seed: u64, index: &Tensor) -> Tensor {
    let (k0, k1) = keys(seed);
    lowbias32(&lowbias32(&index.bitwise_xor(k0)).bitwise_xor(k1))
}

/// `n` 32-bit hashes of the indices `0..n` under `seed`, as int64.
fn bits(seed: u64, n: i64, device: Device) -> Tensor {
    let chunks: Vec<Tensor> = (0..((n + CHUNK - 1) / CHUNK).max(1))
        .map(|c| {
            let len = CHUNK.min(n - c * CHUNK);
            // Each chunk has its own keys, so indices only need 32 bits.
            let idx = Tensor::arange(len, (Kind::Int64, device));
            hash(derive(seed, &[c as u64]), &idx)
        })
        .collect();
    if chunks.len() == 1 {
        chunks.into_iter().next().expect("one chunk")
    } else {
        Tensor::cat(&chunks, 0)
    }
}

/// 24 of a hash's bits as a float in `[0, 1)`.
fn to_unit(bits: Tensor) -> Tensor {
    bits.bitwise_right_shift_tensor_scalar(8)
        .to_kind(Kind::Float)
        * (1.0 / (1u64 << 24) as f64)
}

/// Uniform fp32 numbers `[R, dims...]` where element `[r, i, j, ...]` is a
/// function of the seed, `rows[r]` (int64 keys; their low 32 bits count)
/// and its coordinates `(i, j, ...)` alone, not of the sizes: a sample
/// keyed by its identity draws the same numbers whatever its batch, rank,
/// position or padding.
pub fn uniform_rows(seed: u64, rows: &Tensor, dims: &[i64]) -> Tensor {
    let rank = dims.len();
    let mut shape = vec![-1i64; rank + 1];
    shape[1..].fill(1);
    let mut keys = rows.view(shape.as_slice());
    for (axis, &len) in dims.iter().enumerate() {
        let mut along = vec![1i64; rank + 1];
        along[axis + 1] = len;
        let coords = Tensor::arange(len, (Kind::Int64, rows.device())).view(along.as_slice());
        keys = combine(&keys, &coords);
    }
    to_unit(hash(seed, &keys))
}

/// New row keys from `keys` and `parts` (int64 below 2^32, broadcast
/// against `keys`): the keys of a sample's images, say, from the sample's
/// and the images' positions.
pub fn combine(keys: &Tensor, parts: &Tensor) -> Tensor {
    (lowbias32(&keys.bitwise_and(0xFFFF_FFFFi64)) + parts).bitwise_and(0xFFFF_FFFFi64)
}

/// Uniform fp32 numbers in `[0, 1)` (24 bits each) of shape `dims`.
pub fn uniform(seed: u64, dims: &[i64], device: Device) -> Tensor {
    let n = dims.iter().product::<i64>();
    to_unit(bits(seed, n, device)).view(dims)
}

/// Standard normal fp32 numbers of shape `dims` (Box-Muller on two
/// independent uniform streams; tails end near 5.8 standard deviations).
pub fn normal(seed: u64, dims: &[i64], device: Device) -> Tensor {
    // 1 - u lies in (0, 1]: the logarithm stays finite.
    let u1 = uniform(derive(seed, &[1]), dims, device).neg() + 1.0;
    let u2 = uniform(derive(seed, &[2]), dims, device);
    (u1.log() * -2.0).sqrt() * (u2 * std::f64::consts::TAU).cos()
}

/// Integers uniform in `lo..hi`, int64, of shape `dims`.
pub fn integers(seed: u64, lo: i64, hi: i64, dims: &[i64], device: Device) -> Tensor {
    assert!(lo < hi, "empty range {lo}..{hi}");
    let span = (hi - lo) as f64;
    (uniform(seed, dims, device) * span)
        .floor()
        .to_kind(Kind::Int64)
        .clamp(0, hi - lo - 1)
        + lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_numbers_and_another_seed_others() {
        let a = normal(7, &[3, 5], Device::Cpu);
        assert_eq!(a.size(), [3, 5]);
        assert!(a.equal(&normal(7, &[3, 5], Device::Cpu)));
        assert!(!a.equal(&normal(8, &[3, 5], Device::Cpu)));
        // A prefix of a longer stream: element i depends on i alone.
        let long = uniform(7, &[20], Device::Cpu);
        assert!(long.narrow(0, 0, 15).equal(&uniform(7, &[15], Device::Cpu)));
    }

    #[test]
    fn moments_and_ranges_are_those_of_the_distributions() {
        let u = uniform(1, &[200_000], Device::Cpu);
        let (lo, hi) = (u.min().double_value(&[]), u.max().double_value(&[]));
        assert!((0.0..1e-4).contains(&lo) && (1.0 - 1e-4..1.0).contains(&hi));
        assert!((u.mean(Kind::Double).double_value(&[]) - 0.5).abs() < 5e-3);
        let z = normal(2, &[200_000], Device::Cpu);
        assert!(z.mean(Kind::Double).double_value(&[]).abs() < 1e-2);
        assert!((z.std(true).double_value(&[]) - 1.0).abs() < 1e-2);
        let k = integers(3, 2, 7, &[10_000], Device::Cpu);
        assert_eq!(k.min().int64_value(&[]), 2);
        assert_eq!(k.max().int64_value(&[]), 6);
        // Neighbouring elements are uncorrelated.
        let (x, y) = (u.narrow(0, 0, 199_999), u.narrow(0, 1, 199_999));
        let c = ((&x - 0.5) * (&y - 0.5))
            .mean(Kind::Double)
            .double_value(&[])
            * 12.0;
        assert!(c.abs() < 1e-2, "lag-1 correlation {c}");
    }

    #[test]
    fn products_stay_exact_where_int64_would_overflow() {
        // The largest 32-bit value times the mixer's constants, against u64.
        let xs = [0u64, 1, 0xFFFF, 0x1_0000, 0xDEAD_BEEF, 0xFFFF_FFFF];
        let t = Tensor::from_slice(&xs.map(|x| x as i64));
        for c in [0x7FEB_352Du32, 0x846C_A68B] {
            let got = Vec::<i64>::try_from(mul32(&t, c)).unwrap();
            let want = xs.map(|x| ((x * c as u64) & 0xFFFF_FFFF) as i64);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn rows_draw_by_their_key_not_their_position() {
        let keys = Tensor::from_slice(&[5i64, 9, 5]);
        let u = uniform_rows(3, &keys, &[2, 4]);
        assert_eq!(u.size(), [3, 2, 4]);
        assert!(u.get(0).equal(&u.get(2)));
        assert!(!u.get(0).equal(&u.get(1)));
        let alone = uniform_rows(3, &Tensor::from_slice(&[9i64]), &[2, 4]);
        assert!(alone.get(0).equal(&u.get(1)));
        let images = combine(&keys, &Tensor::from(1i64));
        assert!(!uniform_rows(3, &images, &[8])
            .get(0)
            .equal(&u.get(0).view([8])));
    }

    #[test]
    fn an_element_draws_by_its_coordinates_not_the_padding() {
        let keys = Tensor::from_slice(&[4i64, 6]);
        let short = uniform_rows(1, &keys, &[2, 3, 5]);
        let padded = uniform_rows(1, &keys, &[2, 7, 6]);
        assert!(short.equal(&padded.narrow(2, 0, 3).narrow(3, 0, 5)));
    }

    #[test]
    fn large_tensors_span_chunks() {
        let n = CHUNK + 10;
        let u = uniform(5, &[n], Device::Cpu);
        assert_eq!(u.size(), [n]);
        // The second chunk's keys differ from the first's.
        assert!(!u.narrow(0, CHUNK, 10).equal(&u.narrow(0, 0, 10)));
    }
}
