//! OpenAI request bodies built from structure (`arbitrary`), shared by the
//! `request_structured` target and the example that writes its seeds
//! (`cargo run --example request_structured_seeds`).

use arbitrary::Arbitrary;
use inference_gateway::openai::ApiKind;

#[derive(Arbitrary, Debug)]
pub enum Kind {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

#[derive(Arbitrary, Debug)]
pub enum Key {
    Model,
    Stream,
    StreamOptions,
    IncludeUsage,
    Priority,
    Prompt,
    Messages,
    Input,
    Instructions,
    Role,
    Content,
    Type,
    Text,
    Tools,
    ToolCalls,
    Other(String),
}

impl Key {
    fn name(&self) -> &str {
        match self {
            Key::Model => "model",
            Key::Stream => "stream",
            Key::StreamOptions => "stream_options",
            Key::IncludeUsage => "include_usage",
            Key::Priority => "priority",
            Key::Prompt => "prompt",
            Key::Messages => "messages",
            Key::Input => "input",
            Key::Instructions => "instructions",
            Key::Role => "role",
            Key::Content => "content",
            Key::Type => "type",
            Key::Text => "text",
            Key::Tools => "tools",
            Key::ToolCalls => "tool_calls",
            Key::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A number as written (exponents, huge values, `-0`).
    RawNumber(u8, u32),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(Key, Json)>),
    /// `{"role": …, "content": …}`
    Message(Role, Box<Json>),
    /// `{"type": "text"|"input_text"|…, "text": …}`
    Part(PartType, String),
    /// `{"include_usage": …}`
    StreamOptions(Box<Json>),
}

#[derive(Arbitrary, Debug)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
    Developer,
}

#[derive(Arbitrary, Debug)]
pub enum PartType {
    Text,
    InputText,
    OutputText,
    ImageUrl,
    InputAudio,
}

#[derive(Arbitrary, Debug)]
pub struct Body {
    pub kind: Kind,
    /// The `model` string; `None`: `model` is `fields`' business.
    pub model: Option<String>,
    pub escape_model: bool,
    /// Where among `fields` the model goes.
    pub model_at: u8,
    pub fields: Vec<(Key, Json)>,
    /// Whitespace style: 0 compact, 1 spaces, 2 newlines and tabs.
    pub ws: u8,
    pub leading_ws: bool,
}

struct Out {
    s: String,
    ws: u8,
}

impl Out {
    fn sep(&mut self) {
        match self.ws % 3 {
            0 => {}
            1 => self.s.push(' '),
            _ => self.s.push_str("\n\t"),
        }
    }

    fn string(&mut self, v: &str, escape_all: bool) {
        if !escape_all {
            self.s.push_str(&serde_json::to_string(v).unwrap());
            return;
        }
        self.s.push('"');
        for unit in v.encode_utf16() {
            self.s.push_str(&format!("\\u{unit:04x}"));
        }
        self.s.push('"');
    }

    fn key(&mut self, k: &Key) {
        self.string(k.name(), false);
        self.s.push(':');
        self.sep();
    }

    fn value(&mut self, v: &Json, depth: usize) {
        if depth > 40 {
            self.s.push_str("null");
            return;
        }
        match v {
            Json::Null => self.s.push_str("null"),
            Json::Bool(b) => self.s.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => self.s.push_str(&i.to_string()),
            Json::Float(f) => self.s.push_str(&serde_json::to_string(f).unwrap()),
            Json::RawNumber(style, n) => self.s.push_str(&match style % 6 {
                0 => format!("{n}e{}", style / 6),
                1 => format!("-{n}.5E-{}", style / 6),
                2 => "-0".to_string(),
                3 => format!("{n}00000000000000000000"),
                4 => format!("{n}.0"),
                _ => format!("-{n}"),
            }),
            Json::Str(s) => self.string(s, false),
            Json::Arr(items) => {
                self.s.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.s.push(',');
                        self.sep();
                    }
                    self.value(item, depth + 1);
                }
                self.s.push(']');
            }
            Json::Obj(fields) => {
                self.s.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        self.s.push(',');
                        self.sep();
                    }
                    self.key(k);
                    self.value(v, depth + 1);
                }
                self.s.push('}');
            }
            Json::Message(role, content) => {
                let role = match role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                    Role::Tool => "tool",
                    Role::Developer => "developer",
                };
                self.s.push_str(&format!("{{\"role\":\"{role}\","));
                self.sep();
                self.s.push_str("\"content\":");
                self.value(content, depth + 1);
                self.s.push('}');
            }
            Json::Part(t, text) => {
                let t = match t {
                    PartType::Text => "text",
                    PartType::InputText => "input_text",
                    PartType::OutputText => "output_text",
                    PartType::ImageUrl => "image_url",
                    PartType::InputAudio => "input_audio",
                };
                self.s.push_str(&format!("{{\"type\":\"{t}\",\"text\":"));
                self.string(text, false);
                self.s.push('}');
            }
            Json::StreamOptions(v) => {
                self.s.push_str("{\"include_usage\":");
                self.value(v, depth + 1);
                self.s.push('}');
            }
        }
    }
}

impl Body {
    /// The API the body is sent to.
    pub fn api(&self) -> ApiKind {
        match self.kind {
            Kind::Chat => ApiKind::ChatCompletions,
            Kind::Completions => ApiKind::Completions,
            Kind::Embeddings => ApiKind::Embeddings,
            Kind::Responses => ApiKind::Responses,
        }
    }

    /// The body as JSON text, fields in the generated order with `model` at
    /// `model_at`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Out {
            s: String::new(),
            ws: self.ws,
        };
        if self.leading_ws {
            out.s.push_str(" \n");
        }
        out.s.push('{');
        let model_at = (self.model_at as usize) % (self.fields.len() + 1);
        let mut first = true;
        for i in 0..=self.fields.len() {
            if i == model_at {
                if let Some(m) = &self.model {
                    if !first {
                        out.s.push(',');
                    }
                    first = false;
                    out.key(&Key::Model);
                    out.string(m, self.escape_model);
                }
            }
            if let Some((k, v)) = self.fields.get(i) {
                if !first {
                    out.s.push(',');
                    out.sep();
                }
                first = false;
                out.key(k);
                out.value(v, 0);
            }
        }
        out.s.push('}');
        out.s.into_bytes()
    }
}
