//! A deterministic stand-in for a tokenizer and for generation: about one token per
//! word or punctuation mark, and output words drawn from a small vocabulary by a
//! PRNG seeded with the replica seed and the prompt.

const VOCABULARY: &[&str] = &[
    "the", "model", "answers", "with", "a", "short", "and", "helpful", "reply", "about", "food",
    "quality", "service", "it", "is", "good", "fresh", "tasty", "review", "overall",
];

/// Approximate token count: words and punctuation marks.
pub fn count(text: &str) -> u32 {
    u32::try_from(pieces(text).count()).unwrap_or(u32::MAX)
}

/// Token ids for `text`, one per counted token: a hash of the word or mark, so equal
/// text gives equal ids and the prefix cache can match shared prefixes.
pub fn ids(text: &str) -> Vec<u32> {
    pieces(text).map(|p| fxhash(p) as u32).collect()
}

/// The tokens of `text`: runs of alphanumerics, and each other non-space char.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        rest = rest.trim_start();
        let mut chars = rest.char_indices();
        let (_, c) = chars.next()?;
        let end = if c.is_alphanumeric() {
            chars
                .find(|(_, c)| !c.is_alphanumeric())
                .map_or(rest.len(), |(i, _)| i)
        } else {
            c.len_utf8()
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
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
        assert_eq!(count("héllo wörld…"), 3);
    }

    #[test]
    fn ids_match_count_and_prefixes() {
        let a = ids("the cat sat, on the mat");
        assert_eq!(a.len() as u32, count("the cat sat, on the mat"));
        assert_eq!(a[0], a[5], "same word, same id");
        let b = ids("the cat sat, on a hat");
        assert_eq!(a[..5], b[..5]);
        assert_ne!(a[5], b[5]);
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
