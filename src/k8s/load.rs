//! Reading Kubernetes YAML: files, directories (recursively, `.yaml`/`.yml`/`.json`,
//! in sorted order), multi-document streams, empty documents and `kind: List`.

use super::node::{K8sError, Location};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

/// Bounds, so a wrong `-f /` fails fast instead of reading a disk.
pub const MAX_FILES: usize = 10_000;
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// One object (a document, or an item of a List document).
#[derive(Debug, Clone)]
pub struct Document {
    pub loc: Location,
    pub value: Value,
}

/// The files `paths` stand for: files as given, directories walked recursively.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, K8sError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| file_err(p, format!("cannot read: {e}")))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
        if out.len() > MAX_FILES {
            return Err(file_err(p, format!("more than {MAX_FILES} files")));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), K8sError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, format!("cannot read directory: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        let hidden = e
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if e.is_dir() {
            walk(&e, out)?;
        } else if e
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
        {
            out.push(e);
        }
        if out.len() > MAX_FILES {
            return Err(file_err(dir, format!("more than {MAX_FILES} files")));
        }
    }
    Ok(())
}

fn file_err(p: &Path, message: String) -> K8sError {
    K8sError {
        file: p.display().to_string(),
        doc: None,
        field: String::new(),
        message,
    }
}

/// Reads a file's bytes within [`MAX_FILE_BYTES`].
pub fn read_file(p: &Path) -> Result<String, K8sError> {
    let meta = std::fs::metadata(p).map_err(|e| file_err(p, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(file_err(p, format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    std::fs::read_to_string(p).map_err(|e| file_err(p, format!("cannot read: {e}")))
}

/// Every object of every file under `paths`, with the errors met on the way.
pub fn load_paths(paths: &[PathBuf]) -> (Vec<Document>, Vec<K8sError>) {
    let files = match expand_paths(paths) {
        Ok(f) => f,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match read_file(&f) {
            Ok(text) => {
                let (d, e) = parse_stream(&f.display().to_string(), &text);
                docs.extend(d);
                errors.extend(e);
            }
            Err(e) => errors.push(e),
        }
    }
    (docs, errors)
}

/// The documents of one YAML stream; `kind: List` documents become their items.
/// Empty documents (a leading or trailing `---`) are skipped but counted, so the
/// index matches what an editor shows between separators.
pub fn parse_stream(file: &str, text: &str) -> (Vec<Document>, Vec<K8sError>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let loc = Location::new(file, i);
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(K8sError::at(&loc, "", format!("not valid YAML: {e}")));
                // The parser cannot resynchronise after an error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if is_list(&value) {
            match value.get("items") {
                Some(Value::Sequence(items)) => {
                    for (j, item) in items.iter().enumerate() {
                        docs.push(Document {
                            loc: Location {
                                item: Some(j),
                                ..loc.clone()
                            },
                            value: item.clone(),
                        });
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => errors.push(K8sError::at(&loc, "items", "must be a list")),
            }
            continue;
        }
        docs.push(Document { loc, value });
    }
    (docs, errors)
}

/// `kind: List` (kubectl's) or any `…List` kind with `items`, as `kubectl get -o yaml` writes.
fn is_list(v: &Value) -> bool {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    kind == "List" || (kind.ends_with("List") && v.get("items").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_streams_count_empty_documents() {
        let (docs, errs) = parse_stream("x.yaml", "---\nkind: A\n---\n---\nkind: B\n---\n");
        assert!(errs.is_empty(), "{errs:?}");
        let locs: Vec<String> = docs.iter().map(|d| d.loc.to_string()).collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(locs[0], "x.yaml[0]");
        assert!(locs[1].starts_with("x.yaml["), "{locs:?}");
    }

    #[test]
    fn list_kinds_become_their_items() {
        let (docs, errs) = parse_stream(
            "l.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- kind: A\n- kind: B\n",
        );
        assert!(errs.is_empty());
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].loc.to_string(), "l.yaml[0] items[1]");
        assert_eq!(docs[1].loc.prefix(), "items[1]");
        let (_, errs) = parse_stream("l.yaml", "kind: List\nitems: 3\n");
        assert_eq!(errs[0].to_string(), "l.yaml[0] items: must be a list");
    }

    #[test]
    fn broken_yaml_names_the_document() {
        let (docs, errs) = parse_stream("b.yaml", "kind: A\n---\nkind: [unclosed\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].to_string().starts_with("b.yaml[1]: not valid YAML"),
            "{}",
            errs[0]
        );
    }
}
