//! `igwctl migrate`: v1alpha2 resources → v1, as the GKE migration guide's phases
//! (deploy the v1 InferencePool and InferenceObjectives side by side; split the
//! HTTPRoute 50/50 between the two pools; send 100 % to v1; delete the v1alpha2
//! resources). The final set (`migrated`) renders to the same routing as the
//! input; what the v1 API cannot say is reported as lossy.

use super::node::K8sError;
use super::render::MODELS_ANNOTATION;
use super::resources::{Inventory, Model, Pool, PoolApi, GROUP_V1, GROUP_X};
use serde_json::json;
use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The Gateway a new HTTPRoute attaches to (when no route references the pool).
    pub gateway: String,
    /// Name of that new HTTPRoute.
    pub route_name: String,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            gateway: "inference-gateway".into(),
            route_name: "llm-route".into(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Migration {
    /// Phase 1: the v1 pools and the InferenceObjectives (new or updated).
    pub phase1: Vec<Value>,
    /// Phase 2: HTTPRoutes splitting each old pool's share 50/50 with its v1 pool.
    pub phase2: Vec<Value>,
    /// Phase 3: HTTPRoutes sending everything to the v1 pools.
    pub phase3: Vec<Value>,
    /// Phase 4: the v1alpha2 resources to delete (`kubectl delete` lines).
    pub phase4: Vec<String>,
    /// Every input object after phase 4: what `render` reads once migrated.
    pub migrated: Vec<Value>,
    /// What the v1 resources cannot carry, or carry differently.
    pub lossy: Vec<String>,
    pub notes: Vec<String>,
}

/// The v1 name of a v1alpha2 pool: `-preview` becomes `-ga`, as in the GKE guide.
pub fn v1_pool_name(old: &str) -> String {
    format!("{}-ga", old.strip_suffix("-preview").unwrap_or(old))
}

/// An InferenceObjective being migrated: its document, the model entries for
/// [`MODELS_ANNOTATION`], and the location it came from when its pool moved.
type ObjectiveDraft = (Value, Vec<serde_json::Value>, Option<String>);

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn to_yaml(v: serde_json::Value) -> Value {
    serde_yaml_ng::to_value(v).unwrap_or(Value::Null)
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

pub fn migrate(inv: &Inventory, opts: &MigrateOptions) -> Result<Migration, Vec<K8sError>> {
    let mut out = Migration::default();
    let mut errors = Vec::new();
    // (namespace, old name) → new name.
    let mut renamed: BTreeMap<(String, String), String> = BTreeMap::new();
    // Documents (by location) replaced or removed in the final set.
    let mut replaced: BTreeMap<String, Option<Value>> = BTreeMap::new();
    let mut added: Vec<Value> = Vec::new();

    let mut old_pools: Vec<&Pool> = inv
        .pools
        .iter()
        .filter(|p| p.api == PoolApi::V1Alpha2)
        .collect();
    old_pools
        .sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    for p in &old_pools {
        let new = v1_pool_name(&p.meta.name);
        let ns = &p.meta.namespace;
        renamed.insert(key(ns, &p.meta.name), new.clone());
        replaced.insert(p.meta.loc.to_string(), None);
        out.phase4.push(format!(
            "kubectl delete inferencepools.{GROUP_X} {} -n {ns}   # {}",
            p.meta.name, p.meta.loc
        ));
        if let Some(existing) = inv.pool(ns, GROUP_V1, &new) {
            if existing.selector == p.selector && existing.ports == p.ports {
                out.notes.push(format!(
                    "pool {ns}/{}: the v1 pool {new} already exists with the same selector and port ({}): phase 1 keeps it",
                    p.meta.name, existing.meta.loc
                ));
                continue;
            }
            errors.push(K8sError::at(
                &existing.meta.loc,
                "spec",
                format!(
                    "the v1 pool {new} (the migration's name for {}) selects other pods or ports: rename one of them",
                    p.meta.name
                ),
            ));
            continue;
        }
        if new.len() > 53 {
            errors.push(K8sError::at(
                &p.meta.loc,
                "metadata.name",
                format!("the v1 name '{new}' leaves no room for '-endpoints' (63 characters)"),
            ));
            continue;
        }
        let mut spec = vec![
            (
                "selector",
                map(vec![("matchLabels", to_yaml(json!(p.selector)))]),
            ),
            (
                "targetPorts",
                to_yaml(json!(p
                    .ports
                    .iter()
                    .map(|n| json!({"number": n}))
                    .collect::<Vec<_>>())),
            ),
        ];
        match &p.picker {
            Some(r) => {
                let name = match r.name.strip_prefix(p.meta.name.as_str()) {
                    Some(rest) => format!("{new}{rest}"),
                    None => {
                        out.lossy.push(format!(
                            "{} spec.extensionRef.name {}: an endpoint picker serves one pool; the v1 pool {new} names the same one: deploy one for {new} if a GKE Gateway is to call it",
                            p.meta.loc, r.name
                        ));
                        r.name.clone()
                    }
                };
                spec.push((
                    "endpointPickerRef",
                    to_yaml(json!({
                        "group": r.group,
                        "kind": r.kind,
                        "name": name,
                        "port": {"number": r.port.unwrap_or(9002)},
                        "failureMode": r.failure_mode,
                    })),
                ));
            }
            None => out.notes.push(format!(
                "{}: no extensionRef: the v1 pool has no endpointPickerRef (required by GIE's v1 CRD up to v1.5)",
                p.meta.loc
            )),
        }
        let pool = map(vec![
            ("apiVersion", s("inference.networking.k8s.io/v1")),
            ("kind", s("InferencePool")),
            (
                "metadata",
                map(vec![("name", s(&new)), ("namespace", s(ns))]),
            ),
            ("spec", map(spec)),
        ]);
        out.phase1.push(pool.clone());
        added.push(pool);
    }
    let new_ref = |ns: &str, group: &str, name: &str| -> (String, String) {
        if group == GROUP_X {
            if let Some(n) = renamed.get(&key(ns, name)) {
                return (GROUP_V1.to_string(), n.clone());
            }
        }
        (group.to_string(), name.to_string())
    };

    // InferenceModel → InferenceObjective (+ the annotation with the filter's model routing).
    let mut models: Vec<&Model> = inv.models.iter().collect();
    models
        .sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    // (namespace, objective) → (document, annotation entries)
    let mut objectives: BTreeMap<(String, String), ObjectiveDraft> = BTreeMap::new();
    for o in &inv.objectives {
        let (g, n) = new_ref(&o.meta.namespace, &o.pool_ref.group, &o.pool_ref.name);
        let doc = inv
            .documents
            .iter()
            .find(|d| d.loc == o.meta.loc)
            .map(|d| d.value.clone())
            .unwrap_or(Value::Null);
        let mut doc = doc;
        let existing: Vec<serde_json::Value> = o
            .meta
            .annotations
            .get(MODELS_ANNOTATION)
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let changed = g != o.pool_ref.group || n != o.pool_ref.name;
        if changed {
            set_path(
                &mut doc,
                &["spec", "poolRef"],
                to_yaml(json!({"group": g, "name": n})),
            );
        }
        objectives.insert(
            key(&o.meta.namespace, &o.meta.name),
            (doc, existing, changed.then(|| o.meta.loc.to_string())),
        );
    }
    let mut touched: Vec<(String, String)> = Vec::new();
    for m in &models {
        let ns = &m.meta.namespace;
        let (g, pool) = new_ref(ns, &m.pool_ref.group, &m.pool_ref.name);
        replaced.insert(m.meta.loc.to_string(), None);
        out.phase4.push(format!(
            "kubectl delete inferencemodels.{GROUP_X} {} -n {ns}   # {}",
            m.meta.name, m.meta.loc
        ));
        let mut entry = serde_json::Map::new();
        entry.insert("name".into(), json!(m.model_name));
        if let Some(c) = m.criticality {
            entry.insert("criticality".into(), json!(format!("{c:?}")));
        }
        let targets: Vec<serde_json::Value> = m
            .targets
            .iter()
            .filter(|t| t.weight != Some(0))
            .map(|t| json!({"name": t.name, "weight": t.weight.unwrap_or(1)}))
            .collect();
        if !targets.is_empty() {
            out.lossy.push(format!(
                "{} spec.targetModels ({}): InferenceObjective has no such field: kept for this gateway in the annotation {MODELS_ANNOTATION} (the filter's models[].target_models); a GKE/GIE gateway needs Body-Based Routing with a model rewrite on the route instead",
                m.meta.loc,
                m.targets
                    .iter()
                    .map(|t| format!("{} {}", t.name, t.weight.map(|w| w.to_string()).unwrap_or("-".into())))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            entry.insert("target_models".into(), json!(targets));
        }
        let priority = m.criticality.map(|c| c.priority());
        let k = key(ns, &m.meta.name);
        match objectives.get_mut(&k) {
            Some((doc, entries, _)) => {
                let have = doc
                    .get("spec")
                    .and_then(|s| s.get("priority"))
                    .and_then(Value::as_i64);
                if have != priority.map(i64::from) {
                    out.lossy.push(format!(
                        "{}: InferenceObjective {ns}/{} already exists with priority {}; the criticality {} implied {}: the objective keeps its priority (clients selecting it by header get that), requests for model {} keep {} through the annotation",
                        m.meta.loc,
                        m.meta.name,
                        have.map(|p| p.to_string()).unwrap_or("unset".into()),
                        m.criticality.map(|c| format!("{c:?}")).unwrap_or("unset".into()),
                        priority.map(|p| p.to_string()).unwrap_or("0".into()),
                        m.model_name,
                        m.criticality.map(|c| format!("{c:?}")).unwrap_or("priority 0".into()),
                    ));
                }
                let obj_pool = doc
                    .get("spec")
                    .and_then(|s| s.get("poolRef"))
                    .and_then(|r| r.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if obj_pool != pool {
                    errors.push(K8sError::at(
                        &m.meta.loc,
                        "spec.poolRef.name",
                        format!("the InferenceObjective of the same name refers to pool {obj_pool}, this model to {pool}: rename one"),
                    ));
                }
                entries.push(serde_json::Value::Object(entry));
            }
            None => {
                let mut spec = vec![];
                if let Some(p) = priority {
                    spec.push(("priority", Value::Number(p.into())));
                }
                spec.push(("poolRef", to_yaml(json!({"group": g, "name": pool}))));
                let doc = map(vec![
                    ("apiVersion", s("inference.networking.x-k8s.io/v1alpha2")),
                    ("kind", s("InferenceObjective")),
                    (
                        "metadata",
                        map(vec![("name", s(&m.meta.name)), ("namespace", s(ns))]),
                    ),
                    ("spec", map(spec)),
                ]);
                objectives.insert(
                    k.clone(),
                    (doc, vec![serde_json::Value::Object(entry)], None),
                );
            }
        }
        if m.model_name != m.meta.name {
            out.notes.push(format!(
                "{}: model {} → InferenceObjective {} (clients select an objective by name in x-gateway-inference-objective)",
                m.meta.loc, m.model_name, m.meta.name
            ));
        }
        out.notes.push(format!(
            "{}: criticality {} → priority {} (Critical 1, Standard 0, Sheddable -1, as the filter maps it)",
            m.meta.loc,
            m.criticality.map(|c| format!("{c:?}")).unwrap_or("unset".into()),
            priority.unwrap_or(0)
        ));
        touched.push(k);
    }
    let existing_locs: BTreeMap<(String, String), String> = inv
        .objectives
        .iter()
        .map(|o| (key(&o.meta.namespace, &o.meta.name), o.meta.loc.to_string()))
        .collect();
    for (k, (mut doc, entries, moved)) in objectives {
        let is_touched = touched.contains(&k);
        if is_touched {
            let text = serde_json::Value::Array(entries).to_string();
            set_path(
                &mut doc,
                &["metadata", "annotations", MODELS_ANNOTATION],
                s(&text),
            );
        }
        match existing_locs.get(&k) {
            Some(loc) if is_touched || moved.is_some() => {
                out.phase1.push(doc.clone());
                replaced.insert(loc.clone(), Some(doc));
            }
            Some(_) => {}
            None => {
                out.phase1.push(doc.clone());
                added.push(doc);
            }
        }
    }

    // Routes.
    let mut any_route = false;
    for r in &inv.routes {
        let refs_old = r.rules.iter().any(|rule| {
            rule.backends.iter().any(|b| {
                b.is_pool()
                    && b.group == GROUP_X
                    && renamed.contains_key(&key(
                        b.namespace.as_deref().unwrap_or(&r.meta.namespace),
                        &b.name,
                    ))
            })
        });
        if !refs_old {
            continue;
        }
        any_route = true;
        let Some(doc) = inv.documents.iter().find(|d| d.loc == r.meta.loc) else {
            continue;
        };
        let ns = r.meta.namespace.clone();
        let p2 = rewrite_route(&doc.value, &ns, &renamed, false);
        let p3 = rewrite_route(&doc.value, &ns, &renamed, true);
        out.phase2.push(p2);
        out.phase3.push(p3.clone());
        replaced.insert(r.meta.loc.to_string(), Some(p3));
    }
    if !any_route && !old_pools.is_empty() {
        let taken = old_pools.len() == 1
            && inv.routes.iter().any(|r| {
                r.meta.name == opts.route_name && r.meta.namespace == old_pools[0].meta.namespace
            });
        if taken {
            out.notes.push(format!(
                "HTTPRoute {} exists and does not reference the v1alpha2 pool: phases 2 and 3 render nothing (pass --route-name for a new route)",
                opts.route_name
            ));
        } else if old_pools.len() == 1 {
            let p = old_pools[0];
            let new = v1_pool_name(&p.meta.name);
            let route = |refs: serde_json::Value| {
                to_yaml(json!({
                    "apiVersion": "gateway.networking.k8s.io/v1",
                    "kind": "HTTPRoute",
                    "metadata": {"name": opts.route_name, "namespace": p.meta.namespace},
                    "spec": {
                        "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": opts.gateway}],
                        "rules": [{"backendRefs": refs}],
                    }
                }))
            };
            out.phase2.push(route(json!([
                {"group": GROUP_X, "kind": "InferencePool", "name": p.meta.name, "weight": 50},
                {"group": GROUP_V1, "kind": "InferencePool", "name": new, "weight": 50},
            ])));
            let p3 = route(
                json!([{"group": GROUP_V1, "kind": "InferencePool", "name": new, "weight": 100}]),
            );
            out.phase3.push(p3.clone());
            added.push(p3);
            out.notes.push(format!(
                "no HTTPRoute references {}: phases 2 and 3 use a new HTTPRoute {} on Gateway {}",
                p.meta.name, opts.route_name, opts.gateway
            ));
        } else {
            out.notes.push(
                "no HTTPRoute references the v1alpha2 pools: shift traffic in your own routes (phases 2 and 3 render nothing)"
                    .into(),
            );
        }
    }
    if !errors.is_empty() {
        errors.sort();
        return Err(errors);
    }

    // The inventory keeps no API-key Secret (they hold plaintext keys).
    for s in &inv.api_keys {
        out.notes.push(format!(
            "{}: the API-key Secret {}/{} is left out of migrated.yaml (it holds keys): keep it as it is and pass it to render with another -f",
            s.meta.loc, s.meta.namespace, s.meta.name
        ));
    }
    for d in &inv.documents {
        match replaced.get(&d.loc.to_string()) {
            Some(Some(v)) => out.migrated.push(v.clone()),
            Some(None) => {}
            None => out.migrated.push(d.value.clone()),
        }
    }
    out.migrated.extend(added);
    Ok(out)
}

fn set_path(doc: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = doc;
    for p in parents {
        let Value::Mapping(m) = cur else { return };
        if !matches!(m.get(*p), Some(Value::Mapping(_))) {
            m.insert(s(p), Value::Mapping(Mapping::new()));
        }
        let Some(next) = m.get_mut(*p) else { return };
        cur = next;
    }
    if let Value::Mapping(m) = cur {
        m.insert(s(last), value);
    }
}

/// Phase 2 (`to_v1` false): next to each old pool's backendRef, the v1 pool with
/// the same weight. Phase 3: the old refs' weight moves to the v1 pool. Refs to
/// one pool are merged, weights summed.
fn rewrite_route(
    route: &Value,
    ns: &str,
    renamed: &BTreeMap<(String, String), String>,
    to_v1: bool,
) -> Value {
    let mut route = route.clone();
    let Some(rules) = route
        .get_mut("spec")
        .and_then(|s| s.get_mut("rules"))
        .and_then(Value::as_sequence_mut)
    else {
        return route;
    };
    for rule in rules {
        let Some(refs) = rule.get_mut("backendRefs").and_then(Value::as_sequence_mut) else {
            continue;
        };
        let names: Vec<(String, String)> = refs
            .iter()
            .map(|r| {
                (
                    r.get("group")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    r.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        let mut out: Vec<Value> = Vec::new();
        let add = |out: &mut Vec<Value>, r: Value| {
            let id = |v: &Value| {
                (
                    v.get("group").and_then(Value::as_str).map(String::from),
                    v.get("kind").and_then(Value::as_str).map(String::from),
                    v.get("name").and_then(Value::as_str).map(String::from),
                    v.get("namespace").and_then(Value::as_str).map(String::from),
                )
            };
            let w = |v: &Value| v.get("weight").and_then(Value::as_u64).unwrap_or(1);
            if let Some(existing) = out.iter_mut().find(|e| id(e) == id(&r)) {
                let sum = w(existing) + w(&r);
                if let Value::Mapping(m) = existing {
                    m.insert(s("weight"), Value::Number(sum.into()));
                }
            } else {
                out.push(r);
            }
        };
        for r in refs.iter() {
            let is_old = r.get("kind").and_then(Value::as_str) == Some("InferencePool")
                && r.get("group").and_then(Value::as_str) == Some(GROUP_X);
            let name = r.get("name").and_then(Value::as_str).unwrap_or("");
            let rns = r.get("namespace").and_then(Value::as_str).unwrap_or(ns);
            let new = is_old.then(|| renamed.get(&key(rns, name))).flatten();
            match new {
                // Phase 2 of a rule that already splits between the two: as it is.
                Some(new) if !to_v1 && names.contains(&(GROUP_V1.to_string(), new.clone())) => {
                    add(&mut out, r.clone())
                }
                Some(new) => {
                    let mut v1 = r.clone();
                    if let Value::Mapping(m) = &mut v1 {
                        m.insert(s("group"), s(GROUP_V1));
                        m.insert(s("name"), s(new));
                        m.insert(
                            s("weight"),
                            Value::Number(
                                r.get("weight").and_then(Value::as_u64).unwrap_or(1).into(),
                            ),
                        );
                    }
                    if !to_v1 {
                        add(&mut out, r.clone());
                    }
                    add(&mut out, v1);
                }
                None => add(&mut out, r.clone()),
            }
        }
        *refs = out;
    }
    route
}

impl Migration {
    /// The phased plan, for people.
    pub fn plan(&self, out_dir: Option<&str>) -> String {
        let mut t = String::new();
        let file = |name: &str| match out_dir {
            Some(d) => format!("{d}/{name}"),
            None => name.to_string(),
        };
        let names = |docs: &[Value]| {
            docs.iter()
                .map(|d| {
                    format!(
                        "{} {}/{}",
                        d.get("kind").and_then(Value::as_str).unwrap_or(""),
                        d.get("metadata")
                            .and_then(|m| m.get("namespace"))
                            .and_then(Value::as_str)
                            .unwrap_or("default"),
                        d.get("metadata")
                            .and_then(|m| m.get("name"))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(t, "Migration plan (GKE Inference Gateway: v1alpha2 → v1)");
        let _ = writeln!(
            t,
            "1) Deploy the v1 resources side by side: kubectl apply -f {}\n   {}",
            file("phase1-v1-resources.yaml"),
            if self.phase1.is_empty() {
                "(nothing new)".into()
            } else {
                names(&self.phase1)
            }
        );
        let _ = writeln!(
            t,
            "2) Split traffic 50/50 between each old pool and its v1 pool: kubectl apply -f {}\n   {}",
            file("phase2-httproute-split.yaml"),
            if self.phase2.is_empty() { "(no route)".into() } else { names(&self.phase2) }
        );
        let _ = writeln!(
            t,
            "3) Send 100 % to v1 once the v1 pool serves well: kubectl apply -f {}\n   {}",
            file("phase3-httproute-v1.yaml"),
            if self.phase3.is_empty() {
                "(no route)".into()
            } else {
                names(&self.phase3)
            }
        );
        let _ = writeln!(t, "4) Remove the v1alpha2 resources:");
        for d in &self.phase4 {
            let _ = writeln!(t, "   {d}");
        }
        if !self.lossy.is_empty() {
            let _ = writeln!(t, "lossy conversions:");
            for l in &self.lossy {
                let _ = writeln!(t, "  - {l}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(t, "notes:");
            for l in &self.notes {
                let _ = writeln!(t, "  - {l}");
            }
        }
        t
    }
}

/// A multi-document YAML stream.
pub fn yaml_stream(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(d).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::load::parse_stream;
    use crate::k8s::render::{render, RenderOptions};
    use crate::k8s::testutil::load_examples;
    use serde_json::Value as Json;

    /// What decides where a listed model's request goes and how it is treated:
    /// per model, each pool (by the pods it selects, so a renamed pool with the
    /// same pods is the same) with its share of the requests, and whether the
    /// model's entry (priority, rewrite) applies there.
    type ModelRouting = BTreeMap<String, BTreeMap<String, (String, bool, Json)>>;

    fn pool_content(inv: &Inventory, name: &str) -> String {
        let p = inv.pools.iter().find(|p| p.meta.name == name).unwrap();
        format!("{}:{:?}:{:?}", p.meta.namespace, p.selector, p.ports)
    }

    fn routing(inv: &Inventory) -> (ModelRouting, BTreeMap<String, i64>) {
        let r = render(inv, &RenderOptions::default()).unwrap_or_else(|e| panic!("{e:#?}"));
        let c = &r.plugin_config;
        let split: Vec<(String, u64)> = match c.get("backends").and_then(Json::as_array) {
            Some(b) => b
                .iter()
                .map(|b| {
                    (
                        pool_content(inv, b["pool"].as_str().unwrap()),
                        b["weight"].as_u64().unwrap(),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let mut out = ModelRouting::new();
        for m in c["models"].as_array().cloned().unwrap_or_default() {
            let home = pool_content(inv, m["pool"].as_str().unwrap());
            let treatment = json!({"criticality": m.get("criticality"), "priority": m.get("priority"), "targets": m.get("target_models")});
            let mut shares: BTreeMap<String, u64> = BTreeMap::new();
            if split.is_empty() {
                shares.insert(home.clone(), 1);
            }
            for (content, w) in &split {
                *shares.entry(content.clone()).or_default() += w;
            }
            let total: u64 = shares.values().sum();
            let per = shares
                .into_iter()
                .map(|(content, w)| {
                    let applies = content == home;
                    (
                        content,
                        (
                            format!("{:.4}", w as f64 / total as f64),
                            applies,
                            treatment.clone(),
                        ),
                    )
                })
                .collect();
            out.insert(m["name"].as_str().unwrap().to_string(), per);
        }
        let objectives = c["objectives"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap().to_string(),
                    o["priority"].as_i64().unwrap(),
                )
            })
            .collect();
        (out, objectives)
    }

    fn reread(docs: &[Value]) -> Inventory {
        let (d, errors) = parse_stream("migrated.yaml", &yaml_stream(docs));
        assert!(errors.is_empty(), "{errors:#?}");
        let (inv, errors) = Inventory::parse(d);
        assert!(errors.is_empty(), "{errors:#?}");
        inv
    }

    fn assert_same_routing(files: &[&str]) -> Migration {
        let before = load_examples(files);
        let m = migrate(&before, &MigrateOptions::default()).unwrap();
        let after = reread(&m.migrated);
        assert!(
            after.pools.iter().all(|p| p.api == PoolApi::V1),
            "{:?}",
            after.pools
        );
        assert!(after.models.is_empty());
        let (models_before, objectives_before) = routing(&before);
        let (models_after, objectives_after) = routing(&after);
        assert_eq!(models_before, models_after);
        for (name, p) in &objectives_before {
            assert_eq!(objectives_after.get(name), Some(p), "objective {name}");
        }
        m
    }

    #[test]
    fn migrated_shared_examples_route_the_same() {
        let m = assert_same_routing(&[
            "inferencepool-v1.yaml",
            "inferencepool-v1alpha2.yaml",
            "inferencemodel-v1alpha2.yaml",
            "inferenceobjectives.yaml",
            "httproute-split-50-50.yaml",
        ]);
        // The route already split 50/50: phase 2 is that route; phase 3 all to v1.
        let refs = |v: &Value| {
            v["spec"]["rules"][0]["backendRefs"]
                .as_sequence()
                .unwrap()
                .clone()
        };
        assert_eq!(refs(&m.phase2[0]).len(), 2);
        assert_eq!(refs(&m.phase2[0])[0]["weight"].as_u64(), Some(50));
        let p3 = refs(&m.phase3[0]);
        assert_eq!(p3.len(), 1);
        assert_eq!(p3[0]["name"].as_str(), Some("vllm-llama3-8b-instruct-ga"));
        assert_eq!(p3[0]["group"].as_str(), Some(GROUP_V1));
        assert_eq!(p3[0]["weight"].as_u64(), Some(100));
        // The existing objectives keep their priority; the conflict is reported.
        assert!(m
            .lossy
            .iter()
            .any(|l| l.contains("food-review already exists with priority 2")));
        assert!(m
            .lossy
            .iter()
            .any(|l| l.contains("spec.targetModels (food-review-1 90, food-review-2 10)")));
        assert_eq!(m.phase4.len(), 4);
        assert!(m.phase4[0].starts_with("kubectl delete inferencepools.inference.networking.x-k8s.io vllm-llama3-8b-instruct-preview -n default"));
        let plan = m.plan(None);
        for step in [
            "1) Deploy",
            "2) Split",
            "3) Send 100 %",
            "4) Remove",
            "lossy conversions:",
        ] {
            assert!(plan.contains(step), "{plan}");
        }
        // Without a route: a new one (llm-route) carries phases 2 and 3.
        let m = assert_same_routing(&[
            "inferencepool-v1.yaml",
            "inferencepool-v1alpha2.yaml",
            "inferencemodel-v1alpha2.yaml",
            "inferenceobjectives.yaml",
        ]);
        assert_eq!(m.phase3[0]["metadata"]["name"].as_str(), Some("llm-route"));
        // A route of that name already sends everything elsewhere: nothing is invented.
        let inv = load_examples(&[
            "inferencepool-v1.yaml",
            "inferencepool-v1alpha2.yaml",
            "httproute-ga-100.yaml",
        ]);
        let m = migrate(&inv, &MigrateOptions::default()).unwrap();
        assert!(m.phase2.is_empty() && m.phase3.is_empty());
        assert!(m
            .notes
            .iter()
            .any(|n| n.contains("HTTPRoute llm-route exists")));
        reread(&m.migrated);
    }

    #[test]
    fn a_preview_pool_alone_gets_a_v1_pool_and_a_route() {
        let m = assert_same_routing(&[
            "inferencepool-v1alpha2.yaml",
            "inferencemodel-v1alpha2.yaml",
        ]);
        let pool = m
            .phase1
            .iter()
            .find(|d| d["kind"].as_str() == Some("InferencePool"))
            .unwrap();
        assert_eq!(
            pool["apiVersion"].as_str(),
            Some("inference.networking.k8s.io/v1")
        );
        assert_eq!(
            pool["metadata"]["name"].as_str(),
            Some("vllm-llama3-8b-instruct-ga")
        );
        assert_eq!(
            pool["spec"]["selector"]["matchLabels"]["app"].as_str(),
            Some("vllm-llama3-8b-instruct")
        );
        assert_eq!(
            pool["spec"]["targetPorts"][0]["number"].as_u64(),
            Some(8000)
        );
        let epp = &pool["spec"]["endpointPickerRef"];
        assert_eq!(epp["name"].as_str(), Some("vllm-llama3-8b-instruct-ga-epp"));
        assert_eq!(epp["port"]["number"].as_u64(), Some(9002));
        assert_eq!(epp["failureMode"].as_str(), Some("FailClose"));
        // Criticality → priority as the filter maps it; the pool reference has its group.
        let obj = |name: &str| {
            m.phase1
                .iter()
                .find(|d| d["metadata"]["name"].as_str() == Some(name))
                .unwrap()
        };
        assert_eq!(obj("base-model")["spec"]["priority"].as_i64(), Some(1));
        assert_eq!(obj("food-review")["spec"]["priority"].as_i64(), Some(0));
        assert_eq!(
            obj("batch-summaries")["spec"]["priority"].as_i64(),
            Some(-1)
        );
        assert_eq!(
            obj("food-review")["spec"]["poolRef"]["group"].as_str(),
            Some(GROUP_V1)
        );
        // The guide's phases 2 and 3 on a new route.
        let refs = |v: &Value| {
            v["spec"]["rules"][0]["backendRefs"]
                .as_sequence()
                .unwrap()
                .clone()
        };
        let p2 = refs(&m.phase2[0]);
        assert_eq!(
            p2.iter()
                .map(|r| (r["name"].as_str().unwrap(), r["weight"].as_u64().unwrap()))
                .collect::<Vec<_>>(),
            [
                ("vllm-llama3-8b-instruct-preview", 50),
                ("vllm-llama3-8b-instruct-ga", 50)
            ]
        );
        assert_eq!(m.phase2[0]["metadata"]["name"].as_str(), Some("llm-route"));
        assert_eq!(refs(&m.phase3[0])[0]["weight"].as_u64(), Some(100));
        // Phase 2 re-read renders a 50/50 split between the two pools.
        let mut mid: Vec<Value> = load_examples(&["inferencepool-v1alpha2.yaml"])
            .documents
            .iter()
            .map(|d| d.value.clone())
            .collect();
        mid.extend(m.phase1.clone());
        mid.extend(m.phase2.clone());
        let r = render(&reread(&mid), &RenderOptions::default()).unwrap();
        assert_eq!(
            r.plugin_config["backends"],
            json!([{"pool": "vllm-llama3-8b-instruct-preview", "weight": 50}, {"pool": "vllm-llama3-8b-instruct-ga", "weight": 50}])
        );
    }

    #[test]
    fn a_v1_name_taken_by_other_pods_is_an_error() {
        let mut inv = load_examples(&["inferencepool-v1.yaml", "inferencepool-v1alpha2.yaml"]);
        inv.pools[0].selector.insert("app".into(), "other".into());
        let e = migrate(&inv, &MigrateOptions::default()).unwrap_err();
        assert!(
            e[0].to_string().contains("selects other pods or ports"),
            "{e:?}"
        );
    }
}
