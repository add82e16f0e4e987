//! SAM's answer normalisation (`Eval.process` in its `evaluate_score.py`,
//! the VQA evaluation's punctuation rule), applied to every prediction and
//! reference before scoring, and the whitespace split that the scorers share.
//!
//! SAM's script runs on Python strings, so "whitespace", "digit" and
//! "lowercase" mean what Python 3 means by them: `str.isspace`, the `re`
//! module's `\d` (Unicode decimal digits, general category Nd) and
//! `str.lower`. The steps, in SAM's order:
//!
//! 1. newlines and tabs become spaces, then the text is stripped;
//! 2. each punctuation mark in [`PUNCTUATION`] is deleted everywhere if the
//!    original text has that mark followed or preceded by a space, or has a
//!    `digit,digit` anywhere; otherwise each occurrence becomes a space;
//! 3. periods not followed by a digit are deleted, at most
//!    [`PERIOD_STRIP_LIMIT`] of them;
//! 4. leading and trailing `'`, then `"`, are stripped; the text is stripped
//!    again and lowercased.
//!
//! Step 3 is what SAM's code does, not what it meant: its pattern
//! `(?!<=\d)(\.)(?!\d)` misspells the look-behind as a look-ahead that can
//! never fail, so a period before a digit survives even after a letter
//! (`"v.2"`), and `re.UNICODE` is passed where `Pattern.sub` takes its
//! `count`, so only the first 32 such periods go.

use std::sync::LazyLock;

use regex::Regex;

/// SAM's punctuation list (the VQA evaluation's), in its order. Periods are
/// handled apart (step 3); `'` only at the ends (step 4).
const PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// How many periods step 3 deletes at most: the value of `re.UNICODE` (32),
/// which SAM passes as `Pattern.sub`'s `count`.
pub const PERIOD_STRIP_LIMIT: usize = 32;

/// A `digit,digit` anywhere in the text (`1,000`) makes step 2 delete
/// punctuation instead of spacing it. The `regex` crate's `\d` is Unicode's
/// Nd, as Python's.
static DIGIT_COMMA_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\d,\d").expect("a valid pattern"));

/// A decimal digit at the start of the text: the look-ahead of step 3.
static LEADING_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A\d").expect("a valid pattern"));

/// Normalises one answer exactly as SAM's `Eval.process`.
pub fn normalize(answer: &str) -> String {
    let text = answer.replace(['\n', '\t'], " ");
    let text = process_punctuation(strip(&text));
    let text = text.trim_matches('\'').trim_matches('"');
    strip(text).to_lowercase()
}

/// Steps 2 and 3 (SAM's `processPunctuation`). Every decision reads the
/// text as it came in, not as earlier replacements left it.
fn process_punctuation(text: &str) -> String {
    let delete_all = DIGIT_COMMA_DIGIT.is_match(text);
    let mut out = text.to_owned();
    for mark in PUNCTUATION {
        let next_to_space =
            text.contains(&format!("{mark} ")) || text.contains(&format!(" {mark}"));
        let replacement = if delete_all || next_to_space { "" } else { " " };
        out = out.replace(mark, replacement);
    }
    strip_periods(&out)
}

/// Step 3: deletes the first [`PERIOD_STRIP_LIMIT`] periods that are not
/// followed by a digit. Like `re.sub`, the look-ahead reads the text before
/// any deletion.
fn strip_periods(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut deleted = 0;
    for (at, c) in text.char_indices() {
        let before_digit = || LEADING_DIGIT.is_match(&text[at + c.len_utf8()..]);
        if c == '.' && deleted < PERIOD_STRIP_LIMIT && !before_digit() {
            deleted += 1;
        } else {
            out.push(c);
        }
    }
    out
}

/// Python's `str.isspace`: Unicode's White_Space plus the four ASCII
/// separators U+001C..U+001F, which Python counts and Rust does not.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
fn strip(text: &str) -> &str {
    text.trim_matches(is_python_space)
}

/// Python's `str.split()` with no argument: the words between runs of
/// whitespace. pycocoevalcap's scorers and the `rouge` package tokenise
/// with it.
pub fn split_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space).filter(|w| !w.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from SAM's `Eval.process` run in Python 3.11.
    #[test]
    fn known_answers() {
        let cases = [
            ("A Dog, running!", "a dog running"),
            ("a-b c", "a b c"),
            ("a - b", "a  b"),
            (
                "It costs 1,000 (approx.) dollars.",
                "it costs 1000 approx dollars",
            ),
            ("Version 3.5 is out.", "version 3.5 is out"),
            ("v.2 and end.", "v.2 and end"),
            ("'quoted'", "quoted"),
            // The `"` become spaces, so the `'` are no longer at the ends.
            ("\"'both'\"", "'both'"),
            ("line\none\ttab", "line one tab"),
            ("  ...  ", ""),
            ("?!", ""),
            ("ΣΑΣ", "σας"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), want, "normalize({raw:?})");
        }
    }

    #[test]
    fn only_the_first_32_periods_go() {
        let raw = "a.".repeat(40);
        let want = format!("{}{}", "a".repeat(32), "a.".repeat(8));
        assert_eq!(normalize(&raw), want);
    }

    #[test]
    fn unicode_digits_count_as_digits() {
        // U+0663 ARABIC-INDIC DIGIT THREE is `\d` to Python's `re`.
        assert_eq!(normalize("x \u{663},\u{665} y-z"), "x \u{663}\u{665} yz");
        assert_eq!(normalize("a.\u{665}"), "a.\u{665}");
    }

    #[test]
    fn whitespace_is_pythons() {
        // Every code point for which Python 3.11's str.isspace() is true.
        let python: Vec<u32> = [
            0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680,
        ]
        .into_iter()
        .chain(0x2000..=0x200a)
        .chain([0x2028, 0x2029, 0x202f, 0x205f, 0x3000])
        .collect();
        let ours: Vec<u32> = (0..=0x10ffff)
            .filter_map(char::from_u32)
            .filter(|&c| is_python_space(c))
            .map(u32::from)
            .collect();
        assert_eq!(ours, python);
        let words: Vec<&str> = split_words(" a\u{1c}b\u{a0} c ").collect();
        assert_eq!(words, ["a", "b", "c"]);
    }
}
