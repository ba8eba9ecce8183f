//! `docs/kubernetes.md`: every ```yaml block parses (with serde_yaml_ng, several
//! documents per block), every object has a known `apiVersion`/`kind`, and the
//! objects agree with each other: selectors and pod labels, the InferencePool and
//! its headless Service, Secret and ConfigMap references, the pool name in the
//! collector, the filter and the HPA, the collector's DNS names and the Services
//! they name, the Envoy bootstrap's listeners, filter and clusters. Nothing here
//! runs a cluster.

use inference_gateway::deploy::repo_root;
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet};

const DOC: &str = "docs/kubernetes.md";

/// Every `(apiVersion, kind)` the page may use. No RBAC kinds: the layout needs none.
const KNOWN: &[(&str, &str)] = &[
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
];

const POOL: &str = "vllm-llama3-8b-instruct";

/// The fenced blocks of `lang` in a Markdown text.
fn blocks(markdown: &str, lang: &str) -> Vec<String> {
    let open = format!("```{lang}");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_end() == open => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => out.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```{lang} block");
    out
}

struct Objects(Vec<Value>);

impl Objects {
    fn load() -> Objects {
        let text = std::fs::read_to_string(repo_root().join(DOC)).unwrap();
        let mut objects = Vec::new();
        for (i, block) in blocks(&text, "yaml").iter().enumerate() {
            for doc in serde_yaml_ng::Deserializer::from_str(block) {
                let v = <Value as serde::Deserialize>::deserialize(doc)
                    .unwrap_or_else(|e| panic!("yaml block {}: {e}\n{block}", i + 1));
                if !v.is_null() {
                    objects.push(v);
                }
            }
        }
        Objects(objects)
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|o| {
                o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("no {kind} {name} in {DOC}"))
    }
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

fn pod_labels(deployment: &Value) -> BTreeMap<String, String> {
    str_map(&deployment["spec"]["template"]["metadata"]["labels"])
}

/// The Deployments whose pods `selector` selects.
fn selected<'a>(objects: &'a Objects, selector: &Value) -> Vec<&'a str> {
    let sel = str_map(selector);
    objects
        .all("Deployment")
        .into_iter()
        .filter(|d| is_subset(&sel, &pod_labels(d)))
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect()
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `name.namespace.svc.cluster.local[:port]` → (name, namespace, port).
fn service_dns(address: &str) -> (String, String, Option<u16>) {
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()),
        None => (address, None),
    };
    let parts: Vec<&str> = host.split('.').collect();
    assert!(
        parts.len() >= 3 && parts[2] == "svc",
        "{address} is not a Service DNS name"
    );
    (parts[0].to_string(), parts[1].to_string(), port)
}

#[test]
fn every_object_has_a_known_api_version_and_kind() {
    let objects = Objects::load();
    assert!(objects.0.len() >= 15, "{} objects", objects.0.len());
    let mut seen = BTreeSet::new();
    for o in &objects.0 {
        let api = o["apiVersion"].as_str().expect("apiVersion");
        let kind = o["kind"].as_str().expect("kind");
        assert!(KNOWN.contains(&(api, kind)), "unexpected {api} {kind}");
        let name = o["metadata"]["name"].as_str().expect("metadata.name");
        assert!(
            o["metadata"]["namespace"].as_str().is_some(),
            "{kind} {name}: namespace"
        );
        assert!(seen.insert((kind, name)), "{kind} {name} twice");
    }
    for kind in [
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
        "ServiceAccount",
    ] {
        assert!(objects.all(kind).is_empty(), "no RBAC is needed: {kind}");
    }
}

#[test]
fn deployments_select_their_own_pods_and_references_resolve() {
    let objects = Objects::load();
    let text = std::fs::read_to_string(repo_root().join(DOC)).unwrap();
    // Secrets: the manifests' and those the page creates with kubectl.
    let mut secrets: BTreeSet<String> = objects
        .all("Secret")
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    for block in blocks(&text, "sh") {
        for line in block.lines() {
            if let Some(rest) = line.trim().strip_prefix("kubectl create secret generic ") {
                secrets.extend(rest.split_whitespace().next().map(str::to_string));
            }
        }
    }
    for d in objects.all("Deployment") {
        let name = d["metadata"]["name"].as_str().unwrap();
        let sel = str_map(&d["spec"]["selector"]["matchLabels"]);
        assert!(
            is_subset(&sel, &pod_labels(d)),
            "{name}: selector ⊄ pod labels"
        );
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{name}: no API access needed"
        );
        let containers = pod["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_sequence().into_iter().flatten());
        let volumes: BTreeMap<String, &Value> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v))
            .collect();
        for c in containers {
            for env in c["env"].as_sequence().into_iter().flatten() {
                let r = &env["valueFrom"]["secretKeyRef"];
                if let Some(secret) = r["name"].as_str() {
                    assert!(secrets.contains(secret), "{name}: no Secret {secret}");
                    if let Some(s) = objects.0.iter().find(|o| {
                        o["kind"].as_str() == Some("Secret")
                            && o["metadata"]["name"].as_str() == Some(secret)
                    }) {
                        let key = r["key"].as_str().unwrap();
                        assert!(!s["stringData"][key].is_null(), "{secret} has no {key}");
                    }
                }
            }
            for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                let v = m["name"].as_str().unwrap();
                assert!(volumes.contains_key(v), "{name}: no volume {v}");
            }
            if let Some(probe) = c["readinessProbe"]["httpGet"]["port"].as_str() {
                let ports: Vec<&str> = c["ports"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                assert!(ports.contains(&probe), "{name}: probe port {probe}");
            }
        }
        for v in volumes.values() {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                objects.get("ConfigMap", cm);
            }
        }
    }
    // Every Service and PodMonitor selects exactly one Deployment's pods.
    for s in objects.all("Service") {
        let name = s["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            selected(&objects, &s["spec"]["selector"]).len(),
            1,
            "Service {name}"
        );
    }
    for m in objects.all("PodMonitor") {
        let name = m["metadata"]["name"].as_str().unwrap();
        let d = selected(&objects, &m["spec"]["selector"]["matchLabels"]);
        assert_eq!(d.len(), 1, "PodMonitor {name}");
        let deployment = objects.get("Deployment", d[0]);
        let ports: BTreeSet<&str> = deployment["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
            .filter_map(|p| p["name"].as_str())
            .collect();
        for e in m["spec"]["podMetricsEndpoints"].as_sequence().unwrap() {
            let port = e["port"].as_str().unwrap();
            assert!(ports.contains(port), "PodMonitor {name}: port {port}");
        }
    }
}

#[test]
fn the_pool_its_headless_service_and_the_model_servers_agree() {
    let objects = Objects::load();
    let pool = objects.get("InferencePool", POOL);
    let selector = &pool["spec"]["selector"]["matchLabels"];
    let servers = selected(&objects, selector);
    assert_eq!(servers, [POOL], "the pool selects the model-server pods");
    let port = pool["spec"]["targetPorts"][0]["number"].as_u64().unwrap();
    let vllm = container(objects.get("Deployment", POOL), "vllm");
    assert_eq!(vllm["ports"][0]["containerPort"].as_u64(), Some(port));
    assert!(
        vllm["readinessProbe"].is_mapping(),
        "members are Ready pods"
    );
    assert!(vllm["lifecycle"]["preStop"].is_mapping(), "a preStop sleep");

    let svc = objects.get("Service", &format!("{POOL}-endpoints"));
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"), "headless");
    assert_eq!(
        svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(false)
    );
    assert_eq!(str_map(&svc["spec"]["selector"]), str_map(selector));
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(port));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"].as_u64(), Some(port));

    // The preStop sleep outlasts the discovery bound, and the grace period the sleep.
    let sleep: u64 = vllm["lifecycle"]["preStop"]["exec"]["command"][2]
        .as_str()
        .and_then(|c| c.strip_prefix("sleep "))
        .and_then(|s| s.parse().ok())
        .expect("preStop sleep N");
    let grace = objects.get("Deployment", POOL)["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(sleep > 35 && grace > sleep, "sleep {sleep}, grace {grace}");

    let hpa = objects.get("HorizontalPodAutoscaler", POOL);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
        Some("Deployment")
    );
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some(POOL));
    let metric = &hpa["spec"]["metrics"][0]["external"]["metric"];
    assert_eq!(
        metric["name"].as_str(),
        Some("inference_pool_average_kv_cache_utilization")
    );
    assert_eq!(
        metric["selector"]["matchLabels"]["name"].as_str(),
        Some(POOL)
    );
    let adapter: Value = serde_yaml_ng::from_str(
        objects.get("ConfigMap", "adapter-config")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let rules = adapter["externalRules"].as_sequence().unwrap();
    assert!(rules
        .iter()
        .any(|r| r["name"]["as"].as_str() == metric["name"].as_str()));
}

#[test]
fn the_collector_config_names_the_pool_and_both_headless_services() {
    let objects = Objects::load();
    let pool = objects.get("InferencePool", POOL);
    let cm = objects.get("ConfigMap", "inference-gateway-collector");
    let config: Value = serde_yaml_ng::from_str(cm["data"]["collector.yaml"].as_str().unwrap())
        .expect("collector.yaml");
    let p = &config["pools"][0];
    assert_eq!(p["name"].as_str(), Some(POOL));
    assert_eq!(
        p["target_ports"][0].as_u64(),
        pool["spec"]["targetPorts"][0]["number"].as_u64()
    );
    let (svc, ns, port) = service_dns(p["endpoints"][0].as_str().unwrap());
    assert_eq!(
        (svc.as_str(), ns.as_str(), port),
        (&*format!("{POOL}-endpoints"), "default", None)
    );
    objects.get("Service", &svc);

    // The push target: the Envoy headless Service, not-ready pods included.
    let (svc, ns, port) = service_dns(config["push_targets"][0].as_str().unwrap());
    assert_eq!(ns, "default");
    let ingest = objects.get("Service", &svc);
    assert_eq!(ingest["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        ingest["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    assert_eq!(
        selected(&objects, &ingest["spec"]["selector"]),
        ["inference-gateway"]
    );
    assert_eq!(
        port.map(u64::from),
        ingest["spec"]["ports"][0]["port"].as_u64()
    );

    // The token comes from the environment variable the Deployment fills from the Secret.
    let collector = container(
        objects.get("Deployment", "inference-gateway-collector"),
        "collector",
    );
    let var = config["token_env"].as_str().unwrap();
    let env = collector["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(var))
        .expect("the token variable");
    assert_eq!(
        env["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("inference-gateway-ingest")
    );
    assert!(config["token"].is_null(), "no token in the ConfigMap");
    // The collector itself accepts it (the token variable set as the Deployment does).
    let text = cm["data"]["collector.yaml"].as_str().unwrap();
    let parsed = inference_gateway::collector::config::CollectorConfig::parse(text, false, |v| {
        (v == var).then(|| "a-token-from-the-secret".to_string())
    })
    .unwrap_or_else(|e| panic!("the documented collector.yaml is refused: {e}"));
    assert_eq!(parsed.pools[0].name, POOL);
    let listen = config["listen"].as_str().unwrap();
    let metrics_port = collector["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(listen.ends_with(&format!(":{metrics_port}")), "{listen}");
}

/// The plugin configuration JSON of the Wasm filter on `listener`.
fn plugin_config(bootstrap: &Value, listener: &str) -> serde_json::Value {
    let l = bootstrap["static_resources"]["listeners"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|l| l["name"].as_str() == Some(listener))
        .unwrap_or_else(|| panic!("listener {listener}"));
    let filters = &l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
    let wasm = &filters[0]["typed_config"]["config"];
    assert_eq!(filters[0]["name"].as_str(), Some("envoy.filters.http.wasm"));
    assert_eq!(
        wasm["allow_on_headers_stop_iteration"].as_bool(),
        Some(true)
    );
    assert_eq!(
        wasm["vm_config"]["vm_id"].as_str(),
        Some("inference-gateway")
    );
    assert_eq!(
        wasm["vm_config"]["code"]["local"]["filename"].as_str(),
        Some("/etc/envoy/inference_gateway.wasm")
    );
    serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{listener}'s plugin configuration: {e}"))
}

#[test]
fn the_envoy_bootstrap_routes_on_the_filter_and_takes_the_token_from_the_secret() {
    let objects = Objects::load();
    let cm = objects.get("ConfigMap", "inference-gateway-envoy");
    let template = cm["data"]["envoy.yaml.tmpl"].as_str().unwrap();
    let bootstrap: Value = serde_yaml_ng::from_str(template).expect("the bootstrap template");
    assert_eq!(
        bootstrap["admin"]["address"]["socket_address"]["address"].as_str(),
        Some("127.0.0.1"),
        "the admin interface stays on loopback"
    );
    let gateway = plugin_config(&bootstrap, "gateway");
    assert_eq!(gateway["pools"][0]["name"], POOL);
    assert!(
        gateway["pools"][0].get("endpoints").is_none(),
        "members come from snapshots"
    );
    assert!(gateway["allowed_endpoint_cidrs"].is_array());
    for m in gateway["models"].as_array().unwrap() {
        assert_eq!(m["pool"], POOL);
    }
    // The filter itself accepts both plugin configurations.
    let filter = inference_gateway::config::Config::from_json(gateway.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the documented gateway configuration is refused: {e}"));
    assert!(filter.pools[0].endpoints.is_empty());
    let control = plugin_config(&bootstrap, "control");
    assert_eq!(control["role"], "control");
    assert_eq!(control["ingest"]["token"], "@INGEST_TOKEN@");
    inference_gateway::config::Config::from_json(control.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the documented control configuration is refused: {e}"));
    assert_eq!(template.matches("@INGEST_TOKEN@").count(), 1);

    let clusters = bootstrap["static_resources"]["clusters"]
        .as_sequence()
        .unwrap();
    let model_servers = clusters
        .iter()
        .find(|c| c["name"].as_str() == Some("model_servers"))
        .unwrap();
    assert_eq!(model_servers["type"].as_str(), Some("ORIGINAL_DST"));
    assert_eq!(
        model_servers["original_dst_lb_config"]["http_header_name"].as_str(),
        Some("x-gateway-destination-endpoint")
    );

    // The listeners' ports are the container's, and the Services point at them.
    let envoy_deploy = objects.get("Deployment", "inference-gateway");
    let envoy = container(envoy_deploy, "envoy");
    let container_ports: BTreeMap<&str, u64> = envoy["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    for l in bootstrap["static_resources"]["listeners"]
        .as_sequence()
        .unwrap()
    {
        let name = l["name"].as_str().unwrap();
        let sa = &l["address"]["socket_address"];
        assert_eq!(sa["address"].as_str(), Some("0.0.0.0"), "{name}");
        assert_eq!(
            sa["port_value"].as_u64(),
            container_ports.get(name).copied(),
            "{name}"
        );
    }
    for svc in ["inference-gateway", "inference-gateway-ingest"] {
        let target = objects.get("Service", svc)["spec"]["ports"][0]["targetPort"]
            .as_u64()
            .unwrap();
        assert!(
            container_ports.values().any(|p| *p == target),
            "{svc} → {target}"
        );
    }

    // The init container renders the template from the ConfigMap with the Secret's
    // token into the volume Envoy reads its bootstrap from.
    let pod = &envoy_deploy["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let script = init["command"][2].as_str().unwrap();
    assert!(script.contains("/config/envoy.yaml.tmpl > /bootstrap/envoy.yaml"));
    assert_eq!(
        init["env"][0]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("inference-gateway-ingest")
    );
    let args: Vec<&str> = envoy["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args
        .windows(2)
        .any(|w| w == ["--config-path", "/bootstrap/envoy.yaml"]));
    let secret = objects.get("Secret", "inference-gateway-ingest");
    let placeholder = secret["stringData"]["token"].as_str().unwrap();
    assert!(
        placeholder.starts_with("change-me") && script.contains("change-me*)"),
        "the manifest's placeholder token is refused"
    );
}
