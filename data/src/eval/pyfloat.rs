//! The floating-point steps SAM's script takes through numpy and Python,
//! reproduced to the bit: `np.mean` (pairwise summation), numpy's rounding
//! of a float64 and Python's rounding of a float. They differ: numpy rounds
//! `x * 100` to an integer half-to-even, so `round(np.float64(2.675), 2)` is
//! 2.68, while Python rounds the exact binary value, 2.67.

/// `np.mean` of a contiguous float64 array: numpy's pairwise sum, then one
/// division by the count. `values` must not be empty (numpy gives NaN).
pub fn numpy_mean(values: &[f64]) -> f64 {
    pairwise_sum(values) / values.len() as f64
}

/// numpy's `pairwise_sum_DOUBLE`: plain below 8 values, 8 interleaved
/// accumulators up to 128, halves (cut at a multiple of 8) above.
fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |sum, &x| sum + x)
    } else if n <= BLOCK {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        for chunk in a[8..whole].chunks_exact(8) {
            for (acc, &x) in r.iter_mut().zip(chunk) {
                *acc += x;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        a[whole..].iter().fold(head, |sum, &x| sum + x)
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
    }
}

/// `round(x, 2)` for a numpy float64: `rint(x * 100) / 100`.
pub fn numpy_round2(x: f64) -> f64 {
    (x * 100.0).round_ties_even() / 100.0
}

/// `round(x, 2)` for a Python float: the exact binary value rounded to two
/// decimals (ties to even), read back. Rust's fixed-precision formatting is
/// exact with the same tie rule.
pub fn python_round2(x: f64) -> f64 {
    format!("{x:.2}").parse().expect("a formatted float parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_like_numpy_and_python() {
        // (x, round(np.float64(x), 2), round(x, 2)) from numpy 2.4 / Python 3.11.
        let cases = [
            (2.675, 2.68, 2.67),
            (1.005, 1.0, 1.0),
            (0.125, 0.12, 0.12),
            (0.375, 0.38, 0.38),
            (12.125, 12.12, 12.12),
            (33.335, 33.34, 33.34),
        ];
        for (x, numpy, python) in cases {
            assert_eq!(numpy_round2(x), numpy, "numpy round({x}, 2)");
            assert_eq!(python_round2(x), python, "python round({x}, 2)");
        }
    }

    #[test]
    fn mean_sums_pairwise() {
        // Values whose naive left-to-right sum differs from numpy's.
        let values: Vec<f64> = (0..300).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let naive = values.iter().sum::<f64>() / 300.0;
        // np.mean([1 / (i + 1) for i in range(300)]).hex()
        let numpy = f64::from_bits(0x3F95_71E0_1EA2_A26F);
        assert_eq!(numpy_mean(&values), numpy);
        assert_ne!(naive, numpy);
    }
}
