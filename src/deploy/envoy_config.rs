//! Renders the Envoy bootstrap YAML that runs the filter: a gateway listener
//! (HTTP connection manager → the Wasm filter → router → `ORIGINAL_DST` cluster
//! routed by `x-gateway-destination-endpoint`), a loopback control listener with the
//! same Wasm module and `vm_id` (role `control`: `GET /debug/state`), and the admin
//! interface on loopback.
//!
//! `envoy/envoy.yaml` is exactly [`demo_envoy_yaml`]; a unit test keeps them equal.

use crate::config::DEFAULT_MAX_REQUEST_BODY_BYTES;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The header the filter writes and the `ORIGINAL_DST` cluster routes on.
pub use crate::gateway::headers::DESTINATION_HEADER;
/// Where build.rs puts the filter, relative to the repository root.
pub const DEMO_WASM_PATH: &str = "target/wasm-filter/wasm32-wasip1/release/inference_gateway.wasm";
/// The committed bootstrap, relative to the repository root.
pub const ENVOY_YAML_PATH: &str = "envoy/envoy.yaml";
/// How to regenerate `envoy/envoy.yaml` after changing the demo settings.
pub const REGENERATE_COMMAND: &str =
    "cargo run --bin gateway-demo -- --print-envoy-config > envoy/envoy.yaml";
/// The demo pool's model servers.
pub const DEMO_ENDPOINTS: [&str; 3] = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"];
/// The demo pool's name.
pub const DEMO_POOL: &str = "demo-pool";
/// The models clients may ask the demo gateway for.
pub const DEMO_MODELS: [&str; 2] = ["food-review", "chat"];
/// The model names that reach the demo's model servers (after the weighted
/// rewrite of `food-review`): what the simulators must serve.
pub const DEMO_UPSTREAM_MODELS: [&str; 3] = ["food-review-v1", "food-review-v2", "chat"];
/// The upstream models that are LoRA adapters (of the simulated base model).
pub const DEMO_LORA_ADAPTERS: [&str; 2] = ["food-review-v1", "food-review-v2"];
/// Name of the cluster the gateway routes to.
pub const MODEL_SERVERS_CLUSTER: &str = "model_servers";
/// Name of the cluster the filter's safety callouts go to.
pub const SAFETY_CLUSTER: &str = "safety_service";
/// The committed bootstrap's ingest token, for running the stack by hand on
/// loopback (`envoy/collector.yaml` reads it from `IGW_INGEST_TOKEN`). The demo
/// binary and the tests use fresh tokens; anything beyond loopback needs a secret.
pub const DEMO_INGEST_TOKEN: &str = "demo-ingest-token-change-me";
/// Where the demo's safety simulator listens.
pub const DEMO_SAFETY_ADDRESS: &str = "127.0.0.1:8090";
/// The demo's Model Armor templates (served by the safety simulator's default rules).
pub const DEMO_PROMPT_TEMPLATE: &str = "projects/demo/locations/local/templates/prompt-guard";
pub const DEMO_RESPONSE_TEMPLATE: &str = "projects/demo/locations/local/templates/response-guard";

/// What picks the model server for a request on the gateway listener.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Routing {
    /// The Wasm filter: the product. The module is [`EnvoySettings::wasm_path`], so
    /// the overhead benchmark runs its floor (`bench-floor-filter`) in this very
    /// wiring by pointing that path, and the plugin configurations, elsewhere.
    #[default]
    WasmFilter,
    /// No picker: Envoy's own load balancer over the plugin configuration's pool
    /// endpoints, as a Kubernetes Service gives. A benchmark baseline.
    EnvoyLb(LbPolicy),
    /// An `ext_proc` endpoint picker at `grpc` (`ip:port`) that gets the headers and
    /// the buffered body and answers with the destination header, as GIE wires its
    /// EPP. The benchmarks' sidecar-hop comparison.
    ExtProc { grpc: String },
    /// The `endpoint-picker` at `grpc` (`ip:port`), wired as conformant Gateway API
    /// inference gateways wire an InferencePool's `endpointPickerRef`: ext_proc
    /// with FULL_DUPLEX_STREAMED bodies both ways and trailers SEND, over TLS
    /// without verification (gRPC health-checked on the ext_proc service name),
    /// the subset hint and `envoy.lb` metadata forwarded.
    EndpointPicker {
        grpc: String,
        lb: PickerLb,
        failure_mode: FailureMode,
    },
}

/// How Envoy reaches the endpoint the picker named ([`Routing::EndpointPicker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PickerLb {
    /// An `ORIGINAL_DST` cluster on `x-gateway-destination-endpoint`: any address,
    /// one per request, no fallbacks, nothing to fall back on without a picker.
    #[default]
    OriginalDst,
    /// The override-host load-balancing policy (Envoy >= 1.34) reading the
    /// `envoy.lb` metadata key `x-gateway-destination-endpoint` (a list: the pick,
    /// then fallbacks tried on retries), over a cluster of the pool's endpoints
    /// (the plugin configuration's), round robin when the metadata is absent.
    /// The endpoint that served is written back to `envoy.lb`
    /// `x-gateway-destination-endpoint-served` for the picker's response path.
    OverrideHost,
}

/// The InferencePool's `endpointPickerRef.failureMode`: what the gateway does
/// when the picker is unreachable or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// "The parent should drop the request" (GIE v1; the default): ext_proc
    /// `failure_mode_allow: false`, Envoy answers 5xx.
    #[default]
    FailClose,
    /// "Forward the request to an endpoint of its picking": ext_proc
    /// `failure_mode_allow: true`. Only [`PickerLb::OverrideHost`] has an endpoint
    /// of its own to pick (its fallback policy); an `ORIGINAL_DST` cluster has
    /// no address without the picker and answers 503. Holds from the moment the
    /// picker's health check fails (within about a second of its death), see
    /// [`PICKER_HEALTH_CHECK`].
    FailOpen,
}

/// Envoy's load balancers for [`Routing::EnvoyLb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
}

/// Name of the cluster [`Routing::ExtProc`] reaches its picker through.
pub const EXTPROC_CLUSTER: &str = "extproc_picker";

/// Everything that varies between the demo, the tests and the benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoySettings {
    /// The OpenAI-facing listener.
    pub gateway_address: String,
    pub gateway_port: u16,
    /// The control listener (`GET /debug/state`, snapshot ingest). Keep it on loopback.
    pub control_address: String,
    pub control_port: u16,
    /// Envoy's admin interface (`/ready`, `/stats/prometheus`). Keep it on loopback.
    pub admin_address: String,
    pub admin_port: u16,
    /// The filter module, absolute or relative to Envoy's working directory.
    pub wasm_path: String,
    /// The gateway listener's plugin configuration (see `docs/configuration.md`).
    pub gateway_config: Value,
    /// The control listener's plugin configuration, e.g. `{"role": "control"}`.
    pub control_config: Value,
    /// Shared by both listeners, so the control listener sees the gateway's state.
    pub vm_id: String,
    /// What Envoy does when the Wasm VM has failed: `FAIL_CLOSED` (requests get
    /// 503), `FAIL_OPEN` (skip the filter) or `FAIL_RELOAD` (restart the VM).
    pub failure_policy: String,
    /// Envoy's `--log-level` (for [`envoy_args`]).
    pub log_level: String,
    /// Envoy's `--component-log-level`, e.g. `wasm:info` (empty: none).
    pub component_log_level: String,
    /// Envoy's `--file-flush-interval-msec`: how soon access-log lines appear.
    pub log_flush_interval_ms: u32,
    /// Envoy's `--concurrency` (worker threads); `None`: one per CPU.
    pub concurrency: Option<u32>,
    /// A stream that sends nothing for this long is reset (there is no overall
    /// request timeout: generations stream for minutes).
    pub stream_idle_timeout_secs: u64,
    pub connect_timeout_ms: u64,
    /// The gateway listener's `per_connection_buffer_limit_bytes`; `None`: twice the
    /// plugin's `max_request_body_bytes` (at least 1 MiB above it), so the filter,
    /// not Envoy, answers oversized bodies.
    pub buffer_limit_bytes: Option<u64>,
    /// Access log of the gateway listener on stdout.
    pub access_log: bool,
    /// Circuit-breaker ceiling for connections/requests to the model servers.
    pub max_upstream_requests: u64,
    /// Global cap on downstream connections (overload manager).
    pub max_downstream_connections: u64,
    /// `ip:port` of the safety service: renders the STATIC cluster
    /// [`SAFETY_CLUSTER`] that the plugin's `safety.cluster` names. `None`: no cluster.
    pub safety_address: Option<String>,
    /// With the plugin's `destination_list: true`: how many times the router
    /// retries on the next fallback endpoint.
    pub fallback_retries: u32,
    /// The filter, or what the benchmarks compare it with. Everything else in the
    /// bootstrap stays the same, so only the routing step differs.
    pub routing: Routing,
    /// Serve the gateway filter's configuration through Envoy's extension config
    /// discovery (ECDS) from this file (see [`gateway_ecds`]) instead of inline:
    /// rewriting the file (a rename or a ConfigMap's symlink swap in its
    /// directory) reconfigures the running Envoy without a restart or a dropped
    /// request. `None`: inline in the bootstrap.
    pub gateway_ecds_path: Option<String>,
    /// [`Routing::EndpointPicker`] reaches its picker over TLS (as conformant
    /// gateways do); `false`: plain-text gRPC, for a picker run with `--insecure`
    /// (the overhead benchmark, which compares the hop, not the TLS handshake).
    pub picker_tls: bool,
}

impl Default for EnvoySettings {
    fn default() -> Self {
        EnvoySettings::demo()
    }
}

impl EnvoySettings {
    /// The demo layout: gateway on 127.0.0.1:8080, control on 127.0.0.1:9902,
    /// admin on 127.0.0.1:9901, three model servers on 127.0.0.1:8001..8003.
    pub fn demo() -> Self {
        let endpoints: Vec<String> = DEMO_ENDPOINTS.iter().map(|e| e.to_string()).collect();
        EnvoySettings {
            gateway_address: "127.0.0.1".into(),
            gateway_port: 8080,
            control_address: "127.0.0.1".into(),
            control_port: 9902,
            admin_address: "127.0.0.1".into(),
            admin_port: 9901,
            wasm_path: DEMO_WASM_PATH.into(),
            gateway_config: with_demo_safety(demo_gateway_config(&endpoints)),
            control_config: json!({"role": "control", "ingest": {"token": DEMO_INGEST_TOKEN}}),
            vm_id: "inference-gateway".into(),
            failure_policy: "FAIL_CLOSED".into(),
            log_level: "info".into(),
            component_log_level: String::new(),
            log_flush_interval_ms: 1_000,
            concurrency: None,
            stream_idle_timeout_secs: 300,
            connect_timeout_ms: 5_000,
            buffer_limit_bytes: None,
            access_log: true,
            max_upstream_requests: 100_000,
            max_downstream_connections: 50_000,
            safety_address: Some(DEMO_SAFETY_ADDRESS.into()),
            fallback_retries: 2,
            routing: Routing::WasmFilter,
            gateway_ecds_path: None,
            picker_tls: true,
        }
    }

    /// The plugin's `max_request_body_bytes` (or its default).
    pub fn max_request_body_bytes(&self) -> u64 {
        self.gateway_config
            .get("max_request_body_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES as u64)
    }

    /// The gateway listener's buffer limit: explicit, or derived from the body cap.
    pub fn effective_buffer_limit_bytes(&self) -> u64 {
        self.buffer_limit_bytes.unwrap_or_else(|| {
            crate::config::listener_buffer_limit_bytes(self.max_request_body_bytes())
        })
    }

    pub fn gateway_url(&self) -> String {
        format!(
            "http://{}",
            host_port(&self.gateway_address, self.gateway_port)
        )
    }

    pub fn control_url(&self) -> String {
        format!(
            "http://{}",
            host_port(&self.control_address, self.control_port)
        )
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", host_port(&self.admin_address, self.admin_port))
    }
}

fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// The demo's gateway configuration over the given pool endpoints: `food-review`
/// (rewritten 90/10 to `food-review-v1`/`food-review-v2`, as a GKE InferenceModel
/// with `targetModels` would) and `chat`, in one pool; other paths are rejected by
/// the filter (404 in the OpenAI shape), so nothing but an inference request the
/// filter routed ever reaches the `ORIGINAL_DST` cluster.
pub fn demo_gateway_config(endpoints: &[String]) -> Value {
    json!({
        "max_request_body_bytes": DEFAULT_MAX_REQUEST_BODY_BYTES,
        "other_paths": "reject",
        "pools": [{"name": DEMO_POOL, "endpoints": endpoints}],
        "models": [
            {
                "name": "food-review",
                "pool": DEMO_POOL,
                "criticality": "Standard",
                "target_models": [
                    {"name": "food-review-v1", "weight": 90},
                    {"name": "food-review-v2", "weight": 10}
                ]
            },
            {"name": "chat", "pool": DEMO_POOL}
        ]
    })
}

/// The demo's safety settings: every model's prompts screened with
/// [`DEMO_PROMPT_TEMPLATE`] and responses with [`DEMO_RESPONSE_TEMPLATE`] through
/// [`SAFETY_CLUSTER`], failing closed.
pub fn demo_safety_config() -> Value {
    json!({
        "cluster": SAFETY_CLUSTER,
        "timeout_ms": 1000,
        "fail_open": false,
        "default": {
            "user_prompt_template_id": DEMO_PROMPT_TEMPLATE,
            "model_response_template_id": DEMO_RESPONSE_TEMPLATE
        }
    })
}

/// `gateway_config` with [`demo_safety_config`] as its `safety` section.
pub fn with_demo_safety(mut gateway_config: Value) -> Value {
    if let Some(obj) = gateway_config.as_object_mut() {
        obj.insert("safety".into(), demo_safety_config());
    }
    gateway_config
}

/// The committed `envoy/envoy.yaml`: [`render`] of [`EnvoySettings::demo`]. The demo
/// binary prints it for `--print-envoy-config`.
pub fn demo_envoy_yaml() -> String {
    render(&EnvoySettings::demo())
}

/// Envoy's command line for a bootstrap at `config_path`: config, log level,
/// concurrency, and no hot-restart shared memory (so several Envoys can run side by
/// side, as parallel tests do).
pub fn envoy_args(settings: &EnvoySettings, config_path: &str) -> Vec<String> {
    let mut args = vec![
        "--config-path".to_string(),
        config_path.to_string(),
        "--log-level".to_string(),
        settings.log_level.clone(),
        "--disable-hot-restart".to_string(),
        "--file-flush-interval-msec".to_string(),
        settings.log_flush_interval_ms.to_string(),
    ];
    if !settings.component_log_level.is_empty() {
        args.push("--component-log-level".into());
        args.push(settings.component_log_level.clone());
    }
    if let Some(n) = settings.concurrency {
        args.push("--concurrency".into());
        args.push(n.to_string());
    }
    args
}

/// Renders the bootstrap YAML.
pub fn render(s: &EnvoySettings) -> String {
    let access_log = if s.access_log {
        ACCESS_LOG.replace("{ACCESS_LOG_FILTER_STATE}", ACCESS_LOG_FILTER_STATE)
    } else {
        String::new()
    };
    let max_body = s.max_request_body_bytes();
    let (mut model_servers, mut retry_policy) = (original_dst_cluster(s), String::new());
    let gateway = host_port(&s.gateway_address, s.gateway_port);
    let layout = match &s.routing {
        Routing::WasmFilter => format!(
            "#   {gateway}  gateway: OpenAI API -> Wasm filter (picks a model server) -> ORIGINAL_DST\n\
             #   {control}  control: the same Wasm module and vm_id, role \"control\": GET /debug/state\n",
            control = host_port(&s.control_address, s.control_port),
        ),
        Routing::EnvoyLb(policy) => {
            format!("#   {gateway}  gateway: Envoy's {policy:?} over the pool (no picker)\n")
        }
        Routing::ExtProc { grpc } => format!(
            "#   {gateway}  gateway: ext_proc picker at {grpc} (picks a model server) -> ORIGINAL_DST\n"
        ),
        Routing::EndpointPicker {
            grpc,
            lb,
            failure_mode,
        } => format!(
            "#   {gateway}  gateway: endpoint-picker at {grpc} (Endpoint Picker Protocol, {}, {failure_mode:?}) -> {}\n",
            if s.picker_tls { "TLS" } else { "plain text" },
            match lb {
                PickerLb::OriginalDst => "ORIGINAL_DST",
                PickerLb::OverrideHost => "override-host over the pool",
            }
        ),
    };
    let (gateway_filter, health_bypass, control_listener) = match &s.routing {
        Routing::WasmFilter => {
            if destination_list(&s.gateway_config) {
                model_servers = override_host_cluster(s);
                retry_policy = retry_policy_yaml(s.fallback_retries);
            }
            let filter = match &s.gateway_ecds_path {
                None => wasm_filter("inference-gateway", &s.gateway_config, s),
                Some(path) => ecds_filter(path),
            };
            (filter, HEALTH_WASM_BYPASS, control_listener_yaml(s))
        }
        Routing::EnvoyLb(policy) => {
            model_servers = static_pool_cluster(s, *policy);
            (String::new(), "", String::new())
        }
        Routing::ExtProc { grpc } => {
            model_servers.push_str(&circuit_breakers_yaml(s));
            model_servers.push_str(&extproc_cluster_yaml(grpc));
            (EXTPROC_FILTER.to_string(), "", String::new())
        }
        Routing::EndpointPicker {
            grpc,
            lb,
            failure_mode,
        } => {
            if *lb == PickerLb::OverrideHost {
                model_servers = picker_override_host_cluster(s);
                retry_policy = retry_policy_yaml(s.fallback_retries);
            }
            model_servers.push_str(&circuit_breakers_yaml(s));
            model_servers.push_str(&extproc_cluster_yaml(grpc));
            if s.picker_tls {
                model_servers.push_str(PICKER_TLS);
            }
            model_servers.push_str(PICKER_HEALTH_CHECK);
            (endpoint_picker_filter(*failure_mode), "", String::new())
        }
    };
    let safety_cluster = s
        .safety_address
        .as_deref()
        .map(static_cluster_yaml)
        .unwrap_or_default();
    format!(
        r#"# Envoy bootstrap for inference-gateway. GENERATED: do not edit by hand.
# Source: src/deploy/envoy_config.rs (EnvoySettings::demo()). Regenerate with
#   {regenerate}
#
{layout}#   {admin}  Envoy admin: /ready, /stats/prometheus
#
# The .wasm path is relative to the working directory: run Envoy from the repository
# root, e.g. `envoy -c envoy/envoy.yaml`.

{node}admin:
  address:
    socket_address: {{address: {admin_address}, port_value: {admin_port}}}

static_resources:
  listeners:
  - name: gateway
    address:
      socket_address: {{address: {gateway_address}, port_value: {gateway_port}}}
    # Above the filter's max_request_body_bytes ({max_body}): otherwise Envoy itself
    # answers 413 in plain text before the filter can answer in the OpenAI shape.
    per_connection_buffer_limit_bytes: {buffer_limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          use_remote_address: true
          # Generations stream for minutes: no overall request timeout (the route's
          # timeout is 0 too), but a stream silent for this long is reset.
          request_timeout: 0s
          stream_idle_timeout: {idle}s
{access_log}          http_filters:
{gateway_filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: gateway
            virtual_hosts:
            - name: gateway
              domains: ["*"]
              routes:
              # Envoy's own liveness, for load balancers: answered here, the filter
              # is skipped. (The model servers' health is not proxied.)
              - match: {{path: /health}}
                direct_response: {{status: 200, body: {{inline_string: "ok\n"}}}}
{health_bypass}              # Everything else passes the filter first. Inference requests leave it
              # with {header} set; GET /v1/models and
              # errors are answered by the filter. Other paths follow the plugin's
              # other_paths: "reject" answers 404 in the OpenAI shape; with "pass"
              # they arrive here with no destination the filter chose.
              - match: {{prefix: /}}
                route:
                  cluster: {cluster}
                  timeout: 0s
{retry_policy}
{control_listener}
  clusters:
  # The model servers: each request goes to the endpoint the filter wrote into
  # {header}.
{model_servers}{circuit_breakers}{safety_cluster}
# The filter's metrics carry labels as `.label.value` pairs in their names; these
# turn them into Prometheus labels, e.g.
# inference_model_request_total.model_name.chat -> inference_model_request_total{{model_name="chat"}}.
stats_config:
  stats_tags:
{stats_tags}
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {max_downstream}
"#,
        node = if s.gateway_ecds_path.is_some() {
            // Configuration discovery (ECDS) requires a node identity.
            "node: {id: inference-gateway, cluster: inference-gateway}\n"
        } else {
            ""
        },
        regenerate = REGENERATE_COMMAND,
        admin = host_port(&s.admin_address, s.admin_port),
        admin_address = scalar(&s.admin_address),
        admin_port = s.admin_port,
        gateway_address = scalar(&s.gateway_address),
        gateway_port = s.gateway_port,
        buffer_limit = s.effective_buffer_limit_bytes(),
        idle = s.stream_idle_timeout_secs,
        header = DESTINATION_HEADER,
        cluster = MODEL_SERVERS_CLUSTER,
        circuit_breakers = circuit_breakers_yaml(s),
        max_downstream = s.max_downstream_connections,
        stats_tags = stats_tags(),
    )
}

/// Envoy answers `/health` itself: the filter is skipped on that route.
const HEALTH_WASM_BYPASS: &str = r#"                typed_per_filter_config:
                  envoy.filters.http.wasm:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
"#;

/// The loopback listener where the same module and `vm_id` (role `control`) serves
/// `/debug/state`, `/metrics` and snapshot ingest.
fn control_listener_yaml(s: &EnvoySettings) -> String {
    format!(
        r#"  - name: control
    address:
      socket_address: {{address: {control_address}, port_value: {control_port}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: control
          http_filters:
{control_filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: control
            virtual_hosts:
            - name: control
              domains: ["*"]
              routes:
              # The filter answers every request on this listener.
              - match: {{prefix: /}}
                direct_response: {{status: 404}}
"#,
        control_filter = wasm_filter("inference-gateway-control", &s.control_config, s),
        control_address = scalar(&s.control_address),
        control_port = s.control_port,
    )
}

/// For the cluster rendered last before them (the model servers or the picker).
fn circuit_breakers_yaml(s: &EnvoySettings) -> String {
    format!(
        r#"    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: {max}
        max_pending_requests: {max}
        max_requests: {max}
"#,
        max = s.max_upstream_requests
    )
}

/// [`Routing::EnvoyLb`]: the pool endpoints as a STATIC cluster.
fn static_pool_cluster(s: &EnvoySettings, policy: LbPolicy) -> String {
    let policy = match policy {
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::LeastRequest => "LEAST_REQUEST",
    };
    format!(
        r#"  - name: {MODEL_SERVERS_CLUSTER}
    type: STATIC
    lb_policy: {policy}
    connect_timeout: {connect_timeout}
    load_assignment:
      cluster_name: {MODEL_SERVERS_CLUSTER}
      endpoints:
      - lb_endpoints:
{hosts}"#,
        connect_timeout = duration_ms(s.connect_timeout_ms),
        hosts = lb_endpoints(&pool_endpoints(&s.gateway_config)),
    )
}

/// `lb_endpoints` items for `ip:port` addresses.
fn lb_endpoints(addresses: &[String]) -> String {
    let mut out = String::new();
    for endpoint in addresses {
        let Some((host, port)) = endpoint.rsplit_once(':') else {
            continue;
        };
        let _ = writeln!(
            out,
            "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {port}}}}}}}",
            scalar(host.trim_matches(['[', ']']))
        );
    }
    out
}

/// [`Routing::ExtProc`]: headers and the buffered body go to the picker, which
/// answers with the destination header. Responses are not sent (the cheapest
/// ext_proc setup; GIE's EPP also reads response headers).
const EXTPROC_FILTER: &str = r#"          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {cluster_name: extproc_picker}
                timeout: 30s
              failure_mode_allow: false
              message_timeout: 5s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SKIP
                request_body_mode: BUFFERED
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP
"#;

/// [`Routing::EndpointPicker`]: the Endpoint Picker Protocol's ext_proc settings.
/// Request headers are held by the picker until the streamed body is whole; the
/// response streams through it chunk by chunk. `envoy.lb.subset_hint` (set by an
/// earlier filter, if any) and `envoy.lb` go to the picker; `envoy.lb` comes back.
pub fn endpoint_picker_filter(failure_mode: FailureMode) -> String {
    ENDPOINT_PICKER_FILTER.replace(
        "{FAILURE_MODE_ALLOW}",
        match failure_mode {
            FailureMode::FailClose => "false",
            FailureMode::FailOpen => "true",
        },
    )
}

const ENDPOINT_PICKER_FILTER: &str = r#"          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {cluster_name: extproc_picker}
              failure_mode_allow: {FAILURE_MODE_ALLOW}
              message_timeout: 10s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              metadata_options:
                forwarding_namespaces:
                  untyped: [envoy.lb.subset_hint, envoy.lb]
                receiving_namespaces:
                  untyped: [envoy.lb]
"#;

/// TLS to the picker without verifying it, as conformant gateways connect (the
/// picker's certificate is self-signed).
const PICKER_TLS: &str = r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
"#;

/// gRPC health checks on the ext_proc service name, as conformant gateways probe
/// the picker: a dead picker is out within a second, a restarted one back within
/// one interval. (Appended to the picker's cluster.)
///
/// No panic routing: with the picker marked down, the ext_proc stream fails as it
/// opens, before any body chunk went out, which is the only point where Envoy
/// 1.40 can still fail open in FULL_DUPLEX_STREAMED mode (a stream that fails
/// after the first chunk answers 500 even with `failure_mode_allow`). So
/// `FailOpen` holds once the health check has seen the picker down; in the
/// second before that, requests still get a 500.
const PICKER_HEALTH_CHECK: &str = r#"    common_lb_config:
      healthy_panic_threshold: {value: 0}
    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check:
        service_name: envoy.service.ext_proc.v3.ExternalProcessor
"#;

/// The picker's gRPC cluster (HTTP/2).
fn extproc_cluster_yaml(grpc: &str) -> String {
    format!(
        r#"  - name: {EXTPROC_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: {EXTPROC_CLUSTER}
      endpoints:
      - lb_endpoints:
{hosts}"#,
        hosts = lb_endpoints(&[grpc.to_string()]),
    )
}

/// The plugin writes a comma-separated endpoint list (chosen first, then fallbacks).
fn destination_list(gateway_config: &Value) -> bool {
    gateway_config.get("destination_list") == Some(&Value::Bool(true))
}

/// One `ip:port` in the header: Envoy connects to whatever address it names.
fn original_dst_cluster(s: &EnvoySettings) -> String {
    format!(
        r#"  - name: {MODEL_SERVERS_CLUSTER}
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: {connect_timeout}
    original_dst_lb_config:
      use_http_header: true
      http_header_name: {DESTINATION_HEADER}
"#,
        connect_timeout = duration_ms(s.connect_timeout_ms),
    )
}

/// A list in the header (`destination_list: true`): the override-host policy takes
/// the first address and, on each retry, the next. It picks among the cluster's
/// own hosts, so the cluster lists every pool endpoint; an address outside it
/// falls back to round robin over the pool.
fn override_host_cluster(s: &EnvoySettings) -> String {
    let hosts = lb_endpoints(&pool_endpoints(&s.gateway_config));
    format!(
        r#"  - name: {MODEL_SERVERS_CLUSTER}
    type: STATIC
    connect_timeout: {connect_timeout}
    load_assignment:
      cluster_name: {MODEL_SERVERS_CLUSTER}
      endpoints:
      - lb_endpoints:
{hosts}    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - header: {DESTINATION_HEADER}
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
"#,
        connect_timeout = duration_ms(s.connect_timeout_ms),
    )
}

/// [`PickerLb::OverrideHost`]: the pool's endpoints as members; the picker's list
/// (pick, then fallbacks) from `envoy.lb` metadata, the next one on each retry;
/// round robin over the members without it (no picker: `FailOpen`) or once the
/// list is used up. The endpoint that served goes back to `envoy.lb`.
fn picker_override_host_cluster(s: &EnvoySettings) -> String {
    let hosts = lb_endpoints(&pool_endpoints(&s.gateway_config));
    format!(
        r#"  - name: {MODEL_SERVERS_CLUSTER}
    type: STATIC
    connect_timeout: {connect_timeout}
    load_assignment:
      cluster_name: {MODEL_SERVERS_CLUSTER}
      endpoints:
      - lb_endpoints:
{hosts}    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - metadata:
                key: envoy.lb
                path: [{{key: {DESTINATION_HEADER}}}]
            selected_host_key:
              key: envoy.lb
              path: [{{key: {DESTINATION_HEADER}-served}}]
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
"#,
        connect_timeout = duration_ms(s.connect_timeout_ms),
    )
}

/// Every endpoint of every pool in the plugin configuration, once.
fn pool_endpoints(gateway_config: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for pool in gateway_config
        .get("pools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for e in pool
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !out.iter().any(|o| o == e) {
                out.push(e.to_string());
            }
        }
    }
    out
}

/// Retries that move to the next fallback: only failures before any response
/// byte reached the client (a refused or reset connection, or a 503 from a server
/// that is overloaded or draining); a started stream is never replayed.
fn retry_policy_yaml(retries: u32) -> String {
    format!(
        r#"                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset-before-request,retriable-status-codes
                    retriable_status_codes: [503]
                    num_retries: {retries}
"#
    )
}

/// The safety service: a STATIC cluster for an IP (loopback simulator or a local
/// proxy); for a host name (Google Cloud Model Armor,
/// `modelarmor.<region>.rep.googleapis.com:443`) a `STRICT_DNS` cluster, with TLS
/// (SNI = the host) on port 443 (see docs/safety.md).
fn static_cluster_yaml(address: &str) -> String {
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p),
        None => (address, "80"),
    };
    let by_name = host.parse::<std::net::IpAddr>().is_err();
    let (kind, dns) = if by_name {
        ("STRICT_DNS", "    dns_lookup_family: V4_ONLY\n")
    } else {
        ("STATIC", "")
    };
    let tls = if by_name && port == "443" {
        format!(
            r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {host}
"#,
            host = scalar(host)
        )
    } else {
        String::new()
    };
    format!(
        r#"  # The safety service the filter calls (Model Armor's REST API) with
  # dispatch_http_call; its timeout is the plugin's safety.timeout_ms.
  - name: {SAFETY_CLUSTER}
    type: {kind}
    connect_timeout: 1s
{dns}    load_assignment:
      cluster_name: {SAFETY_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: {host}, port_value: {port}}}
{tls}"#,
        host = scalar(host),
    )
}

const ACCESS_LOG: &str = r#"          access_log:
          - name: envoy.access_loggers.stdout
            filter:
              or_filter:
                filters:
                - status_code_filter:
                    comparison:
                      op: GE
                      value: {default_value: 400, runtime_key: access_log.always_from_status}
                - header_filter:
                    header: {name: x-gateway-access-log, present_match: true, invert_match: true}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                text_format_source:
                  inline_string: "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% %DURATION%ms upstream_first_byte=%RESPONSE_DURATION%ms upstream=%UPSTREAM_HOST% request_id=%REQ(X-REQUEST-ID)% %FILTER_STATE({ACCESS_LOG_FILTER_STATE}:PLAIN)%\n"
"#;

/// The filter state the plugin's access-log fields are in (`model=… target_model=…
/// endpoint=… priority=… safety_prompt=… safety_response=… input_tokens=…
/// output_tokens=… ttft_ms=… duration_ms=… error=…`): proxy-wasm properties
/// become filter state named `wasm.<property>`.
pub const ACCESS_LOG_FILTER_STATE: &str = "wasm.igw";

/// Labels of the filter's metrics (`.label.value` in the name).
const STAT_LABELS: [&str; 8] = [
    "model_name",
    "pool_name",
    "target_model_name",
    "error_code",
    "check",
    "filter",
    "consumer",
    "token_type",
];

fn stats_tags() -> String {
    let mut out = String::new();
    for label in STAT_LABELS {
        let _ = writeln!(out, "  - tag_name: {label}");
        let _ = writeln!(out, "    regex: '(\\.{label}\\.([^.]+))'");
    }
    out
}

/// The Wasm HTTP filter with `plugin` as its configuration, as a list item of
/// `http_filters` (10 spaces of indentation).
fn wasm_filter(name: &str, plugin: &Value, s: &EnvoySettings) -> String {
    let mut json = String::new();
    for line in pretty_json(plugin).lines() {
        let _ = writeln!(json, "                    {line}");
    }
    format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: inference-gateway
                # Without this, pausing in on_http_request_headers stops the body
                # from ever reaching the filter (the request hangs).
                allow_on_headers_stop_iteration: true
                failure_policy: {failure_policy}
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {wasm}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{json}"#,
        name = scalar(name),
        failure_policy = scalar(&s.failure_policy),
        vm_id = scalar(&s.vm_id),
        wasm = scalar(&s.wasm_path),
    )
}

/// The type of the gateway filter's configuration, as ECDS serves it.
const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The gateway's Wasm filter, its configuration discovered from the file `path`.
/// The resource is named after the filter, as ECDS requires; the directory is
/// watched so that a rename or a Kubernetes ConfigMap's symlink swap is seen.
fn ecds_filter(path: &str) -> String {
    let dir = std::path::Path::new(path)
        .parent()
        .map_or_else(|| ".".to_string(), |d| d.to_string_lossy().into_owned());
    format!(
        r#"          - name: envoy.filters.http.wasm
            config_discovery:
              config_source:
                resource_api_version: V3
                path_config_source:
                  path: {path}
                  watched_directory:
                    path: {dir}
              type_urls:
              - {WASM_TYPE_URL}
"#,
        path = scalar(path),
        dir = scalar(&dir),
    )
}

/// The ECDS file for [`EnvoySettings::gateway_ecds_path`]: a discovery response
/// (JSON, which Envoy reads as YAML too) holding the gateway filter's whole Wasm
/// configuration. Write it to a temporary name and rename it into place.
pub fn gateway_ecds(s: &EnvoySettings) -> String {
    let resource = json!({
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": WASM_TYPE_URL,
            "config": {
                "name": "inference-gateway",
                "root_id": "inference-gateway",
                "allow_on_headers_stop_iteration": true,
                "failure_policy": s.failure_policy,
                "vm_config": {
                    "vm_id": s.vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": s.wasm_path}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": s.gateway_config.to_string()
                }
            }
        }
    });
    pretty_json(&json!({"resources": [resource]}))
}

/// A YAML scalar: plain when that cannot be misread, JSON-quoted otherwise.
fn scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
        && !s.starts_with(['-', '.'])
        && s.parse::<f64>().is_err()
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n" | "inf" | "nan"
        );
    if plain {
        s.to_string()
    } else {
        Value::String(s.to_string()).to_string()
    }
}

fn duration_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", ms as f64 / 1000.0)
    }
}

/// Keys first in this order (the rest alphabetically), so the configuration reads
/// top-down: what the listener is, its pools, then the models on them.
const KEY_ORDER: [&str; 15] = [
    "role",
    "name",
    "pool",
    "max_request_body_bytes",
    "other_paths",
    "pools",
    "endpoints",
    "objectives",
    "priority",
    "criticality",
    "objective",
    "models",
    "target_models",
    "weight",
    "default_pool",
];

const LINE_WIDTH: usize = 72;

/// Pretty JSON for people: two-space indentation, keys in [`KEY_ORDER`], and short
/// lists or objects of plain values on one line.
pub fn pretty_json(v: &Value) -> String {
    let mut out = String::new();
    write_pretty(v, 0, &mut out);
    out.push('\n');
    out
}

fn ordered(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let rank = |k: &str| KEY_ORDER.iter().position(|o| *o == k).unwrap_or(usize::MAX);
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| rank(a.0).cmp(&rank(b.0)).then_with(|| a.0.cmp(b.0)));
    entries
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

fn compact(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(compact).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = ordered(map)
                .into_iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), compact(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        scalar => scalar.to_string(),
    }
}

fn write_pretty(v: &Value, indent: usize, out: &mut String) {
    let flat = match v {
        Value::Array(items) => items.iter().all(is_scalar),
        Value::Object(map) => map.values().all(is_scalar),
        _ => true,
    };
    let one_line = compact(v);
    if flat && indent + one_line.len() <= LINE_WIDTH {
        out.push_str(&one_line);
        return;
    }
    let pad = " ".repeat(indent + 2);
    match v {
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad);
                write_pretty(item, indent + 2, out);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            out.push_str(&" ".repeat(indent));
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str("{\n");
            let entries = ordered(map);
            for (i, (k, item)) in entries.iter().enumerate() {
                out.push_str(&pad);
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push_str(": ");
                write_pretty(item, indent + 2, out);
                out.push_str(if i + 1 < entries.len() { ",\n" } else { "\n" });
            }
            out.push_str(&" ".repeat(indent));
            out.push('}');
        }
        _ => out.push_str(&one_line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn committed_envoy_yaml_is_the_rendering_of_the_demo_settings() {
        let committed = include_str!("../../envoy/envoy.yaml");
        let rendered = demo_envoy_yaml();
        if committed != rendered && std::env::var_os("INFERENCE_GATEWAY_BLESS").is_some() {
            let path = crate::deploy::repo_root().join(ENVOY_YAML_PATH);
            std::fs::write(&path, &rendered).unwrap();
            eprintln!("wrote {}", path.display());
            return;
        }
        if committed != rendered {
            let line = committed
                .lines()
                .zip(rendered.lines())
                .position(|(a, b)| a != b)
                .map(|i| i + 1)
                .unwrap_or_else(|| committed.lines().count().min(rendered.lines().count()) + 1);
            panic!(
                "{ENVOY_YAML_PATH} differs from render(&EnvoySettings::demo()) (first at line {line}).\n\
                 Regenerate it from the repository root with:\n    {REGENERATE_COMMAND}\n\
                 or: INFERENCE_GATEWAY_BLESS=1 cargo test --lib committed_envoy_yaml"
            );
        }
    }

    #[test]
    fn plugin_configurations_are_valid_filter_configs() {
        let s = EnvoySettings::demo();
        let gateway = Config::from_json(s.gateway_config.to_string().as_bytes()).unwrap();
        assert_eq!(gateway.pools[0].endpoints, DEMO_ENDPOINTS);
        assert_eq!(gateway.model_names, DEMO_MODELS);
        let upstream: Vec<&str> = gateway
            .models
            .values()
            .flat_map(|m| m.targets.iter().map(|t| t.name.as_str()))
            .chain(["chat"])
            .collect();
        for name in DEMO_UPSTREAM_MODELS {
            assert!(upstream.contains(&name), "{name}");
        }
        Config::from_json(s.control_config.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn embedded_json_round_trips() {
        let s = EnvoySettings::demo();
        let yaml = render(&s);
        // The gateway's configuration block: the lines after the first `value: |`,
        // up to the next line that is not indented deeper.
        let start = yaml.find("value: |\n").unwrap() + "value: |\n".len();
        let block: String = yaml[start..]
            .lines()
            .take_while(|l| l.starts_with("                    "))
            .map(|l| format!("{}\n", &l[20..]))
            .collect();
        let parsed: Value = serde_json::from_str(&block).unwrap();
        assert_eq!(parsed, s.gateway_config);
        assert!(block
            .contains(r#""endpoints": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]"#));
    }

    #[test]
    fn buffer_limit_stays_above_the_body_cap() {
        let mut s = EnvoySettings::demo();
        assert_eq!(s.effective_buffer_limit_bytes(), 8 * 1024 * 1024);
        s.gateway_config["max_request_body_bytes"] = json!(1000);
        assert_eq!(s.effective_buffer_limit_bytes(), 1000 + (1 << 20));
        s.buffer_limit_bytes = Some(5);
        assert_eq!(s.effective_buffer_limit_bytes(), 5);
        assert!(render(&s).contains("per_connection_buffer_limit_bytes: 5\n"));
    }

    #[test]
    fn settings_reach_the_yaml() {
        let mut s = EnvoySettings::demo();
        s.gateway_port = 18080;
        s.control_port = 19902;
        s.admin_port = 19901;
        s.wasm_path = "/abs/path with space/f.wasm".into();
        s.vm_id = "vm-7".into();
        let yaml = render(&s);
        assert!(yaml.contains("port_value: 18080}"));
        assert!(yaml.contains("port_value: 19902}"));
        assert!(yaml.contains("port_value: 19901}"));
        assert_eq!(
            yaml.matches(r#"filename: "/abs/path with space/f.wasm""#)
                .count(),
            2
        );
        assert_eq!(yaml.matches("vm_id: vm-7\n").count(), 2);
        assert!(yaml.contains("allow_on_headers_stop_iteration: true"));
        assert!(yaml.contains("http_header_name: x-gateway-destination-endpoint"));
        assert_eq!(s.gateway_url(), "http://127.0.0.1:18080");
    }

    #[test]
    fn the_envoy_lb_baseline_has_no_filter_and_lists_the_pool() {
        let s = EnvoySettings {
            routing: Routing::EnvoyLb(LbPolicy::LeastRequest),
            ..EnvoySettings::demo()
        };
        let yaml = render(&s);
        assert!(yaml.contains("lb_policy: LEAST_REQUEST"));
        assert!(!yaml.contains("envoy.filters.http.wasm") && !yaml.contains("ext_proc"));
        assert!(!yaml.contains("name: control"));
        for endpoint in DEMO_ENDPOINTS {
            let (host, port) = endpoint.split_once(':').unwrap();
            assert!(yaml.contains(&format!("address: {host}, port_value: {port}}}")));
        }
        // Only the routing step differs from the filter's bootstrap.
        let filter = render(&EnvoySettings::demo());
        for shared in [
            "per_connection_buffer_limit_bytes: ",
            "stream_idle_timeout: 300s",
            "max_requests: 100000",
            "max_active_downstream_connections: 50000",
        ] {
            assert!(yaml.contains(shared) && filter.contains(shared), "{shared}");
        }
    }

    #[test]
    fn the_ext_proc_variant_buffers_and_routes_by_header() {
        let s = EnvoySettings {
            routing: Routing::ExtProc {
                grpc: "127.0.0.1:9002".into(),
            },
            ..EnvoySettings::demo()
        };
        let yaml = render(&s);
        assert!(yaml.contains("request_body_mode: BUFFERED"));
        assert!(yaml.contains("type: ORIGINAL_DST"));
        assert!(yaml.contains("http_header_name: x-gateway-destination-endpoint"));
        assert!(yaml.contains(&format!("- name: {EXTPROC_CLUSTER}")));
        assert!(yaml.contains("http2_protocol_options: {}"));
        assert!(yaml.contains("address: 127.0.0.1, port_value: 9002}"));
        assert!(!yaml.contains("envoy.filters.http.wasm"));
    }

    #[test]
    fn the_endpoint_picker_is_reached_over_tls_unless_switched_off() {
        let s = EnvoySettings {
            routing: Routing::EndpointPicker {
                grpc: "127.0.0.1:9002".into(),
                lb: PickerLb::OriginalDst,
                failure_mode: FailureMode::FailClose,
            },
            ..EnvoySettings::demo()
        };
        let tls = render(&s);
        assert!(tls.contains("request_body_mode: FULL_DUPLEX_STREAMED"));
        assert!(tls.contains("UpstreamTlsContext"));
        let plain = render(&EnvoySettings {
            picker_tls: false,
            ..s
        });
        assert!(plain.contains("request_body_mode: FULL_DUPLEX_STREAMED"));
        assert!(plain.contains(&format!("- name: {EXTPROC_CLUSTER}")));
        assert!(plain.contains("(Endpoint Picker Protocol, plain text, FailClose)"));
        assert!(!plain.contains("UpstreamTlsContext"), "{plain}");
    }

    #[test]
    fn a_destination_list_gets_the_override_host_cluster_and_retries() {
        let mut s = EnvoySettings::demo();
        let yaml = render(&s);
        assert!(yaml.contains("type: ORIGINAL_DST") && !yaml.contains("retry_policy"));
        s.gateway_config["destination_list"] = json!(true);
        s.fallback_retries = 3;
        let yaml = render(&s);
        assert!(!yaml.contains("type: ORIGINAL_DST"));
        assert!(yaml.contains("envoy.load_balancing_policies.override_host"));
        assert!(yaml.contains("num_retries: 3"));
        for endpoint in DEMO_ENDPOINTS {
            let (host, port) = endpoint.split_once(':').unwrap();
            assert!(
                yaml.contains(&format!("address: {host}, port_value: {port}}}")),
                "{endpoint} is a host of the cluster"
            );
        }
    }

    #[test]
    fn the_endpoint_picker_variants_render_as_conformant_gateways_wire_them() {
        let picker = |lb, failure_mode| EnvoySettings {
            routing: Routing::EndpointPicker {
                grpc: "127.0.0.1:9002".into(),
                lb,
                failure_mode,
            },
            fallback_retries: 2,
            ..EnvoySettings::demo()
        };
        let yaml = render(&picker(PickerLb::OriginalDst, FailureMode::FailClose));
        assert!(yaml.contains("type: ORIGINAL_DST") && !yaml.contains("retry_policy"));
        assert!(yaml.contains("failure_mode_allow: false"));
        assert!(yaml.contains("request_body_mode: FULL_DUPLEX_STREAMED"));
        assert!(yaml.contains("response_trailer_mode: SEND"));
        assert!(yaml.contains("service_name: envoy.service.ext_proc.v3.ExternalProcessor"));
        assert!(yaml.contains("UpstreamTlsContext"));

        let yaml = render(&picker(PickerLb::OverrideHost, FailureMode::FailOpen));
        assert!(!yaml.contains("type: ORIGINAL_DST"));
        assert!(yaml.contains("failure_mode_allow: true"));
        assert!(yaml.contains("envoy.load_balancing_policies.override_host"));
        assert!(yaml.contains("path: [{key: x-gateway-destination-endpoint}]"));
        assert!(yaml.contains("path: [{key: x-gateway-destination-endpoint-served}]"));
        assert!(yaml.contains("envoy.load_balancing_policies.round_robin"));
        assert!(yaml.contains("num_retries: 2"));
        for endpoint in DEMO_ENDPOINTS {
            let (host, port) = endpoint.split_once(':').unwrap();
            assert!(yaml.contains(&format!("address: {host}, port_value: {port}}}")));
        }
    }

    #[test]
    fn another_module_in_the_filters_place_gets_the_same_wiring() {
        // The overhead benchmark's floor: only the module and the plugin
        // configurations differ from the filter's bootstrap.
        let filter = EnvoySettings::demo();
        let floor = EnvoySettings {
            wasm_path: "/tmp/bench_floor_filter.wasm".into(),
            gateway_config: json!(["127.0.0.1:8001", "127.0.0.1:8002"]),
            control_config: json!([]),
            ..EnvoySettings::demo()
        };
        let yaml = render(&floor);
        assert_eq!(
            yaml.matches("filename: /tmp/bench_floor_filter.wasm\n")
                .count(),
            2
        );
        assert!(yaml.contains("                    [\"127.0.0.1:8001\", \"127.0.0.1:8002\"]\n"));
        assert!(yaml.contains("                    []\n"));
        assert!(yaml.contains("allow_on_headers_stop_iteration: true"));
        assert!(yaml.contains("type: ORIGINAL_DST"));
        assert!(yaml.contains("http_header_name: x-gateway-destination-endpoint"));
        // Line by line, apart from the module path and the embedded configurations
        // (indented 20 spaces), the two bootstraps are the same.
        let wiring = |yaml: &str| -> Vec<String> {
            yaml.lines()
                .filter(|l| !l.starts_with(&" ".repeat(20)))
                .map(|l| match l.split_once("filename: ") {
                    Some((indent, _)) => format!("{indent}filename: <module>"),
                    None => l.to_string(),
                })
                .collect()
        };
        assert_eq!(wiring(&yaml), wiring(&render(&filter)));
    }

    #[test]
    fn scalars_are_quoted_when_needed() {
        assert_eq!(scalar("127.0.0.1"), "127.0.0.1");
        assert_eq!(scalar("::1"), "\"::1\"");
        assert_eq!(scalar("1.40"), "\"1.40\"");
        assert_eq!(scalar("yes"), "\"yes\"");
        assert_eq!(scalar(""), "\"\"");
        assert_eq!(scalar("a: b"), "\"a: b\"");
    }

    #[test]
    fn a_named_safety_service_is_a_dns_cluster_with_tls() {
        let mut s = EnvoySettings::demo();
        s.safety_address = Some("modelarmor.us-central1.rep.googleapis.com:443".into());
        let yaml = render(&s);
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let clusters = v["static_resources"]["clusters"].as_sequence().unwrap();
        let safety = clusters
            .iter()
            .find(|c| c["name"].as_str() == Some(SAFETY_CLUSTER))
            .unwrap();
        assert_eq!(safety["type"].as_str(), Some("STRICT_DNS"));
        assert_eq!(
            safety["transport_socket"]["typed_config"]["sni"].as_str(),
            Some("modelarmor.us-central1.rep.googleapis.com")
        );
        // An IP stays STATIC and plain (the demo's simulator).
        assert!(demo_envoy_yaml().contains("type: STATIC"));
        assert!(!demo_envoy_yaml().contains("STRICT_DNS"));
    }

    #[test]
    fn envoy_args_disable_hot_restart() {
        let mut s = EnvoySettings::demo();
        s.concurrency = Some(2);
        let args = envoy_args(&s, "/tmp/e.yaml");
        assert_eq!(
            args,
            [
                "--config-path",
                "/tmp/e.yaml",
                "--log-level",
                "info",
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "1000",
                "--concurrency",
                "2"
            ]
        );
    }
}
