//! Whether an answer names what the synthetic images show: the content
//! measure beside CIDEr, BLEU-4 and ROUGE-L, which reward the answer
//! templates as much as the content (a model that says "every picture shows
//! a red square ." to every sample scores well on them and names the right
//! object once in 16).
//!
//! The content of an answer is its colour, shape, region and size words
//! (the generator's whole vocabulary of them). A prediction names the
//! content of its reference when it has every content word of the reference
//! and no colour or shape the reference lacks: for group captioning, the
//! shared object's colour and shape; for storytelling, the object and its
//! new place, size or colour.

use std::collections::{BTreeSet, HashMap};

use super::synth;

/// The content words of `text`, longest phrases first so that "top left
/// corner" is not also counted as "top".
fn content(text: &str) -> BTreeSet<&'static str> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut rest = format!(" {} ", words.join(" "));
    let mut phrases = synth::content_vocabulary();
    phrases.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut found = BTreeSet::new();
    for phrase in phrases {
        let padded = format!(" {phrase} ");
        if rest.contains(&padded) {
            found.insert(phrase);
            rest = rest.replace(&padded, " | ");
        }
    }
    found
}

/// Whether `prediction` names the content of `reference` (module docs).
pub fn names_content(prediction: &str, reference: &str) -> bool {
    let (said, wanted) = (content(prediction), content(reference));
    let objects = synth::object_words();
    wanted.is_subset(&said)
        && said
            .iter()
            .filter(|w| objects.contains(w))
            .all(|w| wanted.contains(w))
}

/// The share of `(prediction, reference)` pairs whose prediction names the
/// reference's content; 0 for no pairs.
pub fn content_accuracy<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let (mut named, mut total) = (0usize, 0usize);
    for (prediction, reference) in pairs {
        total += 1;
        named += usize::from(names_content(prediction, reference));
    }
    if total == 0 {
        0.0
    } else {
        named as f64 / total as f64
    }
}

/// The accuracy on `references` of always giving the content most frequent
/// among `training` answers: the baseline a model that ignores its images
/// can reach.
pub fn most_frequent_accuracy<'a>(
    training: impl IntoIterator<Item = &'a str>,
    references: &[&str],
) -> f64 {
    let mut counts: HashMap<BTreeSet<&'static str>, usize> = HashMap::new();
    for answer in training {
        *counts.entry(content(answer)).or_default() += 1;
    }
    let Some((best, _)) = counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
    else {
        return 0.0;
    };
    let answer = best.iter().copied().collect::<Vec<_>>().join(" ");
    content_accuracy(references.iter().map(|r| (answer.as_str(), *r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_shared_object_only_with_its_colour_and_shape() {
        let gt = "every picture shows a red square.";
        assert!(names_content("they all contain a red square .", gt));
        assert!(!names_content("they all contain a red star .", gt));
        assert!(!names_content("a blue square appears in each image.", gt));
        // Naming every object is not naming the shared one.
        assert!(!names_content("a red square and a blue star.", gt));
    }

    #[test]
    fn storytelling_needs_the_new_state_too() {
        let gt = "the red square moves to the top left corner.";
        assert!(names_content(
            "the red square moves to the top left corner .",
            gt
        ));
        assert!(!names_content("the red square moves to the top.", gt));
        assert!(names_content(
            "the square turns blue.",
            "the square turns blue ."
        ));
        assert!(!names_content(
            "the square turns red.",
            "the square turns blue ."
        ));
    }

    #[test]
    fn the_baseline_answers_the_most_frequent_object() {
        let train = [
            "a red square appears in each image.",
            "every picture shows a red square.",
            "they all contain a blue star.",
        ];
        let refs = [
            "they all contain a red square.",
            "a blue star appears in each image.",
        ];
        assert_eq!(most_frequent_accuracy(train, &refs), 0.5);
    }
}
