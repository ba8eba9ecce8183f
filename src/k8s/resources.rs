//! The resources the tool understands, parsed from YAML with every field checked:
//! InferencePool (v1 and v1alpha2), InferenceObjective, InferenceModel, HTTPRoute,
//! GCPTrafficExtension (Model Armor), GCPBackendPolicy and Secrets labelled as
//! API keys (`apikeys`). Everything else is listed as ignored (and not read).
//! Errors name file, document and field.

use super::apikeys::{self, is_key_secret, KeySecret};
use super::load::Document;
use super::node::{suggest, At, Fields, K8sError, Location};
use crate::config::Criticality;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;

pub const GROUP_V1: &str = "inference.networking.k8s.io";
pub const GROUP_X: &str = "inference.networking.x-k8s.io";
pub const API_POOL_V1: &str = "inference.networking.k8s.io/v1";
pub const API_X_V1ALPHA2: &str = "inference.networking.x-k8s.io/v1alpha2";
pub const API_GATEWAY: &str = "gateway.networking.k8s.io/v1";
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const API_GKE: &str = "networking.gke.io/v1";

/// The kinds this tool reads, with the apiVersions each may have.
pub const KNOWN_KINDS: &[(&str, &[&str])] = &[
    ("InferencePool", &[API_POOL_V1, API_X_V1ALPHA2]),
    ("InferenceObjective", &[API_X_V1ALPHA2]),
    ("InferenceModel", &[API_X_V1ALPHA2]),
    ("HTTPRoute", &[API_GATEWAY]),
    ("GCPTrafficExtension", &[API_GKE]),
    ("GCPBackendPolicy", &[API_GKE]),
];

/// API groups whose other kinds are ignored, unless a kind is a near miss of one
/// of ours (then it is an error with a suggestion).
const OUR_GROUPS: &[&str] = &[GROUP_V1, GROUP_X, GATEWAY_GROUP, "networking.gke.io"];

const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
const META: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub name: String,
    /// `default` when unset (what `kubectl apply` without `-n` gives).
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
    pub loc: Location,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolApi {
    V1,
    V1Alpha2,
}

impl PoolApi {
    pub fn group(self) -> &'static str {
        match self {
            PoolApi::V1 => GROUP_V1,
            PoolApi::V1Alpha2 => GROUP_X,
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            PoolApi::V1 => API_POOL_V1,
            PoolApi::V1Alpha2 => API_X_V1ALPHA2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickerRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub port: Option<u16>,
    /// `FailOpen` or `FailClose`.
    pub failure_mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub meta: Meta,
    pub api: PoolApi,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<u16>,
    pub picker: Option<PickerRef>,
}

/// A reference to an InferencePool, as written (resolved later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    /// Explicit or the kind's default.
    pub group: String,
    pub name: String,
    /// Field path of the reference, for errors.
    pub field: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub meta: Meta,
    pub priority: Option<i32>,
    pub pool_ref: PoolRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetModel {
    pub name: String,
    /// `None`: no weights given (all equal).
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub meta: Meta,
    pub model_name: String,
    pub criticality: Option<Criticality>,
    pub pool_ref: PoolRef,
    pub targets: Vec<TargetModel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMatch {
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    pub kind: String,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: usize,
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    pub filters: usize,
    pub field: String,
}

impl BackendRef {
    pub fn is_pool(&self) -> bool {
        self.kind == "InferencePool"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub matches: Vec<RouteMatch>,
    pub filters: usize,
    pub backends: Vec<BackendRef>,
    /// Fields the filter has no counterpart for (timeouts, retry, sessionPersistence).
    pub other: Vec<String>,
    pub field: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub meta: Meta,
    pub parents: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// Where Model Armor's templates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArmorTemplates {
    /// `extensionPolicy` (a template for every model) with the two switches.
    Policy {
        template: String,
        prompt: bool,
        response: bool,
    },
    /// `model_armor_settings`: templates per model.
    PerModel(Vec<ArmorModel>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmorModel {
    pub model: String,
    pub prompt: Option<String>,
    pub response: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub field: String,
    pub google_service: Option<String>,
    /// `group/kind/name` of a backendRef.
    pub backend: Option<String>,
    pub fail_open: bool,
    pub timeout_ms: Option<u64>,
    pub events: Vec<String>,
    /// Set when `google_service` is Model Armor.
    pub armor: Option<(String, ArmorTemplates)>,
    pub metadata_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub cel: Vec<String>,
    pub extensions: Vec<Extension>,
    pub field: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficExtension {
    pub meta: Meta,
    pub targets: Vec<String>,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPolicy {
    pub meta: Meta,
    pub target_group: String,
    pub target_kind: String,
    pub target_name: String,
    pub fields: Vec<String>,
    pub scopes: usize,
    /// The policy as the filter's `backend_policies[]` entry reads it, without
    /// `pool` (docs/backend-policy.md).
    pub plugin: serde_json::Value,
}

/// A document the tool does not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub loc: Location,
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// Everything read from the inputs.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub pools: Vec<Pool>,
    pub objectives: Vec<Objective>,
    pub models: Vec<Model>,
    pub routes: Vec<Route>,
    pub extensions: Vec<TrafficExtension>,
    pub policies: Vec<BackendPolicy>,
    /// Secrets labelled as API keys (digests only).
    pub api_keys: Vec<KeySecret>,
    pub ignored: Vec<Ignored>,
    /// Accepted, but worth a look (e.g. a documented misspelling read as meant).
    pub warnings: Vec<String>,
    /// The documents as read, for `migrate` to pass through untouched (except
    /// API-key Secrets).
    pub documents: Vec<Document>,
}

impl Inventory {
    /// Parses every document, collecting all errors (not only the first).
    pub fn parse(docs: Vec<Document>) -> (Inventory, Vec<K8sError>) {
        let mut inv = Inventory::default();
        let mut errors = Vec::new();
        for d in &docs {
            if let Err(e) = inv.add(d) {
                errors.push(e);
            }
        }
        // Not kept: the labelled Secrets hold plaintext keys, and these documents
        // are printed (`migrate`) and Debug-formatted.
        inv.documents = docs
            .into_iter()
            .filter(|d| !is_key_secret(&d.value))
            .collect();
        errors.extend(inv.check_references());
        errors.sort();
        errors.dedup();
        (inv, errors)
    }

    fn add(&mut self, d: &Document) -> Result<(), K8sError> {
        let root = At::root(&d.value, &d.loc);
        let (Some(api), Some(kind)) = (
            d.value.get("apiVersion").and_then(Value::as_str),
            d.value.get("kind").and_then(Value::as_str),
        ) else {
            if matches!(d.value, Value::Mapping(_)) {
                // e.g. a Prometheus rules file in the same directory.
                self.ignored.push(Ignored {
                    loc: d.loc.clone(),
                    api_version: String::new(),
                    kind: "(no apiVersion/kind: not a Kubernetes object)".into(),
                    name: String::new(),
                });
                return Ok(());
            }
            return Err(root.err("must be a Kubernetes object (a map with apiVersion and kind)"));
        };
        if is_key_secret(&d.value) {
            let top = root.fields(apikeys::SECRET_FIELDS)?;
            let meta = meta(&top, &d.loc)?;
            self.api_keys.push(apikeys::secret(meta, &top)?);
            return Ok(());
        }
        let group = api.split_once('/').map(|(g, _)| g).unwrap_or("");
        let known = KNOWN_KINDS.iter().find(|(k, _)| *k == kind);
        match known {
            Some((_, versions))
                if !versions.contains(&api)
                    && (OUR_GROUPS.contains(&group) || group.is_empty()) =>
            {
                return Err(root.field_err(
                    "apiVersion",
                    format!(
                        "{kind} in '{api}' is not supported (supported: {})",
                        versions.join(", ")
                    ),
                ));
            }
            None if OUR_GROUPS.contains(&group) => {
                let names: Vec<&str> = KNOWN_KINDS.iter().map(|(k, _)| *k).collect();
                if let Some(s) = suggest(kind, &names) {
                    return Err(root.field_err("kind", format!("unknown kind: did you mean {s}?")));
                }
            }
            _ => {}
        }
        let top = root.fields(TOP).or_else(|e| {
            // Unknown top-level fields matter only for the kinds we read.
            if known.is_some() {
                Err(e)
            } else {
                root.any_fields()
            }
        })?;
        if known.is_none_or(|(_, v)| !v.contains(&api)) {
            let name = top
                .get("metadata")
                .and_then(|m| {
                    m.value
                        .get("name")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or_default();
            self.ignored.push(Ignored {
                loc: d.loc.clone(),
                api_version: api.into(),
                kind: kind.into(),
                name,
            });
            return Ok(());
        }
        let meta = meta(&top, &d.loc)?;
        let spec = top.req("spec")?;
        match kind {
            "InferencePool" if api == API_POOL_V1 => self.pools.push(pool_v1(meta, &spec)?),
            "InferencePool" => self.pools.push(pool_v1alpha2(meta, &spec)?),
            "InferenceObjective" => self.objectives.push(objective(meta, &spec)?),
            "InferenceModel" => self.models.push(model(meta, &spec)?),
            "HTTPRoute" => self.routes.push(route(meta, &spec)?),
            "GCPTrafficExtension" => self.extensions.push(extension(meta, &spec)?),
            "GCPBackendPolicy" => {
                let (p, warnings) = backend_policy(meta, &spec)?;
                self.warnings.extend(warnings);
                self.policies.push(p);
            }
            _ => unreachable!("KNOWN_KINDS lists exactly the kinds matched here"),
        }
        Ok(())
    }

    /// The pool a reference from `namespace` names.
    pub fn pool(&self, namespace: &str, group: &str, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| {
            p.meta.namespace == namespace && p.meta.name == name && p.api.group() == group
        })
    }

    fn resolve(&self, loc: &Location, namespace: &str, r: &PoolRef) -> Result<(), K8sError> {
        if self.pool(namespace, &r.group, &r.name).is_some() {
            return Ok(());
        }
        let other = self
            .pools
            .iter()
            .find(|p| p.meta.namespace == namespace && p.meta.name == r.name);
        let mut msg = match other {
            Some(p) => format!(
                "InferencePool '{}' exists in group {}, not {}: set group: {}",
                r.name,
                p.api.group(),
                r.group,
                p.api.group()
            ),
            None => format!(
                "no InferencePool '{}' ({}) in namespace {namespace}",
                r.name, r.group
            ),
        };
        if other.is_none() {
            let names: Vec<&str> = self.pools.iter().map(|p| p.meta.name.as_str()).collect();
            if let Some(s) = suggest(&r.name, &names) {
                msg.push_str(&format!(": did you mean {s}?"));
            }
        }
        Err(K8sError::at(loc, &r.field, msg))
    }

    /// Missing references and duplicate objects. The filter knows pools,
    /// objectives and models by name only, so those must be unique across namespaces.
    fn check_references(&self) -> Vec<K8sError> {
        let mut errors = Vec::new();
        for o in &self.objectives {
            errors.extend(
                self.resolve(&o.meta.loc, &o.meta.namespace, &o.pool_ref)
                    .err(),
            );
        }
        for m in &self.models {
            errors.extend(
                self.resolve(&m.meta.loc, &m.meta.namespace, &m.pool_ref)
                    .err(),
            );
        }
        for r in &self.routes {
            for rule in &r.rules {
                for b in rule.backends.iter().filter(|b| b.is_pool()) {
                    let ns = b.namespace.as_deref().unwrap_or(&r.meta.namespace);
                    let pr = PoolRef {
                        group: b.group.clone(),
                        name: b.name.clone(),
                        field: format!("{}.name", b.field),
                    };
                    errors.extend(self.resolve(&r.meta.loc, ns, &pr).err());
                }
            }
        }
        for p in &self.policies {
            if p.target_kind == "InferencePool" {
                let pr = PoolRef {
                    group: p.target_group.clone(),
                    name: p.target_name.clone(),
                    field: "spec.targetRef.name".into(),
                };
                errors.extend(self.resolve(&p.meta.loc, &p.meta.namespace, &pr).err());
            }
        }
        let mut seen: BTreeMap<(String, String, String), Location> = BTreeMap::new();
        let mut dup = |kind: &str, m: &Meta, errors: &mut Vec<K8sError>| {
            let key = (kind.to_string(), m.namespace.clone(), m.name.clone());
            if let Some(first) = seen.get(&key) {
                errors.push(K8sError::at(
                    &m.loc,
                    "metadata.name",
                    format!(
                        "{kind} {}/{} is also defined at {first} (kubectl apply would keep only the last one)",
                        m.namespace, m.name
                    ),
                ));
            } else {
                seen.insert(key, m.loc.clone());
            }
        };
        for p in &self.pools {
            dup(
                &format!("InferencePool.{}", p.api.group()),
                &p.meta,
                &mut errors,
            );
        }
        for o in &self.objectives {
            dup("InferenceObjective", &o.meta, &mut errors);
        }
        for m in &self.models {
            dup("InferenceModel", &m.meta, &mut errors);
        }
        for r in &self.routes {
            dup("HTTPRoute", &r.meta, &mut errors);
        }
        for e in &self.extensions {
            dup("GCPTrafficExtension", &e.meta, &mut errors);
        }
        for p in &self.policies {
            dup("GCPBackendPolicy", &p.meta, &mut errors);
        }
        errors.extend(apikeys::check(&self.api_keys, &self.objectives));
        for s in &self.api_keys {
            dup("Secret", &s.meta, &mut errors);
        }
        // Global names in the filter's configuration.
        let mut global: BTreeMap<(&str, &str), &Meta> = BTreeMap::new();
        let names = self
            .pools
            .iter()
            .map(|p| ("pool", p.meta.name.as_str(), &p.meta, "metadata.name"))
            .chain(
                self.objectives
                    .iter()
                    .map(|o| ("objective", o.meta.name.as_str(), &o.meta, "metadata.name")),
            )
            .chain(
                self.models
                    .iter()
                    .map(|m| ("model", m.model_name.as_str(), &m.meta, "spec.modelName")),
            );
        for (what, name, m, field) in names {
            match global.get(&(what, name)) {
                Some(first) if first.namespace != m.namespace || what == "model" => {
                    if first.loc != m.loc {
                        errors.push(K8sError::at(
                            &m.loc,
                            field,
                            format!(
                                "the gateway knows each {what} by name: '{name}' is also used at {}",
                                first.loc
                            ),
                        ));
                    }
                }
                Some(_) => {}
                None => {
                    global.insert((what, name), m);
                }
            }
        }
        errors
    }
}

fn meta(top: &Fields, loc: &Location) -> Result<Meta, K8sError> {
    let m = top.req("metadata")?.fields(META)?;
    let name = m.req("name")?.name()?;
    let namespace = match m.get("namespace") {
        Some(n) => n.name()?,
        None => "default".into(),
    };
    let annotations = match m.get("annotations") {
        Some(a) => a.string_map()?,
        None => BTreeMap::new(),
    };
    if let Some(l) = m.get("labels") {
        l.string_map()?;
    }
    Ok(Meta {
        name,
        namespace,
        annotations,
        loc: loc.clone(),
    })
}

fn selector_map(at: &At) -> Result<BTreeMap<String, String>, K8sError> {
    let m = at.string_map()?;
    if m.is_empty() {
        return Err(at.err("must select at least one label"));
    }
    Ok(m)
}

fn failure_mode(f: &Fields) -> Result<String, K8sError> {
    match f.get("failureMode") {
        Some(v) => v.one_of(&["FailOpen", "FailClose"]),
        None => Ok("FailClose".into()),
    }
}

fn pool_v1(meta: Meta, spec: &At) -> Result<Pool, K8sError> {
    let s = spec.fields(&["selector", "targetPorts", "endpointPickerRef"])?;
    let sel = s.req("selector")?;
    let selector = selector_map(&sel.fields(&["matchLabels"])?.req("matchLabels")?)?;
    let tp = s.req("targetPorts")?;
    let items = tp.seq()?;
    if items.is_empty() || items.len() > 8 {
        return Err(tp.err("must list 1 to 8 ports"));
    }
    let mut ports = Vec::new();
    for item in items {
        let n = item.fields(&["number"])?.req("number")?;
        let p = n.port()?;
        if ports.contains(&p) {
            return Err(n.err(format!("duplicate port {p}")));
        }
        ports.push(p);
    }
    let picker = match s.get("endpointPickerRef") {
        None => None,
        Some(r) => {
            let f = r.fields(&["group", "kind", "name", "port", "failureMode"])?;
            let kind = opt_str(&f, "kind")?.unwrap_or_else(|| "Service".into());
            let port = match f.get("port") {
                Some(p) => Some(p.fields(&["number"])?.req("number")?.port()?),
                None if kind == "Service" => {
                    return Err(f.err("port", "is required when kind is Service"))
                }
                None => None,
            };
            Some(PickerRef {
                group: opt_str(&f, "group")?.unwrap_or_default(),
                kind,
                name: f.req("name")?.name()?,
                port,
                failure_mode: failure_mode(&f)?,
            })
        }
    };
    Ok(Pool {
        meta,
        api: PoolApi::V1,
        selector,
        ports,
        picker,
    })
}

fn pool_v1alpha2(meta: Meta, spec: &At) -> Result<Pool, K8sError> {
    let s = spec.fields(&["selector", "targetPortNumber", "extensionRef"])?;
    let selector = selector_map(&s.req("selector")?)?;
    let port = s.req("targetPortNumber")?.port()?;
    let picker = match s.get("extensionRef") {
        None => None,
        Some(r) => {
            let f = r.fields(&["group", "kind", "name", "portNumber", "failureMode"])?;
            Some(PickerRef {
                group: opt_str(&f, "group")?.unwrap_or_default(),
                kind: opt_str(&f, "kind")?.unwrap_or_else(|| "Service".into()),
                name: f.req("name")?.name()?,
                port: f.get("portNumber").map(|p| p.port()).transpose()?,
                failure_mode: failure_mode(&f)?,
            })
        }
    };
    Ok(Pool {
        meta,
        api: PoolApi::V1Alpha2,
        selector,
        ports: vec![port],
        picker,
    })
}

fn opt_str(f: &Fields, key: &str) -> Result<Option<String>, K8sError> {
    f.get(key).map(|v| v.str().map(String::from)).transpose()
}

fn pool_ref(at: &At, default_group: &str) -> Result<PoolRef, K8sError> {
    let f = at.fields(&["group", "kind", "name"])?;
    if let Some(k) = f.get("kind") {
        k.one_of(&["InferencePool"])?;
    }
    let group = match f.get("group") {
        Some(g) => g.one_of(&[GROUP_V1, GROUP_X])?,
        None => default_group.to_string(),
    };
    Ok(PoolRef {
        group,
        name: f.req("name")?.name()?,
        field: format!("{}.name", at.path),
    })
}

fn objective(meta: Meta, spec: &At) -> Result<Objective, K8sError> {
    let s = spec.fields(&["priority", "poolRef"])?;
    let priority = s
        .get("priority")
        .map(|p| p.int_in(i32::MIN.into(), i32::MAX.into()).map(|v| v as i32))
        .transpose()?;
    Ok(Objective {
        meta,
        priority,
        // GIE's default group for an objective's poolRef is the GA one.
        pool_ref: pool_ref(&s.req("poolRef")?, GROUP_V1)?,
    })
}

fn model(meta: Meta, spec: &At) -> Result<Model, K8sError> {
    let s = spec.fields(&["modelName", "criticality", "poolRef", "targetModels"])?;
    let criticality = match s.get("criticality") {
        None => None,
        Some(c) => Some(
            match c.one_of(&["Critical", "Standard", "Sheddable"])?.as_str() {
                "Critical" => Criticality::Critical,
                "Standard" => Criticality::Standard,
                _ => Criticality::Sheddable,
            },
        ),
    };
    let mut targets = Vec::new();
    if let Some(t) = s.get("targetModels") {
        for item in t.seq()? {
            let f = item.fields(&["name", "weight"])?;
            let weight = f
                .get("weight")
                .map(|w| w.int_in(0, 1_000_000).map(|v| v as u32))
                .transpose()?;
            targets.push(TargetModel {
                name: f.req("name")?.name()?,
                weight,
            });
        }
        let weighted = targets.iter().filter(|t| t.weight.is_some()).count();
        if weighted != 0 && weighted != targets.len() {
            return Err(t.err("set a weight on every target model or on none"));
        }
        if weighted != 0 && targets.iter().all(|t| t.weight == Some(0)) {
            return Err(t.err("at least one weight must be > 0"));
        }
    }
    Ok(Model {
        meta,
        model_name: s.req("modelName")?.name()?,
        criticality,
        // v1alpha2 InferenceModels refer to v1alpha2 pools unless they say otherwise.
        pool_ref: pool_ref(&s.req("poolRef")?, GROUP_X)?,
        targets,
    })
}

fn route(meta: Meta, spec: &At) -> Result<Route, K8sError> {
    let s = spec.fields(&["parentRefs", "hostnames", "rules"])?;
    let mut parents = Vec::new();
    if let Some(p) = s.get("parentRefs") {
        for item in p.seq()? {
            let f = item.fields(&["group", "kind", "namespace", "name", "sectionName", "port"])?;
            if let Some(port) = f.get("port") {
                port.port()?;
            }
            parents.push(ParentRef {
                group: opt_str(&f, "group")?.unwrap_or_else(|| GATEWAY_GROUP.into()),
                kind: opt_str(&f, "kind")?.unwrap_or_else(|| "Gateway".into()),
                name: f.req("name")?.name()?,
                namespace: opt_str(&f, "namespace")?,
                section_name: opt_str(&f, "sectionName")?,
            });
        }
    }
    let mut hostnames = Vec::new();
    if let Some(h) = s.get("hostnames") {
        for item in h.seq()? {
            hostnames.push(item.name()?);
        }
    }
    let mut rules = Vec::new();
    if let Some(r) = s.get("rules") {
        for item in r.seq()? {
            rules.push(route_rule(&item)?);
        }
    }
    Ok(Route {
        meta,
        parents,
        hostnames,
        rules,
    })
}

fn route_rule(at: &At) -> Result<RouteRule, K8sError> {
    let f = at.fields(&[
        "name",
        "matches",
        "filters",
        "backendRefs",
        "timeouts",
        "retry",
        "sessionPersistence",
    ])?;
    let mut matches = Vec::new();
    if let Some(m) = f.get("matches") {
        for item in m.seq()? {
            let mf = item.fields(&["path", "headers", "queryParams", "method"])?;
            let path = match mf.get("path") {
                None => None,
                Some(p) => {
                    let pf = p.fields(&["type", "value"])?;
                    Some(PathMatch {
                        kind: match pf.get("type") {
                            Some(t) => t.one_of(&["Exact", "PathPrefix", "RegularExpression"])?,
                            None => "PathPrefix".into(),
                        },
                        value: opt_str(&pf, "value")?.unwrap_or_else(|| "/".into()),
                    })
                }
            };
            let mut headers = Vec::new();
            if let Some(h) = mf.get("headers") {
                for hi in h.seq()? {
                    let hf = hi.fields(&["type", "name", "value"])?;
                    headers.push(HeaderMatch {
                        kind: match hf.get("type") {
                            Some(t) => t.one_of(&["Exact", "RegularExpression"])?,
                            None => "Exact".into(),
                        },
                        name: hf.req("name")?.name()?,
                        value: hf.req("value")?.str()?.to_string(),
                    });
                }
            }
            let query_params = match mf.get("queryParams") {
                Some(q) => q.seq()?.len(),
                None => 0,
            };
            matches.push(RouteMatch {
                path,
                headers,
                query_params,
                method: opt_str(&mf, "method")?,
            });
        }
    }
    let mut backends = Vec::new();
    if let Some(b) = f.get("backendRefs") {
        for item in b.seq()? {
            let bf = item.fields(&[
                "group",
                "kind",
                "name",
                "namespace",
                "port",
                "weight",
                "filters",
            ])?;
            let kind = opt_str(&bf, "kind")?.unwrap_or_else(|| "Service".into());
            let group = match bf.get("group") {
                Some(g) if kind == "InferencePool" => g.one_of(&[GROUP_V1, GROUP_X])?,
                Some(g) => g.str()?.to_string(),
                None if kind == "InferencePool" => {
                    return Err(bf.err(
                        "group",
                        format!("is required for an InferencePool ({GROUP_V1} or {GROUP_X})"),
                    ))
                }
                None => String::new(),
            };
            backends.push(BackendRef {
                group,
                kind,
                name: bf.req("name")?.name()?,
                namespace: opt_str(&bf, "namespace")?,
                port: bf.get("port").map(|p| p.port()).transpose()?,
                weight: match bf.get("weight") {
                    Some(w) => w.int_in(0, 1_000_000)? as u32,
                    None => 1,
                },
                filters: match bf.get("filters") {
                    Some(x) => x.seq()?.len(),
                    None => 0,
                },
                field: item.path.clone(),
            });
        }
    }
    let other = ["timeouts", "retry", "sessionPersistence"]
        .iter()
        .filter(|k| f.get(k).is_some())
        .map(|k| k.to_string())
        .collect();
    Ok(RouteRule {
        matches,
        filters: match f.get("filters") {
            Some(x) => x.seq()?.len(),
            None => 0,
        },
        backends,
        other,
        field: at.path.clone(),
    })
}

pub const EVENTS: &[&str] = &[
    "RequestHeaders",
    "RequestBody",
    "RequestTrailers",
    "ResponseHeaders",
    "ResponseBody",
    "ResponseTrailers",
];

/// `1s`, `500ms`, `0.5s` → milliseconds.
pub fn duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * scale).round() as u64)
}

/// `modelarmor.<region>.rep.googleapis.com` → the region.
pub fn model_armor_region(service: &str) -> Option<&str> {
    let region = service
        .strip_prefix("modelarmor.")?
        .strip_suffix(".rep.googleapis.com")?;
    (!region.is_empty() && !region.contains('.')).then_some(region)
}

fn extension(meta: Meta, spec: &At) -> Result<TrafficExtension, K8sError> {
    let s = spec.fields(&["targetRefs", "extensionChains"])?;
    let mut targets = Vec::new();
    if let Some(t) = s.get("targetRefs") {
        for item in t.seq()? {
            let f = item.fields(&["group", "kind", "name"])?;
            targets.push(format!(
                "{}/{}",
                opt_str(&f, "kind")?.unwrap_or_else(|| "Gateway".into()),
                f.req("name")?.name()?
            ));
        }
    }
    let mut chains = Vec::new();
    for item in s.req("extensionChains")?.seq()? {
        let f = item.fields(&["name", "matchCondition", "extensions"])?;
        let mut cel = Vec::new();
        if let Some(mc) = f.get("matchCondition") {
            let mcf = mc.fields(&["celExpressions"])?;
            if let Some(exprs) = mcf.get("celExpressions") {
                for e in exprs.seq()? {
                    let ef = e.fields(&["celMatcher"])?;
                    cel.push(ef.req("celMatcher")?.str()?.to_string());
                }
            }
        }
        let mut extensions = Vec::new();
        for e in f.req("extensions")?.seq()? {
            extensions.push(traffic_extension(&e)?);
        }
        chains.push(Chain {
            name: f.req("name")?.name()?,
            cel,
            extensions,
            field: item.path.clone(),
        });
    }
    Ok(TrafficExtension {
        meta,
        targets,
        chains,
    })
}

const ARMOR_METADATA: &[&str] = &[
    "extensionPolicy",
    "sanitizeUserPrompt",
    "sanitizeUserResponse",
    "model_armor_settings",
];
const ARMOR_SETTING: &[&str] = &[
    "model",
    "model_response_template_id",
    "user_prompt_template_id",
];

fn traffic_extension(at: &At) -> Result<Extension, K8sError> {
    let f = at.fields(&[
        "name",
        "authority",
        "backendRef",
        "googleAPIServiceName",
        "metadata",
        "failOpen",
        "timeout",
        "supportedEvents",
        "forwardHeaders",
        "requestBodySendMode",
    ])?;
    let google_service = opt_str(&f, "googleAPIServiceName")?;
    let backend = match f.get("backendRef") {
        None => None,
        Some(b) => {
            let bf = b.fields(&["group", "kind", "name", "namespace", "port"])?;
            Some(format!(
                "{}/{}/{}",
                opt_str(&bf, "group")?.unwrap_or_default(),
                opt_str(&bf, "kind")?.unwrap_or_else(|| "Service".into()),
                bf.req("name")?.name()?
            ))
        }
    };
    if google_service.is_some() == backend.is_some() {
        return Err(at.err("set exactly one of googleAPIServiceName and backendRef"));
    }
    let timeout_ms = match f.get("timeout") {
        None => None,
        Some(t) => {
            let ms = duration_ms(t.str()?)
                .ok_or_else(|| t.err("must be a duration such as 1s or 500ms"))?;
            if !(10..=10_000).contains(&ms) {
                return Err(t.err("must be between 10ms and 10s"));
            }
            Some(ms)
        }
    };
    let mut events = Vec::new();
    if let Some(e) = f.get("supportedEvents") {
        for item in e.seq()? {
            let ev = item.one_of(EVENTS)?;
            if !events.contains(&ev) {
                events.push(ev);
            }
        }
    }
    let metadata = f.get("metadata");
    let mut metadata_keys = Vec::new();
    let mut armor = None;
    if let Some(m) = &metadata {
        metadata_keys = m.any_fields()?.keys().map(String::from).collect();
    }
    if let Some(region) = google_service.as_deref().and_then(model_armor_region) {
        let Some(m) = metadata else {
            return Err(f.err("metadata", "is required for Model Armor (the templates)"));
        };
        armor = Some((region.to_string(), armor_templates(&m)?));
    }
    Ok(Extension {
        name: f.req("name")?.name()?,
        field: at.path.clone(),
        google_service,
        backend,
        fail_open: f
            .get("failOpen")
            .map(|b| b.bool())
            .transpose()?
            .unwrap_or(false),
        timeout_ms,
        events,
        armor,
        metadata_keys,
    })
}

/// `'true'` as GKE writes it (a string), or a YAML boolean.
fn flag(at: &At) -> Result<bool, K8sError> {
    match at.value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(at.err("must be 'true' or 'false'")),
    }
}

fn armor_templates(m: &At) -> Result<ArmorTemplates, K8sError> {
    let f = m.fields(ARMOR_METADATA)?;
    if let Some(settings) = f.get("model_armor_settings") {
        if let Some(k) = [
            "extensionPolicy",
            "sanitizeUserPrompt",
            "sanitizeUserResponse",
        ]
        .iter()
        .find(|k| f.get(k).is_some())
        {
            return Err(f.err(
                k,
                "set either model_armor_settings or extensionPolicy (with the sanitize switches), not both",
            ));
        }
        let text = settings.str()?;
        let parsed: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| settings.err(format!("must be a JSON list: {e}")))?;
        let Some(items) = parsed.as_array() else {
            return Err(settings.err("must be a JSON list of {model, user_prompt_template_id, model_response_template_id}"));
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{}[{i}]", settings.path);
            let err = |field: &str, msg: String| K8sError::at(m.loc, format!("{at}.{field}"), msg);
            let Some(obj) = item.as_object() else {
                return Err(K8sError::at(m.loc, at.clone(), "must be an object"));
            };
            for k in obj.keys() {
                if !ARMOR_SETTING.contains(&k.as_str()) {
                    return Err(err(
                        k,
                        match suggest(k, ARMOR_SETTING) {
                            Some(s) => format!("unknown field: did you mean {s}?"),
                            None => format!("unknown field (known: {})", ARMOR_SETTING.join(", ")),
                        },
                    ));
                }
            }
            let s = |k: &str| -> Result<Option<String>, K8sError> {
                match obj.get(k) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(v)) if !v.trim().is_empty() => {
                        Ok(Some(v.clone()))
                    }
                    Some(_) => Err(err(k, "must be a non-empty string".into())),
                }
            };
            let Some(model) = s("model")? else {
                return Err(err("model", "is required".into()));
            };
            out.push(ArmorModel {
                model,
                prompt: s("user_prompt_template_id")?,
                response: s("model_response_template_id")?,
            });
        }
        return Ok(ArmorTemplates::PerModel(out));
    }
    let template = f.req("extensionPolicy")?.name()?;
    Ok(ArmorTemplates::Policy {
        template,
        prompt: f
            .get("sanitizeUserPrompt")
            .map(|v| flag(&v))
            .transpose()?
            .unwrap_or(false),
        response: f
            .get("sanitizeUserResponse")
            .map(|v| flag(&v))
            .transpose()?
            .unwrap_or(false),
    })
}

/// Backend-level fields: set at the default level or in scopes, never both.
const BACKEND_FIELDS: &[&str] = &[
    "balancingMode",
    "maxRatePerEndpoint",
    "maxInFlightPerEndpoint",
    "capacityScalerPercent",
    "backendPreference",
    "customMetrics",
];
const POLICY_DEFAULT: &[&str] = &[
    "logging",
    "timeoutSec",
    "connectionDraining",
    "sessionAffinity",
    "securityPolicy",
    "iap",
    "scopes",
    "balancingMode",
    "maxRatePerEndpoint",
    "maxInFlightPerEndpoint",
    "capacityScalerPercent",
    "backendPreference",
    "customMetrics",
];
/// The documentation's spelling in one example (`docs` field table: `capacityScalerPercent`).
const SCALER_ALIAS: &str = "capacityScalarPercent";

/// The field a balancing mode implies at the level that sets it.
fn implied_by_mode(mode: &str) -> Option<&'static str> {
    match mode {
        "RATE" => Some("maxRatePerEndpoint"),
        "IN_FLIGHT" => Some("maxInFlightPerEndpoint"),
        "CUSTOM_METRICS" => Some("customMetrics"),
        _ => None,
    }
}

/// Checks one level's backend fields; returns the fields it sets (with implied ones).
fn backend_fields(
    f: &Fields,
    warnings: &mut Vec<String>,
    plugin: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, String)>, K8sError> {
    let mut set = Vec::new();
    for key in f.keys().collect::<Vec<_>>() {
        let Some(v) = f.get(key) else { continue };
        let canonical = if key == SCALER_ALIAS {
            warnings.push(format!(
                "{} {}: read as capacityScalerPercent (the documentation's spelling in one example; \
                 check which spelling your cluster's CRD accepts)",
                f.loc, v.path
            ));
            "capacityScalerPercent"
        } else if BACKEND_FIELDS.contains(&key) {
            key
        } else {
            continue;
        };
        match canonical {
            "balancingMode" => {
                let mode = v.one_of(&["RATE", "IN_FLIGHT", "UTILIZATION", "CUSTOM_METRICS"])?;
                if let Some(implied) = implied_by_mode(&mode) {
                    set.push((implied.to_string(), format!("balancingMode {mode}")));
                }
                plugin.insert("balancing_mode".into(), mode.into());
            }
            "maxRatePerEndpoint" | "maxInFlightPerEndpoint" => {
                let n = v.int_in(0, 1_000_000_000)?;
                let name = if canonical == "maxRatePerEndpoint" {
                    "max_rate_per_endpoint"
                } else {
                    "max_in_flight_per_endpoint"
                };
                plugin.insert(name.into(), n.into());
            }
            "capacityScalerPercent" => {
                let n = v.int_in(0, 100)?;
                plugin.insert("capacity_scaler_percent".into(), n.into());
            }
            "backendPreference" => {
                let p = v.one_of(&["DEFAULT", "PREFERRED"])?;
                plugin.insert("backend_preference".into(), p.into());
            }
            _ => {
                v.seq()?;
                plugin.insert("custom_metrics".into(), serde_json::Value::Bool(true));
            }
        }
        set.push((canonical.to_string(), key.to_string()));
    }
    Ok(set)
}

fn backend_policy(meta: Meta, spec: &At) -> Result<(BackendPolicy, Vec<String>), K8sError> {
    let mut warnings = Vec::new();
    let s = spec.fields(&["targetRef", "default"])?;
    let t = s
        .req("targetRef")?
        .fields(&["group", "kind", "name", "namespace"])?;
    let target_kind = t.req("kind")?.name()?;
    let target_group = opt_str(&t, "group")?.unwrap_or_default();
    if target_kind == "InferencePool" && target_group != GROUP_V1 && target_group != GROUP_X {
        return Err(t.err(
            "group",
            format!("must be {GROUP_V1} or {GROUP_X} for an InferencePool"),
        ));
    }
    let mut fields = Vec::new();
    let mut scopes = 0;
    let mut plugin = serde_json::Map::new();
    if let Some(d) = s.get("default") {
        let df = d.fields(&[POLICY_DEFAULT, &[SCALER_ALIAS]].concat())?;
        fields = df.keys().map(String::from).collect();
        if let Some(l) = df.get("logging") {
            let lf = l.fields(&["enabled", "sampleRate", "optionalMode", "optionalFields"])?;
            let mut logging = serde_json::Map::new();
            if let Some(e) = lf.get("enabled") {
                logging.insert("enabled".into(), e.bool()?.into());
            }
            if let Some(r) = lf.get("sampleRate") {
                logging.insert("sample_rate".into(), r.int_in(0, 1_000_000)?.into());
            }
            plugin.insert("logging".into(), logging.into());
        }
        if let Some(t) = df.get("timeoutSec") {
            t.int_in(1, 86_400)?;
        }
        let mut level = serde_json::Map::new();
        let at_default = backend_fields(&df, &mut warnings, &mut level)?;
        plugin.insert("default".into(), level.into());
        let mut rendered_scopes = Vec::new();
        if let Some(sc) = df.get("scopes") {
            let scope_known = [BACKEND_FIELDS, &["selector", SCALER_ALIAS]].concat();
            for item in sc.seq()? {
                scopes += 1;
                let f = item.fields(&scope_known)?;
                let sel = f.req("selector")?;
                let mut level = serde_json::Map::new();
                level.insert(
                    "selector".into(),
                    serde_json::to_value(selector_map(&sel)?).unwrap_or_default(),
                );
                let set = backend_fields(&f, &mut warnings, &mut level)?;
                rendered_scopes.push(serde_json::Value::Object(level));
                for (field, written) in set {
                    if let Some((_, why)) = at_default.iter().find(|(d, _)| *d == field) {
                        let why = if why == &field {
                            "it is set at the default level".to_string()
                        } else {
                            format!("the default level sets it ({why})")
                        };
                        return Err(f.err(
                            &written,
                            format!(
                                "{why}: a field set at the default level may not also appear in a scope"
                            ),
                        ));
                    }
                }
            }
        }
        plugin.insert("scopes".into(), rendered_scopes.into());
    }
    Ok((
        BackendPolicy {
            meta,
            target_group,
            target_kind,
            target_name: t.req("name")?.name()?,
            fields,
            scopes,
            plugin: plugin.into(),
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::testutil::{error_of, load_examples, parse, POOL_V1, POOL_X};

    #[test]
    fn pools_in_both_apis() {
        let inv = load_examples(&["inferencepool-v1.yaml", "inferencepool-v1alpha2.yaml"]);
        let ga = inv
            .pool("default", GROUP_V1, "vllm-llama3-8b-instruct-ga")
            .unwrap();
        assert_eq!(ga.api, PoolApi::V1);
        assert_eq!(ga.ports, vec![8000]);
        assert_eq!(ga.selector["app"], "vllm-llama3-8b-instruct");
        let picker = ga.picker.as_ref().unwrap();
        assert_eq!(
            (picker.port, picker.failure_mode.as_str()),
            (Some(9002), "FailClose")
        );
        let pre = inv
            .pool("default", GROUP_X, "vllm-llama3-8b-instruct-preview")
            .unwrap();
        assert_eq!(pre.api, PoolApi::V1Alpha2);
        assert_eq!(pre.ports, vec![8000]);
        assert_eq!(
            pre.picker.as_ref().unwrap().name,
            "vllm-llama3-8b-instruct-preview-epp"
        );
        // Same name in the other group is a different pool.
        assert!(inv
            .pool("default", GROUP_X, "vllm-llama3-8b-instruct-ga")
            .is_none());
    }

    #[test]
    fn objectives_and_models() {
        let inv = load_examples(&[
            "inferencepool-v1.yaml",
            "inferencepool-v1alpha2.yaml",
            "inferenceobjectives.yaml",
            "inferencemodel-v1alpha2.yaml",
        ]);
        let fr = inv
            .objectives
            .iter()
            .find(|o| o.meta.name == "food-review")
            .unwrap();
        assert_eq!(fr.priority, Some(2));
        assert_eq!(fr.pool_ref.group, GROUP_V1);
        assert_eq!(fr.meta.namespace, "default");
        let m = inv
            .models
            .iter()
            .find(|m| m.meta.name == "food-review")
            .unwrap();
        assert_eq!(m.criticality, Some(Criticality::Standard));
        // No group in the example: a v1alpha2 model's pool is a v1alpha2 pool.
        assert_eq!(m.pool_ref.group, GROUP_X);
        assert_eq!(m.targets.len(), 2);
        assert_eq!(m.targets[0].weight, Some(90));
        let base = inv
            .models
            .iter()
            .find(|m| m.meta.name == "base-model")
            .unwrap();
        assert_eq!(base.model_name, "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(base.criticality, Some(Criticality::Critical));
    }

    #[test]
    fn routes_with_weights() {
        let inv = load_examples(&[
            "inferencepool-v1.yaml",
            "inferencepool-v1alpha2.yaml",
            "httproute-split-50-50.yaml",
        ]);
        let r = &inv.routes[0];
        assert_eq!(r.parents[0].name, "inference-gateway");
        let b = &r.rules[0].backends;
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].group.as_str(), b[0].weight), (GROUP_X, 50));
        assert_eq!(b[1].field, "spec.rules[0].backendRefs[1]");
        // weight defaults to 1.
        let (inv, errors) = parse(&format!(
            "{POOL_V1}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  rules:\n  - backendRefs:\n    - {{group: inference.networking.k8s.io, kind: InferencePool, name: ga}}\n"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(inv.routes[0].rules[0].backends[0].weight, 1);
    }

    #[test]
    fn model_armor_in_both_metadata_forms() {
        let inv = load_examples(&["model-armor-extension-v1.yaml"]);
        let e = &inv.extensions[0].chains[0].extensions[0];
        assert_eq!(e.timeout_ms, Some(1000));
        assert!(!e.fail_open);
        assert_eq!(e.events, vec!["RequestHeaders"]);
        assert_eq!(
            e.armor,
            Some((
                "us-central1".into(),
                ArmorTemplates::Policy {
                    template: "my-model-armor-template-name-id".into(),
                    prompt: true,
                    response: true
                }
            ))
        );
        let inv = load_examples(&["model-armor-extension-settings.yaml"]);
        let e = &inv.extensions[0].chains[0].extensions[0];
        let Some((_, ArmorTemplates::PerModel(models))) = &e.armor else {
            panic!("{e:?}")
        };
        assert_eq!(models[0].model, "google/gemma-3-1b-it");
        assert_eq!(
            models[0].prompt.as_deref(),
            Some("projects/my-project/locations/us-central1/templates/my-template")
        );
        assert_eq!(e.events.len(), 6);
        // Apigee: read, not Model Armor.
        let inv = load_examples(&["apigee-extension.yaml"]);
        let e = &inv.extensions[0].chains[0].extensions[0];
        assert!(e.armor.is_none());
        assert_eq!(inv.ignored[0].kind, "ApigeeBackendService");
    }

    const ARMOR: &str = "apiVersion: networking.gke.io/v1
kind: GCPTrafficExtension
metadata: {name: x}
spec:
  extensionChains:
  - name: c
    extensions:
    - name: e
      googleAPIServiceName: modelarmor.europe-west4.rep.googleapis.com
      metadata:
";

    #[test]
    fn model_armor_settings_are_checked() {
        let e = error_of(&format!(
            "{ARMOR}        model_armor_settings: '[{{\"modle\": \"m\"}}]'\n"
        ));
        assert_eq!(e, "t.yaml[0] spec.extensionChains[0].extensions[0].metadata.model_armor_settings[0].modle: unknown field: did you mean model?");
        let e = error_of(&format!(
            "{ARMOR}        model_armor_settings: 'not json'\n"
        ));
        assert!(
            e.contains("model_armor_settings: must be a JSON list"),
            "{e}"
        );
        let e = error_of(&format!(
            "{ARMOR}        extensionPolicy: t\n        sanitizeUserPromt: 'true'\n"
        ));
        assert!(
            e.ends_with(
                "metadata.sanitizeUserPromt: unknown field: did you mean sanitizeUserPrompt?"
            ),
            "{e}"
        );
        let e = error_of(&format!(
            "{ARMOR}        extensionPolicy: t\n        sanitizeUserPrompt: 'yes'\n"
        ));
        assert!(
            e.ends_with("sanitizeUserPrompt: must be 'true' or 'false'"),
            "{e}"
        );
        let e = error_of(&ARMOR.replace(
            "      metadata:\n",
            "      timeout: 1m\n      metadata: {extensionPolicy: t}\n",
        ));
        assert!(
            e.ends_with("timeout: must be a duration such as 1s or 500ms"),
            "{e}"
        );
        let e = error_of(&ARMOR.replace(
            "      metadata:\n",
            "      supportedEvents: [RequestBodies]\n      metadata: {extensionPolicy: t}\n",
        ));
        assert!(
            e.ends_with(
                "supportedEvents[0]: 'RequestBodies' is not valid: did you mean RequestBody?"
            ),
            "{e}"
        );
    }

    #[test]
    fn backend_policies() {
        let inv = load_examples(&[
            "inferencepool-v1alpha2.yaml",
            "backend-policy-logging.yaml",
            "backend-policy-scopes.yaml",
        ]);
        assert_eq!(inv.policies.len(), 2);
        // The documented misspelling is read as meant, and said so.
        assert_eq!(inv.warnings.len(), 1);
        assert!(inv.warnings[0].contains("capacityScalarPercent: read as capacityScalerPercent"));
        let (_, errors) =
            crate::k8s::load(&[crate::k8s::testutil::example("backend-policy-invalid.yaml")]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = errors[0].to_string();
        assert!(e.ends_with("backend-policy-invalid.yaml[0] spec.default.scopes[0].maxInFlightPerEndpoint: the default level sets it (balancingMode IN_FLIGHT): a field set at the default level may not also appear in a scope"), "{e}");
        // The same field explicitly at both levels.
        let yaml = "apiVersion: networking.gke.io/v1\nkind: GCPBackendPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {kind: Service, name: s}\n  default:\n    maxRatePerEndpoint: 5\n    scopes:\n    - selector: {env: prod}\n      maxRatePerEndpoint: 10\n";
        assert!(
            error_of(yaml).contains("scopes[0].maxRatePerEndpoint: it is set at the default level")
        );
        // Scopes alone are fine; a selector is required.
        let ok = yaml.replace("    maxRatePerEndpoint: 5\n", "");
        assert!(parse(&ok).1.is_empty());
        assert!(
            error_of(&ok.replace("    - selector: {env: prod}\n      max", "    - max"))
                .ends_with("scopes[0].selector: is required")
        );
        // A policy on a missing pool.
        let e = error_of("apiVersion: networking.gke.io/v1\nkind: GCPBackendPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {group: inference.networking.k8s.io, kind: InferencePool, name: nope}\n");
        assert!(
            e.contains("spec.targetRef.name: no InferencePool 'nope'"),
            "{e}"
        );
    }

    #[test]
    fn misspelt_fields_get_a_suggestion() {
        let e = error_of(&POOL_V1.replace("targetPorts", "targetPort"));
        assert_eq!(
            e,
            "t.yaml[0] spec.targetPort: unknown field: did you mean targetPorts?"
        );
        let e = error_of(&POOL_X.replace("targetPortNumber", "targetPortNumbr"));
        assert_eq!(
            e,
            "t.yaml[0] spec.targetPortNumbr: unknown field: did you mean targetPortNumber?"
        );
        let e =
            error_of(&POOL_V1.replace("metadata: {name: ga}", "metadata: {name: ga, namspace: x}"));
        assert_eq!(
            e,
            "t.yaml[0] metadata.namspace: unknown field: did you mean namespace?"
        );
        let e = error_of(&POOL_V1.replace("spec:", "spec:\n  zzz: 1"));
        assert!(e.starts_with("t.yaml[0] spec.zzz: unknown field (known: selector, targetPorts, endpointPickerRef)"), "{e}");
    }

    #[test]
    fn wrong_types_and_ranges() {
        let e = error_of(&POOL_V1.replace("[{number: 8000}]", "\"8000\""));
        assert_eq!(
            e,
            "t.yaml[0] spec.targetPorts: must be a list, not a string"
        );
        let e = error_of(&POOL_V1.replace("{number: 8000}", "{number: 70000}"));
        assert_eq!(e, "t.yaml[0] spec.targetPorts[0].number: must be ≤ 65535");
        let e = error_of(&POOL_V1.replace("{app: vllm}", "{}"));
        assert_eq!(
            e,
            "t.yaml[0] spec.selector.matchLabels: must select at least one label"
        );
        let e = error_of(&POOL_V1.replace("{app: vllm}", "{app: 3}"));
        assert_eq!(
            e,
            "t.yaml[0] spec.selector.matchLabels.app: must be a string, not a number"
        );
        let route = format!("{POOL_V1}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: llm-route}}\nspec:\n  rules:\n  - backendRefs:\n    - {{group: inference.networking.k8s.io, kind: InferencePool, name: ga}}\n    - {{group: inference.networking.k8s.io, kind: InferencePool, name: ga, weight: -1}}\n");
        assert_eq!(
            error_of(&route),
            "t.yaml[1] spec.rules[0].backendRefs[1].weight: must be ≥ 0"
        );
        let e = error_of(&route.replace("weight: -1", "weight: ten"));
        assert!(
            e.ends_with("backendRefs[1].weight: must be an integer, not a string"),
            "{e}"
        );
        let e = error_of(&route.replace(
            "{group: inference.networking.k8s.io, kind: InferencePool, name: ga, weight: -1}",
            "{kind: InferencePool, name: ga}",
        ));
        assert!(e.ends_with("backendRefs[1].group: is required for an InferencePool (inference.networking.k8s.io or inference.networking.x-k8s.io)"), "{e}");
    }

    #[test]
    fn missing_references_are_errors() {
        let obj = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata: {name: o}\nspec:\n  priority: 1\n  poolRef: {name: gaa}\n";
        let e = error_of(&format!("{POOL_V1}---\n{obj}"));
        assert_eq!(e, "t.yaml[1] spec.poolRef.name: no InferencePool 'gaa' (inference.networking.k8s.io) in namespace default: did you mean ga?");
        // The right name in the other group.
        let model = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata: {name: m}\nspec:\n  modelName: m\n  poolRef: {name: ga}\n";
        let e = error_of(&format!("{POOL_V1}---\n{model}"));
        assert_eq!(e, "t.yaml[1] spec.poolRef.name: InferencePool 'ga' exists in group inference.networking.k8s.io, not inference.networking.x-k8s.io: set group: inference.networking.k8s.io");
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - backendRefs:\n    - {group: inference.networking.x-k8s.io, kind: InferencePool, name: preview}\n    - {group: inference.networking.x-k8s.io, kind: InferencePool, name: nope}\n";
        let e = error_of(&format!("{POOL_X}---\n{route}"));
        assert!(
            e.starts_with("t.yaml[1] spec.rules[0].backendRefs[1].name: no InferencePool 'nope'"),
            "{e}"
        );
        // Another namespace is another pool.
        let e = error_of(&format!(
            "{POOL_X}---\n{}",
            route
                .replace("{name: r}", "{name: r, namespace: other}")
                .replace(
                "    - {group: inference.networking.x-k8s.io, kind: InferencePool, name: nope}\n",
                ""
            )
        ));
        assert!(e.contains("in namespace other"), "{e}");
    }

    #[test]
    fn unknown_kinds_are_ignored_near_misses_are_not() {
        let (inv, errors) = parse("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {x: 1}\n---\ngroups: []\n");
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<&str> = inv.ignored.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Gateway",
                "(no apiVersion/kind: not a Kubernetes object)"
            ]
        );
        let e = error_of(&POOL_V1.replace("kind: InferencePool", "kind: InferencePol"));
        assert_eq!(
            e,
            "t.yaml[0] kind: unknown kind: did you mean InferencePool?"
        );
        let e = error_of(&POOL_V1.replace(
            "inference.networking.k8s.io/v1",
            "inference.networking.k8s.io/v1beta1",
        ));
        assert!(e.starts_with("t.yaml[0] apiVersion: InferencePool in 'inference.networking.k8s.io/v1beta1' is not supported"), "{e}");
        assert!(error_of("- a\n- b\n").contains("must be a Kubernetes object"));
    }

    #[test]
    fn lists_and_streams() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
            serde_json::to_string(&serde_yaml_ng::from_str::<serde_json::Value>(POOL_V1).unwrap())
                .unwrap(),
            serde_json::to_string(
                &serde_yaml_ng::from_str::<serde_json::Value>(
                    &POOL_X.replace("targetPortNumber: 8000", "targetPortNumber: 0")
                )
                .unwrap()
            )
            .unwrap(),
        );
        let (inv, errors) = parse(&list);
        assert_eq!(inv.pools.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "t.yaml[0] items[1].spec.targetPortNumber: must be ≥ 1"
        );
        let (inv, errors) = parse(&format!("---\n{POOL_V1}---\n---\n{POOL_X}---\n"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(inv.pools.len(), 2);
    }

    #[test]
    fn duplicates_are_errors() {
        let e = error_of(&format!("{POOL_V1}---\n{POOL_V1}"));
        assert!(e.starts_with("t.yaml[1] metadata.name: InferencePool.inference.networking.k8s.io default/ga is also defined at t.yaml[0]"), "{e}");
        // The filter knows pools by name: one name in two namespaces collides.
        let e = error_of(&format!(
            "{POOL_V1}---\n{}",
            POOL_V1.replace("{name: ga}", "{name: ga, namespace: b}")
        ));
        assert!(e.contains("the gateway knows each pool by name"), "{e}");
        let m = "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata: {name: NAME}\nspec:\n  modelName: same\n  poolRef: {group: inference.networking.k8s.io, name: ga}\n";
        let e = error_of(&format!(
            "{POOL_V1}---\n{}---\n{}",
            m.replace("NAME", "a"),
            m.replace("NAME", "b")
        ));
        assert!(e.starts_with("t.yaml[2] spec.modelName: the gateway knows each model by name: 'same' is also used at t.yaml[1]"), "{e}");
    }

    #[test]
    fn durations_and_regions() {
        assert_eq!(duration_ms("1s"), Some(1000));
        assert_eq!(duration_ms("250ms"), Some(250));
        assert_eq!(duration_ms("0.5s"), Some(500));
        assert_eq!(duration_ms("1m"), None);
        assert_eq!(
            model_armor_region("modelarmor.us-central1.rep.googleapis.com"),
            Some("us-central1")
        );
        assert_eq!(model_armor_region("modelarmor.googleapis.com"), None);
    }
}
