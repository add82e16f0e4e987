//! CIDEr-D as pycocoevalcap 1.2's `Cider` computes it (n = 4, sigma = 6),
//! with one reference per sample, as SAM scores. Words come from Python's
//! whitespace split of the normalised strings (SAM runs no PTB tokenizer).
//!
//! pycocoevalcap's details, all kept because they change the numbers:
//! - document frequencies are counted over the references of the evaluated
//!   set, and an n-gram's idf is `log(N) - log(max(1, df))`, so n-grams that
//!   no reference has still weigh `log(N)` in the hypothesis's norm;
//! - the similarity of each n-gram order clips the hypothesis's weight at the
//!   reference's (`min(h, r) * r`), and is divided by the two norms only
//!   when both are non-zero;
//! - the Gaussian length penalty `e^(-delta^2 / (2 sigma^2))` measures
//!   `delta` in *bigram* counts (its `length` counts n-grams of index 1);
//! - the four orders are averaged with numpy and the result multiplied
//!   by 10; the corpus score is the numpy mean of the per-sample scores.
//!
//! Floating-point operations run in pycocoevalcap's order, and its `pow`
//! calls go to the C library's `pow` as numpy's do, so a sample's score
//! matches to the bit, except where numpy's own `log` (SIMD code on AVX-512
//! machines) differs from the C library's by an ulp, as it does for a few
//! arguments (9170 is the smallest integer).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::f64::consts::E;
use std::hint::black_box;

use super::normalize::split_words;
use super::pyfloat::numpy_mean;

/// Longest n-gram.
const N: usize = 4;
/// Standard deviation of the length penalty, in bigrams.
const SIGMA: f64 = 6.0;

/// CIDEr-D of a set of samples, as `Cider().compute_score` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct CiderScores {
    pub corpus: f64,
    pub per_sample: Vec<f64>,
}

type Ngram<'a> = &'a [&'a str];

/// Scores `hypotheses[i]` against `references[i]`; both hold normalised
/// strings and have the same, non-zero length.
pub fn cider(hypotheses: &[&str], references: &[&str]) -> CiderScores {
    assert_eq!(
        hypotheses.len(),
        references.len(),
        "one reference per hypothesis"
    );
    let hyp_words: Vec<Vec<&str>> = hypotheses
        .iter()
        .map(|s| split_words(s).collect())
        .collect();
    let ref_words: Vec<Vec<&str>> = references
        .iter()
        .map(|s| split_words(s).collect())
        .collect();
    let hyp_counts: Vec<_> = hyp_words.iter().map(|w| ngram_counts(w)).collect();
    let ref_counts: Vec<_> = ref_words.iter().map(|w| ngram_counts(w)).collect();

    // One reference per sample, so an n-gram's document frequency is the
    // number of references that have it.
    let mut doc_freq: HashMap<Ngram, f64> = HashMap::new();
    for counts in &ref_counts {
        for &(gram, _) in counts {
            *doc_freq.entry(gram).or_insert(0.0) += 1.0;
        }
    }
    let log_refs = (references.len() as f64).ln();

    let per_sample: Vec<f64> = hyp_counts
        .iter()
        .zip(&ref_counts)
        .map(|(hyp, reference)| {
            let hyp = tf_idf(hyp, &doc_freq, log_refs);
            let reference = tf_idf(reference, &doc_freq, log_refs);
            // pycocoevalcap divides by the number of references, here 1.
            numpy_mean(&similarity(&hyp, &reference)) * 10.0
        })
        .collect();
    CiderScores {
        corpus: numpy_mean(&per_sample),
        per_sample,
    }
}

/// Counts of the 1- to 4-grams of `words`, in the order in which
/// pycocoevalcap's `precook` first meets them (all unigrams, then all
/// bigrams, ...): later sums run in that order.
fn ngram_counts<'a>(words: &'a [&'a str]) -> Vec<(Ngram<'a>, u32)> {
    let mut position: HashMap<Ngram, usize> = HashMap::new();
    let mut counts: Vec<(Ngram, u32)> = Vec::new();
    for k in 1..=N {
        for gram in words.windows(k) {
            match position.entry(gram) {
                Entry::Occupied(at) => counts[*at.get()].1 += 1,
                Entry::Vacant(at) => {
                    at.insert(counts.len());
                    counts.push((gram, 1));
                }
            }
        }
    }
    counts
}

/// A sentence's tf-idf vector per n-gram order (`counts2vec`).
struct TfIdf<'a> {
    weights: [Vec<(Ngram<'a>, f64)>; N],
    norm: [f64; N],
    bigrams: u32,
}

fn tf_idf<'a>(
    counts: &[(Ngram<'a>, u32)],
    doc_freq: &HashMap<Ngram, f64>,
    log_refs: f64,
) -> TfIdf<'a> {
    let mut weights: [Vec<(Ngram, f64)>; N] = Default::default();
    let mut squares = [0.0; N];
    let mut bigrams = 0;
    for &(gram, tf) in counts {
        let df = doc_freq.get(gram).copied().unwrap_or(0.0);
        let idf = log_refs - df.max(1.0).ln();
        let weight = f64::from(tf) * idf;
        let order = gram.len() - 1;
        weights[order].push((gram, weight));
        // `pow(w, 2)` in pycocoevalcap is the C library's pow, which is not
        // always `w * w` to the last bit; black_box keeps the compiler from
        // turning the call into that multiplication.
        squares[order] += weight.powf(black_box(2.0));
        if order == 1 {
            bigrams += tf;
        }
    }
    TfIdf {
        weights,
        norm: squares.map(f64::sqrt),
        bigrams,
    }
}

/// Clipped cosine similarity per n-gram order with the length penalty (`sim`).
fn similarity(hyp: &TfIdf, reference: &TfIdf) -> [f64; N] {
    let delta = f64::from(hyp.bigrams) - f64::from(reference.bigrams);
    let penalty = E.powf(-(delta * delta) / (2.0 * SIGMA * SIGMA));
    std::array::from_fn(|order| {
        let reference_weight: HashMap<Ngram, f64> =
            reference.weights[order].iter().copied().collect();
        let mut val = 0.0;
        for &(gram, weight) in &hyp.weights[order] {
            let r = reference_weight.get(gram).copied().unwrap_or(0.0);
            val += weight.min(r) * r;
        }
        if hyp.norm[order] != 0.0 && reference.norm[order] != 0.0 {
            val /= hyp.norm[order] * reference.norm[order];
        }
        val * penalty
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from pycocoevalcap 1.2's Cider on the same strings,
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
        let got = cider(&hyps, &refs);
        let want = CiderScores {
            corpus: 4.128511207881614,
            // Identical 3-word texts score 7.5: they have no 4-gram, and
            // the empty order counts as 0 in the mean.
            per_sample: vec![3.20613883008419, 5.807906001442267, 0.0, 7.5],
        };
        assert_eq!(got, want);
    }

    #[test]
    fn counts_in_first_seen_order() {
        let words = ["a", "b", "a", "b"];
        let counts = ngram_counts(&words);
        let grams: Vec<(Vec<&str>, u32)> = counts.iter().map(|(g, c)| (g.to_vec(), *c)).collect();
        assert_eq!(
            grams,
            [
                (vec!["a"], 2),
                (vec!["b"], 2),
                (vec!["a", "b"], 2),
                (vec!["b", "a"], 1),
                (vec!["a", "b", "a"], 1),
                (vec!["b", "a", "b"], 1),
                (vec!["a", "b", "a", "b"], 1),
            ]
        );
    }
}
