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
//!
//! With `plugin.safety` (prompt and response screening, `docs/safety.md`) the
//! picker calls the safety service itself: `safety_url` is its base URL
//! (`http://host:port`; the filter names an Envoy cluster instead, which a
//! separate process does not have). `plugin.safety.cluster` is then unused.

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
    #[serde(default)]
    safety_url: Option<String>,
}

/// The validated configuration.
pub struct PickerConfig {
    pub plugin: Config,
    pub discovery: Option<CollectorConfig>,
    /// The safety service's base URL (no trailing slash), set exactly when
    /// `plugin.safety` is.
    pub safety_url: Option<String>,
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
        let safety_url = match (&plugin.safety, raw.safety_url) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err("safety_url: set, but plugin.safety is not (nothing to screen)".into())
            }
            (Some(_), None) => return Err(
                "safety_url: required with plugin.safety (the safety service's http://host:port)"
                    .into(),
            ),
            (Some(_), Some(url)) => Some(check_safety_url(&url)?),
        };
        Ok(PickerConfig {
            plugin,
            discovery,
            safety_url,
        })
    }

    pub fn load(path: &Path) -> Result<PickerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, json, |k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }
}

/// `http://host[:port][/prefix]`: plain HTTP to a service in the cluster (the
/// picker's client has no TLS; Google's Model Armor itself is reached through
/// its own GCPTrafficExtension, see docs/gke.md).
fn check_safety_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("safety_url: '{url}': {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!(
            "safety_url: '{url}': only http:// is supported (the picker's client has no TLS)"
        ));
    }
    if parsed.host_str().is_none() || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "safety_url: '{url}': must be http://host[:port][/prefix]"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
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

    #[test]
    fn safety_needs_a_url_and_a_url_needs_safety() {
        let plugin = r#"pools: [{name: p, endpoints: ["127.0.0.1:1"]}]
  models: [{name: m, pool: p}]"#;
        let safety = r#"
  safety: {cluster: unused, default: {user_prompt_template_id: projects/p/locations/l/templates/t}}"#;
        let with = |extra: &str, url: &str| {
            PickerConfig::parse(&format!("plugin:\n  {plugin}{extra}\n{url}"), false, |_| {
                None
            })
        };
        let c = with(safety, "safety_url: http://127.0.0.1:8090/").unwrap();
        assert_eq!(c.safety_url.as_deref(), Some("http://127.0.0.1:8090"));
        for (extra, url, field) in [
            (safety, "", "safety_url: required"),
            (
                "",
                "safety_url: http://127.0.0.1:8090",
                "plugin.safety is not",
            ),
            (safety, "safety_url: https://x:443", "only http://"),
            (safety, "safety_url: 'not a url'", "safety_url"),
        ] {
            let e = with(extra, url).err().unwrap();
            assert!(e.contains(field), "{e}");
        }
    }
}
