//! Streamed (SSE) responses, as the response check sees them: the text generated so
//! far, and where the closing `data: [DONE]` is, so the filter can hold it back
//! until the verdict is in.

use serde_json::Value;

const DONE: &[u8] = b"data: [DONE]";

/// Accumulates the generated text of an OpenAI SSE stream across chunks (events
/// may be split anywhere). Bounded: text past `max_text` is dropped and the
/// accumulator reports `truncated`.
#[derive(Debug, Default)]
pub struct SseText {
    carry: Vec<u8>,
    text: String,
    max_text: usize,
    pub truncated: bool,
    pub done_seen: bool,
    /// The blank line ending the `[DONE]` event goes with it.
    skip_blank: bool,
}

impl SseText {
    pub fn new(max_text: usize) -> Self {
        SseText {
            max_text,
            ..Default::default()
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Feeds one chunk as it goes to the client and returns it with any
    /// `data: [DONE]` event removed (the filter sends its own ending).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        self.carry.extend_from_slice(chunk);
        // Complete lines only; a partial line waits for the next chunk.
        let Some(last_nl) = self.carry.iter().rposition(|&b| b == b'\n') else {
            return out; // nothing complete yet: a split `[DONE]` is still caught
        };
        let complete: Vec<u8> = self.carry.drain(..=last_nl).collect();
        for line in complete.split_inclusive(|&b| b == b'\n') {
            let trimmed = trim_eol(line);
            if trimmed == DONE {
                self.done_seen = true;
                self.skip_blank = true;
                continue;
            }
            if std::mem::take(&mut self.skip_blank) && trimmed.is_empty() {
                continue;
            }
            if let Some(data) = trimmed.strip_prefix(b"data:") {
                self.take_text(data);
            }
            out.extend_from_slice(line);
        }
        out
    }

    /// Bytes still held (a final line without a newline), to pass on at the end.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.carry);
        if trim_eol(&rest) == DONE {
            self.done_seen = true;
            return Vec::new();
        }
        if let Some(data) = trim_eol(&rest).strip_prefix(b"data:") {
            self.take_text(data);
        }
        rest
    }

    fn take_text(&mut self, data: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
            return;
        };
        let Some(Value::Array(choices)) = v.get("choices") else {
            return;
        };
        for c in choices {
            let piece = c
                .pointer("/delta/content")
                .and_then(Value::as_str)
                .or_else(|| c.get("text").and_then(Value::as_str));
            if let Some(p) = piece {
                if self.text.len() + p.len() > self.max_text {
                    self.truncated = true;
                } else {
                    self.text.push_str(p);
                }
            }
        }
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The closing event for a stream whose text passed the check.
pub fn done_event() -> &'static [u8] {
    b"data: [DONE]\n\n"
}

/// The closing event for a blocked stream: an OpenAI-style error object in place
/// of `[DONE]`, which OpenAI clients raise as an API error.
pub fn error_event(error_json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(error_json.len() + 10);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(error_json);
    out.extend_from_slice(b"\n\n");
    out
}
