//! `deploy/gke/`: the endpoint picker's GKE manifests (docs/gke.md shows the same
//! objects). Three checks:
//!
//! 1. Every manifest parses and the objects agree with each other: the
//!    Deployment's flags, container ports, probes, env and volumes; the Service
//!    and the InferencePool's `endpointPickerRef`; the ConfigMap's picker
//!    configuration (validated by `PickerConfig::parse`, and compared with what
//!    igwctl derives from the InferencePool); the metrics token Secret, its RBAC
//!    and the ClusterPodMonitoring; the HTTPRoute, Gateway and Model Armor
//!    extension. docs/gke.md must show exactly these objects.
//! 2. The Deployment's args and env, moved to loopback ports, start the real
//!    binary: gRPC health `readiness` turns SERVING after a discovery round over
//!    DNS (a loopback DNS server answers the headless Service's name) and
//!    `/metrics` wants the Secret's token.
//! 3. The same with the locally built image (docker, host network, read-only
//!    root, the image's non-root user); SKIPPED without a Docker daemon.

mod support;

use inference_gateway::deploy::docker;
use inference_gateway::deploy::process::{self, ChildGuard};
use inference_gateway::picker::config::PickerConfig;
use inference_gateway::picker::server::{LIVENESS, READINESS};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::dns::DnsServer;
use support::sim::{Sim, SimOptions};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const DIR: &str = "deploy/gke";
const DOC: &str = "docs/gke.md";
const PICKER: &str = "endpoint-picker";

const KNOWN: &[(&str, &str)] = &[
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("networking.gke.io/v1", "GCPTrafficExtension"),
    ("monitoring.googleapis.com/v1", "ClusterPodMonitoring"),
];

fn repo() -> PathBuf {
    support::repo_root()
}

fn parse_stream(what: &str, text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = <Value as serde::Deserialize>::deserialize(doc)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// Every object of every `deploy/gke/*.yaml`.
struct Manifests(Vec<Value>);

impl Manifests {
    fn load() -> Manifests {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no manifests in {DIR}");
        let mut objects = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            objects.extend(parse_stream(&f.display().to_string(), &text));
        }
        Manifests(objects)
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
            .unwrap_or_else(|| panic!("no {kind} {name} in {DIR}"))
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "exactly one {kind} expected");
        all[0]
    }

    fn picker_deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn picker_container(&self) -> &Value {
        seq(&self.picker_deployment()["spec"]["template"]["spec"]["containers"])
            .iter()
            .find(|c| c["name"].as_str() == Some(PICKER))
            .expect("the endpoint-picker container")
    }

    /// The ConfigMap key the container's `--config` names, through its volume.
    fn picker_config_text(&self) -> String {
        let d = self.picker_deployment();
        let c = self.picker_container();
        let config = PathBuf::from(&flags(c)["config"]);
        let dir = config.parent().unwrap().to_str().unwrap();
        let file = config.file_name().unwrap().to_str().unwrap();
        let mount = seq(&c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(dir))
            .unwrap_or_else(|| panic!("no volumeMount at {dir}"));
        let volume = seq(&d["spec"]["template"]["spec"]["volumes"])
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let cm = self.get("ConfigMap", s(&volume["configMap"]["name"]));
        s(&cm["data"][file]).to_string()
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence()
        .map(|s| s.as_slice())
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
}

fn port_of(v: &Value) -> u16 {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("not a port: {v:?}"))
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

fn selects(selector: &Value, labels: &Value) -> bool {
    let (sel, labels) = (str_map(selector), str_map(labels));
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn args(container: &Value) -> Vec<String> {
    seq(&container["args"])
        .iter()
        .map(|a| s(a).to_string())
        .collect()
}

/// `--flag=value` and `--flag value` → {flag: value}; a bare flag → "".
fn flags(container: &Value) -> BTreeMap<String, String> {
    let args = args(container);
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].strip_prefix("--").expect("args are long flags");
        match a.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None if args.get(i + 1).is_some_and(|n| !n.starts_with("--")) => {
                out.insert(a.to_string(), args[i + 1].clone());
                i += 1;
            }
            None => {
                out.insert(a.to_string(), String::new());
            }
        }
        i += 1;
    }
    out
}

fn flag_port(flags: &BTreeMap<String, String>, flag: &str) -> u16 {
    let v = flags
        .get(flag)
        .unwrap_or_else(|| panic!("the Deployment sets no --{flag}"));
    v.parse::<SocketAddr>()
        .unwrap_or_else(|_| panic!("--{flag}={v}: not ip:port"))
        .port()
}

fn container_port(container: &Value, name: &str) -> u16 {
    let p = seq(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    port_of(&p["containerPort"])
}

/// The env var's Secret (name, key).
fn env_secret(container: &Value, var: &str) -> (String, String) {
    let e = seq(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(var))
        .unwrap_or_else(|| panic!("no env {var}"));
    let r = &e["valueFrom"]["secretKeyRef"];
    (s(&r["name"]).to_string(), s(&r["key"]).to_string())
}

#[test]
fn manifests_parse_and_agree() {
    let m = Manifests::load();
    for o in &m.0 {
        let key = (s(&o["apiVersion"]), s(&o["kind"]));
        assert!(KNOWN.contains(&key), "unexpected {key:?}");
        assert!(o["metadata"]["name"].as_str().is_some(), "unnamed {key:?}");
    }
    let dep = m.picker_deployment();
    let ns = s(&dep["metadata"]["namespace"]);
    let pod = &dep["spec"]["template"];
    assert!(selects(
        &dep["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    let c = m.picker_container();
    let f = flags(c);

    // Flags ↔ container ports ↔ probes.
    let grpc = flag_port(&f, "grpc");
    let health = flag_port(&f, "grpc-health");
    let metrics = flag_port(&f, "metrics");
    assert_eq!(container_port(c, "grpc"), grpc);
    assert_eq!(container_port(c, "grpc-health"), health);
    assert_eq!(container_port(c, "metrics"), metrics);
    assert_ne!(
        grpc, health,
        "kubelet probes need the plain-text health port"
    );
    for (probe, service) in [("livenessProbe", LIVENESS), ("readinessProbe", READINESS)] {
        let p = &c[probe]["grpc"];
        assert_eq!(port_of(&p["port"]), health, "{probe}");
        assert_eq!(s(&p["service"]), service, "{probe}");
    }
    assert!(!f.contains_key("insecure"), "the gateway connects with TLS");

    // Non-root, read-only root filesystem, resources.
    let psc = &pod["spec"]["securityContext"];
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    assert!(psc["runAsUser"].as_u64().is_some_and(|u| u != 0));
    let csc = &c["securityContext"];
    assert_eq!(csc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(csc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(c["resources"]["requests"]["memory"].as_str().is_some());
    // The manifest runs the image build-images.sh builds.
    assert_eq!(s(&c["image"]), docker::PICKER_IMAGE);

    // No API access: its ServiceAccount exists, mounts no token, and no binding
    // grants it anything.
    let sa = s(&pod["spec"]["serviceAccountName"]);
    m.get("ServiceAccount", sa);
    assert_eq!(
        pod["spec"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    for b in m.all("RoleBinding") {
        for subj in seq(&b["subjects"]) {
            assert_ne!(subj["name"].as_str(), Some(sa), "the picker needs no Role");
        }
    }

    // The config file, through volume and ConfigMap, validates.
    let text = m.picker_config_text();
    let cfg = PickerConfig::parse(&text, false, |_| None).unwrap_or_else(|e| panic!("{e}"));
    let discovery = cfg.discovery.as_ref().expect("discovery by DNS");

    // Service ↔ InferencePool.endpointPickerRef ↔ container.
    let pool = m.one("InferencePool");
    let pool_name = s(&pool["metadata"]["name"]);
    let epr = &pool["spec"]["endpointPickerRef"];
    assert_eq!(epr["group"].as_str(), Some(""));
    assert_eq!(epr["kind"].as_str(), Some("Service"));
    assert!(matches!(
        epr["failureMode"].as_str(),
        Some("FailOpen" | "FailClose")
    ));
    let svc = m.get("Service", s(&epr["name"]));
    assert_eq!(s(&svc["metadata"]["namespace"]), ns);
    assert!(selects(
        &svc["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    let svc_port = seq(&svc["spec"]["ports"])
        .iter()
        .find(|p| port_of(&p["port"]) == port_of(&epr["port"]["number"]))
        .expect("the Service port endpointPickerRef names");
    let target = match &svc_port["targetPort"] {
        Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
        Value::String(name) => container_port(c, name),
        other => panic!("targetPort {other:?}"),
    };
    assert_eq!(target, grpc, "the Service must reach the ext_proc port");

    // The pool, its headless Service and the picker's discovery name the same pods.
    let headless = m
        .all("Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless Service for the model servers");
    assert_eq!(
        str_map(&headless["spec"]["selector"]),
        str_map(&pool["spec"]["selector"]["matchLabels"])
    );
    let fqdn = format!(
        "{}.{}.svc.cluster.local",
        s(&headless["metadata"]["name"]),
        s(&headless["metadata"]["namespace"])
    );
    let pool_ports: Vec<u16> = seq(&pool["spec"]["targetPorts"])
        .iter()
        .map(|p| port_of(&p["number"]))
        .collect();
    assert!(cfg.plugin.pools.iter().any(|p| p.name == pool_name));
    let raw: Value = serde_yaml_ng::from_str(&text).unwrap();
    let dpool = seq(&raw["discovery"]["pools"])
        .iter()
        .find(|p| p["name"].as_str() == Some(pool_name))
        .expect("a discovery pool named as the InferencePool");
    assert_eq!(
        seq(&dpool["endpoints"]).iter().map(s).collect::<Vec<_>>(),
        vec![fqdn.as_str()]
    );
    let dports: Vec<u16> = seq(&dpool["target_ports"]).iter().map(port_of).collect();
    assert_eq!(dports, pool_ports);
    assert_eq!(discovery.pools.len(), 1);

    // igwctl reads the same resources: the ConfigMap is what `igwctl picker`
    // renders from them (with the ConfigMap's pod range).
    let (inv, errors) = inference_gateway::k8s::load(&[repo().join(DIR)]);
    assert!(errors.is_empty(), "{errors:?}");
    let opts = inference_gateway::k8s::render::RenderOptions {
        allowed_cidrs: seq(&raw["plugin"]["allowed_endpoint_cidrs"])
            .iter()
            .map(|c| s(c).to_string())
            .collect(),
        ..Default::default()
    };
    let rendered =
        inference_gateway::k8s::render::render(&inv, &opts).unwrap_or_else(|e| panic!("{e:?}"));
    let (igw, _) = inference_gateway::k8s::render::picker_config(&rendered).unwrap();
    let cm: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(cm, igw, "the ConfigMap is not what igwctl picker renders");
    let picker_ref = inv.pools[0].picker.as_ref().expect("endpointPickerRef");
    assert_eq!(picker_ref.port, Some(port_of(&svc_port["port"])));
    assert_eq!(picker_ref.name, s(&svc["metadata"]["name"]));

    // Metrics: the token the container compares with is the Secret the
    // ClusterPodMonitoring sends, on the container's metrics port.
    let (secret, key) = env_secret(c, &f["metrics-token-env"]);
    let sec = m.get("Secret", &secret);
    assert_eq!(s(&sec["metadata"]["namespace"]), ns);
    assert_eq!(s(&sec["type"]), "kubernetes.io/service-account-token");
    assert_eq!(key, "token", "a service-account-token Secret holds `token`");
    m.get(
        "ServiceAccount",
        s(&sec["metadata"]["annotations"]["kubernetes.io/service-account.name"]),
    );
    let cpm = m.one("ClusterPodMonitoring");
    assert!(selects(
        &cpm["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    let ep = &seq(&cpm["spec"]["endpoints"])[0];
    assert_eq!(container_port(c, s(&ep["port"])), metrics);
    assert_eq!(s(&ep["path"]), "/metrics");
    assert_eq!(s(&ep["authorization"]["type"]), "Bearer");
    let cred = &ep["authorization"]["credentials"]["secret"];
    assert_eq!(
        (s(&cred["name"]), s(&cred["key"])),
        (secret.as_str(), key.as_str())
    );
    assert_eq!(s(&cred["namespace"]), ns);
    // GMP's collector may read that Secret, and only it.
    let role = m.one("Role");
    let rule = &seq(&role["rules"])[0];
    assert_eq!(
        seq(&rule["resourceNames"])
            .iter()
            .map(s)
            .collect::<Vec<_>>(),
        vec![secret.as_str()]
    );
    assert_eq!(s(&role["metadata"]["namespace"]), ns);
    let rb = m.one("RoleBinding");
    assert_eq!(s(&rb["roleRef"]["name"]), s(&role["metadata"]["name"]));
    let subj = &seq(&rb["subjects"])[0];
    assert_eq!(
        (s(&subj["name"]), s(&subj["namespace"])),
        ("collector", "gmp-system")
    );

    // Route → pool; route and Model Armor → Gateway.
    let gw = s(&m.one("Gateway")["metadata"]["name"]);
    let route = m.one("HTTPRoute");
    assert_eq!(s(&seq(&route["spec"]["parentRefs"])[0]["name"]), gw);
    let backend = &seq(&seq(&route["spec"]["rules"])[0]["backendRefs"])[0];
    assert_eq!(s(&backend["group"]), "inference.networking.k8s.io");
    assert_eq!(s(&backend["kind"]), "InferencePool");
    assert_eq!(s(&backend["name"]), pool_name);
    let ext = m.one("GCPTrafficExtension");
    assert_eq!(s(&seq(&ext["spec"]["targetRefs"])[0]["name"]), gw);
    let armor = &seq(&seq(&ext["spec"]["extensionChains"])[0]["extensions"])[0];
    // Every model Model Armor has templates for is routed by the picker.
    let settings: serde_json::Value =
        serde_json::from_str(s(&armor["metadata"]["model_armor_settings"])).unwrap();
    for entry in settings.as_array().unwrap() {
        let model = entry["model"].as_str().unwrap();
        assert!(
            cfg.plugin.models.iter().any(|(name, _)| name == model)
                || raw["plugin"]["default_pool"].as_str() == Some(pool_name),
            "Model Armor settings for {model}, which the picker does not route"
        );
    }
}

/// docs/gke.md shows exactly the objects of deploy/gke (compared parsed).
#[test]
fn the_doc_shows_the_manifests() {
    let m = Manifests::load();
    let text = std::fs::read_to_string(repo().join(DOC)).unwrap();
    let mut doc = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match &mut block {
            None if line.trim_end() == "```yaml" => block = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => {
                doc.extend(parse_stream(DOC, &block.take().unwrap()))
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    let doc: Vec<Value> = doc
        .into_iter()
        .filter(|o| o.get("kind").is_some())
        .collect();
    for o in &m.0 {
        assert!(
            doc.contains(o),
            "{DOC} does not show (or shows another) {o:?}"
        );
    }
    for o in &doc {
        assert!(m.0.contains(o), "{DOC} shows an object not in {DIR}: {o:?}");
    }
}

// ---------------------------------------------------------------------------
// Running what the Deployment runs.

const TOKEN: &str = "gke-manifests-metrics-token-0123456789";

/// Loopback stand-ins for the cluster: a DNS server answering the headless
/// Service's name with 127.0.0.1, a model server there, the picker config moved
/// onto them.
struct Cluster {
    _dns: DnsServer,
    _sim: Sim,
    config_dir: tempfile::TempDir,
    log_dir: tempfile::TempDir,
}

async fn loopback_cluster(m: &Manifests) -> Cluster {
    let log_dir = tempfile::Builder::new().prefix("gke-").tempdir().unwrap();
    let sim = Sim::start("vllm-0", &SimOptions::default(), log_dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    let dns = DnsServer::start("cluster.local").await;
    let mut cfg: Value = serde_yaml_ng::from_str(&m.picker_config_text()).unwrap();
    let mut names = Vec::new();
    for p in cfg["discovery"]["pools"].as_sequence_mut().unwrap() {
        for e in seq(&p["endpoints"]) {
            names.push(s(e).to_string());
        }
        p["target_ports"] = serde_yaml_ng::to_value([sim.port]).unwrap();
    }
    for name in &names {
        dns.set_a(name, vec![Ipv4Addr::LOCALHOST]).await;
    }
    cfg["discovery"]["dns_servers"] = serde_yaml_ng::to_value([dns.addr().to_string()]).unwrap();
    // The pod range of the manifest does not hold 127.0.0.1.
    if let Some(cidrs) = cfg["plugin"]["allowed_endpoint_cidrs"].as_sequence_mut() {
        cidrs.push("127.0.0.0/8".into());
    }
    let config_dir = tempfile::Builder::new()
        .prefix("gke-cfg-")
        .tempdir()
        .unwrap();
    let config = PathBuf::from(&flags(m.picker_container())["config"]);
    let file = config_dir.path().join(config.file_name().unwrap());
    std::fs::write(&file, serde_yaml_ng::to_string(&cfg).unwrap()).unwrap();
    // The image runs as a non-root user: it must read the mounted config.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(config_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    Cluster {
        _dns: dns,
        _sim: sim,
        config_dir,
        log_dir,
    }
}

/// The container's args with every `ip:port` flag moved to a free loopback
/// port, and `--config` to `config` when given; returns the args and
/// {flag: local port}.
fn loopback_args(m: &Manifests, config: Option<&Path>) -> (Vec<String>, BTreeMap<String, u16>) {
    let mut ports = BTreeMap::new();
    let out = args(m.picker_container())
        .into_iter()
        .map(|a| {
            let Some((flag, value)) = a.split_once('=') else {
                return a;
            };
            let name = flag.trim_start_matches("--").to_string();
            if name == "config" {
                if let Some(c) = config {
                    return format!("{flag}={}", c.display());
                }
            }
            if value.parse::<SocketAddr>().is_ok() {
                let p = process::free_port().unwrap();
                ports.insert(name, p);
                return format!("{flag}=127.0.0.1:{p}");
            }
            a
        })
        .collect();
    (out, ports)
}

/// The container's env: literal values as written, Secret values = [`TOKEN`].
fn container_env(m: &Manifests) -> Vec<(String, String)> {
    seq(&m.picker_container()["env"])
        .iter()
        .map(|e| {
            let v = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    assert!(e["valueFrom"]["secretKeyRef"].is_mapping(), "{e:?}");
                    TOKEN.to_string()
                }
            };
            (s(&e["name"]).to_string(), v)
        })
        .collect()
}

async fn health(port: u16, service: &str) -> Option<i32> {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let req = HealthCheckRequest {
        service: service.into(),
    };
    let mut client = HealthClient::new(ch);
    match tokio::time::timeout(Duration::from_secs(2), client.check(req)).await {
        Ok(Ok(r)) => Some(r.into_inner().status),
        _ => None,
    }
}

async fn get_metrics(port: u16, token: Option<&str>) -> (u16, String) {
    let mut req = support::http_client()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET /metrics");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// What a kubelet and the GMP collector would see: readiness SERVING (after a
/// DNS discovery round), liveness SERVING, ext_proc's port not plain text, and
/// `/metrics` only with the token, listing the discovered pod.
async fn assert_serves_like_a_pod(
    ports: &BTreeMap<String, u16>,
    pool: &str,
    mut running: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = false;
    for _ in 0..300 {
        if let Err(e) = running() {
            panic!("the picker exited: {e}");
        }
        if health(ports["grpc-health"], READINESS).await == Some(ServingStatus::Serving as i32) {
            ready = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "readiness never SERVING on the health port");
    assert_eq!(
        health(ports["grpc-health"], LIVENESS).await,
        Some(ServingStatus::Serving as i32)
    );
    // TLS on the ext_proc port: a plain-text gRPC call gets no answer.
    assert_eq!(health(ports["grpc"], LIVENESS).await, None);

    let metrics = ports["metrics"];
    assert_eq!(get_metrics(metrics, None).await.0, 401);
    assert_eq!(
        get_metrics(metrics, Some("not-the-token-at-all")).await.0,
        401
    );
    let (status, body) = get_metrics(metrics, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let ready_pods = body
        .lines()
        .find(|l| l.starts_with("inference_pool_ready_pods") && l.contains(pool))
        .unwrap_or_else(|| panic!("no inference_pool_ready_pods for {pool}:\n{body}"));
    let n: f64 = ready_pods.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, 1.0, "the one pod DNS names: {ready_pods}");
}

fn picker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_endpoint-picker"))
}

fn pool_name(m: &Manifests) -> String {
    s(&m.one("InferencePool")["metadata"]["name"]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_accepts_the_deployment_args_and_serves_probes_and_metrics() {
    let m = Manifests::load();
    let cluster = loopback_cluster(&m).await;
    let config = cluster.config_dir.path().join(
        PathBuf::from(&flags(m.picker_container())["config"])
            .file_name()
            .unwrap(),
    );
    let (local_args, ports) = loopback_args(&m, Some(&config));
    assert_eq!(
        ports.keys().map(String::as_str).collect::<Vec<_>>(),
        ["grpc", "grpc-health", "metrics"]
    );
    let env = container_env(&m);

    // The real CLI parser takes the args as written (only --config moved).
    let written: Vec<String> = args(m.picker_container())
        .into_iter()
        .map(|a| {
            if a.starts_with("--config=") {
                format!("--config={}", config.display())
            } else {
                a
            }
        })
        .collect();
    let out = Command::new(picker_binary())
        .args(&written)
        .arg("--check")
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = Command::new(picker_binary());
    cmd.args(&local_args).envs(env.iter().cloned());
    let log = cluster.log_dir.path().join("picker.log");
    let mut guard = ChildGuard::spawn(PICKER, &mut cmd, Some(&log)).unwrap();
    let pool = pool_name(&m);
    let check = tokio::time::timeout(
        Duration::from_secs(90),
        assert_serves_like_a_pod(&ports, &pool, || {
            guard.check_running().map_err(|e| e.to_string())
        }),
    )
    .await;
    if check.is_err() {
        panic!("timed out:\n{}", process::file_tail(&log, 8192));
    }
}

/// A container the test removes when it ends.
struct Container(String);

impl Container {
    fn running(&self) -> Result<(), String> {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", &self.0])
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&out.stdout).trim() == "true" {
            Ok(())
        } else {
            Err(self.logs())
        }
    }

    fn logs(&self) -> String {
        let out = Command::new("docker").args(["logs", &self.0]).output();
        out.map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("container {} log:\n{}", self.0, self.logs());
        }
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_deployment_non_root_on_a_read_only_root() {
    if let Err(why) = docker::daemon_api_version() {
        eprintln!(
            "\n*** SKIPPED the_image_runs_the_deployment_non_root_on_a_read_only_root: {why} ***\n"
        );
        return;
    }
    let m = Manifests::load();
    // The test's own tag: the debug binary must not replace a release image.
    let tag = format!("{}-gke-test", docker::PICKER_IMAGE);
    let bin_dir = picker_binary().parent().unwrap().to_path_buf();
    docker::build_picker_image(&repo(), &bin_dir, &tag).unwrap_or_else(|e| panic!("{e}"));

    // The image's user is the one the Deployment asks for.
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Config.User}}", &tag])
        .output()
        .unwrap();
    let psc = &m.picker_deployment()["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "{}:{}",
            psc["runAsUser"].as_u64().unwrap(),
            psc["runAsGroup"].as_u64().unwrap()
        )
    );

    let cluster = loopback_cluster(&m).await;
    // --config stays as written: the config directory is mounted where the
    // Deployment mounts its ConfigMap.
    let (args, ports) = loopback_args(&m, None);
    let config = PathBuf::from(&flags(m.picker_container())["config"]);
    let name = format!("igw-gke-test-{}", std::process::id());
    let mut cmd = Command::new("docker");
    cmd.args([
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
    ])
    .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
    .arg("-v")
    .arg(format!(
        "{}:{}:ro",
        cluster.config_dir.path().display(),
        config.parent().unwrap().display()
    ));
    for (k, v) in container_env(&m) {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    cmd.arg(&tag).args(&args);
    let out = cmd.output().unwrap();
    let container = Container(name);
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = pool_name(&m);
    let check = tokio::time::timeout(
        Duration::from_secs(90),
        assert_serves_like_a_pod(&ports, &pool, || container.running()),
    )
    .await;
    assert!(check.is_ok(), "timed out:\n{}", container.logs());
}
