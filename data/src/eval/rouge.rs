//! ROUGE-L F as the PyPI `rouge` package (1.0.1) computes it:
//! `Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]`, its summary-level
//! ROUGE-L with the default `exclusive=True`.
//!
//! That package differs from the ROUGE papers in ways that change the
//! numbers, and all of them are kept:
//! - a text is split into sentences on every `.` (so `"3.5"` is two), empty
//!   pieces dropped, and each sentence's whitespace collapsed to single
//!   spaces; words are then split on `" "`, so a whitespace-only sentence
//!   contributes one empty word;
//! - word counts `m` and `n` count *distinct* words;
//! - the LCS of a reference sentence and a hypothesis sentence is rebuilt by
//!   one fixed backtrack, and the score counts the distinct words of the
//!   union of those LCSs over all sentence pairs;
//! - `F = 2 P R / (P + R + 1e-8)`.

use std::collections::HashSet;

use thiserror::Error;

/// The `rouge` package raises `ValueError` when a text has no sentence
/// (only periods); SAM's script would stop there.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RougeError {
    #[error("has no sentence left after splitting on periods (the `rouge` package rejects it)")]
    EmptyHypothesis,
    #[error("has no sentence left after splitting on periods (the `rouge` package rejects it)")]
    EmptyReference,
}

/// ROUGE-L F of one hypothesis against one reference.
pub fn rouge_l_f(hypothesis: &str, reference: &str) -> Result<f64, RougeError> {
    let hypothesis = sentences(hypothesis);
    let reference = sentences(reference);
    // The package scores ROUGE-1 first, which checks the hypothesis first.
    if hypothesis.is_empty() {
        return Err(RougeError::EmptyHypothesis);
    }
    if reference.is_empty() {
        return Err(RougeError::EmptyReference);
    }
    let hyp_words: Vec<Vec<&str>> = hypothesis.iter().map(|s| s.split(' ').collect()).collect();
    let ref_words: Vec<Vec<&str>> = reference.iter().map(|s| s.split(' ').collect()).collect();
    let distinct = |words: &[Vec<&str>]| words.iter().flatten().collect::<HashSet<_>>().len();
    let m = distinct(&ref_words) as f64;
    let n = distinct(&hyp_words) as f64;

    let mut union = HashSet::new();
    for r in &ref_words {
        for h in &hyp_words {
            union.extend(lcs_words(r, h));
        }
    }
    let overlap = union.len() as f64;
    let recall = overlap / m;
    let precision = overlap / n;
    Ok(2.0 * ((precision * recall) / (precision + recall + 1e-8)))
}

/// The package's sentence split: on `.`, empty pieces dropped, whitespace
/// runs collapsed to one space.
fn sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            super::normalize::split_words(piece)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The words of one longest common subsequence of `x` (reference) and `y`
/// (hypothesis), chosen by the package's backtrack (`_recon_lcs`): on a
/// mismatch it moves up only when that keeps a strictly longer LCS.
///
/// The lengths are kept for two rows only (O(|y|) words); the backtrack
/// needs, per cell, only whether moving up keeps a strictly longer LCS,
/// which is one bit (|x|·|y| bits, 1/64 of the full table). A
/// divide-and-conquer LCS (Hirschberg) would use O(|y|) alone, but it finds
/// some LCS, not the package's, and the score counts the chosen words.
fn lcs_words<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
    let (n, m) = (x.len(), y.len());
    let mut up = UpBits::new(n, m);
    let mut previous = vec![0usize; m + 1];
    let mut current = vec![0usize; m + 1];
    for i in 1..=n {
        for j in 1..=m {
            current[j] = if x[i - 1] == y[j - 1] {
                previous[j - 1] + 1
            } else {
                previous[j].max(current[j - 1])
            };
            if previous[j] > current[j - 1] {
                up.set(i, j);
            }
        }
        std::mem::swap(&mut previous, &mut current);
    }
    let (mut i, mut j) = (n, m);
    let mut words = Vec::new();
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            words.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if up.get(i, j) {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    words
}

/// One bit per cell (i, j), 1-based: "the LCS of x[..i-1], y[..j] is
/// longer than that of x[..i], y[..j-1]".
struct UpBits {
    width: usize,
    bits: Vec<u64>,
}

impl UpBits {
    fn new(n: usize, m: usize) -> UpBits {
        UpBits {
            width: m,
            bits: vec![0; (n * m).div_ceil(64)],
        }
    }

    fn index(&self, i: usize, j: usize) -> usize {
        (i - 1) * self.width + (j - 1)
    }

    fn set(&mut self, i: usize, j: usize) {
        let k = self.index(i, j);
        self.bits[k / 64] |= 1 << (k % 64);
    }

    fn get(&self, i: usize, j: usize) -> bool {
        let k = self.index(i, j);
        self.bits[k / 64] & (1 << (k % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from the `rouge` package 1.0.1, to the last bit.
    #[test]
    fn known_scores() {
        let cases = [
            (
                "the cat sat on the mat",
                "the cat is on the mat",
                0.7999999950000002,
            ),
            ("a b c d", "a b c d", 0.999999995),
            ("the the the", "the cat", 0.6666666622222223),
            ("3.5 is more than 2", "it is 3", 0.44444444000000005),
            ("x y", "z", 0.0),
            ("a b . . c", "a c", 0.6666666622222223),
        ];
        for (hyp, reference, want) in cases {
            let got = rouge_l_f(hyp, reference).unwrap();
            assert_eq!(got, want, "rouge_l_f({hyp:?}, {reference:?})");
        }
    }

    /// The package's `_recon_lcs` over its whole table, as it is written.
    fn lcs_words_full_table<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
        let (n, m) = (x.len(), y.len());
        let mut t = vec![vec![0usize; m + 1]; n + 1];
        for i in 1..=n {
            for j in 1..=m {
                t[i][j] = if x[i - 1] == y[j - 1] {
                    t[i - 1][j - 1] + 1
                } else {
                    t[i - 1][j].max(t[i][j - 1])
                };
            }
        }
        let (mut i, mut j, mut words) = (n, m, Vec::new());
        while i > 0 && j > 0 {
            if x[i - 1] == y[j - 1] {
                words.push(x[i - 1]);
                (i, j) = (i - 1, j - 1);
            } else if t[i - 1][j] > t[i][j - 1] {
                i -= 1;
            } else {
                j -= 1;
            }
        }
        words
    }

    #[test]
    fn bit_table_backtracks_as_the_full_table() {
        let vocabulary = ["a", "b", "c", "d"];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut words = |len: usize| -> Vec<&str> {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    vocabulary[(state >> 60) as usize % vocabulary.len()]
                })
                .collect()
        };
        for case in 0..500 {
            let (x, y) = (words(case % 23), words(case % 17 + 1));
            assert_eq!(
                lcs_words(&x, &y),
                lcs_words_full_table(&x, &y),
                "{x:?} {y:?}"
            );
        }
    }

    #[test]
    fn only_periods_is_an_error() {
        assert_eq!(rouge_l_f(".", "a"), Err(RougeError::EmptyHypothesis));
        assert_eq!(rouge_l_f("a", ".."), Err(RougeError::EmptyReference));
    }
}
