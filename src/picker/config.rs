//! The endpoint picker's configuration file (YAML, or JSON when the name ends in
//! `.json`): the plugin configuration the Wasm filter takes (`plugin`, see
//! `docs/configuration.md`) and the collector's discovery and scraping settings
//! (`discovery`, see `docs/collector.md`), in one file so one ConfigMap holds it.
//!
//! ```yaml
//! plugin:
//!   pools: [{name: llama, endpoints: []}]
//!   models: [{name: meta-llama/Llama-3.1-8B-Instruct, pool: llama}]
//! discovery:
//!   scrape_interval_ms: 50
//!   pools: [{name: llama, endpoints: [vllm-llama.default.svc.cluster.local], target_ports: [8000]}]
//! ```
//!
//! A `discovery` pool feeds the `plugin` pool of the same name; without
//! `discovery` the plugin's static `endpoints` are the members and carry no
//! metrics (snapshots may still be pushed to the optional ingest listener).

use crate::collector::config::{CollectorConfig, RawCollectorConfig};
use crate::config::Config;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPickerConfig {
    plugin: serde_json::Value,
    #[serde(default)]
    discovery: Option<RawCollectorConfig>,
}

/// The validated configuration.
pub struct PickerConfig {
    pub plugin: Config,
    pub discovery: Option<CollectorConfig>,
}

impl PickerConfig {
    /// Parses and validates; `env` looks up the environment (the collector's
    /// `token_env`).
    pub fn parse(
        text: &str,
        json: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PickerConfig, String> {
        let raw: RawPickerConfig = if json {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| e.to_string())?
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| e.to_string())?
        };
        let plugin_json = serde_json::to_vec(&raw.plugin).map_err(|e| format!("plugin: {e}"))?;
        let plugin = Config::from_json(&plugin_json).map_err(|e| format!("plugin: {e}"))?;
        let discovery = match raw.discovery {
            None => None,
            Some(d) => Some(d.validate(env).map_err(|e| format!("discovery: {e}"))?),
        };
        if let Some(d) = &discovery {
            for (i, p) in d.pools.iter().enumerate() {
                if !plugin.pools.iter().any(|q| q.name == p.name) {
                    return Err(format!(
                        "discovery.pools[{i}].name: '{}' is not a plugin pool (the names must match)",
                        p.name
                    ));
                }
            }
        }
        Ok(PickerConfig { plugin, discovery })
    }

    pub fn load(path: &Path) -> Result<PickerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, json, |k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
plugin:
  pools: [{name: p, endpoints: []}]
  models: [{name: m, pool: p}]
discovery:
  scrape_interval_ms: 100
  dns_servers: ["127.0.0.1:5353"]
  pools:
  - name: p
    endpoints: [vllm.default.svc.cluster.local]
    target_ports: [8000]
"#;

    #[test]
    fn plugin_and_discovery_in_one_file() {
        let c = PickerConfig::parse(YAML, false, |_| None).unwrap();
        assert_eq!(c.plugin.pools[0].name, "p");
        let d = c.discovery.unwrap();
        assert_eq!(d.pools[0].name, "p");
        assert_eq!(d.dns_servers.len(), 1);
        assert_eq!(d.scrape_interval.as_millis(), 100);
    }

    #[test]
    fn mismatched_pools_and_bad_fields_are_named() {
        let e = PickerConfig::parse(&YAML.replace("- name: p", "- name: q"), false, |_| None)
            .err()
            .unwrap();
        assert!(e.contains("discovery.pools[0].name"), "{e}");
        let e = PickerConfig::parse("plugin: {}\nextra: 1\n", false, |_| None)
            .err()
            .unwrap();
        assert!(e.contains("extra"), "{e}");
        let e = PickerConfig::parse(r#"{"plugin": {"pools": 3}}"#, true, |_| None)
            .err()
            .unwrap();
        assert!(e.starts_with("plugin:"), "{e}");
        // Without discovery: the plugin's static endpoints.
        let c = PickerConfig::parse(
            r#"{"plugin": {"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}], "models": [{"name": "m", "pool": "p"}]}}"#,
            true,
            |_| None,
        )
        .unwrap();
        assert!(c.discovery.is_none());
    }
}
