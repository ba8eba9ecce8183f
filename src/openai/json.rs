//! A JSON tree for request bodies that the gateway must understand exactly.
//!
//! Written here rather than using `serde_json::Value` because a safety decision
//! depends on it: `Value` keeps the *last* of two equal keys without a word, while
//! other JSON parsers keep the first, so `{"content":"benign","content":"evil"}`
//! could be screened as one text and read by the model as the other. `Node` refuses
//! duplicate keys at every level. It also borrows strings from the body when they
//! have no escapes (a body is mostly text), keeps object members in body order
//! (the screened text follows the order the model reads), and keeps each number's
//! text. Depth is bounded by serde_json's recursion limit (128).
//!
//! Most bodies are read by [`fast`], which scans string text 64 bytes at a time;
//! whatever it does not accept is read again by serde_json, which decides.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

mod fast;

#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    /// The number's text (`1`, `-2`, `0.5`), as serde_json read it.
    Number(String),
    Str(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    /// Members in body order; keys are unique.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// Parses one JSON value from `text`, refusing duplicate object keys.
    pub fn parse(text: &'a str) -> Result<Node<'a>, serde_json::Error> {
        match fast::parse(text) {
            Some(node) => Ok(node),
            None => Self::parse_with_serde_json(text),
        }
    }

    /// [`Node::parse`] by serde_json alone: the reference the fast reader is
    /// tested against, and the one that explains a refusal.
    pub fn parse_with_serde_json(text: &'a str) -> Result<Node<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match self {
            Node::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What kind of JSON value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Number(_) => "a number",
            Node::Str(_) => "a string",
            Node::Array(_) => "an array",
            Node::Object(_) => "an object",
        }
    }

    /// `==`, and the same strings borrowed from the text (`Cow`'s `==` ignores
    /// it; the request's `model_span` relies on it): how the fast reader is
    /// compared with serde_json in the tests and the `request` fuzz target.
    pub fn same_reading(&self, other: &Node<'_>) -> bool {
        let same_str = |x: &Cow<str>, y: &Cow<str>| {
            x == y && matches!(x, Cow::Borrowed(_)) == matches!(y, Cow::Borrowed(_))
        };
        match (self, other) {
            (Node::Str(x), Node::Str(y)) => same_str(x, y),
            (Node::Array(x), Node::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| x.same_reading(y))
            }
            (Node::Object(x), Node::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((kx, vx), (ky, vy))| same_str(kx, ky) && vx.same_reading(vy))
            }
            _ => self == other,
        }
    }

    /// True when no string (key or value) occurs anywhere in this value: it
    /// carries no text a model could read.
    pub fn is_textless(&self) -> bool {
        match self {
            Node::Null | Node::Bool(_) | Node::Number(_) => true,
            Node::Str(_) | Node::Object(_) => false,
            Node::Array(items) => items.iter().all(Node::is_textless),
        }
    }
}

/// A string that borrows from the input when it can.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.to_string()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.to_string()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.to_string()))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members = Members::default();
        while let Some(CowStr(key)) = map.next_key()? {
            if !members.is_new(&key) {
                return Err(de::Error::custom(format_args!("duplicate key '{key}'")));
            }
            let value = map.next_value()?;
            members.push(key, value);
        }
        Ok(Node::Object(members.into_vec()))
    }
}

/// An object's members as they are read, keys checked unique. Small objects are
/// checked linearly; from [`Members::WIDE`] members on, a set keeps a hostile
/// body (thousands of keys) from making the check quadratic.
#[derive(Default)]
struct Members<'a> {
    list: Vec<(Cow<'a, str>, Node<'a>)>,
    seen: Option<HashSet<Cow<'a, str>>>,
}

impl<'a> Members<'a> {
    const WIDE: usize = 32;

    /// Whether no member has `key` yet.
    fn is_new(&self, key: &str) -> bool {
        match &self.seen {
            Some(set) => !set.contains(key),
            None => !self.list.iter().any(|(k, _)| k == key),
        }
    }

    fn push(&mut self, key: Cow<'a, str>, value: Node<'a>) {
        if let Some(set) = &mut self.seen {
            set.insert(key.clone());
        }
        self.list.push((key, value));
        if self.seen.is_none() && self.list.len() == Self::WIDE {
            self.seen = Some(self.list.iter().map(|(k, _)| k.clone()).collect());
        }
    }

    fn into_vec(self) -> Vec<(Cow<'a, str>, Node<'a>)> {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_borrows() {
        let text = r#"{"a":[1,-2,0.5,true,null],"b":"plain","c":"esc\u0061ped"}"#;
        let n = Node::parse(text).unwrap();
        assert!(matches!(
            n.get("b"),
            Some(Node::Str(Cow::Borrowed("plain")))
        ));
        assert_eq!(n.get("c").and_then(Node::as_str), Some("escaped"));
        let Some(Node::Array(items)) = n.get("a") else {
            panic!("array")
        };
        assert_eq!(items[1], Node::Number("-2".into()));
        assert!(n.get("a").unwrap().is_textless());
        assert!(!n.is_textless());
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        for body in [
            r#"{"a":1,"a":2}"#,
            r#"{"m":[{"content":"x","content":"y"}]}"#,
            // An escaped key is the same key.
            r#"{"content":"x","cont\u0065nt":"y"}"#,
        ] {
            let e = Node::parse(body).unwrap_err();
            assert!(e.to_string().contains("duplicate key"), "{body}: {e}");
        }
    }

    #[test]
    fn wide_objects_are_checked_in_linear_time() {
        let mut body = String::from("{");
        for i in 0..5000 {
            body.push_str(&format!("\"k{i}\":{i},"));
        }
        body.push_str("\"k4999\":0}");
        assert!(Node::parse(&body).is_err());
        let ok = body.replace("\"k4999\":0}", "\"k5000\":0}");
        let Node::Object(m) = Node::parse(&ok).unwrap() else {
            panic!("object")
        };
        assert_eq!(m.len(), 5001);
    }

    #[test]
    fn nested_wide_objects_do_not_share_state() {
        // Two wide sibling objects with the same keys are both fine.
        let inner: String = (0..40).map(|i| format!("\"k{i}\":1,")).collect();
        let inner = format!("{{{}}}", inner.trim_end_matches(','));
        let body = format!("{{\"a\":{inner},\"b\":{inner}}}");
        assert!(Node::parse(&body).is_ok());
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(Node::parse(&deep).is_err());
    }
}
