//! The text of model responses, as the response check sees it, and how a text
//! too long for one check call is cut into several.
//!
//! Responses are read deny-by-default: every string in a response (or a streamed
//! event) is screened except the members known to hold no generated text (ids,
//! roles, finish reasons, the echo of the request in Responses API objects). So a
//! tool call's arguments, a refusal, reasoning text or a field a server adds
//! tomorrow are screened without this code knowing their names. A body that is
//! not JSON is screened as it is.

use serde_json::Value;

/// Members that hold no generated text, at any depth.
const NOT_TEXT: &[&str] = &[
    "id",
    "object",
    "type",
    "role",
    "model",
    "created",
    "created_at",
    "finish_reason",
    "stop_reason",
    "index",
    "logprobs",
    "status",
    "call_id",
    "item_id",
    "output_index",
    "content_index",
    "summary_index",
    "sequence_number",
    "system_fingerprint",
    "service_tier",
    "usage",
    "token_ids",
    "prompt_token_ids",
    "prompt_logprobs",
    "kv_transfer_params",
];

/// Top-level members of a Responses API object that echo the request (already
/// screened as the prompt) rather than carry output.
const REQUEST_ECHO: &[&str] = &[
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "metadata",
    "user",
    "previous_response_id",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "truncation",
    "max_output_tokens",
    "store",
    "prompt",
    "prompt_cache_key",
    "safety_identifier",
];

/// Streamed Responses API events that carry no output of their own: the request
/// echo when a response starts, and recaps of what the deltas already carried.
const RECAP_EVENTS: &[&str] = &[
    "response.created",
    "response.queued",
    "response.in_progress",
    "response.completed",
    "response.incomplete",
    "response.failed",
];

fn push(out: &mut String, s: &str) {
    if s.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(s);
}

/// `join`: how pieces are put together: a newline between the separate texts of
/// a response, nothing between the deltas of a stream (a word or a number cut
/// across two chunks must read as one).
fn strings(v: &Value, out: &mut String, depth: usize, join: fn(&mut String, &str)) {
    match v {
        Value::String(s) => join(out, s),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out, depth + 1, join)),
        Value::Object(members) => {
            for (k, v) in members {
                let skip = NOT_TEXT.contains(&k.as_str())
                    || (depth == 0 && REQUEST_ECHO.contains(&k.as_str()));
                if !skip {
                    strings(v, out, depth + 1, join);
                }
            }
        }
        _ => {}
    }
}

/// The text of a non-streamed response body. Not JSON: the body itself.
pub fn response_text(body: &[u8]) -> String {
    let mut out = String::new();
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => strings(&v, &mut out, 0, push),
        Err(_) => out.push_str(&String::from_utf8_lossy(body)),
    }
    out
}

/// Appends the text of one SSE `data:` payload (already stripped of `data:`).
/// Chat and Completions chunks, Responses API events; not JSON: as it is.
pub fn event_text(data: &[u8], out: &mut String) {
    let data = data.trim_ascii();
    if data.is_empty() || data == b"[DONE]" {
        return;
    }
    match serde_json::from_slice::<Value>(data) {
        Ok(v) => {
            let is_recap = v
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| RECAP_EVENTS.contains(&t));
            if !is_recap {
                // Depth 1: a chunk's top level is not a Responses object.
                strings(&v, out, 1, |out, s| out.push_str(s));
            }
        }
        Err(_) => out.push_str(&String::from_utf8_lossy(data)),
    }
}

/// Cuts `text` into pieces of at most `max` bytes for separate check calls, each
/// piece starting with the last `overlap` bytes of the one before, so a phrase cut
/// at a boundary is whole in one of them. Cuts fall on character boundaries.
/// `max` must be larger than `overlap` plus one character (the configuration
/// guarantees `max >= 2 * overlap + 4`).
pub fn split(text: &str, max: usize, overlap: usize) -> Vec<&str> {
    if text.len() <= max {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    loop {
        let mut end = floor_char(text, (start + max).min(text.len()));
        if end <= start {
            // A window narrower than one character cannot happen with a valid
            // configuration; take the character whole rather than loop forever.
            end = ceil_char(text, start + 1);
        }
        pieces.push(&text[start..end]);
        if end == text.len() {
            return pieces;
        }
        let next = ceil_char(text, end.saturating_sub(overlap));
        start = if next > start { next } else { end };
    }
}

/// The largest char boundary at or below `i`.
pub fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The smallest char boundary at or above `i`.
pub fn ceil_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_text_reads_every_generated_string() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[
            {"index":0,"finish_reason":"tool_calls","message":{"role":"assistant","content":"CONTENT",
             "refusal":"REFUSAL","reasoning_content":"THINK",
             "tool_calls":[{"id":"call_1","type":"function","function":{"name":"FN","arguments":"{\"a\":\"ARGS\"}"}}]}},
            {"index":1,"text":"LEGACY"}],"usage":{"prompt_tokens":1},"new_field":"NEW"}"#;
        let t = response_text(body);
        for piece in ["CONTENT", "REFUSAL", "THINK", "FN", "ARGS", "LEGACY", "NEW"] {
            assert!(t.contains(piece), "{piece}: {t:?}");
        }
        for id in [
            "chatcmpl-1",
            "call_1",
            "assistant",
            "tool_calls",
            "chat.completion",
        ] {
            assert!(!t.contains(id), "{id}: {t:?}");
        }
    }

    #[test]
    fn responses_objects_skip_the_request_echo() {
        let body = br#"{"id":"resp_1","object":"response","instructions":"ECHO","tools":[{"description":"ECHO2"}],
            "output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"OUT","annotations":[{"title":"CITE"}]}]},
                      {"type":"function_call","name":"FN","arguments":"ARGS","call_id":"c"}]}"#;
        let t = response_text(body);
        assert!(t.contains("OUT") && t.contains("CITE") && t.contains("FN") && t.contains("ARGS"));
        assert!(!t.contains("ECHO"));
    }

    #[test]
    fn a_body_that_is_not_json_is_screened_as_is() {
        assert_eq!(response_text(b"plain words"), "plain words");
    }

    #[test]
    fn event_text_of_chunks_and_events() {
        let mut out = String::new();
        event_text(
            br#" {"choices":[{"index":0,"delta":{"content":"A","tool_calls":[{"index":0,"function":{"arguments":"B"}}]}}]}"#,
            &mut out,
        );
        event_text(
            br#"{"type":"response.output_text.delta","item_id":"i","delta":"C"}"#,
            &mut out,
        );
        event_text(
            br#"{"type":"response.created","response":{"instructions":"ECHO"}}"#,
            &mut out,
        );
        event_text(b"[DONE]", &mut out);
        event_text(b"not json", &mut out);
        // Deltas join as the client reads them.
        assert_eq!(out, "ABCnot json");
    }

    #[test]
    fn split_covers_everything_with_overlap() {
        let text: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let pieces = split(&text, 100, 20);
        assert!(pieces.iter().all(|p| p.len() <= 100));
        assert_eq!(pieces[0], &text[..100]);
        assert_eq!(&pieces[1][..20], &text[80..100]);
        assert!(text.ends_with(pieces.last().unwrap()));
        // Every window of 20 bytes is inside one piece.
        for start in 0..=text.len() - 20 {
            let w = &text[start..start + 20];
            assert!(pieces.iter().any(|p| p.contains(w)), "window at {start}");
        }
        assert_eq!(split("short", 100, 20), vec!["short"]);
    }

    #[test]
    fn split_respects_characters() {
        let text = "é".repeat(100); // 2 bytes each
        let pieces = split(&text, 15, 4);
        assert!(pieces.iter().all(|p| p.len() <= 15 && !p.is_empty()));
        assert!(pieces.concat().chars().filter(|&c| c == 'é').count() >= 100);
        assert!(text.ends_with(pieces.last().unwrap()));
    }
}
