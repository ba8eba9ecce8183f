//! Streamed (SSE) responses under a response check: which text to screen when, and
//! which bytes may reach the client. Pure; the filter moves the bytes.
//!
//! The stream is read line by line. Generated text is gathered into *windows*;
//! a window closes and is sent for screening (in one or more calls, see
//! [`super::text::split`]) when it is due, each call carrying up to `overlap`
//! bytes of the text before it so a phrase cut at a window edge is still seen.
//! Every complete line is a *release point* tagged with how much text must have
//! passed before it may go out:
//!
//! - **hold** (prevention): a line needs all text up to its own end to have passed.
//!   Windows close every `window_chars` characters or `window_ms` after their first
//!   text, whichever comes first, and at `[DONE]` / the end of the stream.
//! - **detect**: lines go out at once; only `[DONE]` waits for every check. Windows
//!   close when they reach the call size limit and at the end, so no text goes
//!   unscreened however long the stream; a block found mid-stream cuts it there.
//!
//! A block stops everything after the last released line; the filter then ends
//! the stream with an error event.

use super::text::{self, ceil_char};
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    Hold { window_chars: usize, window_ms: u64 },
    Detect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub mode: StreamMode,
    /// Largest text one check call carries.
    pub max_call_bytes: usize,
    /// Text repeated from before a window (or a piece) at the start of its call.
    pub overlap: usize,
    /// Windows in flight at once; further text waits and joins the next window.
    pub max_pending: usize,
    /// Hold mode: the last bytes of a passed window stay held until the next window
    /// (whose call repeats them as overlap) passes too, so the start of a phrase
    /// cut by a window edge is not released before the phrase is seen whole.
    /// At most `overlap`.
    pub holdback: usize,
}

/// One check call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckText {
    pub id: u32,
    pub text: String,
}

#[derive(Debug)]
struct Window {
    /// Absolute end of the window's text.
    text_end: usize,
    /// Call ids not answered yet.
    waiting: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct ReleasePoint {
    /// Absolute stream offset just after the line.
    byte_end: u64,
    /// Text (absolute offset) that must have passed first; `usize::MAX`: all of it,
    /// with nothing pending (`[DONE]` in detect mode).
    needs: usize,
    /// The line was blank: an SSE event ends here.
    event_end: bool,
}

#[derive(Debug)]
pub struct StreamScreen {
    limits: StreamLimits,
    /// An incomplete line, waiting for the rest.
    carry: Vec<u8>,
    /// Bytes fed so far.
    received: u64,
    /// Text kept: `text[0]` is at absolute offset `text_base`.
    text: String,
    text_base: usize,
    /// Absolute start of the text not yet in any window.
    window_start: usize,
    window_chars: usize,
    window_opened_ms: Option<u64>,
    windows: VecDeque<Window>,
    /// All text before this absolute offset has passed.
    passed: usize,
    points: VecDeque<ReleasePoint>,
    /// Bytes up to here may go out (absolute).
    releasable: u64,
    /// Whether the last release point ended an event.
    releasable_event_end: bool,
    next_id: u32,
    blocked: bool,
    ended: bool,
    pub done_seen: bool,
}

impl StreamScreen {
    pub fn new(limits: StreamLimits) -> Self {
        StreamScreen {
            limits,
            carry: Vec::new(),
            received: 0,
            text: String::new(),
            text_base: 0,
            window_start: 0,
            window_chars: 0,
            window_opened_ms: None,
            windows: VecDeque::new(),
            passed: 0,
            points: VecDeque::new(),
            releasable: 0,
            releasable_event_end: true,
            next_id: 0,
            blocked: false,
            ended: false,
            done_seen: false,
        }
    }

    fn text_end(&self) -> usize {
        self.text_base + self.text.len()
    }

    /// Reads a chunk of the stream; returns the calls to make now.
    pub fn feed(&mut self, chunk: &[u8], now_ms: u64) -> Vec<CheckText> {
        self.received += chunk.len() as u64;
        let mut start_of_rest = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'\n' {
                let line_end = self.received - (chunk.len() - i - 1) as u64;
                if self.carry.is_empty() {
                    self.line(&chunk[start_of_rest..=i], line_end, now_ms);
                } else {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&chunk[start_of_rest..=i]);
                    self.line(&line, line_end, now_ms);
                }
                start_of_rest = i + 1;
            }
        }
        self.carry.extend_from_slice(&chunk[start_of_rest..]);
        self.poll(now_ms)
    }

    /// The stream ended: a last line without a newline counts, the open window
    /// closes. Returns the calls to make.
    pub fn finish(&mut self, now_ms: u64) -> Vec<CheckText> {
        // Ended first: the end lifts the holdback even when no window closes now
        // (a stream without `[DONE]` whose last window passed before its end).
        self.ended = true;
        if !self.carry.is_empty() {
            let line = std::mem::take(&mut self.carry);
            self.line(&line, self.received, now_ms);
        }
        self.advance();
        self.poll(now_ms)
    }

    fn line(&mut self, line: &[u8], byte_end: u64, now_ms: u64) {
        let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        let mut needs = None;
        if let Some(data) = trimmed.strip_prefix(b"data:") {
            if data.trim_ascii() == b"[DONE]" {
                self.done_seen = true;
                if self.limits.mode == StreamMode::Detect {
                    needs = Some(usize::MAX);
                }
            } else {
                let before = self.text.len();
                text::event_text(data, &mut self.text);
                let added = &self.text[before..];
                if !added.is_empty() {
                    self.window_chars += added.chars().count();
                    self.window_opened_ms.get_or_insert(now_ms);
                }
            }
        }
        let needs = needs.unwrap_or(match self.limits.mode {
            StreamMode::Hold { .. } => self.text_end(),
            StreamMode::Detect => 0,
        });
        self.points.push_back(ReleasePoint {
            byte_end,
            needs,
            event_end: trimmed.is_empty(),
        });
        self.advance();
    }

    /// Closes the open window if it is due; returns the calls to make. Call it
    /// after feeding, after verdicts, and from a timer if there is one.
    pub fn poll(&mut self, now_ms: u64) -> Vec<CheckText> {
        let open = self.text_end() - self.window_start;
        if open == 0 || self.blocked || self.windows.len() >= self.limits.max_pending {
            return Vec::new();
        }
        let due = self.ended
            || self.done_seen
            || match self.limits.mode {
                StreamMode::Hold {
                    window_chars,
                    window_ms,
                } => {
                    self.window_chars >= window_chars
                        || self
                            .window_opened_ms
                            .is_some_and(|t| now_ms.saturating_sub(t) >= window_ms)
                }
                StreamMode::Detect => open + self.limits.overlap >= self.limits.max_call_bytes,
            };
        if due {
            self.close_window()
        } else {
            Vec::new()
        }
    }

    fn close_window(&mut self) -> Vec<CheckText> {
        let end = self.text_end();
        let from = self
            .window_start
            .saturating_sub(self.limits.overlap)
            .max(self.text_base);
        let local = ceil_char(&self.text, from - self.text_base);
        let pieces: Vec<String> = text::split(
            &self.text[local..],
            self.limits.max_call_bytes,
            self.limits.overlap,
        )
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .map(str::to_string)
        .collect();
        let mut calls = Vec::with_capacity(pieces.len());
        for text in pieces {
            calls.push(CheckText {
                id: self.next_id,
                text,
            });
            self.next_id = self.next_id.wrapping_add(1);
        }
        self.window_start = end;
        self.window_chars = 0;
        self.window_opened_ms = None;
        self.windows.push_back(Window {
            text_end: end,
            waiting: calls.iter().map(|c| c.id).collect(),
        });
        self.advance();
        calls
    }

    /// A call passed (or failed open).
    pub fn pass(&mut self, id: u32) {
        for w in &mut self.windows {
            w.waiting.retain(|&x| x != id);
        }
        self.advance();
    }

    /// A call blocked (or failed closed): nothing after the last releasable byte
    /// goes out.
    pub fn block(&mut self) {
        self.blocked = true;
        self.windows.clear();
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Calls not answered yet.
    pub fn pending(&self) -> bool {
        self.windows.iter().any(|w| !w.waiting.is_empty())
    }

    /// Every byte fed may go out and nothing more will be screened.
    pub fn complete(&self) -> bool {
        self.ended
            && !self.blocked
            && self.carry.is_empty()
            && self.windows.is_empty()
            && self.window_start == self.text_end()
            && self.releasable == self.received
    }

    /// Absolute offset up to which bytes may be sent to the client.
    pub fn releasable(&self) -> u64 {
        self.releasable
    }

    /// Whether an error event appended at [`Self::releasable`] needs a blank line
    /// first to start an event of its own.
    pub fn needs_event_break(&self) -> bool {
        !self.releasable_event_end
    }

    fn advance(&mut self) {
        if self.blocked {
            return;
        }
        while self.windows.front().is_some_and(|w| w.waiting.is_empty()) {
            if let Some(w) = self.windows.pop_front() {
                self.passed = w.text_end;
            }
        }
        // Nothing open, nothing waiting: all text so far has passed.
        let all_passed = self.windows.is_empty() && self.window_start == self.text_end();
        // Text that ends the stream needs no holdback: nothing follows it.
        let limit = if all_passed && (self.ended || self.done_seen) {
            self.passed
        } else {
            self.passed.saturating_sub(self.limits.holdback)
        };
        while let Some(p) = self.points.front() {
            let ok = if p.needs == usize::MAX {
                all_passed
            } else {
                p.needs <= limit || p.needs == 0
            };
            if !ok {
                break;
            }
            self.releasable = p.byte_end;
            self.releasable_event_end = p.event_end;
            self.points.pop_front();
        }
        // Text before the overlap of the oldest unscreened text is not needed again.
        let keep_from = self
            .passed
            .min(self.window_start)
            .saturating_sub(self.limits.overlap);
        if keep_from > self.text_base + 4096 {
            let cut = text::floor_char(&self.text, keep_from - self.text_base);
            self.text.drain(..cut);
            self.text_base += cut;
        }
    }
}

#[cfg(test)]
mod tests;
