//! The common case of [`Node::parse`](super::Node::parse), read without serde_json.
//!
//! A request body is mostly the text of a few long strings, and serde_json finds
//! a string's end by testing eight bytes at a time for a quote, a backslash or a
//! control character (it has no Wasm SIMD path; simd-json, which has one, parsed
//! chat bodies about twice as slowly in Wasm: benches/results/findings.md). That
//! scan was most of a large request's cost in the module (256 KB: 1.25 of 1.94
//! million Wasm instructions). Here [`special`] tests 64 bytes per step with Wasm
//! SIMD, elsewhere it leaves the work to memchr.
//!
//! This reader only ever *accepts* bodies: anything it does not take as plain,
//! valid JSON (and anything it is unsure of: a lone surrogate, deep nesting, a
//! duplicate key) makes it give up, and serde_json reads the body again and
//! decides, with its error message. So it can refuse more than serde_json (that
//! costs a second read, nothing else) but must never accept what serde_json
//! refuses nor read a value differently; the unit tests and the `request` fuzz
//! target compare the two on every input.

use super::{Members, Node};
use std::borrow::Cow;

/// Deeper nesting goes to serde_json (which refuses more than 127 levels).
const MAX_DEPTH: u32 = 64;

/// `text` as one JSON value with optional whitespace around it, or `None` when
/// serde_json must decide.
pub(super) fn parse(text: &str) -> Option<Node<'_>> {
    let mut p = Reader {
        text,
        at: 0,
        depth: 0,
    };
    p.skip_ws();
    let value = p.value()?;
    p.skip_ws();
    (p.at == text.len()).then_some(value)
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
    depth: u32,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    /// Steps over `byte`, or gives up.
    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn value(&mut self) -> Option<Node<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Node::Str),
            b'{' => self.object(),
            b'[' => self.array(),
            b't' => self.word("true", Node::Bool(true)),
            b'f' => self.word("false", Node::Bool(false)),
            b'n' => self.word("null", Node::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn word(&mut self, word: &str, node: Node<'a>) -> Option<Node<'a>> {
        let rest = self.text.as_bytes().get(self.at..)?;
        rest.starts_with(word.as_bytes()).then(|| {
            self.at += word.len();
            node
        })
    }

    /// A number token by JSON's grammar, its value read by serde_json itself so
    /// that both paths keep the same text (`1.0` and `1e2` as serde_json reads
    /// them). Numbers are a few short fields, not worth more.
    fn number(&mut self) -> Option<Node<'a>> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let digits = |mut i: usize| {
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            i
        };
        let mut i = start + usize::from(bytes.get(start) == Some(&b'-'));
        i = match bytes.get(i)? {
            b'0' => i + 1,
            b'1'..=b'9' => digits(i + 1),
            _ => return None,
        };
        if bytes.get(i) == Some(&b'.') {
            let end = digits(i + 1);
            if end == i + 1 {
                return None;
            }
            i = end;
        }
        if let Some(b'e' | b'E') = bytes.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = bytes.get(i) {
                i += 1;
            }
            let end = digits(i);
            if end == i {
                return None;
            }
            i = end;
        }
        self.at = i;
        match serde_json::from_str::<Node>(self.text.get(start..i)?).ok()? {
            n @ Node::Number(_) => Some(n),
            _ => None,
        }
    }

    /// A string, borrowed from the text unless it has escapes (as serde_json).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.expect(b'"')?;
        let mut run = self.at;
        let mut owned: Option<String> = None;
        loop {
            self.at += special(self.text.as_bytes().get(self.at..)?);
            let text = self.text.get(run..self.at)?;
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(match owned {
                        None => Cow::Borrowed(text),
                        Some(mut s) => {
                            s.push_str(text);
                            Cow::Owned(s)
                        }
                    });
                }
                b'\\' => {
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(text);
                    self.at += 1;
                    let c = self.escape()?;
                    s.push(c);
                    run = self.at;
                }
                // A control character, or the end of the text: not a string.
                _ => return None,
            }
        }
    }

    /// The character of the escape after a backslash.
    fn escape(&mut self) -> Option<char> {
        let c = match self.peek()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                self.at += 1;
                let unit = self.hex4()?;
                return match unit {
                    0xD800..=0xDBFF => {
                        // Only a whole surrogate pair; serde_json judges the rest.
                        self.expect(b'\\')?;
                        self.expect(b'u')?;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                    }
                    _ => char::from_u32(unit),
                };
            }
            _ => return None,
        };
        self.at += 1;
        Some(c)
    }

    /// Four hex digits (exactly: `u32::from_str_radix` would take a sign).
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.as_bytes().get(self.at..self.at + 4)?;
        let mut unit = 0;
        for &d in digits {
            unit = unit * 16 + char::from(d).to_digit(16)?;
        }
        self.at += 4;
        Some(unit)
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        self.at += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn array(&mut self) -> Option<Node<'a>> {
        self.enter()?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek()? == b']' {
            self.at += 1;
        } else {
            loop {
                self.skip_ws();
                items.push(self.value()?);
                self.skip_ws();
                match self.peek()? {
                    b',' => self.at += 1,
                    b']' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(Node::Array(items))
    }

    fn object(&mut self) -> Option<Node<'a>> {
        self.enter()?;
        let mut members = Members::default();
        self.skip_ws();
        if self.peek()? == b'}' {
            self.at += 1;
        } else {
            loop {
                self.skip_ws();
                let key = self.string()?;
                if !members.is_new(&key) {
                    return None;
                }
                self.skip_ws();
                self.expect(b':')?;
                self.skip_ws();
                let value = self.value()?;
                members.push(key, value);
                self.skip_ws();
                match self.peek()? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(Node::Object(members.into_vec()))
    }
}

/// Where the first quote, backslash or control character (below 0x20) of
/// `bytes` is: `bytes.len()` if none.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn special(bytes: &[u8]) -> usize {
    use core::arch::wasm32::{
        u8x16_bitmask, u8x16_eq, u8x16_lt, u8x16_splat, v128, v128_any_true, v128_load, v128_or,
    };
    let quote = u8x16_splat(b'"');
    let backslash = u8x16_splat(b'\\');
    let space = u8x16_splat(0x20);
    let hits = |v: v128| {
        v128_or(
            v128_or(u8x16_eq(v, quote), u8x16_eq(v, backslash)),
            u8x16_lt(v, space),
        )
    };
    // SAFETY (all loads): `v128_load` reads 16 bytes at the pointer, which has
    // no alignment requirement in Wasm; every pointer is into a chunk of 64 or
    // 16 bytes with at least 16 bytes from it to the chunk's end.
    let mut at = 0;
    let mut wide = bytes.chunks_exact(64);
    for c in &mut wide {
        let p = c.as_ptr();
        let (a, b, d, e) = unsafe {
            (
                v128_load(p.cast()),
                v128_load(p.add(16).cast()),
                v128_load(p.add(32).cast()),
                v128_load(p.add(48).cast()),
            )
        };
        if v128_any_true(v128_or(
            v128_or(hits(a), hits(b)),
            v128_or(hits(d), hits(e)),
        )) {
            break;
        }
        at += 64;
    }
    let mut narrow = bytes[at..].chunks_exact(16);
    for c in &mut narrow {
        let m = hits(unsafe { v128_load(c.as_ptr().cast()) });
        if v128_any_true(m) {
            return at + u8x16_bitmask(m).trailing_zeros() as usize;
        }
        at += 16;
    }
    let tail = narrow.remainder();
    at + tail
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(tail.len())
}

/// Where the first quote, backslash or control character (below 0x20) of
/// `bytes` is: `bytes.len()` if none. Natively memchr finds the quote or
/// backslash (SSE2/AVX2) and a minimum (vectorized) checks the run before it.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn special(bytes: &[u8]) -> usize {
    let end = memchr::memchr2(b'"', b'\\', bytes).unwrap_or(bytes.len());
    let run = &bytes[..end];
    if run.iter().copied().min().is_some_and(|b| b < 0x20) {
        return run.iter().position(|&b| b < 0x20).unwrap_or(end);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_special_byte() {
        for (text, at) in [
            ("", 0),
            ("plain", 5),
            ("a\"b", 1),
            ("ab\\\"", 2),
            ("x\ny\"", 1),
            ("\u{1f}", 0),
            ("é€😀\"", "é€😀".len()),
        ] {
            assert_eq!(special(text.as_bytes()), at, "{text:?}");
        }
        let long = "a".repeat(200) + "\"";
        assert_eq!(special(long.as_bytes()), 200);
    }

    /// A random JSON text of bounded depth: valid, with escapes of every kind,
    /// numbers of every shape and whitespace between tokens.
    fn random_json(rng: &mut fastrand::Rng, depth: u32, out: &mut String) {
        const STRINGS: [&str; 12] = [
            "",
            "content",
            "plain text",
            "é€😀",
            "q\\\"b",
            "\\n\\t\\r\\b\\f\\/",
            "\\u0041\\u00e9",
            "\\ud83d\\ude00",
            "\\u0000",
            "a\\\\b",
            "role",
            "model",
        ];
        const NUMBERS: [&str; 10] = [
            "0",
            "-0",
            "1",
            "-12",
            "0.5",
            "1.0",
            "1e2",
            "-2.5E-3",
            "18446744073709551616",
            "3",
        ];
        const WS: [&str; 5] = ["", "", " ", "\n  ", "\t\r\n"];
        out.push_str(WS[rng.usize(..WS.len())]);
        match if depth == 0 { rng.u8(..4) } else { rng.u8(..6) } {
            0 => out.push_str(["true", "false", "null"][rng.usize(..3)]),
            1 => out.push_str(NUMBERS[rng.usize(..NUMBERS.len())]),
            2 | 3 => {
                out.push('"');
                out.push_str(STRINGS[rng.usize(..STRINGS.len())]);
                out.push('"');
            }
            4 => {
                out.push('[');
                for i in 0..rng.usize(..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth - 1, out);
                }
                out.push_str(WS[rng.usize(..WS.len())]);
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.usize(..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(WS[rng.usize(..WS.len())]);
                    out.push('"');
                    // Few keys, so duplicates happen.
                    out.push_str(STRINGS[rng.usize(..4)]);
                    out.push_str("\":");
                    random_json(rng, depth - 1, out);
                }
                out.push('}');
            }
        }
        out.push_str(WS[rng.usize(..WS.len())]);
    }

    /// The fast reader never accepts what serde_json refuses, never reads a
    /// value differently, and takes every valid text without duplicate keys.
    #[test]
    fn agrees_with_serde_json() {
        const BYTES: [&str; 24] = [
            "\"", "\\", "u", "d8", "DC", "0", "{", "}", "[", "]", ",", ":", " ", "\n", "\u{1}",
            "\u{1f}", "-", ".", "e", "+", "t", "n", "é", "\u{7f}",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut valid, mut taken) = (0, 0);
        for case in 0..30_000 {
            let mut text = String::new();
            let depth = rng.u32(..5);
            random_json(&mut rng, depth, &mut text);
            // Two of three cases damaged: bytes cut, doubled or inserted.
            for _ in 0..if case % 3 == 0 { 0 } else { rng.usize(1..4) } {
                let mut at = rng.usize(..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.u8(..3) {
                    0 => {
                        let end = text[at..].chars().next().map_or(at, |c| at + c.len_utf8());
                        text.replace_range(at..end, "");
                    }
                    1 => text.insert_str(at, &text[at..].chars().take(3).collect::<String>()),
                    _ => text.insert_str(at, BYTES[rng.usize(..BYTES.len())]),
                }
            }
            let reference = Node::parse_with_serde_json(&text);
            match (parse(&text), &reference) {
                (Some(fast), Ok(slow)) => {
                    assert!(fast.same_reading(slow), "{text:?}: {fast:?} vs {slow:?}");
                    taken += 1;
                }
                (Some(fast), Err(e)) => panic!("{text:?}: accepted as {fast:?}; serde_json: {e}"),
                (None, _) => {}
            }
            if reference.is_ok() {
                valid += 1;
            }
        }
        // Duplicate keys are refused by both; everything else valid is taken.
        assert!(
            valid > 10_000 && taken * 10 > valid * 9,
            "{taken} of {valid}"
        );
    }

    #[test]
    fn hands_serde_json_what_it_must_judge() {
        for text in [
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"a\u{1}b\"",
            "\"tab\there\"",
            "01",
            "1.",
            "1e",
            "-",
            "1e400",
            "\"\\u+041\"",
            "{\"a\":1,}",
            "[1,]",
            "{\"a\":1,\"a\":2}",
            "\u{feff}{}",
            "{} x",
        ] {
            assert!(parse(text).is_none(), "{text:?}");
        }
        let deep = "[".repeat(MAX_DEPTH as usize + 1) + &"]".repeat(MAX_DEPTH as usize + 1);
        assert!(parse(&deep).is_none());
        let deep = "[".repeat(MAX_DEPTH as usize) + &"]".repeat(MAX_DEPTH as usize);
        assert!(parse(&deep).is_some());
    }
}
