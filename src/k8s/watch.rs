//! Writing outputs atomically (temp file + rename, so a file watcher such as
//! Envoy's never reads half a file) and re-rendering when the inputs change.

use super::load::{expand_paths, read_file};
use super::node::K8sError;
use super::render::{render, RenderOptions, Rendered};
use crate::deploy::envoy_config::pretty_json;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    Json,
    #[default]
    Yaml,
}

/// Writes `contents` to `dir/name` through a temporary file in the same
/// directory and a rename; an unchanged file is left alone (no spurious reload).
/// Returns whether the file changed.
pub fn write_atomic(dir: &Path, name: &str, contents: &str) -> std::io::Result<bool> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == contents.as_bytes()) {
        return Ok(false);
    }
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, &path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(true)
}

/// The files `render --out` writes: name and contents, in a fixed order.
pub fn output_files(r: &Rendered, format: Format) -> Vec<(String, String)> {
    let services = match format {
        Format::Yaml => r
            .services
            .iter()
            .map(|s| format!("---\n{}", serde_yaml_ng::to_string(s).unwrap_or_default()))
            .collect::<String>(),
        Format::Json => pretty_json(&serde_json::json!({
            "apiVersion": "v1", "kind": "List", "items": r.services,
        })),
    };
    let (collector_name, collector) = match format {
        Format::Yaml => (
            "collector.yaml",
            serde_yaml_ng::to_string(&r.collector_config).unwrap_or_default(),
        ),
        Format::Json => ("collector.json", pretty_json(&r.collector_config)),
    };
    let services_name = match format {
        Format::Yaml => "services.yaml",
        Format::Json => "services.json",
    };
    vec![
        ("plugin-config.json".into(), pretty_json(&r.plugin_config)),
        ("control-config.json".into(), pretty_json(&r.control_config)),
        (collector_name.into(), collector),
        ("envoy.yaml".into(), r.envoy_yaml.clone()),
        // Last: Envoy watches it and reloads the filter's configuration live.
        ("gateway-filter.json".into(), r.gateway_filter.clone()),
        (services_name.into(), services),
        ("report.txt".into(), r.report.text()),
    ]
}

/// Writes every output; returns the names of the files that changed.
pub fn write_outputs(r: &Rendered, dir: &Path, format: Format) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut changed = Vec::new();
    for (name, contents) in output_files(r, format) {
        if write_atomic(dir, &name, &contents)? {
            changed.push(name);
        }
    }
    Ok(changed)
}

/// The inputs' contents, to notice a change (polled: works on every file system
/// and with ConfigMap symlink swaps). Bounded by the loader's file limits.
pub fn fingerprint(paths: &[PathBuf]) -> Result<u64, K8sError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in expand_paths(paths)? {
        h.update(f.display().to_string().as_bytes());
        h.update(&[0]);
        h.update(read_file(&f)?.as_bytes());
        h.update(&[0]);
    }
    Ok(h.digest())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    Unchanged,
    /// Rendered; the files that changed.
    Rendered(Vec<String>),
    /// The inputs are wrong: the previous outputs stay.
    Invalid(Vec<K8sError>),
}

/// Re-renders into `out` when the inputs' contents changed since the last tick.
pub struct Watcher {
    pub paths: Vec<PathBuf>,
    pub out: PathBuf,
    pub format: Format,
    pub options: RenderOptions,
    last: Option<u64>,
}

impl Watcher {
    pub fn new(paths: Vec<PathBuf>, out: PathBuf, format: Format, options: RenderOptions) -> Self {
        Watcher {
            paths,
            out,
            format,
            options,
            last: None,
        }
    }

    pub fn tick(&mut self) -> std::io::Result<Tick> {
        let fp = match fingerprint(&self.paths) {
            Ok(fp) => fp,
            Err(e) => return Ok(Tick::Invalid(vec![e])),
        };
        if self.last == Some(fp) {
            return Ok(Tick::Unchanged);
        }
        // Remember bad inputs too: they are reported once, not every tick.
        self.last = Some(fp);
        let (inv, errors) = super::load(&self.paths);
        if !errors.is_empty() {
            return Ok(Tick::Invalid(errors));
        }
        match render(&inv, &self.options) {
            Ok(r) => Ok(Tick::Rendered(write_outputs(&r, &self.out, self.format)?)),
            Err(errors) => Ok(Tick::Invalid(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: x}}\n  targetPorts: [{number: 8000}]\n";

    #[test]
    fn renders_on_change_only_and_keeps_outputs_on_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        let out = dir.path().join("out");
        std::fs::write(input.join("pool.yaml"), POOL).unwrap();
        let mut w = Watcher::new(
            vec![input.clone()],
            out.clone(),
            Format::Yaml,
            RenderOptions::default(),
        );
        let Tick::Rendered(files) = w.tick().unwrap() else {
            panic!()
        };
        assert!(
            files.contains(&"plugin-config.json".to_string()),
            "{files:?}"
        );
        assert_eq!(w.tick().unwrap(), Tick::Unchanged);
        let before = std::fs::read_to_string(out.join("plugin-config.json")).unwrap();
        std::fs::write(
            input.join("pool.yaml"),
            POOL.replace("targetPorts", "targetPort"),
        )
        .unwrap();
        let Tick::Invalid(errs) = w.tick().unwrap() else {
            panic!()
        };
        assert!(
            errs[0].to_string().contains("did you mean targetPorts?"),
            "{errs:?}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("plugin-config.json")).unwrap(),
            before
        );
        std::fs::write(input.join("pool.yaml"), POOL.replace("name: p", "name: q")).unwrap();
        let Tick::Rendered(files) = w.tick().unwrap() else {
            panic!()
        };
        assert!(files.contains(&"plugin-config.json".to_string()));
        assert!(std::fs::read_to_string(out.join("plugin-config.json"))
            .unwrap()
            .contains("\"q\""));
        // No temporary files left behind.
        for e in std::fs::read_dir(&out).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.starts_with('.'), "{name}");
        }
    }

    #[test]
    fn rotating_a_key_rewrites_the_ecds_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        let out = dir.path().join("out");
        std::fs::write(input.join("pool.yaml"), POOL).unwrap();
        let secret = |key: &str| {
            format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: keys\n  labels: {{inference-gateway.io/api-keys: \"true\"}}\nstringData:\n  keys.yaml: |\n    - id: team-a\n      key: {key}\n")
        };
        std::fs::write(input.join("keys.yaml"), secret("sk-old-key-1")).unwrap();
        let mut w = Watcher::new(
            vec![input.clone()],
            out.clone(),
            Format::Yaml,
            RenderOptions::default(),
        );
        assert!(matches!(w.tick().unwrap(), Tick::Rendered(_)));
        let ecds = || std::fs::read_to_string(out.join("gateway-filter.json")).unwrap();
        assert!(ecds().contains(&crate::auth::digest_hex("sk-old-key-1")));

        std::fs::write(input.join("keys.yaml"), secret("sk-new-key-2")).unwrap();
        let Tick::Rendered(files) = w.tick().unwrap() else {
            panic!()
        };
        // Envoy picks the new filter configuration up from this file, no restart.
        assert!(
            files.contains(&"gateway-filter.json".to_string()),
            "{files:?}"
        );
        assert!(ecds().contains(&crate::auth::digest_hex("sk-new-key-2")));
        assert!(!ecds().contains(&crate::auth::digest_hex("sk-old-key-1")));
        for (_, text) in output_files(
            &render(&super::super::load(&[input]).0, &RenderOptions::default()).unwrap(),
            Format::Yaml,
        ) {
            assert!(!text.contains("sk-new-key-2"));
        }
    }
}
