//! Resources → what the product runs on: the filter's plugin configuration
//! (gateway role), the collector's configuration, the Envoy bootstrap and one
//! headless Service per pool. Each output is fed to its own parser before it is
//! returned. What the filter cannot express is listed in the report, never dropped
//! silently.

use super::node::{K8sError, Location};
use super::resources::{ArmorTemplates, Extension, Inventory, Pool, PoolApi, Route};
use crate::collector::config::CollectorConfig;
use crate::config::Config;
use crate::deploy::envoy_config::{self, EnvoySettings, SAFETY_CLUSTER};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Annotation on an InferenceObjective in which `igwctl migrate` keeps the filter's
/// per-model routing (model name, criticality, target models) that the v1 API has no
/// field for. GKE and GIE ignore it.
pub const MODELS_ANNOTATION: &str = "igwctl.inference-gateway.dev/models";
/// The Envoy pods' headless Service (docs/kubernetes.md), the collector's push target.
pub const INGEST_SERVICE: &str = "inference-gateway-ingest";
/// Placeholder the Envoy init container replaces with the Secret's token.
pub const INGEST_TOKEN_PLACEHOLDER: &str = "@INGEST_TOKEN@";
pub const INGEST_TOKEN_ENV: &str = "IGW_INGEST_TOKEN";
/// Used when no `--gcp-project` is given (reported).
pub const PROJECT_PLACEHOLDER: &str = "PROJECT_ID";

#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Namespace of the gateway Deployment (the ingest Service's DNS name).
    pub namespace: String,
    /// Project of Model Armor templates given by short name (`extensionPolicy`).
    pub gcp_project: Option<String>,
    pub wasm_path: String,
    /// The filter's `allowed_endpoint_cidrs`; empty: its default (private ranges).
    pub allowed_cidrs: Vec<String>,
    /// Where Envoy reads the gateway filter's configuration (ECDS, the rendered
    /// `gateway-filter.json`): re-rendering changes the running Envoy, no restart.
    pub ecds_path: String,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            namespace: "default".into(),
            gcp_project: None,
            wasm_path: "/etc/envoy/inference_gateway.wasm".into(),
            allowed_cidrs: Vec::new(),
            ecds_path: DEFAULT_ECDS_PATH.into(),
        }
    }
}

/// Where the Envoy Deployment of docs/kubernetes.md mounts the ECDS file.
pub const DEFAULT_ECDS_PATH: &str = "/etc/envoy/ecds/gateway-filter.json";

/// What the tool did with the inputs, for people.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub summary: Vec<String>,
    /// Parts of the resources the gateway does not implement.
    pub not_honoured: Vec<String>,
    pub ignored: Vec<String>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (title, lines) in [
            ("", &self.summary),
            ("not honoured", &self.not_honoured),
            ("warnings", &self.warnings),
            ("ignored", &self.ignored),
        ] {
            if lines.is_empty() {
                continue;
            }
            if !title.is_empty() {
                let _ = writeln!(out, "{title}:");
            }
            for l in lines {
                let indent = if title.is_empty() { "" } else { "  - " };
                let _ = writeln!(out, "{indent}{l}");
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Rendered {
    pub plugin_config: Value,
    pub control_config: Value,
    pub collector_config: Value,
    pub envoy_yaml: String,
    /// The gateway filter's configuration as an ECDS discovery response.
    pub gateway_filter: String,
    pub services: Vec<Value>,
    pub report: Report,
}

fn err_at(loc: &Location, field: impl Into<String>, msg: impl Into<String>) -> K8sError {
    K8sError::at(loc, field, msg)
}

/// A rendered output its own parser refused: a bug in this tool or an input the
/// checks above missed; named after the output.
fn output_err(output: &str, e: impl std::fmt::Display) -> K8sError {
    K8sError {
        file: format!("(rendered {output})"),
        doc: None,
        field: String::new(),
        message: e.to_string(),
    }
}

pub fn headless_service_name(pool: &str) -> String {
    format!("{pool}-endpoints")
}

pub fn headless_service_dns(pool: &Pool) -> String {
    format!(
        "{}.{}.svc.cluster.local",
        headless_service_name(&pool.meta.name),
        pool.meta.namespace
    )
}

fn sorted_pools(inv: &Inventory) -> Vec<&Pool> {
    let mut pools: Vec<&Pool> = inv.pools.iter().collect();
    pools.sort_by(|a, b| (&a.meta.name, &a.meta.namespace).cmp(&(&b.meta.name, &b.meta.namespace)));
    pools
}

/// Renders everything; errors name the resource they come from.
pub fn render(inv: &Inventory, opts: &RenderOptions) -> Result<Rendered, Vec<K8sError>> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    let pools = sorted_pools(inv);
    if pools.is_empty() {
        errors.push(K8sError {
            file: "(inputs)".into(),
            doc: None,
            field: String::new(),
            message: "no InferencePool: nothing to route to".into(),
        });
        return Err(errors);
    }
    for p in &pools {
        let svc = headless_service_name(&p.meta.name);
        if svc.len() > 63 {
            errors.push(err_at(
                &p.meta.loc,
                "metadata.name",
                format!("the headless Service name '{svc}' would be longer than 63 characters"),
            ));
        }
        report.summary.push(format!(
            "pool {} ({}, {}/{}): pods {} on port(s) {}, discovered through {}",
            p.meta.name,
            p.api.api_version(),
            p.meta.namespace,
            p.meta.name,
            selector_text(&p.selector),
            ports_text(&p.ports),
            headless_service_dns(p)
        ));
        if let Some(picker) = &p.picker {
            report.not_honoured.push(format!(
                "{} {}: endpoint picker {} ({}) is not called: the filter inside Envoy picks",
                p.meta.loc,
                match p.api {
                    PoolApi::V1 => "spec.endpointPickerRef",
                    PoolApi::V1Alpha2 => "spec.extensionRef",
                },
                picker.name,
                picker.failure_mode
            ));
        }
    }

    let mut plugin = Map::new();
    plugin.insert("other_paths".into(), json!("reject"));
    plugin.insert(
        "pools".into(),
        Value::Array(pools.iter().map(|p| json!({"name": p.meta.name})).collect()),
    );
    if !opts.allowed_cidrs.is_empty() {
        plugin.insert("allowed_endpoint_cidrs".into(), json!(opts.allowed_cidrs));
    }

    // Objectives, by name.
    let mut objectives: Vec<_> = inv.objectives.iter().collect();
    objectives.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    if !objectives.is_empty() {
        plugin.insert(
            "objectives".into(),
            Value::Array(
                objectives
                    .iter()
                    .map(|o| json!({"name": o.meta.name, "priority": o.priority.unwrap_or(0)}))
                    .collect(),
            ),
        );
        for o in &objectives {
            report.summary.push(format!(
                "objective {} (priority {}{}) on pool {} (header x-gateway-inference-objective: {})",
                o.meta.name,
                o.priority.unwrap_or(0),
                if o.priority.is_none() { ", unset" } else { "" },
                o.pool_ref.name,
                o.meta.name
            ));
        }
    }

    // Models: legacy InferenceModels and the annotation `migrate` writes.
    let mut models: BTreeMap<String, (Value, Location)> = BTreeMap::new();
    for m in &inv.models {
        let mut entry = Map::new();
        entry.insert("name".into(), json!(m.model_name));
        entry.insert("pool".into(), json!(m.pool_ref.name));
        if let Some(c) = m.criticality {
            entry.insert("criticality".into(), json!(format!("{c:?}")));
        }
        let mut targets = Vec::new();
        for (i, t) in m.targets.iter().enumerate() {
            match t.weight {
                Some(0) => report.not_honoured.push(format!(
                    "{} spec.targetModels[{i}]: weight 0: {} gets no traffic and is left out",
                    m.meta.loc, t.name
                )),
                w => targets.push(json!({"name": t.name, "weight": w.unwrap_or(1)})),
            }
        }
        if !targets.is_empty() {
            entry.insert("target_models".into(), Value::Array(targets));
        }
        insert_model(
            &mut models,
            entry,
            &m.meta.loc,
            "spec.modelName",
            &mut errors,
        );
    }
    for o in &inv.objectives {
        let Some(text) = o.meta.annotations.get(MODELS_ANNOTATION) else {
            continue;
        };
        let field = format!("metadata.annotations.{MODELS_ANNOTATION}");
        match serde_json::from_str::<Vec<Map<String, Value>>>(text) {
            Ok(entries) => {
                for (i, mut e) in entries.into_iter().enumerate() {
                    const KEYS: [&str; 5] = [
                        "name",
                        "criticality",
                        "priority",
                        "target_models",
                        "adapter",
                    ];
                    if let Some(k) = e.keys().find(|k| !KEYS.contains(&k.as_str())) {
                        errors.push(err_at(
                            &o.meta.loc,
                            format!("{field}[{i}].{k}"),
                            match super::node::suggest(k, &KEYS) {
                                Some(s) => format!("unknown field: did you mean {s}?"),
                                None => format!("unknown field (known: {})", KEYS.join(", ")),
                            },
                        ));
                        continue;
                    }
                    e.insert("pool".into(), json!(o.pool_ref.name));
                    insert_model(&mut models, e, &o.meta.loc, &field, &mut errors);
                }
            }
            Err(e) => errors.push(err_at(
                &o.meta.loc,
                field,
                format!("must be a JSON list of models: {e}"),
            )),
        }
    }
    for (name, (m, _)) in &models {
        report.summary.push(format!(
            "model {name} → pool {}{}{}",
            m["pool"].as_str().unwrap_or(""),
            m.get("criticality")
                .and_then(Value::as_str)
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            m.get("target_models")
                .and_then(Value::as_array)
                .map(|t| format!(
                    ", rewritten to {}",
                    t.iter()
                        .map(|t| format!("{} ({})", t["name"].as_str().unwrap_or(""), t["weight"]))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .unwrap_or_default()
        ));
    }
    if !models.is_empty() {
        plugin.insert(
            "models".into(),
            Value::Array(models.into_values().map(|(v, _)| v).collect()),
        );
    }

    // Routes → backends.
    match route_backends(inv, &mut report, &mut errors) {
        Some(backends) if !backends.is_empty() => {
            if backends.len() == 1 {
                plugin.insert("default_pool".into(), backends[0]["pool"].clone());
            }
            plugin.insert("backends".into(), Value::Array(backends));
        }
        _ => report.summary.push(
            "no HTTPRoute to an InferencePool: each model goes to its models[] pool; other models get 404"
                .into(),
        ),
    }

    // Safety.
    if let Some(safety) = safety(inv, opts, &mut report, &mut errors) {
        plugin.insert("safety".into(), safety);
    }

    // API keys: digests only (the Secret's plaintext keys were hashed when read).
    let auth = super::apikeys::auth_section(&inv.api_keys);
    if let Some((section, _)) = &auth {
        plugin.insert("auth".into(), section.clone());
        for s in &inv.api_keys {
            report.summary.push(format!(
                "api keys from Secret {}/{}: {} (the filter's auth section, as SHA-256 digests)",
                s.meta.namespace,
                s.meta.name,
                s.consumers
                    .iter()
                    .map(|c| c.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }

    let mut policies = Vec::new();
    for p in &inv.policies {
        // A GCPInferencePoolImport (multi-cluster) carries the exported pool's
        // name: the policy applies to the rendered pool of that name, whose
        // endpoints from every cluster the collector labels.
        let import = p.target_kind == "GCPInferencePoolImport";
        let pool = pools.iter().find(|q| {
            q.meta.name == p.target_name
                && q.meta.namespace == p.meta.namespace
                && (import || (p.target_kind == "InferencePool" && q.api.group() == p.target_group))
        });
        if let Some(pool) = pool {
            if p.plugin["default"].get("custom_metrics").is_some()
                || p.plugin["scopes"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|l| l.get("custom_metrics").is_some()))
            {
                errors.push(err_at(
                    &p.meta.loc,
                    "spec.default",
                    "balancingMode CUSTOM_METRICS / customMetrics is not supported by this gateway (docs/backend-policy.md)",
                ));
                continue;
            }
            let mut entry = p.plugin.clone();
            if let Some(o) = entry.as_object_mut() {
                o.insert("pool".into(), json!(pool.meta.name));
            }
            policies.push(entry);
            report.summary.push(format!(
                "GCPBackendPolicy {}/{} applied to pool {}{} (docs/backend-policy.md)",
                p.meta.namespace,
                p.meta.name,
                pool.meta.name,
                if import {
                    " (through its GCPInferencePoolImport)"
                } else {
                    ""
                },
            ));
            continue;
        }
        if import {
            report.warnings.push(format!(
                "GCPBackendPolicy {}/{} targets GCPInferencePoolImport {}: not applied, no InferencePool {} in namespace {} among the inputs (the import names the exported pool: render that pool with this policy)",
                p.meta.namespace, p.meta.name, p.target_name, p.target_name, p.meta.namespace,
            ));
        }
        report.summary.push(format!(
            "GCPBackendPolicy {}/{} on {} {} checked ({}{}): not applied by this gateway",
            p.meta.namespace,
            p.meta.name,
            p.target_kind,
            p.target_name,
            if p.fields.is_empty() {
                "no default".to_string()
            } else {
                p.fields.join(", ")
            },
            if p.scopes > 0 {
                format!(", {} scopes", p.scopes)
            } else {
                String::new()
            }
        ));
    }
    if !policies.is_empty() {
        plugin.insert("backend_policies".into(), Value::Array(policies));
    }
    for i in &inv.ignored {
        report.ignored.push(if i.api_version.is_empty() {
            format!("{} {}", i.loc, i.kind)
        } else {
            format!("{} {} {} {}", i.loc, i.api_version, i.kind, i.name)
        });
    }
    report.warnings.extend(inv.warnings.iter().cloned());
    if !errors.is_empty() {
        errors.sort();
        return Err(errors);
    }

    let plugin_config = Value::Object(plugin);
    if let Err(e) = validate_plugin_config(&plugin_config) {
        // An auth error is the Secret's: name its entry, not the rendered index.
        let at_secret = auth
            .as_ref()
            .and_then(|(_, origin)| super::apikeys::locate(&e, origin));
        return Err(vec![
            at_secret.unwrap_or_else(|| output_err("plugin configuration", e))
        ]);
    }
    let control_config = json!({"role": "control", "ingest": {"token": INGEST_TOKEN_PLACEHOLDER}});
    if let Err(e) = Config::from_json(control_config.to_string().as_bytes()) {
        return Err(vec![output_err("control configuration", e)]);
    }

    let collector_config = collector(&pools, opts);
    let collector_yaml = serde_yaml_ng::to_string(&collector_config).unwrap_or_default();
    if let Err(e) = CollectorConfig::parse(&collector_yaml, false, |k| {
        (k == INGEST_TOKEN_ENV).then(|| "validation-only-token".to_string())
    }) {
        return Err(vec![output_err("collector configuration", e)]);
    }

    let mut settings = EnvoySettings::demo();
    settings.gateway_address = "0.0.0.0".into();
    settings.control_address = "0.0.0.0".into();
    settings.wasm_path = opts.wasm_path.clone();
    settings.gateway_config = plugin_config.clone();
    settings.control_config = control_config.clone();
    settings.gateway_ecds_path = Some(opts.ecds_path.clone());
    settings.safety_address = plugin_config
        .get("safety")
        .and_then(|s| s.get("authority"))
        .and_then(Value::as_str)
        .map(|host| format!("{host}:443"));
    // The shared renderer's header names the demo as the source; say what made this one.
    let envoy_yaml = envoy_config::render(&settings)
        .replacen(
            "(EnvoySettings::demo())",
            "(via igwctl, from Kubernetes resources)",
            1,
        )
        .replacen(
            envoy_config::REGENERATE_COMMAND,
            "igwctl render -f <resources> --out <dir>",
            1,
        );
    if let Err(e) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&envoy_yaml) {
        return Err(vec![output_err("Envoy bootstrap", e)]);
    }

    report.summary.push(format!(
        "control listener: ingest token placeholder {INGEST_TOKEN_PLACEHOLDER} (replaced from the Secret by the init container, docs/kubernetes.md); collector reads it from ${INGEST_TOKEN_ENV}"
    ));
    let gateway_filter = envoy_config::gateway_ecds(&settings);
    Ok(Rendered {
        plugin_config,
        control_config,
        collector_config,
        envoy_yaml,
        gateway_filter,
        services: pools.iter().map(|p| headless_service(p)).collect(),
        report,
    })
}

/// The endpoint picker's configuration file (`endpoint-picker --config`,
/// docs/gke.md) for rendered resources: `plugin` is the gateway filter's
/// configuration without `safety` (the picker screens nothing: on GKE Model
/// Armor is the Gateway's GCPTrafficExtension) and without `auth` (it checks no
/// keys), `discovery` the collector's without what only a separate collector
/// needs (`listen`, `push_targets`, the ingest token). Checked with `PickerConfig::parse`; what was dropped is said in
/// the returned notes.
pub fn picker_config(r: &Rendered) -> Result<(Value, Vec<String>), K8sError> {
    let mut notes = Vec::new();
    let mut plugin = r.plugin_config.clone();
    if let Some(safety) = plugin.as_object_mut().and_then(|p| p.remove("safety")) {
        notes.push(format!(
            "safety ({}) left out: the picker does not screen; keep the GCPTrafficExtension on the Gateway",
            safety["authority"].as_str().unwrap_or("callout")
        ));
    }
    // The picker does not enforce API keys (the gateway filter does).
    if let Some(auth) = plugin.as_object_mut().and_then(|p| p.remove("auth")) {
        notes.push(format!(
            "auth ({} API keys) left out: the picker does not check keys",
            auth["keys"].as_array().map_or(0, Vec::len)
        ));
    }
    let mut discovery = r.collector_config.clone();
    if let Some(d) = discovery.as_object_mut() {
        for k in ["listen", "push_targets", "token_env", "token"] {
            d.remove(k);
        }
    }
    let cfg = json!({"plugin": plugin, "discovery": discovery});
    crate::picker::config::PickerConfig::parse(&cfg.to_string(), true, |_| None)
        .map_err(|e| output_err("picker configuration", e))?;
    Ok((cfg, notes))
}

/// `Config::from_json` on the rendered configuration: what is written is what the
/// filter accepts.
pub fn validate_plugin_config(v: &Value) -> Result<Config, crate::config::ConfigError> {
    Config::from_json(v.to_string().as_bytes())
}

fn insert_model(
    models: &mut BTreeMap<String, (Value, Location)>,
    entry: Map<String, Value>,
    loc: &Location,
    field: &str,
    errors: &mut Vec<K8sError>,
) {
    let name = entry
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        errors.push(err_at(loc, field, "a model without a name"));
        return;
    }
    if let Some((_, first)) = models.get(&name) {
        errors.push(err_at(
            loc,
            field,
            format!("model '{name}' is also routed by {first}"),
        ));
        return;
    }
    models.insert(name, (Value::Object(entry), loc.clone()));
}

fn selector_text(s: &BTreeMap<String, String>) -> String {
    s.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_text(p: &[u16]) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

fn is_catch_all_cel(e: &str) -> bool {
    let compact: String = e.chars().filter(|c| !c.is_whitespace()).collect();
    compact == "request.path.startsWith(\"/\")" || compact == "request.path.startsWith('/')"
}

/// The one HTTPRoute rule whose InferencePool backends the filter splits over.
fn route_backends(
    inv: &Inventory,
    report: &mut Report,
    errors: &mut Vec<K8sError>,
) -> Option<Vec<Value>> {
    let mut routes: Vec<&Route> = inv.routes.iter().collect();
    routes
        .sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    let mut chosen: Option<(Vec<(String, u32)>, String)> = None;
    for r in routes {
        let loc = &r.meta.loc;
        if !r.hostnames.is_empty() {
            report.not_honoured.push(format!(
                "{loc} spec.hostnames: {}: the gateway listener serves every host name",
                r.hostnames.join(", ")
            ));
        }
        let parents: Vec<String> = r
            .parents
            .iter()
            .map(|p| format!("{} {}", p.kind, p.name))
            .collect();
        for rule in &r.rules {
            let at = format!("{loc} {}", rule.field);
            let mut weights: Vec<(String, u32)> = Vec::new();
            for b in &rule.backends {
                if !b.is_pool() {
                    report.not_honoured.push(format!(
                        "{loc} {}: backend {} {}: the gateway routes only to InferencePools",
                        b.field, b.kind, b.name
                    ));
                    continue;
                }
                if b.filters > 0 {
                    report.not_honoured.push(format!(
                        "{loc} {}.filters: backend filters are not applied",
                        b.field
                    ));
                }
                match weights.iter_mut().find(|(n, _)| *n == b.name) {
                    Some((_, w)) => *w += b.weight,
                    None => weights.push((b.name.clone(), b.weight)),
                }
            }
            if weights.is_empty() {
                continue;
            }
            if weights.iter().all(|(_, w)| *w == 0) {
                errors.push(err_at(
                    loc,
                    format!("{}.backendRefs", rule.field),
                    "every InferencePool weight is 0: at least one must be > 0",
                ));
                continue;
            }
            match &chosen {
                Some((w, _)) if *w == weights => continue,
                Some((_, first)) => {
                    report.not_honoured.push(format!(
                        "{at}: a second set of InferencePool backends; the gateway applies one split to every request ({first})"
                    ));
                    continue;
                }
                None => {}
            }
            for (mi, m) in rule.matches.iter().enumerate() {
                let mat = format!("{at}.matches[{mi}]");
                if let Some(p) = &m.path {
                    if !(p.kind == "PathPrefix" && p.value == "/") {
                        report.not_honoured.push(format!(
                            "{mat}.path {} {}: the gateway sends every inference path (/v1/...) to the split; other paths get 404",
                            p.kind, p.value
                        ));
                    }
                }
                for (hi, h) in m.headers.iter().enumerate() {
                    report.not_honoured.push(format!(
                        "{mat}.headers[{hi}] {} {}: {}: header matches are not evaluated; every request is split",
                        h.kind, h.name, h.value
                    ));
                }
                if m.query_params > 0 {
                    report
                        .not_honoured
                        .push(format!("{mat}.queryParams: not evaluated"));
                }
                if let Some(method) = &m.method {
                    report
                        .not_honoured
                        .push(format!("{mat}.method {method}: not evaluated"));
                }
            }
            if rule.filters > 0 {
                report
                    .not_honoured
                    .push(format!("{at}.filters: not applied"));
            }
            for o in &rule.other {
                report.not_honoured.push(format!("{at}.{o}: not applied"));
            }
            let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
            report.summary.push(format!(
                "route {}/{} ({}) {}: {}",
                r.meta.namespace,
                r.meta.name,
                parents.join(", "),
                rule.field,
                weights
                    .iter()
                    .map(|(n, w)| format!("{n} {w} ({:.0} %)", *w as f64 * 100.0 / total as f64))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            chosen = Some((weights, at));
        }
    }
    chosen.map(|(w, _)| {
        w.into_iter()
            .map(|(pool, weight)| json!({"pool": pool, "weight": weight}))
            .collect()
    })
}

fn full_template(t: &str, region: &str, project: &str) -> String {
    if t.starts_with("projects/") {
        t.to_string()
    } else {
        format!("projects/{project}/locations/{region}/templates/{t}")
    }
}

fn looks_like_template(t: &str) -> bool {
    let parts: Vec<&str> = t.split('/').collect();
    parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "templates"
        && parts.iter().all(|p| !p.is_empty())
}

/// The Model Armor extension → the filter's `safety` section.
fn safety(
    inv: &Inventory,
    opts: &RenderOptions,
    report: &mut Report,
    errors: &mut Vec<K8sError>,
) -> Option<Value> {
    let mut found: Option<(&Extension, Location)> = None;
    let mut exts: Vec<_> = inv.extensions.iter().collect();
    exts.sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    for te in exts {
        let loc = &te.meta.loc;
        for chain in &te.chains {
            for cel in chain.cel.iter().filter(|c| !is_catch_all_cel(c)) {
                report.not_honoured.push(format!(
                    "{loc} {}.matchCondition: CEL '{cel}' is not evaluated: the chain applies to every request",
                    chain.field
                ));
            }
            for e in &chain.extensions {
                if e.armor.is_none() {
                    report.not_honoured.push(format!(
                        "{loc} {}: extension {} ({}) is not run by this gateway",
                        e.field,
                        e.name,
                        e.google_service
                            .clone()
                            .or_else(|| e.backend.clone())
                            .unwrap_or_default()
                    ));
                    continue;
                }
                if let Some((_, first)) = &found {
                    errors.push(err_at(
                        loc,
                        &e.field,
                        format!("a second Model Armor extension: the gateway has one safety section (first: {first})"),
                    ));
                    continue;
                }
                found = Some((e, loc.clone()));
            }
        }
    }
    let (e, loc) = found?;
    let (region, templates) = e.armor.as_ref()?;
    let service = e.google_service.clone().unwrap_or_default();
    let ev = |names: &[&str]| names.iter().any(|n| e.events.iter().any(|x| x == n));
    // GKE's examples subscribe Model Armor to RequestHeaders only and still screen
    // prompts: the prompt is read from the body after the headers.
    let prompts = e.events.is_empty() || ev(&["RequestHeaders", "RequestBody"]);
    let responses = ev(&["ResponseHeaders", "ResponseBody"]);
    let mut events = Vec::new();
    if prompts {
        events.push("RequestBody");
    }
    if responses {
        events.push("ResponseBody");
    }
    let mut safety = Map::new();
    safety.insert("cluster".into(), json!(SAFETY_CLUSTER));
    safety.insert("authority".into(), json!(service));
    safety.insert("timeout_ms".into(), json!(e.timeout_ms.unwrap_or(1000)));
    safety.insert("fail_open".into(), json!(e.fail_open));
    safety.insert("events".into(), json!(events));
    let meta_field = format!("{}.metadata", e.field);
    match templates {
        ArmorTemplates::Policy {
            template,
            prompt,
            response,
        } => {
            let project = match &opts.gcp_project {
                Some(p) => p.clone(),
                None if template.starts_with("projects/") => String::new(),
                None => {
                    report.warnings.push(format!(
                        "{loc} {meta_field}.extensionPolicy: '{template}' is a template name: rendered as projects/{PROJECT_PLACEHOLDER}/locations/{region}/templates/{template}; pass --gcp-project"
                    ));
                    PROJECT_PLACEHOLDER.into()
                }
            };
            let full = full_template(template, region, &project);
            if !looks_like_template(&full) {
                errors.push(err_at(
                    &loc,
                    format!("{meta_field}.extensionPolicy"),
                    format!("'{template}' is neither a template name nor projects/P/locations/L/templates/T"),
                ));
                return None;
            }
            let mut d = Map::new();
            if *prompt {
                d.insert("user_prompt_template_id".into(), json!(full));
            }
            if *response {
                d.insert("model_response_template_id".into(), json!(full));
                if !responses {
                    report.not_honoured.push(format!(
                        "{loc} {meta_field}.sanitizeUserResponse: 'true', but supportedEvents has no ResponseHeaders/ResponseBody: responses are not screened"
                    ));
                }
            }
            if !prompt && !response {
                report.warnings.push(format!(
                    "{loc} {meta_field}: neither sanitizeUserPrompt nor sanitizeUserResponse is 'true': nothing is screened"
                ));
            }
            safety.insert("default".into(), Value::Object(d));
        }
        ArmorTemplates::PerModel(list) => {
            let mut out = Vec::new();
            for (i, m) in list.iter().enumerate() {
                for (key, t) in [
                    ("user_prompt_template_id", &m.prompt),
                    ("model_response_template_id", &m.response),
                ] {
                    if let Some(t) = t {
                        if !looks_like_template(t) {
                            errors.push(err_at(
                                &loc,
                                format!("{meta_field}.model_armor_settings[{i}].{key}"),
                                format!("'{t}' is not projects/P/locations/L/templates/T"),
                            ));
                        }
                    }
                }
                let mut o = Map::new();
                o.insert("model".into(), json!(m.model));
                if let Some(t) = &m.prompt {
                    o.insert("user_prompt_template_id".into(), json!(t));
                }
                if let Some(t) = &m.response {
                    o.insert("model_response_template_id".into(), json!(t));
                    if !responses {
                        report.not_honoured.push(format!(
                            "{loc} {meta_field}.model_armor_settings[{i}]: a response template, but supportedEvents has no ResponseHeaders/ResponseBody"
                        ));
                    }
                }
                out.push(Value::Object(o));
            }
            safety.insert("model_armor_settings".into(), Value::Array(out));
        }
    }
    let others: Vec<&String> = e
        .events
        .iter()
        .filter(|x| x.ends_with("Trailers"))
        .collect();
    if !others.is_empty() {
        report.summary.push(format!(
            "safety: {} have nothing to screen (the text is in the bodies)",
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    report.summary.push(format!(
        "safety: Model Armor {service} (region {region}), prompts {}, responses {}, timeout {} ms, fail {}",
        if prompts { "screened" } else { "not screened" },
        if responses { "screened" } else { "not screened" },
        e.timeout_ms.unwrap_or(1000),
        if e.fail_open { "open" } else { "closed" }
    ));
    report.warnings.push(format!(
        "{loc} {}: Model Armor needs an OAuth access token: add safety.headers.authorization (and x-goog-user-project) through your pipeline; the filter does not mint tokens",
        e.field
    ));
    Some(Value::Object(safety))
}

fn collector(pools: &[&Pool], opts: &RenderOptions) -> Value {
    json!({
        "listen": "0.0.0.0:9464",
        "scrape_interval_ms": 50,
        "scrape_timeout_ms": 500,
        "dns_refresh_interval_ms": 5000,
        "push_targets": [format!("{INGEST_SERVICE}.{}.svc.cluster.local:9902", opts.namespace)],
        "token_env": INGEST_TOKEN_ENV,
        "pools": pools.iter().map(|p| json!({
            "name": p.meta.name,
            "server_type": "vllm",
            "target_ports": p.ports,
            "endpoints": [headless_service_dns(p)],
        })).collect::<Vec<_>>(),
    })
}

/// The headless Service the collector resolves (docs/kubernetes.md section 2).
pub fn headless_service(p: &Pool) -> Value {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|port| {
            let name = if p.ports.len() == 1 {
                "http".to_string()
            } else {
                format!("http-{port}")
            };
            json!({"name": name, "port": port, "targetPort": port})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": headless_service_name(&p.meta.name),
            "namespace": p.meta.namespace,
            "labels": {"app.kubernetes.io/managed-by": "igwctl"},
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "selector": p.selector,
            "ports": ports,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::testutil::{example, examples, load_examples, parse, POOL_V1, POOL_X};

    const BOTH_POOLS: [&str; 2] = ["inferencepool-v1.yaml", "inferencepool-v1alpha2.yaml"];

    fn render_examples(names: &[&str]) -> Rendered {
        render(&load_examples(names), &RenderOptions::default())
            .unwrap_or_else(|e| panic!("{names:?}: {e:#?}"))
    }

    fn render_yaml(yaml: &str) -> Rendered {
        let (inv, errors) = parse(yaml);
        assert!(errors.is_empty(), "{errors:#?}");
        render(&inv, &RenderOptions::default()).unwrap_or_else(|e| panic!("{e:#?}"))
    }

    #[test]
    fn a_backend_policy_on_a_pool_is_rendered_for_the_filter() {
        let policy = "apiVersion: networking.gke.io/v1
kind: GCPBackendPolicy
metadata: {name: bp}
spec:
  targetRef: {group: inference.networking.k8s.io, kind: InferencePool, name: ga}
  default:
    logging: {enabled: true, sampleRate: 500000}
    scopes:
    - selector: {gke.io/zone: zone-b}
      capacityScalarPercent: 0
    - selector: {gke.io/zone: zone-a}
      backendPreference: PREFERRED
      maxInFlightPerEndpoint: 2
";
        let r = render_yaml(&format!("{POOL_V1}---\n{policy}"));
        assert_eq!(
            r.plugin_config["backend_policies"],
            json!([{
                "pool": "ga",
                "default": {},
                "logging": {"enabled": true, "sample_rate": 500000},
                "scopes": [
                    {"selector": {"gke.io/zone": "zone-b"}, "capacity_scaler_percent": 0},
                    {"selector": {"gke.io/zone": "zone-a"}, "backend_preference": "PREFERRED",
                     "max_in_flight_per_endpoint": 2}
                ]
            }])
        );
        let cfg = Config::from_json(r.plugin_config.to_string().as_bytes()).unwrap();
        let p = cfg.policy(0).unwrap();
        assert_eq!(p.scopes[1].level.max_in_flight_per_endpoint, Some(2));
        // CUSTOM_METRICS is refused, naming the policy.
        let (inv, errors) = parse(&format!(
            "{POOL_V1}---\n{}",
            policy
                .replace(
                    "    logging:",
                    "    balancingMode: CUSTOM_METRICS\n    customMetrics: []\n    logging:"
                )
                .replace("      maxInFlightPerEndpoint: 2\n", "")
        ));
        assert!(errors.is_empty(), "{errors:#?}");
        let e = render(&inv, &RenderOptions::default()).unwrap_err();
        assert!(e[0].to_string().contains("CUSTOM_METRICS"), "{e:?}");
    }

    #[test]
    fn a_policy_on_a_pool_import_applies_to_the_pool_of_that_name() {
        // The documented example, whose import names "experimental", with the
        // exported pool rendered under that name.
        let example = std::fs::read_to_string(example("backend-policy-scopes.yaml")).unwrap();
        let pool = POOL_V1.replace("name: ga", "name: experimental");
        let r = render_yaml(&format!("{pool}---\n{example}"));
        let p = &r.plugin_config["backend_policies"][0];
        assert_eq!(p["pool"], "experimental");
        assert_eq!(
            p["scopes"][0],
            json!({"selector": {"gke.io/region": "us-west2"}, "capacity_scaler_percent": 50})
        );
        assert_eq!(p["scopes"][2]["backend_preference"], "PREFERRED");
        assert_eq!(p["scopes"][2]["max_rate_per_endpoint"], 50);
        assert!(r.report.summary.iter().any(
            |l| l.contains("applied to pool experimental (through its GCPInferencePoolImport)")
        ));
        // What the example's comments promise, per endpoint's labels.
        let cfg = Config::from_json(r.plugin_config.to_string().as_bytes()).unwrap();
        let policy = cfg.policy(0).unwrap();
        let applied = |labels: &[(&str, &str)]| {
            let l: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let a = policy.applied(&l);
            (a.scope, a.scaler_percent, a.max_rate, a.preferred)
        };
        assert_eq!(
            applied(&[("gke.io/region", "us-west2")]),
            (Some(0), 50, None, false)
        );
        assert_eq!(applied(&[("env", "prod")]), (Some(1), 100, Some(40), false));
        assert_eq!(
            applied(&[("gke.io/region", "us-west2"), ("env", "prod")]),
            (Some(0), 50, None, false),
            "only the first matching scope"
        );
        let mine = [
            ("gke.io/cluster-name", "my-cluster"),
            ("gke.io/zone", "us-central1-a"),
        ];
        assert_eq!(applied(&mine), (Some(2), 100, Some(50), true));
        assert_eq!(
            applied(&mine[..1]),
            (None, 100, None, false),
            "every selector label must match"
        );
        // No pool of that name: not applied, with a warning saying what to pass.
        let r = render_yaml(&format!("{POOL_V1}---\n{example}"));
        assert!(r.plugin_config.get("backend_policies").is_none());
        assert!(
            r.report.warnings.iter().any(|w| w.contains(
                "targets GCPInferencePoolImport experimental: not applied, no InferencePool experimental in namespace default"
            )),
            "{:?}",
            r.report.warnings
        );
    }

    #[test]
    fn the_logging_example_samples_its_pools_access_log() {
        let inv = load_examples(&["inferencepool-v1alpha2.yaml", "backend-policy-logging.yaml"]);
        let r = render(&inv, &RenderOptions::default()).unwrap();
        assert_eq!(
            r.plugin_config["backend_policies"],
            json!([{"pool": "vllm-llama3-8b-instruct-preview", "default": {}, "scopes": [],
                    "logging": {"enabled": true, "sample_rate": 500000}}])
        );
    }

    #[test]
    fn utilization_balancing_is_rendered() {
        let r = render_yaml(&format!(
            "{POOL_V1}---\napiVersion: networking.gke.io/v1
kind: GCPBackendPolicy
metadata: {{name: bp}}
spec:
  targetRef: {{group: inference.networking.k8s.io, kind: InferencePool, name: ga}}
  default:
    balancingMode: UTILIZATION
    scopes:
    - selector: {{gke.io/zone: zone-a}}
      backendPreference: PREFERRED
"
        ));
        let p = &r.plugin_config["backend_policies"][0];
        assert_eq!(p["default"], json!({"balancing_mode": "UTILIZATION"}));
        let cfg = Config::from_json(r.plugin_config.to_string().as_bytes()).unwrap();
        assert_eq!(
            cfg.policy(0).unwrap().default.balancing_mode,
            Some(crate::policy::BalancingMode::Utilization)
        );
    }

    /// Every valid example, in the two sets that do not define the same object
    /// twice (the two routes and the two Model Armor extensions share names).
    const SET_SPLIT: [&str; 12] = [
        "alerts.yaml",
        "apigee-extension.yaml",
        "backend-policy-logging.yaml",
        "backend-policy-scopes.yaml",
        "hpa.yaml",
        "httproute-split-50-50.yaml",
        "inferencemodel-v1alpha2.yaml",
        "inferenceobjectives.yaml",
        "inferencepool-v1.yaml",
        "inferencepool-v1alpha2.yaml",
        "metrics-scraping.yaml",
        "model-armor-extension-settings.yaml",
    ];

    fn set_ga() -> Vec<&'static str> {
        SET_SPLIT
            .iter()
            .map(|f| match *f {
                "httproute-split-50-50.yaml" => "httproute-ga-100.yaml",
                "model-armor-extension-settings.yaml" => "model-armor-extension-v1.yaml",
                f => f,
            })
            .collect()
    }

    #[test]
    fn every_example_renders() {
        let r = render_examples(&SET_SPLIT);
        // The output passes the filter's own parser, backends included.
        let c = validate_plugin_config(&r.plugin_config).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.objectives.len(), 2);
        assert!(c.safety.is_some());
        assert_eq!(r.report.ignored.len(), 10, "{:#?}", r.report.ignored);
        let r = render_examples(&set_ga());
        validate_plugin_config(&r.plugin_config).unwrap();
        // And each one alone, with the pools it may refer to.
        for f in SET_SPLIT
            .iter()
            .chain(&["httproute-ga-100.yaml", "model-armor-extension-v1.yaml"])
        {
            let mut names = BOTH_POOLS.to_vec();
            if !names.contains(f) {
                names.push(f);
            }
            render_examples(&names);
        }
    }

    #[test]
    fn the_invalid_example_and_the_whole_directory_fail_naming_file_and_field() {
        let (_, errors) = crate::k8s::load(&[example("backend-policy-invalid.yaml")]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains(
            "backend-policy-invalid.yaml[0] spec.default.scopes[0].maxInFlightPerEndpoint:"
        ));
        let (_, errors) = crate::k8s::load(&[examples()]);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{text:#?}");
        assert!(text.iter().any(|e| e.contains("httproute-split-50-50.yaml[0] metadata.name: HTTPRoute default/llm-route is also defined at")));
        assert!(text
            .iter()
            .any(|e| e
                .contains("model-armor-extension-v1.yaml[0] metadata.name: GCPTrafficExtension")));
    }

    #[test]
    fn a_split_route_becomes_backends() {
        let mut names = BOTH_POOLS.to_vec();
        names.push("httproute-split-50-50.yaml");
        let r = render_examples(&names);
        assert_eq!(
            r.plugin_config["backends"],
            json!([
                {"pool": "vllm-llama3-8b-instruct-preview", "weight": 50},
                {"pool": "vllm-llama3-8b-instruct-ga", "weight": 50}
            ])
        );
        assert!(r.plugin_config.get("default_pool").is_none());
        // One pool: the route picks it for every model, also as default_pool.
        names[2] = "httproute-ga-100.yaml";
        let r = render_examples(&names);
        assert_eq!(
            r.plugin_config["backends"],
            json!([{"pool": "vllm-llama3-8b-instruct-ga", "weight": 100}])
        );
        assert_eq!(
            r.plugin_config["default_pool"],
            json!("vllm-llama3-8b-instruct-ga")
        );
        // No route: models route by their pool.
        let r = render_examples(&BOTH_POOLS);
        assert!(r.plugin_config.get("backends").is_none());
    }

    const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: inference-gateway}]
  rules:
  - backendRefs:
    - {group: inference.networking.k8s.io, kind: InferencePool, name: ga, weight: W1}
    - {group: inference.networking.x-k8s.io, kind: InferencePool, name: preview, weight: W2}
";

    #[test]
    fn weights_drain_and_must_not_all_be_zero() {
        let pools = format!("{POOL_V1}---\n{POOL_X}---\n");
        let r = render_yaml(&format!(
            "{pools}{}",
            ROUTE.replace("W1", "0").replace("W2", "3")
        ));
        assert_eq!(
            r.plugin_config["backends"][0],
            json!({"pool": "ga", "weight": 0})
        );
        let (inv, errors) = parse(&format!(
            "{pools}{}",
            ROUTE.replace("W1", "0").replace("W2", "0")
        ));
        assert!(errors.is_empty());
        let e = render(&inv, &RenderOptions::default()).unwrap_err();
        assert_eq!(e[0].to_string(), "t.yaml[2] spec.rules[0].backendRefs: every InferencePool weight is 0: at least one must be > 0");
    }

    #[test]
    fn what_the_filter_cannot_express_is_reported() {
        let route = ROUTE.replace("W1", "1").replace("W2", "1").replace(
            "  - backendRefs:\n",
            "  - matches:\n    - path: {type: Exact, value: /v1/completions}\n      headers: [{name: x-model, value: a}]\n    timeouts: {request: 10s}\n    backendRefs:\n    - {kind: Service, name: other, port: 80}\n",
        );
        let second = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: s}\nspec:\n  hostnames: [a.example.com]\n  rules:\n  - backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: ga}]\n";
        let r = render_yaml(&format!("{POOL_V1}---\n{POOL_X}---\n{route}{second}"));
        let nh = r.report.not_honoured.join("\n");
        for expected in [
            "t.yaml[2] spec.rules[0].matches[0].path Exact /v1/completions:",
            "t.yaml[2] spec.rules[0].matches[0].headers[0] Exact x-model: a: header matches are not evaluated",
            "t.yaml[2] spec.rules[0].timeouts: not applied",
            "t.yaml[2] spec.rules[0].backendRefs[0]: backend Service other: the gateway routes only to InferencePools",
            "t.yaml[3] spec.hostnames: a.example.com",
            "t.yaml[3] spec.rules[0]: a second set of InferencePool backends",
        ] {
            assert!(nh.contains(expected), "{expected}\n{nh}");
        }
        // What it can express is rendered.
        assert_eq!(r.plugin_config["backends"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn model_armor_becomes_the_safety_section() {
        let inv = load_examples(&["inferencepool-v1.yaml", "model-armor-extension-v1.yaml"]);
        let opts = RenderOptions {
            gcp_project: Some("my-project".into()),
            ..RenderOptions::default()
        };
        let r = render(&inv, &opts).unwrap();
        let t =
            "projects/my-project/locations/us-central1/templates/my-model-armor-template-name-id";
        assert_eq!(
            r.plugin_config["safety"],
            json!({
                "cluster": "safety_service",
                "authority": "modelarmor.us-central1.rep.googleapis.com",
                "timeout_ms": 1000,
                "fail_open": false,
                "events": ["RequestBody"],
                "default": {"user_prompt_template_id": t, "model_response_template_id": t}
            })
        );
        assert!(r.report.not_honoured.iter().any(|l| l.contains(
            "sanitizeUserResponse: 'true', but supportedEvents has no ResponseHeaders/ResponseBody"
        )));
        assert!(r
            .envoy_yaml
            .contains("sni: modelarmor.us-central1.rep.googleapis.com"));
        // Without a project: a placeholder, said out loud.
        let r = render(&inv, &RenderOptions::default()).unwrap();
        assert!(r
            .report
            .warnings
            .iter()
            .any(|w| w.contains("pass --gcp-project")));
        let inv = load_examples(&[
            "inferencepool-v1.yaml",
            "model-armor-extension-settings.yaml",
        ]);
        let r = render(&inv, &RenderOptions::default()).unwrap();
        let s = &r.plugin_config["safety"];
        assert_eq!(s["events"], json!(["RequestBody", "ResponseBody"]));
        assert_eq!(
            s["model_armor_settings"][0]["model"],
            json!("google/gemma-3-1b-it")
        );
        let c = validate_plugin_config(&r.plugin_config).unwrap();
        let safety = c.safety.unwrap();
        assert!(safety.check_prompts && safety.check_responses);
        assert_eq!(
            safety.prompt_template("google/gemma-3-1b-it"),
            Some("projects/my-project/locations/us-central1/templates/my-template")
        );
        // Two Model Armor extensions: one safety section only.
        let (inv, _) = crate::k8s::load(&[
            example("inferencepool-v1.yaml"),
            example("model-armor-extension-settings.yaml"),
        ]);
        let mut inv2 = inv.clone();
        let mut second = inv.extensions[0].clone();
        second.meta.name = "second".into();
        inv2.extensions.push(second);
        let e = render(&inv2, &RenderOptions::default()).unwrap_err();
        assert!(
            e[0].message.contains("a second Model Armor extension"),
            "{e:?}"
        );
    }

    #[test]
    fn collector_and_services_follow_the_pools() {
        let r = render_examples(&BOTH_POOLS);
        let pools = r.collector_config["pools"].as_array().unwrap();
        assert_eq!(pools[0]["name"], json!("vllm-llama3-8b-instruct-ga"));
        assert_eq!(
            pools[0]["endpoints"],
            json!(["vllm-llama3-8b-instruct-ga-endpoints.default.svc.cluster.local"])
        );
        assert_eq!(pools[0]["target_ports"], json!([8000]));
        assert_eq!(
            r.collector_config["push_targets"],
            json!(["inference-gateway-ingest.default.svc.cluster.local:9902"])
        );
        let svc = &r.services[1];
        assert_eq!(
            svc["metadata"]["name"],
            json!("vllm-llama3-8b-instruct-preview-endpoints")
        );
        assert_eq!(svc["spec"]["clusterIP"], json!("None"));
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], json!(false));
        assert_eq!(
            svc["spec"]["selector"],
            json!({"app": "vllm-llama3-8b-instruct"})
        );
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"name": "http", "port": 8000, "targetPort": 8000}])
        );
        // The bootstrap carries the plugin configuration and listens on all addresses.
        let boot: serde_yaml_ng::Value = serde_yaml_ng::from_str(&r.envoy_yaml).unwrap();
        let listeners = boot["static_resources"]["listeners"].as_sequence().unwrap();
        assert_eq!(
            listeners[0]["address"]["socket_address"]["address"].as_str(),
            Some("0.0.0.0")
        );
        // The gateway filter's configuration is discovered from the ECDS file,
        // which carries the plugin configuration and the module.
        assert!(r.envoy_yaml.contains(DEFAULT_ECDS_PATH));
        assert!(!r.envoy_yaml.contains("\"vllm-llama3-8b-instruct-preview\""));
        assert!(r.gateway_filter.contains("vllm-llama3-8b-instruct-preview"));
        assert!(r
            .gateway_filter
            .contains("/etc/envoy/inference_gateway.wasm"));
        assert!(r.envoy_yaml.contains(INGEST_TOKEN_PLACEHOLDER));
        assert!(r.envoy_yaml.contains("/etc/envoy/inference_gateway.wasm"));
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let a = render_examples(&SET_SPLIT);
        let mut rev = SET_SPLIT.to_vec();
        rev.reverse();
        let b = render_examples(&rev);
        assert_eq!(a.plugin_config.to_string(), b.plugin_config.to_string());
        assert_eq!(a.collector_config, b.collector_config);
        assert_eq!(a.envoy_yaml, b.envoy_yaml);
        assert_eq!(a.services, b.services);
    }

    #[test]
    fn target_models_with_weight_zero_are_left_out_and_said_so() {
        let r = render_yaml(&format!("{POOL_X}---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata: {{name: m}}\nspec:\n  modelName: m\n  poolRef: {{name: preview}}\n  targetModels: [{{name: a, weight: 0}}, {{name: b, weight: 5}}]\n"));
        assert_eq!(
            r.plugin_config["models"][0]["target_models"],
            json!([{"name": "b", "weight": 5}])
        );
        assert!(r
            .report
            .not_honoured
            .iter()
            .any(|l| l.contains("spec.targetModels[0]: weight 0")));
    }

    #[test]
    fn picker_config_drops_safety_and_the_push_side() {
        let mut names = BOTH_POOLS.to_vec();
        names.push("model-armor-extension-settings.yaml");
        let r = render_examples(&names);
        assert!(r.plugin_config.get("safety").is_some());
        let (cfg, notes) = picker_config(&r).unwrap();
        assert!(cfg["plugin"].get("safety").is_none());
        assert!(notes[0].contains("modelarmor"), "{notes:?}");
        for k in ["listen", "push_targets", "token_env"] {
            assert!(cfg["discovery"].get(k).is_none(), "{k}");
        }
        assert_eq!(cfg["discovery"]["pools"], r.collector_config["pools"]);
        assert_eq!(cfg["plugin"]["pools"], r.plugin_config["pools"]);
    }
}
