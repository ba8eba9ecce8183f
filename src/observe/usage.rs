//! Finds the OpenAI `usage` object in a response as it passes, chunk by chunk,
//! without holding the response: a non-streamed JSON body, or an SSE stream whose
//! last event carries `usage` (`stream_options.include_usage`).
//!
//! The scanner follows JSON string boundaries across chunks, so `"usage"` inside
//! generated text (where its quotes are escaped) never matches; only an object
//! key `"usage"` followed by `{` starts a capture, bounded to [`MAX_USAGE_BYTES`].
//! The last complete `usage` object wins (SSE servers may send `"usage": null`
//! on every chunk and the numbers at the end).

use serde::Deserialize;

/// A `usage` object larger than this is ignored (real ones are ~100 bytes).
pub const MAX_USAGE_BYTES: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum After {
    #[default]
    Nothing,
    /// Just closed the string `"usage"`: a `:` may follow.
    Key,
    /// Saw `"usage":`: a `{` starts the object.
    Colon,
}

#[derive(Debug, Default)]
pub struct UsageScanner {
    in_string: bool,
    escape: bool,
    /// The current string's first bytes (enough to compare with `usage`).
    key: [u8; 6],
    key_len: usize,
    after: After,
    /// The `usage` object being captured and its brace depth.
    capture: Option<(Vec<u8>, u32)>,
    usage: Option<Usage>,
}

impl UsageScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last complete `usage` seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let key_open = self.in_string && self.key_len != usize::MAX;
            if self.after == After::Nothing && self.capture.is_none() && !key_open {
                // Most of a response: no `usage` key in view.
                chunk = self.skip(chunk);
                continue;
            }
            if self.escape || self.after != After::Nothing {
                // An escaped byte, or what follows a `"usage"` key: a byte or two,
                // stepped one by one.
                self.byte(chunk[0]);
                chunk = &chunk[1..];
                continue;
            }
            // Everywhere else only a few bytes change the state: in string text
            // (most of a response is generated content) a quote or a backslash,
            // between tokens a quote, and in a captured object also its braces.
            // Skip to the next one by a word-wise search instead of stepping the
            // state machine per byte; what is skipped is text or is copied whole.
            let next = if self.in_string {
                memchr::memchr2(b'"', b'\\', chunk)
            } else if self.capture.is_some() {
                memchr::memchr3(b'"', b'{', b'}', chunk)
            } else {
                memchr::memchr(b'"', chunk)
            };
            let (skipped, rest) = chunk.split_at(next.unwrap_or(chunk.len()));
            if self.in_string {
                self.string_text(skipped);
            }
            self.capture_text(skipped);
            let Some((&b, rest)) = rest.split_first() else {
                return;
            };
            self.byte(b);
            chunk = rest;
        }
    }

    /// What [`Self::byte`] does over `chunk` while no `usage` key or object is
    /// in view, at a cost per block of 64 bytes instead of per byte: masks of
    /// its quotes, backslashes and `u`s ([`masks`]) show where strings open
    /// and close. A block without backslashes whose strings do not start with
    /// `u` is done by its masks alone; any other is followed quote by
    /// backslash. At a string that opens as `"usage"` it stops after the key
    /// and returns the rest; a string opening too near the end of `chunk` to
    /// tell goes to [`Self::byte`], which keeps its first bytes. Returns what
    /// is left for the byte path (empty: all of `chunk` done).
    fn skip<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let mut in_string = self.in_string;
        // Where in `chunk` the byte an unescaped backslash escapes is.
        let mut escaped = if self.escape { 0 } else { usize::MAX };
        for base in (0..chunk.len()).step_by(64) {
            let len = (chunk.len() - base).min(64);
            let m = masks(chunk, base, len);
            // The last byte's string may open with the next block's `u`.
            let last = 1u64 << (len - 1);
            if m.backslashes == 0 && escaped != base {
                // After each byte: inside a string (a quote toggles).
                let inside = prefix_xor(m.quotes) ^ if in_string { !0 } else { 0 };
                let opening = m.quotes & inside;
                if opening & ((m.us >> 1) | last) == 0 {
                    in_string ^= m.quotes.count_ones() % 2 == 1;
                    continue;
                }
            }
            let mut special = m.quotes | m.backslashes;
            while special != 0 {
                let i = special.trailing_zeros();
                special &= special - 1;
                let at = base + i as usize;
                if at == escaped {
                    continue; // an escaped quote or backslash is string text
                }
                let quote = (m.quotes >> i) & 1 == 1;
                if in_string {
                    if quote {
                        in_string = false;
                    } else {
                        escaped = at + 1;
                    }
                } else if quote {
                    // A string opens (a backslash outside strings changes nothing).
                    match chunk.get(at + 1..at + 7) {
                        Some(b"usage\"") => {
                            self.in_string = false;
                            self.escape = false;
                            self.after = After::Key;
                            return &chunk[at + 7..];
                        }
                        Some(_) => in_string = true,
                        None if chunk.get(at + 1).is_some_and(|&b| b != b'u') => in_string = true,
                        None => {
                            self.in_string = false;
                            self.escape = false;
                            self.byte(b'"');
                            return &chunk[at + 1..];
                        }
                    }
                }
            }
        }
        self.in_string = in_string;
        // A string the fast path opened is not a key it has to follow.
        self.key_len = usize::MAX;
        self.escape = escaped == chunk.len();
        &[]
    }

    /// Bytes of the captured object, kept while it stays within
    /// [`MAX_USAGE_BYTES`] (else the capture ends): one at a time from
    /// [`Self::byte`], runs without a quote or brace from [`Self::feed`].
    fn capture_text(&mut self, text: &[u8]) {
        if let Some((buf, _)) = self.capture.as_mut() {
            if buf.len() + text.len() > MAX_USAGE_BYTES {
                self.capture = None;
            } else {
                buf.extend_from_slice(text);
            }
        }
    }

    /// Bytes of a string without a quote or a backslash: what [`Self::byte`] does
    /// with each of them, at once (only the key's first bytes are kept).
    fn string_text(&mut self, text: &[u8]) {
        if self.key_len == usize::MAX || text.is_empty() {
            return;
        }
        match self.key.get_mut(self.key_len..self.key_len + text.len()) {
            Some(room) => {
                room.copy_from_slice(text);
                self.key_len += text.len();
            }
            None => self.key_len = usize::MAX,
        }
    }

    fn byte(&mut self, b: u8) {
        self.capture_text(std::slice::from_ref(&b));
        if self.in_string {
            if self.escape {
                self.escape = false;
                self.key_len = usize::MAX; // escaped keys never match
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.capture.is_none() && self.key_len == 5 && &self.key[..5] == b"usage" {
                    self.after = After::Key;
                }
            } else if self.key_len < self.key.len() {
                self.key[self.key_len] = b;
                self.key_len += 1;
            } else {
                self.key_len = usize::MAX;
            }
            return;
        }
        if let Some((_, depth)) = self.capture.as_mut() {
            match b {
                b'{' => *depth += 1,
                b'}' => {
                    *depth = depth.saturating_sub(1);
                    if *depth == 0 {
                        self.finish_capture();
                    }
                }
                b'"' => self.start_string(),
                _ => {}
            }
            return;
        }
        let ws = b.is_ascii_whitespace();
        self.after = match (self.after, b) {
            (After::Key, b':') => After::Colon,
            (After::Colon, b'{') => {
                self.capture = Some((vec![b'{'], 1));
                After::Nothing
            }
            (a, _) if ws => a,
            _ => After::Nothing,
        };
        if b == b'"' {
            self.start_string();
        }
    }

    fn start_string(&mut self) {
        self.in_string = true;
        self.escape = false;
        self.key_len = 0;
    }

    fn finish_capture(&mut self) {
        let Some((buf, _)) = self.capture.take() else {
            return;
        };
        if let Ok(raw) = serde_json::from_slice::<RawUsage>(&buf) {
            if raw.prompt_tokens.is_some() || raw.completion_tokens.is_some() {
                self.usage = Some(Usage {
                    prompt_tokens: raw.prompt_tokens.unwrap_or(0),
                    completion_tokens: raw.completion_tokens.unwrap_or(0),
                });
            }
        }
    }
}

/// Bit `i` set where byte `base + i` of `chunk` (`len` ≤ 64 bytes from
/// `base`, none past it) is a quote, a backslash or a `u`.
struct Masks {
    quotes: u64,
    backslashes: u64,
    us: u64,
}

fn masks(chunk: &[u8], base: usize, len: usize) -> Masks {
    let rest = &chunk[base..base + len];
    if let Some(block) = rest.first_chunk::<64>() {
        return block_masks(block, 0);
    }
    if let Some(block) = chunk.last_chunk::<64>() {
        // The chunk's last 64 bytes, the ones before `base` shifted out.
        return block_masks(block, 64 - len as u32);
    }
    let mut padded = [0u8; 64];
    padded[..len].copy_from_slice(rest);
    block_masks(&padded, 0)
}

/// [`Masks`] of a 64-byte `block`, shifted right by `shift`: with Wasm SIMD 16
/// bytes a compare.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn block_masks(block: &[u8; 64], shift: u32) -> Masks {
    use core::arch::wasm32::{u8x16_bitmask, u8x16_eq, u8x16_splat, v128_load};
    let (quote, backslash, u) = (u8x16_splat(b'"'), u8x16_splat(b'\\'), u8x16_splat(b'u'));
    let mut m = Masks {
        quotes: 0,
        backslashes: 0,
        us: 0,
    };
    for lane in 0..4 {
        // SAFETY: 16 bytes at 16 * lane (at most 48) of 64 bytes; a Wasm load
        // has no alignment requirement.
        let v = unsafe { v128_load(block.as_ptr().add(16 * lane).cast()) };
        let at = 16 * lane as u32;
        m.quotes |= u64::from(u8x16_bitmask(u8x16_eq(v, quote))) << at;
        m.backslashes |= u64::from(u8x16_bitmask(u8x16_eq(v, backslash))) << at;
        m.us |= u64::from(u8x16_bitmask(u8x16_eq(v, u))) << at;
    }
    m.quotes >>= shift;
    m.backslashes >>= shift;
    m.us >>= shift;
    m
}

/// [`block_masks`] without Wasm SIMD (native builds: tests, the picker).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn block_masks(block: &[u8; 64], shift: u32) -> Masks {
    let mut m = Masks {
        quotes: 0,
        backslashes: 0,
        us: 0,
    };
    for (i, &b) in block.iter().enumerate() {
        m.quotes |= u64::from(b == b'"') << i;
        m.backslashes |= u64::from(b == b'\\') << i;
        m.us |= u64::from(b == b'u') << i;
    }
    m.quotes >>= shift;
    m.backslashes >>= shift;
    m.us >>= shift;
    m
}

/// Bit `i` of the result: the parity of bits 0..=i of `x`.
fn prefix_xor(mut x: u64) -> u64 {
    for shift in [1, 2, 4, 8, 16, 32] {
        x ^= x << shift;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Option<Usage> {
        let mut s = UsageScanner::new();
        for c in body.chunks(piece.max(1)) {
            s.feed(c);
        }
        s.usage()
    }

    const JSON: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"usage\": {\"prompt_tokens\": 999}"}}],"usage":{"prompt_tokens":12,"total_tokens":17,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}"#;

    #[test]
    fn non_streamed_body_in_any_chunking() {
        let want = Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 5,
        });
        for piece in [1, 2, 3, 7, 64, JSON.len()] {
            assert_eq!(
                scan_in_pieces(JSON.as_bytes(), piece),
                want,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn sse_with_null_usage_then_the_usage_chunk() {
        let sse = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"usage\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\" {\\\"usage\\\":{}}\"}}],\"usage\": null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":16,\"total_tokens\":46}}\n\n",
            "data: [DONE]\n\n"
        );
        for piece in [1, 5, 13, sse.len()] {
            assert_eq!(
                scan_in_pieces(sse.as_bytes(), piece),
                Some(Usage {
                    prompt_tokens: 30,
                    completion_tokens: 16
                }),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn no_usage_or_broken_usage() {
        assert_eq!(scan_in_pieces(br#"{"choices":[]}"#, 3), None);
        assert_eq!(scan_in_pieces(br#"{"usage":null}"#, 3), None);
        assert_eq!(
            scan_in_pieces(br#"{"usage":{"prompt_tokens":"x"}}"#, 3),
            None
        );
        assert_eq!(scan_in_pieces(br#"{"usage":{"prompt_tokens":1"#, 3), None);
        assert_eq!(
            scan_in_pieces(br#"{"not_usage":{"prompt_tokens":1}}"#, 3),
            None
        );
        // An oversized object is dropped, and the scanner keeps working after it.
        let big = format!(
            r#"{{"usage":{{"x":"{}"}}}} {{"usage":{{"prompt_tokens":2,"completion_tokens":3}}}}"#,
            "a".repeat(MAX_USAGE_BYTES)
        );
        assert_eq!(
            scan_in_pieces(big.as_bytes(), 100),
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 3
            })
        );
    }

    /// Whether a string that may still be the key `usage` is open (the byte
    /// path keeps its first bytes; the fast path decided at its quote).
    fn key_pending(s: &UsageScanner) -> bool {
        s.in_string && s.key_len <= 5 && s.key[..s.key_len] == b"usage"[..s.key_len]
    }

    /// The fast paths (a run of string text, a block of 64 bytes looked at
    /// only for quotes and backslashes) find what stepping every byte finds,
    /// cut in chunks anywhere.
    #[test]
    fn feeding_chunks_equals_stepping_each_byte() {
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = b"{}\":usage \\,0123456789promptcletin_x\n";
        let mut found = 0;
        for _ in 0..4000 {
            let longest = if rng.bool() { 300 } else { 1500 };
            let len = rng.usize(0..longest);
            let mut bytes: Vec<u8> = (0..len).map(|_| *rng.choice(alphabet).unwrap()).collect();
            if rng.bool() {
                let at = rng.usize(0..=bytes.len());
                let usage = br#"{"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
                bytes.splice(at..at, usage.iter().copied());
            }
            if rng.u8(..) < 32 {
                // A usage object about as large as a capture may grow: runs copied
                // whole must end the capture exactly where stepping does.
                let filler = "a".repeat(MAX_USAGE_BYTES - 30 + rng.usize(0..12));
                let usage = format!(r#"{{"usage":{{"x":"{filler}","prompt_tokens":7}}}}"#);
                let at = rng.usize(0..=bytes.len());
                bytes.splice(at..at, usage.bytes());
            }
            let mut stepped = UsageScanner::new();
            for &b in &bytes {
                stepped.byte(b);
            }
            let mut fed = UsageScanner::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = match rng.u8(0..4) {
                    0 => rng.usize(1..=8),
                    1 => 64,
                    _ => rng.usize(1..=rest.len()),
                };
                let (c, r) = rest.split_at(n.min(rest.len()));
                fed.feed(c);
                rest = r;
            }
            assert_eq!(
                fed.usage(),
                stepped.usage(),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(
                (fed.in_string, fed.escape, key_pending(&fed), fed.after),
                (
                    stepped.in_string,
                    stepped.escape,
                    key_pending(&stepped),
                    stepped.after
                ),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(fed.capture.is_some(), stepped.capture.is_some());
            found += usize::from(stepped.usage().is_some());
        }
        assert!(found > 100, "the inputs must reach usage objects: {found}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let len = rng.usize(0..400);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    *rng.choice(b"{}\":usage \\,0123456789promptcletin_x\n")
                        .unwrap()
                })
                .collect();
            let mut s = UsageScanner::new();
            s.feed(&bytes);
            let _ = s.usage();
        }
    }
}
