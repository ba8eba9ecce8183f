//! A deterministic stand-in for a tokenizer and for generation: about one token per
//! word or punctuation mark, and output words drawn from a small vocabulary by a
//! PRNG seeded with the replica seed and the prompt.

const VOCABULARY: &[&str] = &[
    "the", "model", "answers", "with", "a", "short", "and", "helpful", "reply", "about", "food",
    "quality", "service", "it", "is", "good", "fresh", "tasty", "review", "overall",
];

/// Approximate token count: words and punctuation marks.
pub fn count(text: &str) -> u32 {
    let mut n = 0u32;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                n = n.saturating_add(1);
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                n = n.saturating_add(1);
            }
        }
    }
    n
}

/// `n` output tokens (words, each with a leading space but the first), reproducible
/// for the same seed and prompt.
pub fn generate(seed: u64, prompt: &str, n: u32) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed ^ fxhash(prompt));
    (0..n)
        .map(|i| {
            let w = VOCABULARY[rng.usize(..VOCABULARY.len())];
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_and_punctuation() {
        assert_eq!(count(""), 0);
        assert_eq!(count("Hello, world!"), 4);
        assert_eq!(count("  one   two "), 2);
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(generate(1, "p", 5), generate(1, "p", 5));
        assert_ne!(generate(1, "p", 8), generate(2, "p", 8));
        assert_eq!(generate(1, "p", 3).len(), 3);
        assert!(!generate(1, "p", 2)[0].starts_with(' '));
        assert!(generate(1, "p", 2)[1].starts_with(' '));
    }
}
