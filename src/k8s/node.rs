//! Walking a YAML document with the path of every field at hand, so each error
//! names `file[doc] spec.rules[0].backendRefs[1].weight`, and unknown fields get
//! a "did you mean" from the field names the kind knows.

use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Where a document came from: the file as named on the command line (or found
/// under a directory given there) and the document's 0-based index in the stream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: String,
    pub doc: usize,
    /// Index in a `kind: List` document's `items`.
    pub item: Option<usize>,
}

impl Location {
    pub fn new(file: impl Into<String>, doc: usize) -> Location {
        Location {
            file: file.into(),
            doc,
            item: None,
        }
    }

    /// The path prefix of fields in this document (`items[3]` inside a List).
    pub fn prefix(&self) -> String {
        self.item.map(|i| format!("items[{i}]")).unwrap_or_default()
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.file, self.doc)?;
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

/// An error in the input, naming file, document and field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct K8sError {
    pub file: String,
    /// `None`: about the file as a whole (unreadable, not YAML before any document).
    pub doc: Option<usize>,
    /// Dotted path, e.g. `spec.targetPorts[0].number`; empty: the document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for K8sError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(d) = self.doc {
            write!(f, "[{d}]")?;
        }
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for K8sError {}

impl K8sError {
    pub fn at(loc: &Location, field: impl Into<String>, message: impl Into<String>) -> K8sError {
        K8sError {
            file: loc.file.clone(),
            doc: Some(loc.doc),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Edit distance with adjacent transpositions (optimal string alignment),
/// case-insensitive: field names differ mostly by a letter or two swapped.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The closest known name, if it is close enough to be a likely misspelling.
pub fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A value with its location and field path (built as we descend).
#[derive(Debug, Clone)]
pub struct At<'a> {
    pub value: &'a Value,
    pub loc: &'a Location,
    pub path: String,
}

impl<'a> At<'a> {
    pub fn root(value: &'a Value, loc: &'a Location) -> At<'a> {
        At {
            value,
            loc,
            path: loc.prefix(),
        }
    }

    pub fn err(&self, message: impl Into<String>) -> K8sError {
        K8sError::at(self.loc, self.path.clone(), message)
    }

    pub fn field_err(&self, key: &str, message: impl Into<String>) -> K8sError {
        K8sError::at(self.loc, join(&self.path, key), message)
    }

    fn kind_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a map",
            Value::Tagged(_) => "a tagged value",
        }
    }

    /// The mapping, with every key checked against `known`.
    pub fn fields(&self, known: &[&str]) -> Result<Fields<'a>, K8sError> {
        let Value::Mapping(map) = self.value else {
            return Err(self.err(format!("must be a map, not {}", self.kind_name())));
        };
        for k in map.keys() {
            let Some(k) = k.as_str() else {
                return Err(self.err("field names must be strings"));
            };
            if !known.contains(&k) {
                let hint = match suggest(k, known) {
                    Some(s) => format!("unknown field: did you mean {s}?"),
                    None => format!("unknown field (known: {})", known.join(", ")),
                };
                return Err(self.field_err(k, hint));
            }
        }
        Ok(Fields {
            map,
            loc: self.loc,
            path: self.path.clone(),
        })
    }

    /// The mapping, any keys (labels, free-form metadata).
    pub fn any_fields(&self) -> Result<Fields<'a>, K8sError> {
        let Value::Mapping(map) = self.value else {
            return Err(self.err(format!("must be a map, not {}", self.kind_name())));
        };
        Ok(Fields {
            map,
            loc: self.loc,
            path: self.path.clone(),
        })
    }

    pub fn seq(&self) -> Result<Vec<At<'a>>, K8sError> {
        let Value::Sequence(items) = self.value else {
            return Err(self.err(format!("must be a list, not {}", self.kind_name())));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| At {
                value: v,
                loc: self.loc,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    pub fn str(&self) -> Result<&'a str, K8sError> {
        match self.value {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(self.err(format!("must be a string, not {}", self.kind_name()))),
        }
    }

    /// A non-empty string.
    pub fn name(&self) -> Result<String, K8sError> {
        let s = self.str()?;
        if s.trim().is_empty() {
            return Err(self.err("must not be empty"));
        }
        Ok(s.to_string())
    }

    pub fn int(&self) -> Result<i64, K8sError> {
        match self.value {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| self.err(format!("must be an integer, not {n}"))),
            _ => Err(self.err(format!("must be an integer, not {}", self.kind_name()))),
        }
    }

    pub fn int_in(&self, min: i64, max: i64) -> Result<i64, K8sError> {
        let v = self.int()?;
        if v < min {
            return Err(self.err(format!("must be ≥ {min}")));
        }
        if v > max {
            return Err(self.err(format!("must be ≤ {max}")));
        }
        Ok(v)
    }

    pub fn port(&self) -> Result<u16, K8sError> {
        Ok(self.int_in(1, 65535)? as u16)
    }

    pub fn bool(&self) -> Result<bool, K8sError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.err(format!("must be true or false, not {}", self.kind_name()))),
        }
    }

    /// A map of strings to strings (labels, selectors).
    pub fn string_map(&self) -> Result<BTreeMap<String, String>, K8sError> {
        let f = self.any_fields()?;
        let mut out = BTreeMap::new();
        for (k, v) in f.map {
            let Some(k) = k.as_str() else {
                return Err(self.err("keys must be strings"));
            };
            let at = f.child(k, v);
            let v = match v {
                Value::String(s) => s.clone(),
                // Kubernetes would refuse these too; say which.
                _ => return Err(at.err(format!("must be a string, not {}", at.kind_name()))),
            };
            out.insert(k.to_string(), v);
        }
        Ok(out)
    }

    /// One of `allowed`, with a suggestion for a near miss.
    pub fn one_of(&self, allowed: &[&str]) -> Result<String, K8sError> {
        let s = self.str()?;
        if allowed.contains(&s) {
            return Ok(s.to_string());
        }
        Err(self.err(match suggest(s, allowed) {
            Some(k) => format!("'{s}' is not valid: did you mean {k}?"),
            None => format!("'{s}' is not one of {}", allowed.join(", ")),
        }))
    }
}

/// A checked mapping.
#[derive(Debug)]
pub struct Fields<'a> {
    pub map: &'a Mapping,
    pub loc: &'a Location,
    pub path: String,
}

impl<'a> Fields<'a> {
    pub fn child(&self, key: &str, value: &'a Value) -> At<'a> {
        At {
            value,
            loc: self.loc,
            path: join(&self.path, key),
        }
    }

    /// The field, if present and not null (Kubernetes treats null as unset).
    pub fn get(&self, key: &str) -> Option<At<'a>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.child(key, v)),
        }
    }

    pub fn req(&self, key: &str) -> Result<At<'a>, K8sError> {
        self.get(key)
            .ok_or_else(|| K8sError::at(self.loc, join(&self.path, key), "is required"))
    }

    pub fn err(&self, key: &str, message: impl Into<String>) -> K8sError {
        K8sError::at(self.loc, join(&self.path, key), message)
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.map.keys().filter_map(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_near_misses_only() {
        assert_eq!(edit_distance("targetPort", "targetPorts"), 1);
        assert_eq!(edit_distance("modle", "model"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            suggest("targetPort", &["selector", "targetPorts"]),
            Some("targetPorts")
        );
        assert_eq!(
            suggest("capacityScalarPercent", &["capacityScalerPercent"]),
            Some("capacityScalerPercent")
        );
        assert_eq!(suggest("zzz", &["selector", "targetPorts"]), None);
    }

    #[test]
    fn errors_carry_file_document_and_path() {
        let loc = Location::new("llm-route.yaml", 1);
        let v: Value = serde_yaml_ng::from_str("spec: {weight: -1, targetPort: 3}").unwrap();
        let root = At::root(&v, &loc);
        let top = root.fields(&["spec"]).unwrap();
        let spec = top.req("spec").unwrap();
        let e = spec.fields(&["weight", "targetPorts"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "llm-route.yaml[1] spec.targetPort: unknown field: did you mean targetPorts?"
        );
        let f = spec.any_fields().unwrap();
        let e = f.req("weight").unwrap().int_in(0, 10).unwrap_err();
        assert_eq!(e.to_string(), "llm-route.yaml[1] spec.weight: must be ≥ 0");
        let e = f.req("nope").unwrap_err();
        assert_eq!(e.field, "spec.nope");
        let e = f.req("weight").unwrap().str().unwrap_err();
        assert!(e.message.contains("must be a string"), "{e}");
    }
}
