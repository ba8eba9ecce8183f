//! API keys from a Kubernetes `Secret` → the filter's `auth` section.
//!
//! A `v1` Secret labelled `inference-gateway.io/api-keys: "true"` holds one entry,
//! `keys.yaml` (in `stringData`, or base64 in `data`): a list of consumers, each
//! with its plaintext `key` or its `sha256`. Only digests leave this module: a
//! plaintext key is hashed while parsing and never stored, printed or put in an
//! error (errors name the Secret, the entry and the field). Other Secrets are
//! never read.

use super::node::{suggest, At, Fields, K8sError, Location};
use super::resources::{Meta, Objective};
use base64::Engine as _;
use serde_json::{json, Map, Value as Json};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;

/// The label that marks a Secret as holding the gateway's API keys.
pub const LABEL: &str = "inference-gateway.io/api-keys";
/// The Secret's one entry.
pub const ENTRY: &str = "keys.yaml";

/// Top-level fields of a Secret.
pub const SECRET_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "type",
    "data",
    "stringData",
    "immutable",
];

const CONSUMER_FIELDS: &[&str] = &[
    "id",
    "key",
    "sha256",
    "models",
    "objective",
    "requests_per_minute",
    "concurrent_requests",
    "tokens_per_minute",
    "tokens_per_day",
];

/// One consumer, as the filter gets it: the digest, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub id: String,
    /// SHA-256 of the key, 64 lowercase hex digits.
    pub sha256: String,
    pub models: Option<Vec<String>>,
    pub objective: Option<String>,
    pub requests_per_minute: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// The entry's path in the Secret (`stringData["keys.yaml"][2]`), for errors.
    pub field: String,
}

impl Consumer {
    /// The filter's `auth.keys[]` entry.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("sha256".into(), json!(self.sha256));
        if let Some(v) = &self.models {
            m.insert("models".into(), json!(v));
        }
        if let Some(v) = &self.objective {
            m.insert("objective".into(), json!(v));
        }
        if let Some(v) = self.requests_per_minute {
            m.insert("requests_per_minute".into(), json!(v));
        }
        if let Some(v) = self.concurrent_requests {
            m.insert("concurrent_requests".into(), json!(v));
        }
        if let Some(v) = self.tokens_per_minute {
            m.insert("tokens_per_minute".into(), json!(v));
        }
        if let Some(v) = self.tokens_per_day {
            m.insert("tokens_per_day".into(), json!(v));
        }
        Json::Object(m)
    }
}

/// A labelled Secret, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySecret {
    pub meta: Meta,
    pub consumers: Vec<Consumer>,
}

/// Whether a document is a Secret carrying the label (only those are read).
pub fn is_key_secret(doc: &Value) -> bool {
    doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && doc.get("kind").and_then(Value::as_str) == Some("Secret")
        && doc
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.get(LABEL))
            .and_then(Value::as_str)
            == Some("true")
}

/// The `keys.yaml` text and the field it came from. As Kubernetes does,
/// `stringData` wins over `data` for the same entry.
fn entry_text(top: &Fields) -> Result<(String, String), K8sError> {
    let mut found: Option<(String, String)> = None;
    for section in ["data", "stringData"] {
        let Some(at) = top.get(section) else { continue };
        let f = at.any_fields()?;
        for (k, v) in f.map {
            let Some(k) = k.as_str() else {
                return Err(at.err("entry names must be strings"));
            };
            let field = format!("{section}[\"{k}\"]");
            let err = |m: &str| K8sError::at(f.loc, &field, m);
            if k != ENTRY {
                return Err(err(&match suggest(k, &[ENTRY]) {
                    Some(s) => format!("unknown entry: did you mean {s}?"),
                    None => format!("unknown entry: the keys are read from {ENTRY} only"),
                }));
            }
            let Value::String(s) = v else {
                return Err(err("must be a string"));
            };
            let text = if section == "data" {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .map_err(|_| err("not valid base64"))?;
                String::from_utf8(bytes).map_err(|_| err("not UTF-8 text"))?
            } else {
                s.clone()
            };
            found = Some((field, text));
        }
    }
    found.ok_or_else(|| top.err("stringData", format!("has no {ENTRY} (nor has data)")))
}

/// Parses a labelled Secret (`top`: its top-level fields, checked).
pub fn secret(meta: Meta, top: &Fields) -> Result<KeySecret, K8sError> {
    let (field, text) = entry_text(top)?;
    let loc: &Location = top.loc;
    // Only the position: a YAML error message may quote the text, which holds keys.
    let parsed: Value = serde_yaml_ng::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        K8sError::at(loc, &field, format!("not valid YAML{at}"))
    })?;
    let list = At {
        value: &parsed,
        loc,
        path: field.clone(),
    };
    let items = match &parsed {
        Value::Null => Vec::new(),
        _ => list.seq()?,
    };
    if items.is_empty() {
        return Err(list.err(
            "no keys: with auth every request needs a key (remove the Secret or its label to turn auth off)",
        ));
    }
    let consumers = items.iter().map(consumer).collect::<Result<Vec<_>, _>>()?;
    Ok(KeySecret { meta, consumers })
}

fn consumer(at: &At) -> Result<Consumer, K8sError> {
    let f = at.fields(CONSUMER_FIELDS)?;
    let id = f.req("id")?.name()?;
    let sha256 = match (f.get("key"), f.get("sha256")) {
        (Some(_), Some(_)) => {
            return Err(at.err("give key or sha256, not both"));
        }
        (None, None) => return Err(f.err("key", "is required (or sha256)")),
        (Some(k), None) => {
            // Trimmed as the filter trims what a request presents.
            let key = k.str()?.trim();
            if key.is_empty() {
                return Err(k.err("must not be empty"));
            }
            crate::auth::digest_hex(key)
        }
        (None, Some(d)) => {
            let d = d.str()?.trim().to_ascii_lowercase();
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(f.err(
                    "sha256",
                    "must be 64 hex digits (SHA-256 of the key: printf %s \"$KEY\" | sha256sum)",
                ));
            }
            d
        }
    };
    let models = match f.get("models") {
        None => None,
        Some(m) => Some(
            m.seq()?
                .iter()
                .map(|x| x.name())
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let objective = f.get("objective").map(|o| o.name()).transpose()?;
    let limit = |name: &str, max: i64| {
        f.get(name)
            .map(|v| v.int_in(1, max).map(|n| n as u64))
            .transpose()
    };
    Ok(Consumer {
        id,
        sha256,
        models,
        objective,
        requests_per_minute: limit("requests_per_minute", u32::MAX.into())?.map(|v| v as u32),
        concurrent_requests: limit("concurrent_requests", u32::MAX.into())?.map(|v| v as u32),
        tokens_per_minute: limit("tokens_per_minute", i64::MAX)?,
        tokens_per_day: limit("tokens_per_day", i64::MAX)?,
        field: at.path.clone(),
    })
}

/// Across all Secrets: ids and keys appear once; objectives exist.
pub fn check(secrets: &[KeySecret], objectives: &[Objective]) -> Vec<K8sError> {
    let mut errors = Vec::new();
    let mut ids: BTreeMap<&str, (&Location, &str)> = BTreeMap::new();
    let mut digests: BTreeMap<&str, (&Location, &Consumer)> = BTreeMap::new();
    let names: Vec<&str> = objectives.iter().map(|o| o.meta.name.as_str()).collect();
    for s in secrets {
        let loc = &s.meta.loc;
        for c in &s.consumers {
            if let Some((l, f)) = ids.get(c.id.as_str()) {
                errors.push(K8sError::at(
                    loc,
                    format!("{}.id", c.field),
                    format!("'{}' is also the id at {l} {f}", c.id),
                ));
            } else {
                ids.insert(&c.id, (loc, &c.field));
            }
            if let Some((l, other)) = digests.get(c.sha256.as_str()) {
                errors.push(K8sError::at(
                    loc,
                    &c.field,
                    format!(
                        "the same key as {l} {} (id '{}'): a key identifies one consumer",
                        other.field, other.id
                    ),
                ));
            } else {
                digests.insert(&c.sha256, (loc, c));
            }
            if let Some(o) = &c.objective {
                if !names.contains(&o.as_str()) {
                    let mut msg = format!("no InferenceObjective '{o}' among the inputs");
                    if let Some(s) = suggest(o, &names) {
                        msg.push_str(&format!(": did you mean {s}?"));
                    }
                    errors.push(K8sError::at(loc, format!("{}.objective", c.field), msg));
                }
            }
        }
    }
    errors
}

/// The `auth` section and, per key, the Secret entry it came from (to name it
/// when the filter's own check refuses the section). `None` without Secrets.
pub fn auth_section(secrets: &[KeySecret]) -> Option<(Json, Vec<(Location, String)>)> {
    let mut sorted: Vec<&KeySecret> = secrets.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.meta.namespace, &a.meta.name, &a.meta.loc).cmp(&(
            &b.meta.namespace,
            &b.meta.name,
            &b.meta.loc,
        ))
    });
    let mut keys = Vec::new();
    let mut origin = Vec::new();
    for s in sorted {
        for c in &s.consumers {
            keys.push(c.to_json());
            origin.push((s.meta.loc.clone(), c.field.clone()));
        }
    }
    (!keys.is_empty()).then(|| (json!({ "keys": keys }), origin))
}

/// A filter error about `auth.keys[i].field`, as an error at the Secret entry.
pub fn locate(e: &crate::config::ConfigError, origin: &[(Location, String)]) -> Option<K8sError> {
    let rest = e.field.strip_prefix("auth.keys[")?;
    let (i, field) = rest.split_once(']')?;
    let (loc, entry) = origin.get(i.parse::<usize>().ok()?)?;
    Some(K8sError::at(
        loc,
        format!("{entry}{field}"),
        e.message.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::digest_hex;
    use crate::k8s::render::{picker_config, render, validate_plugin_config, RenderOptions};
    use crate::k8s::testutil::{parse, POOL_V1};

    const KEY_A: &str = "sk-alpha-0123456789-secret";
    const KEY_B: &str = "sk-bravo-9876543210-secret";

    const OBJECTIVE: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec:
  priority: -1
  poolRef: {group: inference.networking.k8s.io, name: ga}
";

    /// A labelled Secret whose `keys.yaml` is `keys` (indented by the caller's text).
    fn secret(name: &str, keys: &str) -> String {
        let body: String = keys.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  labels: {{{LABEL}: \"true\"}}\nstringData:\n  keys.yaml: |\n{body}"
        )
    }

    fn docs(parts: &[&str]) -> String {
        parts.join("---\n")
    }

    /// The errors of `yaml`, checking that none of them quotes a key.
    fn errors(yaml: &str) -> Vec<K8sError> {
        let (inv, mut errs) = parse(yaml);
        if errs.is_empty() {
            errs = render(&inv, &RenderOptions::default())
                .err()
                .unwrap_or_default();
        }
        for e in &errs {
            let t = e.to_string();
            assert!(!t.contains(KEY_A) && !t.contains(KEY_B), "key leaked: {t}");
        }
        errs
    }

    fn one_error(yaml: &str) -> K8sError {
        let errs = errors(yaml);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs.into_iter().next().unwrap()
    }

    /// Every text igwctl writes or prints for these inputs.
    fn all_output(yaml: &str) -> (crate::config::Config, String) {
        let (inv, errs) = parse(yaml);
        assert!(errs.is_empty(), "{errs:#?}");
        let r = render(&inv, &RenderOptions::default()).unwrap();
        let cfg = validate_plugin_config(&r.plugin_config).unwrap();
        let text = crate::k8s::watch::output_files(&r, crate::k8s::watch::Format::Yaml)
            .into_iter()
            .map(|(_, t)| t)
            .chain([format!("{inv:?}"), format!("{r:?}")])
            .collect::<String>();
        (cfg, text)
    }

    #[test]
    fn keys_are_hashed_and_never_written() {
        let yaml = docs(&[
            POOL_V1,
            OBJECTIVE,
            &secret(
                "api-keys",
                &format!(
                    "- id: team-a\n  key: {KEY_A}\n  models: [llama]\n  requests_per_minute: 60\n  concurrent_requests: 4\n  tokens_per_minute: 10000\n  tokens_per_day: 1000000\n- id: batch-job\n  sha256: {}\n  objective: batch\n",
                    digest_hex(KEY_B).to_uppercase()
                ),
            ),
        ]);
        let (cfg, text) = all_output(&yaml);
        assert!(!text.contains(KEY_A), "plaintext key in the output");
        assert!(text.contains(&digest_hex(KEY_A)));
        let auth = cfg.auth.expect("auth section");
        assert_eq!(auth.keys.len(), 2);
        let a = &auth.keys[0];
        assert_eq!(a.id, "team-a");
        assert_eq!(a.models.as_ref().unwrap().len(), 1);
        assert_eq!(a.limits.requests_per_minute, Some(60));
        assert_eq!(a.limits.concurrent_requests, Some(4));
        assert_eq!(a.limits.tokens_per_minute, Some(10_000));
        assert_eq!(a.limits.tokens_per_day, Some(1_000_000));
        // The filter identifies the key by its digest; the uppercase digest was normalised.
        assert_eq!(auth.identify(Some(KEY_A)).unwrap(), 0);
        assert_eq!(auth.identify(Some(KEY_B)).unwrap(), 1);
        assert_eq!(auth.keys[1].objective.as_deref(), Some("batch"));
        assert!(!auth.keys[1].limits.is_limited());
    }

    #[test]
    fn base64_data_reads_like_string_data() {
        let keys = format!("- id: team-a\n  key: {KEY_A}\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&keys);
        let data = format!(
            "apiVersion: v1\nkind: Secret\ntype: Opaque\nmetadata:\n  name: k\n  labels: {{{LABEL}: \"true\"}}\ndata:\n  keys.yaml: {b64}\n"
        );
        let (cfg, text) = all_output(&docs(&[POOL_V1, &data]));
        assert!(!text.contains(KEY_A));
        let auth = cfg.auth.unwrap();
        assert_eq!(auth.identify(Some(KEY_A)).unwrap(), 0);

        // stringData wins over data for the same entry, as in Kubernetes.
        let both =
            format!("{data}stringData:\n  keys.yaml: |\n    - id: team-b\n      key: {KEY_B}\n");
        let (cfg, _) = all_output(&docs(&[POOL_V1, &both]));
        let auth = cfg.auth.unwrap();
        assert_eq!(auth.keys.len(), 1);
        assert_eq!(auth.keys[0].id, "team-b");
        assert!(auth.identify(Some(KEY_A)).is_err());

        let bad = data.replace(&b64, "not*base64");
        let e = one_error(&docs(&[POOL_V1, &bad]));
        assert_eq!(e.field, "data[\"keys.yaml\"]");
        assert!(e.message.contains("base64"), "{e}");
    }

    #[test]
    fn errors_name_the_field_never_the_key() {
        let at = |keys: &str| one_error(&docs(&[POOL_V1, OBJECTIVE, &secret("s", keys)]));
        let entry = "stringData[\"keys.yaml\"][0]";

        let e = at(&format!(
            "- id: a\n  key: {KEY_A}\n  sha256: {}\n",
            digest_hex(KEY_A)
        ));
        assert_eq!(e.field, entry);
        assert!(e.message.contains("not both"), "{e}");

        let e = at("- id: a\n");
        assert_eq!(e.field, format!("{entry}.key"));

        let e = at(&format!("- id: a\n  kye: {KEY_A}\n"));
        assert_eq!(e.field, format!("{entry}.kye"));
        assert!(e.message.contains("did you mean key?"), "{e}");

        let e = at(&format!("- id: a\n  key: [{KEY_A}]\n"));
        assert_eq!(e.field, format!("{entry}.key"));
        assert!(e.message.contains("must be a string"), "{e}");

        let e = at(&format!("- id: a\n  sha256: {KEY_A}\n"));
        assert_eq!(e.field, format!("{entry}.sha256"));

        let e = at(&format!(
            "- id: a\n  key: {KEY_A}\n  requests_per_minute: 0\n"
        ));
        assert_eq!(e.field, format!("{entry}.requests_per_minute"));
        assert!(e.message.contains("≥ 1"), "{e}");

        // YAML broken right after the key: only the position is reported.
        let e = at(&format!("- id: a\n  key: {KEY_A}\n  models: [x\n"));
        assert_eq!(e.field, "stringData[\"keys.yaml\"]");
        assert!(e.message.starts_with("not valid YAML"), "{e}");

        let e = at("");
        assert!(e.message.starts_with("no keys"), "{e}");

        let e = one_error(&docs(&[
            POOL_V1,
            &secret("s", "- id: a\n  key: x\n").replace("keys.yaml:", "keys.yml:"),
        ]));
        assert_eq!(e.field, "stringData[\"keys.yml\"]");
        assert!(e.message.contains("did you mean keys.yaml?"), "{e}");

        // What only the filter checks (the id's characters) still names the entry.
        let e = at(&format!(
            "- id: ok\n  key: {KEY_B}\n- id: not ok!\n  key: {KEY_A}\n"
        ));
        assert_eq!(e.field, "stringData[\"keys.yaml\"][1].id");
        assert_eq!(e.file, "t.yaml");
        assert_eq!(e.doc, Some(2));
    }

    #[test]
    fn secrets_merge_and_duplicates_name_both() {
        let one = secret("one", &format!("- id: a\n  key: {KEY_A}\n"));
        let two = secret("two", &format!("- id: b\n  key: {KEY_B}\n"));
        let (cfg, _) = all_output(&docs(&[POOL_V1, &one, &two]));
        let ids: Vec<String> = cfg.auth.unwrap().keys.into_iter().map(|k| k.id).collect();
        assert_eq!(ids, ["a", "b"]);

        let same_id = secret("two", &format!("- id: a\n  key: {KEY_B}\n"));
        let e = one_error(&docs(&[POOL_V1, &one, &same_id]));
        assert_eq!(e.doc, Some(2));
        assert_eq!(e.field, "stringData[\"keys.yaml\"][0].id");
        assert!(
            e.message.contains("t.yaml[1] stringData[\"keys.yaml\"][0]"),
            "{e}"
        );

        // The same key, once in plaintext and once as its digest.
        let same_key = secret(
            "two",
            &format!("- id: b\n  sha256: {}\n", digest_hex(KEY_A)),
        );
        let e = one_error(&docs(&[POOL_V1, &one, &same_key]));
        assert_eq!(e.doc, Some(2));
        assert!(e.message.contains("the same key as t.yaml[1]"), "{e}");
        assert!(e.message.contains("id 'a'"), "{e}");

        // The same Secret twice: kubectl would keep one; its entries clash too.
        let errs = errors(&docs(&[POOL_V1, &one, &one]));
        assert!(
            errs.iter()
                .any(|e| e.message.contains("Secret default/one is also defined")),
            "{errs:#?}"
        );
    }

    #[test]
    fn objectives_must_exist() {
        let keys = format!("- id: a\n  key: {KEY_A}\n  objective: bach\n");
        let e = one_error(&docs(&[POOL_V1, OBJECTIVE, &secret("s", &keys)]));
        assert_eq!(e.field, "stringData[\"keys.yaml\"][0].objective");
        assert!(e.message.contains("did you mean batch?"), "{e}");
        let (cfg, _) = all_output(&docs(&[
            POOL_V1,
            OBJECTIVE,
            &secret("s", &keys.replace("bach", "batch")),
        ]));
        let auth = cfg.auth.unwrap();
        assert_eq!(auth.keys[0].objective.as_deref(), Some("batch"));
        assert!(cfg.objectives.contains_key("batch"));
    }

    #[test]
    fn unlabelled_secrets_are_ignored_unread() {
        let unlabelled = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: hf-token}}\nstringData:\n  keys.yaml: \"- id: x\\n  key: {KEY_A}\"\n  oops: [not, a, string]\n"
        );
        let off = secret("k", "- id: x\n  key: y\n").replace("\"true\"", "\"false\"");
        let (inv, errs) = parse(&docs(&[POOL_V1, &unlabelled, &off]));
        assert!(errs.is_empty(), "{errs:#?}");
        assert!(inv.api_keys.is_empty());
        assert_eq!(inv.ignored.len(), 2);
        let r = render(&inv, &RenderOptions::default()).unwrap();
        assert!(r.plugin_config.get("auth").is_none());
        assert!(!r.report.text().contains(KEY_A));
    }

    #[test]
    fn the_picker_gets_no_auth() {
        let yaml = docs(&[POOL_V1, &secret("s", &format!("- id: a\n  key: {KEY_A}\n"))]);
        let (inv, _) = parse(&yaml);
        let r = render(&inv, &RenderOptions::default()).unwrap();
        assert!(r.plugin_config.get("auth").is_some());
        let (cfg, notes) = picker_config(&r).unwrap();
        assert!(cfg["plugin"].get("auth").is_none(), "{cfg}");
        assert!(
            notes.iter().any(|n| n.starts_with("auth (1 API keys)")),
            "{notes:?}"
        );
    }

    #[test]
    fn migrate_does_not_print_the_secret() {
        let yaml = docs(&[POOL_V1, &secret("s", &format!("- id: a\n  key: {KEY_A}\n"))]);
        let (inv, _) = parse(&yaml);
        let m = crate::k8s::migrate::migrate(&inv, &Default::default()).unwrap();
        let text = crate::k8s::migrate::yaml_stream(&m.migrated) + &m.plan(None);
        assert!(!text.contains(KEY_A));
        assert!(
            text.contains("API-key Secret default/s is left out"),
            "{text}"
        );
    }
}
