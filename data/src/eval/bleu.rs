//! BLEU-4 as pycocoevalcap 1.2's `Bleu(4)` computes it, with one reference
//! per sample, as SAM scores: the corpus score pools clipped n-gram matches
//! and lengths over all samples; the per-sample scores are its
//! `bleu_list[3]`. Words come from Python's whitespace split of the
//! normalised strings.
//!
//! pycocoevalcap's details, all kept: precisions are
//! `(correct + 1e-15) / (guess + 1e-9)`, so an order with no n-gram to guess
//! gives 1e-6 instead of failing; the brevity penalty `exp(1 - 1/ratio)`
//! applies when `ratio = (testlen + 1e-15) / (reflen + 1e-9)` is below 1; the
//! reference length is the "closest" one, which with one reference is its
//! length.

use std::collections::HashMap;

use super::normalize::split_words;

/// Longest n-gram.
const N: usize = 4;
/// Added to the guessed n-gram counts ("small" in pycocoevalcap).
const SMALL: f64 = 1e-9;
/// Added to the matched n-gram counts ("tiny" in pycocoevalcap).
const TINY: f64 = 1e-15;

/// BLEU-4 of a set of samples: pycocoevalcap's `score[3]` and `scores[3]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScores {
    pub corpus: f64,
    pub per_sample: Vec<f64>,
}

/// What BLEU keeps of one sample (`cook_test`).
#[derive(Default)]
struct Counts {
    test_len: usize,
    ref_len: usize,
    guess: [usize; N],
    correct: [usize; N],
}

/// Scores `hypotheses[i]` against `references[i]`; both hold normalised
/// strings and have the same length.
pub fn bleu4(hypotheses: &[&str], references: &[&str]) -> BleuScores {
    assert_eq!(
        hypotheses.len(),
        references.len(),
        "one reference per hypothesis"
    );
    let mut total = Counts::default();
    let mut per_sample = Vec::with_capacity(hypotheses.len());
    for (hyp, reference) in hypotheses.iter().zip(references) {
        let counts = count(hyp, reference);
        per_sample.push(score(&counts));
        total.test_len += counts.test_len;
        total.ref_len += counts.ref_len;
        for k in 0..N {
            total.guess[k] += counts.guess[k];
            total.correct[k] += counts.correct[k];
        }
    }
    BleuScores {
        corpus: score(&total),
        per_sample,
    }
}

/// Lengths, guessed n-grams and matched n-grams (clipped at the
/// reference's count) of one hypothesis.
fn count(hypothesis: &str, reference: &str) -> Counts {
    let hyp: Vec<&str> = split_words(hypothesis).collect();
    let reference: Vec<&str> = split_words(reference).collect();
    let ref_counts = ngram_counts(&reference);
    let mut counts = Counts {
        test_len: hyp.len(),
        ref_len: reference.len(),
        ..Counts::default()
    };
    for (gram, n) in ngram_counts(&hyp) {
        let k = gram.len() - 1;
        counts.correct[k] += n.min(ref_counts.get(gram).copied().unwrap_or(0));
    }
    for k in 0..N {
        counts.guess[k] = hyp.len().saturating_sub(k);
    }
    counts
}

fn ngram_counts<'a>(words: &'a [&'a str]) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for k in 1..=N {
        for gram in words.windows(k) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// BLEU-4 from counts, in pycocoevalcap's order of operations: the running
/// product of the four precisions, its fourth root, the brevity penalty.
fn score(counts: &Counts) -> f64 {
    let mut product = 1.0;
    for k in 0..N {
        product *= (counts.correct[k] as f64 + TINY) / (counts.guess[k] as f64 + SMALL);
    }
    let mut bleu = product.powf(1.0 / N as f64);
    let ratio = (counts.test_len as f64 + TINY) / (counts.ref_len as f64 + SMALL);
    if ratio < 1.0 {
        bleu *= (1.0 - 1.0 / ratio).exp();
    }
    bleu
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from pycocoevalcap 1.2's Bleu(4) on the same strings,
    // to the last bit.
    #[test]
    fn known_scores() {
        let hyps = ["a cat sits on a mat", "a dog runs", "", "two birds fly"];
        let refs = [
            "the cat sits on the mat",
            "a dog runs fast",
            "a red car",
            "two birds fly",
        ];
        let got = bleu4(&hyps, &refs);
        let want = BleuScores {
            corpus: 7.028768404774073e-05,
            per_sample: vec![
                6.865890476915431e-05,
                0.022658709544448513,
                0.0,
                // No 4-gram to guess: the fourth precision is 1e-6.
                0.03162277657664911,
            ],
        };
        assert_eq!(got, want);
    }
}
