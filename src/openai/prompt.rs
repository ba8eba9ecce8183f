//! What the model reads: every piece of text in a request body that a model server
//! may put in front of the model, collected in body order, or a refusal naming the
//! field whose shape the gateway does not know.
//!
//! The rule (the table in docs/safety.md): a field the gateway knows is read by
//! the model is *screened* when its shape is known and *refused* (400
//! `invalid_value`, naming the field) when it is not; a field known not to be read
//! (sampling parameters, ids, `user`, `metadata`, `stop`) is *passed*; media parts
//! (images, audio, files) are passed and counted; and any other field that carries
//! a string, including ones this gateway has never heard of (vLLM's
//! `chat_template`, `documents`, `chat_template_kwargs`, a future OpenAI field), is
//! screened whole: its keys and values, so nothing the model might read is skipped.

use super::json::Node;
use super::{ApiError, ApiKind};

/// The text a model server may read from a request, and what could not be read as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelText {
    /// Every screened piece, in body order, joined with newlines.
    pub text: String,
    /// Image, audio, video and file parts: passed, not screened.
    pub media_parts: u32,
    /// The prompt is given (partly) as token ids, which no text check can read.
    pub token_ids: bool,
}

/// Top-level fields the model does not read: passed whatever they hold. (Fields
/// without any string, such as `temperature` or `logit_bias`, pass anyway.)
const PASSED_TOP_LEVEL: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "priority",
    "user",
    "metadata",
    "stop",
    "service_tier",
    "store",
    "reasoning_effort",
    "encoding_format",
    "modalities",
    "previous_response_id",
    "conversation",
    "prompt_cache_key",
    "safety_identifier",
    "truncation",
    "include",
    "background",
    "request_id",
    "logit_bias",
];

/// Content-part types whose text the model reads, and the key that holds it.
const TEXT_PARTS: &[(&str, &str)] = &[
    ("text", "text"),
    ("input_text", "text"),
    ("output_text", "text"),
    ("summary_text", "text"),
    ("reasoning_text", "text"),
    ("refusal", "refusal"),
];

/// Content-part types that carry media, and the key that holds it.
const MEDIA_PARTS: &[(&str, &str)] = &[
    ("image_url", "image_url"),
    ("input_audio", "input_audio"),
    ("file", "file"),
    ("video_url", "video_url"),
    ("audio_url", "audio_url"),
    ("input_image", "image_url"),
    ("input_file", "file_data"),
];

/// Responses API input items whose every string is screened as a whole (tool calls
/// and their results that carry text in shapes of their own).
const WHOLE_ITEMS: &[&str] = &[
    "computer_call",
    "web_search_call",
    "file_search_call",
    "code_interpreter_call",
    "image_generation_call",
    "local_shell_call",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
];

/// A field's place in the body, for error messages: `messages[2].content`.
#[derive(Clone, Copy)]
struct Path<'p> {
    parent: Option<&'p Path<'p>>,
    seg: Seg<'p>,
}

#[derive(Clone, Copy)]
enum Seg<'p> {
    Key(&'p str),
    Index(usize),
}

impl<'p> Path<'p> {
    fn root(key: &'p str) -> Self {
        Path {
            parent: None,
            seg: Seg::Key(key),
        }
    }
    fn key(&'p self, key: &'p str) -> Path<'p> {
        Path {
            parent: Some(self),
            seg: Seg::Key(key),
        }
    }
    fn index(&'p self, i: usize) -> Path<'p> {
        Path {
            parent: Some(self),
            seg: Seg::Index(i),
        }
    }
    fn render(&self) -> String {
        let mut out = self.parent.map(Path::render).unwrap_or_default();
        match self.seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
        out
    }
}

fn refuse(path: &Path<'_>, what: &str, got: &Node<'_>) -> ApiError {
    let at = path.render();
    ApiError::invalid_request(
        "invalid_value",
        format!("'{at}' {what}, not {}.", got.kind()),
    )
    .with_param(at)
}

fn refuse_type(path: &Path<'_>, what: &str, ty: &str) -> ApiError {
    let at = path.render();
    ApiError::invalid_request(
        "invalid_value",
        format!("'{at}' has an unknown {what} type '{ty}': the gateway cannot screen it."),
    )
    .with_param(at)
}

#[derive(Default)]
struct Reader {
    out: ModelText,
}

impl Reader {
    fn push(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if !self.out.text.is_empty() {
            self.out.text.push('\n');
        }
        self.out.text.push_str(s);
    }

    /// A field the gateway has no shape for: every key and scalar, in order.
    fn whole(&mut self, n: &Node<'_>) {
        match n {
            Node::Null | Node::Bool(_) => {}
            Node::Number(t) => self.push(t),
            Node::Str(s) => self.push(s),
            Node::Array(items) => items.iter().for_each(|i| self.whole(i)),
            Node::Object(members) => {
                for (k, v) in members {
                    self.push(k);
                    self.whole(v);
                }
            }
        }
    }

    /// A field that must be a string (or absent / null).
    fn string(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        match n {
            Node::Null => Ok(()),
            Node::Str(s) => {
                self.push(s);
                Ok(())
            }
            other => Err(refuse(path, "must be a string", other)),
        }
    }

    /// `prompt` / `input` of Completions and Embeddings: a string, an array of
    /// strings, token ids, or arrays of token ids.
    fn prompt(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        const SHAPE: &str = "must be a string, an array of strings or token ids";
        match n {
            Node::Str(s) => self.push(s),
            Node::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Node::Str(s) => self.push(s),
                        Node::Number(_) => self.out.token_ids = true,
                        Node::Array(tokens)
                            if tokens.iter().all(|t| matches!(t, Node::Number(_))) =>
                        {
                            self.out.token_ids = true
                        }
                        other => return Err(refuse(&path.index(i), SHAPE, other)),
                    }
                }
            }
            other => return Err(refuse(path, SHAPE, other)),
        }
        Ok(())
    }

    /// Message `content`: a string, null, or an array of typed parts.
    fn content(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        match n {
            Node::Null => Ok(()),
            Node::Str(s) => {
                self.push(s);
                Ok(())
            }
            Node::Array(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    self.part(part, &path.index(i))?;
                }
                Ok(())
            }
            other => Err(refuse(
                path,
                "must be a string or an array of content parts",
                other,
            )),
        }
    }

    fn part(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        let Node::Object(members) = n else {
            return Err(refuse(path, "must be a content part object", n));
        };
        let ty = match n.get("type") {
            Some(Node::Str(t)) => t.as_ref(),
            Some(other) => return Err(refuse(&path.key("type"), "must be a string", other)),
            None => {
                let at = path.render();
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    format!("'{at}' has no 'type': the gateway cannot screen it."),
                )
                .with_param(format!("{at}.type")));
            }
        };
        if let Some((_, key)) = TEXT_PARTS.iter().find(|(t, _)| *t == ty) {
            for (k, v) in members {
                match k.as_ref() {
                    "type" => {}
                    k2 if k2 == *key => self.string(v, &path.key(key))?,
                    _ => self.member(k, v),
                }
            }
            return Ok(());
        }
        if let Some((_, key)) = MEDIA_PARTS.iter().find(|(t, _)| *t == ty) {
            self.out.media_parts += 1;
            for (k, v) in members {
                // The media itself (a URL, base64 data, a file id) is passed; a file
                // name the model may be shown is screened, as is any other field.
                match k.as_ref() {
                    "type" | "detail" | "file_id" | "file_url" | "format" => {}
                    "filename" => self.string(v, &path.key(k))?,
                    k2 if k2 == *key => {
                        if let Some(name) = v.get("filename") {
                            self.string(name, &path.key(key).key("filename"))?;
                        }
                    }
                    _ => self.member(k, v),
                }
            }
            return Ok(());
        }
        Err(refuse_type(&path.key("type"), "content part", ty))
    }

    /// An extra member of a known object: screened whole unless it carries no text.
    fn member(&mut self, key: &str, value: &Node<'_>) {
        if !value.is_textless() {
            self.push(key);
            self.whole(value);
        }
    }

    /// A `tool_calls[]` entry or a legacy `function_call`.
    fn call(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        let Node::Object(members) = n else {
            return Err(refuse(path, "must be an object", n));
        };
        for (k, v) in members {
            match k.as_ref() {
                "id" | "type" => {}
                "function" => {
                    let fpath = path.key("function");
                    let Node::Object(f) = v else {
                        return Err(refuse(&fpath, "must be an object", v));
                    };
                    for (fk, fv) in f {
                        match fk.as_ref() {
                            "name" | "arguments" => self.string(fv, &fpath.key(fk))?,
                            _ => self.member(fk, fv),
                        }
                    }
                }
                "name" | "arguments" => self.string(v, &path.key(k))?,
                _ => self.member(k, v),
            }
        }
        Ok(())
    }

    /// One Chat Completions message.
    fn message(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        let Node::Object(members) = n else {
            return Err(refuse(path, "must be a message object", n));
        };
        for (k, v) in members {
            let at = path.key(k);
            match k.as_ref() {
                "role" => {
                    if !matches!(v, Node::Str(_)) {
                        return Err(refuse(&at, "must be a string", v));
                    }
                }
                "tool_call_id" => {}
                "content" => self.content(v, &at)?,
                "name" | "refusal" | "reasoning_content" | "reasoning" => self.string(v, &at)?,
                "tool_calls" => match v {
                    Node::Null => {}
                    Node::Array(calls) => {
                        for (i, c) in calls.iter().enumerate() {
                            self.call(c, &at.index(i))?;
                        }
                    }
                    other => return Err(refuse(&at, "must be an array of tool calls", other)),
                },
                "function_call" => match v {
                    Node::Null => {}
                    other => self.call(other, &at)?,
                },
                _ => self.member(k, v),
            }
        }
        Ok(())
    }

    /// Responses API `input` (and array `instructions`): a string or input items.
    fn input_items(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        match n {
            Node::Str(s) => {
                self.push(s);
                Ok(())
            }
            Node::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.input_item(item, &path.index(i))?;
                }
                Ok(())
            }
            other => Err(refuse(
                path,
                "must be a string or an array of input items",
                other,
            )),
        }
    }

    fn input_item(&mut self, n: &Node<'_>, path: &Path<'_>) -> Result<(), ApiError> {
        let Node::Object(members) = n else {
            return Err(refuse(path, "must be an input item object", n));
        };
        let ty = match (n.get("type"), n.get("role")) {
            (Some(Node::Str(t)), _) => t.as_ref(),
            (Some(other), _) => return Err(refuse(&path.key("type"), "must be a string", other)),
            (None, Some(_)) => "message",
            (None, None) => {
                let at = path.render();
                return Err(ApiError::invalid_request(
                    "invalid_value",
                    format!("'{at}' has neither 'type' nor 'role': the gateway cannot screen it."),
                )
                .with_param(at));
            }
        };
        // Members every item may carry that the model does not read.
        let passed = |k: &str| matches!(k, "type" | "id" | "status" | "call_id");
        match ty {
            "message" => {
                for (k, v) in members {
                    match k.as_ref() {
                        "role" => {
                            if !matches!(v, Node::Str(_)) {
                                return Err(refuse(&path.key(k), "must be a string", v));
                            }
                        }
                        "content" => self.content(v, &path.key(k))?,
                        k2 if passed(k2) => {}
                        _ => self.member(k, v),
                    }
                }
            }
            "function_call" | "custom_tool_call" => {
                for (k, v) in members {
                    match k.as_ref() {
                        "name" | "arguments" | "input" => self.string(v, &path.key(k))?,
                        k2 if passed(k2) => {}
                        _ => self.member(k, v),
                    }
                }
            }
            "function_call_output" | "custom_tool_call_output" | "local_shell_call_output" => {
                for (k, v) in members {
                    match k.as_ref() {
                        "output" => self.content(v, &path.key(k))?,
                        k2 if passed(k2) => {}
                        _ => self.member(k, v),
                    }
                }
            }
            "computer_call_output" => {
                for (k, v) in members {
                    match k.as_ref() {
                        // A screenshot: media.
                        "output" => match v {
                            Node::Object(_)
                                if v.get("type").and_then(Node::as_str)
                                    == Some("computer_screenshot") =>
                            {
                                self.out.media_parts += 1
                            }
                            other => {
                                return Err(refuse(
                                    &path.key(k),
                                    "must be a computer_screenshot object",
                                    other,
                                ))
                            }
                        },
                        k2 if passed(k2) => {}
                        _ => self.member(k, v),
                    }
                }
            }
            "reasoning" => {
                for (k, v) in members {
                    match k.as_ref() {
                        "summary" | "content" => self.content(v, &path.key(k))?,
                        // Opaque, produced by the serving side itself.
                        "encrypted_content" => {}
                        k2 if passed(k2) => {}
                        _ => self.member(k, v),
                    }
                }
            }
            "item_reference" => {
                for (k, v) in members {
                    if !passed(k) {
                        self.member(k, v);
                    }
                }
            }
            t if WHOLE_ITEMS.contains(&t) => {
                for (k, v) in members {
                    if k != "type" {
                        self.member(k, v);
                    }
                }
            }
            other => return Err(refuse_type(&path.key("type"), "input item", other)),
        }
        Ok(())
    }
}

/// Reads everything the model may read from a request body's top-level members.
/// `required` is the API's prompt field; its absence is the caller's error.
pub fn read(
    kind: ApiKind,
    members: &[(std::borrow::Cow<'_, str>, Node<'_>)],
) -> Result<ModelText, ApiError> {
    let mut r = Reader::default();
    for (key, value) in members {
        let path = Path::root(key);
        match (kind, key.as_ref()) {
            (ApiKind::ChatCompletions, "messages") => {
                let Node::Array(messages) = value else {
                    return Err(refuse(&path, "must be an array of message objects", value));
                };
                for (i, m) in messages.iter().enumerate() {
                    r.message(m, &path.index(i))?;
                }
            }
            (ApiKind::Completions, "prompt") | (ApiKind::Embeddings, "input") => {
                r.prompt(value, &path)?
            }
            (ApiKind::Completions, "suffix") => r.string(value, &path)?,
            (ApiKind::Responses, "input") | (ApiKind::Responses, "instructions") => match value {
                Node::Null => {}
                other => r.input_items(other, &path)?,
            },
            (_, k) if PASSED_TOP_LEVEL.contains(&k) => {}
            (_, k) => r.member(k, value),
        }
    }
    Ok(r.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_body(kind: ApiKind, body: &str) -> Result<ModelText, ApiError> {
        let Node::Object(members) = Node::parse(body).unwrap() else {
            panic!("object")
        };
        read(kind, &members)
    }

    fn chat(body: &str) -> Result<ModelText, ApiError> {
        read_body(ApiKind::ChatCompletions, body)
    }

    fn refused_at(kind: ApiKind, body: &str) -> String {
        let e = read_body(kind, body).expect_err(body);
        assert_eq!((e.status, e.code), (400, "invalid_value"), "{body}");
        e.param.expect("names the field").into_owned()
    }

    #[test]
    fn chat_text_in_every_place_the_model_reads_it() {
        let t = chat(
            r#"{"model":"m","temperature":0.2,"stop":["END"],"user":"u-1",
                "messages":[
                  {"role":"system","content":"SYS"},
                  {"role":"developer","content":[{"type":"text","text":"DEV"}]},
                  {"role":"user","name":"NAME","content":[{"type":"text","text":"USER"},
                     {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
                  {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                     "function":{"name":"FN","arguments":"{\"q\":\"ARGS\"}"}}]},
                  {"role":"tool","tool_call_id":"c1","content":"TOOL-OUT"},
                  {"role":"function","name":"F2","content":"FUNC-OUT"},
                  {"role":"assistant","function_call":{"name":"LEGACY","arguments":"LARGS"},"refusal":"REF"}],
                "tools":[{"type":"function","function":{"name":"T","description":"DESC",
                   "parameters":{"type":"object","properties":{"PROP":{"type":"string","description":"PDESC"}}}}}],
                "response_format":{"type":"json_schema","json_schema":{"name":"S","schema":{"properties":{"SCHEMA-KEY":{}}}}},
                "chat_template":"TEMPLATE {{ messages }}",
                "documents":[{"title":"DOC-T","text":"DOC"}]}"#,
        )
        .unwrap();
        for piece in [
            "SYS",
            "DEV",
            "USER",
            "NAME",
            "FN",
            "ARGS",
            "TOOL-OUT",
            "F2",
            "FUNC-OUT",
            "LEGACY",
            "LARGS",
            "REF",
            "DESC",
            "PROP",
            "PDESC",
            "SCHEMA-KEY",
            "TEMPLATE",
            "DOC-T",
            "DOC",
        ] {
            assert!(
                t.text.contains(piece),
                "{piece} not screened in {:?}",
                t.text
            );
        }
        for passed in ["END", "u-1", "AAAA", "0.2", "c1"] {
            assert!(
                !t.text.contains(passed),
                "{passed} should pass: {:?}",
                t.text
            );
        }
        assert_eq!(t.media_parts, 1);
        assert!(!t.token_ids);
    }

    #[test]
    fn chat_shapes_the_gateway_does_not_know_are_refused_by_name() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"user","content":{"text":"x"}}]}"#,
                "messages[2].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":42}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"txt","text":"x"}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"text":"x"}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":{"t":"x"}}]}]}"#,
                "messages[0].content[0].text",
            ),
            (
                r#"{"messages":[{"role":"user","content":["x"]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages":[{"role":{"x":1},"content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","name":["x"],"content":"x"}]}"#,
                "messages[0].name",
            ),
            (
                r#"{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"q":"x"}}}]}]}"#,
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                r#"{"messages":[{"role":"assistant","tool_calls":{"x":1}}]}"#,
                "messages[0].tool_calls",
            ),
            (r#"{"messages":"x"}"#, "messages"),
            (r#"{"messages":[["x"]]}"#, "messages[0]"),
        ];
        for (body, field) in cases {
            assert_eq!(refused_at(ApiKind::ChatCompletions, body), field, "{body}");
        }
    }

    #[test]
    fn unknown_members_of_known_objects_are_screened() {
        let t = chat(
            r#"{"messages":[{"role":"user","content":"hi","extra":{"nested":"HIDDEN"}},
                {"role":"user","content":[{"type":"image_url","image_url":{"url":"u"},"text":"IN-MEDIA"}]},
                {"role":"user","content":[{"type":"text","text":"t","cache_control":{"type":"EPHEMERAL"}}]},
                {"role":"user","content":[{"type":"file","file":{"file_data":"QUJD","filename":"FILE-NAME.pdf"}}]},
                {"role":"user","content":[{"type":"input_file","file_data":"QUJD","filename":"INPUT-NAME.pdf"}]}]}"#,
        )
        .unwrap();
        assert_eq!(t.media_parts, 3);
        assert!(
            !t.text.contains("QUJD"),
            "file data is passed: {:?}",
            t.text
        );
        for piece in ["HIDDEN", "IN-MEDIA", "EPHEMERAL", "FILE-NAME", "INPUT-NAME"] {
            assert!(t.text.contains(piece), "{piece}: {:?}", t.text);
        }
    }

    #[test]
    fn completions_and_embeddings() {
        let t = read_body(
            ApiKind::Completions,
            r#"{"prompt":["A","B"],"suffix":"SUF","echo":true}"#,
        )
        .unwrap();
        assert_eq!(t.text, "A\nB\nSUF");
        let t = read_body(ApiKind::Completions, r#"{"prompt":[1,2,3]}"#).unwrap();
        assert!(t.token_ids && t.text.is_empty());
        let t = read_body(ApiKind::Embeddings, r#"{"input":[[1,2],[3]]}"#).unwrap();
        assert!(t.token_ids);
        assert_eq!(
            refused_at(ApiKind::Completions, r#"{"prompt":{"x":1}}"#),
            "prompt"
        );
        assert_eq!(
            refused_at(ApiKind::Completions, r#"{"prompt":["a",{"x":1}]}"#),
            "prompt[1]"
        );
        assert_eq!(
            refused_at(ApiKind::Completions, r#"{"prompt":"a","suffix":["b"]}"#),
            "suffix"
        );
        assert_eq!(
            refused_at(ApiKind::Embeddings, r#"{"input":[["a"]]}"#),
            "input[0]"
        );
        // Chat-style embeddings (vLLM) are not a known shape for embeddings: the
        // messages are screened whole.
        let t = read_body(
            ApiKind::Embeddings,
            r#"{"input":"x","messages":[{"role":"user","content":"HIDDEN"}]}"#,
        )
        .unwrap();
        assert!(t.text.contains("HIDDEN"));
    }

    #[test]
    fn responses_items() {
        let t = read_body(
            ApiKind::Responses,
            r#"{"instructions":"INSTR","input":[
                 {"role":"user","content":[{"type":"input_text","text":"Q"},{"type":"input_image","image_url":"data:x"}]},
                 {"type":"message","role":"assistant","content":[{"type":"output_text","text":"A","annotations":[{"title":"CITED"}]}]},
                 {"type":"function_call","call_id":"c","name":"FN","arguments":"ARGS"},
                 {"type":"function_call_output","call_id":"c","output":"OUT"},
                 {"type":"function_call_output","call_id":"c","output":[{"type":"input_text","text":"OUT2"}]},
                 {"type":"reasoning","summary":[{"type":"summary_text","text":"SUMM"}],"encrypted_content":"OPAQUE"},
                 {"type":"mcp_call","name":"MCP","arguments":"MARGS","output":"MOUT","server_label":"s"},
                 {"type":"item_reference","id":"r1"}],
               "tools":[{"type":"function","name":"T","description":"TDESC","parameters":{}}],
               "text":{"format":{"type":"json_schema","schema":{"properties":{"KEY":{}}}}}}"#,
        )
        .unwrap();
        for piece in [
            "INSTR", "Q", "A", "CITED", "FN", "ARGS", "OUT", "OUT2", "SUMM", "MCP", "MARGS",
            "MOUT", "TDESC", "KEY",
        ] {
            assert!(t.text.contains(piece), "{piece}: {:?}", t.text);
        }
        assert!(!t.text.contains("OPAQUE") && !t.text.contains("r1"));
        assert_eq!(t.media_parts, 1);
        for (body, field) in [
            (
                r#"{"input":[{"type":"function_call_output","output":{"x":"y"}}]}"#,
                "input[0].output",
            ),
            (
                r#"{"input":[{"type":"telepathy","text":"x"}]}"#,
                "input[0].type",
            ),
            (r#"{"input":[{"content":"x"}]}"#, "input[0]"),
            (
                r#"{"input":[{"type":"function_call","arguments":{"a":1}}]}"#,
                "input[0].arguments",
            ),
            (r#"{"input":{"x":1}}"#, "input"),
            (r#"{"input":"x","instructions":{"x":1}}"#, "instructions"),
            (
                r#"{"input":[{"role":"user","content":[{"type":"input_text","text":1}]}]}"#,
                "input[0].content[0].text",
            ),
        ] {
            assert_eq!(refused_at(ApiKind::Responses, body), field, "{body}");
        }
    }

    #[test]
    fn textless_extras_pass_and_text_extras_are_screened() {
        let t = chat(r#"{"messages":[],"logit_bias":{"50256":-100},"n":2,"seed":7,"top_k":4}"#)
            .unwrap();
        assert_eq!(t.text, "");
        let t = chat(r#"{"messages":[],"mystery":{"a":["SECRET"]}}"#).unwrap();
        assert_eq!(t.text, "mystery\na\nSECRET");
    }
}
