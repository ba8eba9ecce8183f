//! Issue 13, "how it will be checked": the `endpoint-picker` behind real Envoy in
//! the wirings conformant Gateway API inference gateways use for an
//! InferencePool's `endpointPickerRef`, with the official `openai` client.
//!
//! Four Envoys, two pickers (one writes destination lists for the override-host
//! clusters, one a single address for the ORIGINAL_DST cluster):
//! - `override`: [`PickerLb::OverrideHost`] + `FailOpen`, rendered by envoy_config
//!   (the override-host policy on `envoy.lb` metadata, retries to the next listed
//!   host), plus a Lua filter that turns `x-test-subset` into the subset hint;
//! - `foreign`: a bootstrap written by hand in the shape other projects generate
//!   (Istio's InferencePool translation: ext_proc FULL_DUPLEX_STREAMED with
//!   `envoy.lb` received and an override-host pool cluster with a round-robin
//!   fallback; GIE's test Envoy: TLS with an empty validation context, HTTP/2
//!   window settings; plus the ext_proc fields gateways set: `request_attributes`,
//!   `allow_mode_override`, `max_message_timeout`, `mutation_rules`, a per-route
//!   `ExtProcPerRoute` switch), `FailClose`;
//! - `original`: [`PickerLb::OriginalDst`] + `FailClose`, rendered;
//! - `buffered`: `foreign` with the processing mode of GIE's own test Envoy and
//!   of gateways that buffer (request body BUFFERED, responses not processed,
//!   trailers SKIP), `FailClose`.
//!
//! The pickers route over static pool endpoints (no discovery), so they keep
//! listing a killed replica first now and then: that is what exercises the
//! fallbacks deterministically.

mod support;

use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::deploy::envoy_config::{self, EnvoySettings, FailureMode, PickerLb, Routing};
use support::deploy::process::{self, ChildGuard};
use support::envoy::Envoy;
use support::picker::{picker_binary, SUBSET_LUA};
use support::sim::{Sim, SimOptions};

/// What the route echoes for the assertions: the picker's list (`envoy.lb`), the
/// endpoint the override-host policy reports as served, and where Envoy
/// connected last (after retries).
const ECHO: &str = r#"                response_headers_to_add:
                - header: {key: x-test-picked, value: "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"}
                - header: {key: x-test-served, value: "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint-served)%"}
                - header: {key: x-test-upstream, value: "%UPSTREAM_REMOTE_ADDRESS%"}
"#;

/// A gateway bootstrap in the shape other projects generate for an
/// InferencePool (written for this test from their documented fields, not
/// copied): the ext_proc filter sits in the chain and a route switches it off
/// per route; the pool is a cluster of its pods with the override-host policy.
const FOREIGN_STYLE: &str = r#"admin:
  address: {socket_address: {address: 127.0.0.1, port_value: @ADMIN@}}
static_resources:
  listeners:
  - name: inference-gateway-http
    address: {socket_address: {address: 127.0.0.1, port_value: @GATEWAY@}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inference-gateway
          normalize_path: true
          merge_slashes: true
          http_filters:
          - name: envoy.filters.http.ext_proc/inferencepool/default/pool
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc:
                  cluster_name: endpointpicker/default/pool-epp
                  authority: pool-epp.default.svc:9002
                timeout: 10s
              failure_mode_allow: false
              allow_mode_override: true
              message_timeout: 5s
              max_message_timeout: 30s
              request_attributes: [request.path, request.method, xds.route_name]
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
              mutation_rules:
                allow_all_routing: true
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
          route_config:
            name: inference-gateway-http
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - name: healthz
                match: {path: /healthz}
                direct_response: {status: 200, body: {inline_string: ok}}
                typed_per_filter_config:
                  envoy.filters.http.ext_proc/inferencepool/default/pool:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
                    disabled: true
              - name: httproute/default/llm-route/rule/0
                match: {prefix: /}
                route:
                  cluster: inferencepool/default/pool
                  timeout: 0s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset-before-request
                    num_retries: 2
@ECHO@  clusters:
  - name: inferencepool/default/pool
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: inferencepool/default/pool
      endpoints:
      - lb_endpoints:
@MEMBERS@    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources:
            - metadata:
                key: envoy.lb
                path: [{key: x-gateway-destination-endpoint}]
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
  - name: endpointpicker/default/pool-epp
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            initial_stream_window_size: 65536
            initial_connection_window_size: 1048576
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          validation_context: {}
    health_checks:
    - timeout: 1s
      interval: 1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check:
        service_name: envoy.service.ext_proc.v3.ExternalProcessor
    load_assignment:
      cluster_name: endpointpicker/default/pool-epp
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: @PICKER@}}}
"#;

/// `FOREIGN_STYLE`'s processing mode, and the buffering one that replaces it.
const FULL_DUPLEX: &str = "request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND";
const BUFFERED: &str = "request_header_mode: SEND
                response_header_mode: SKIP
                request_body_mode: BUFFERED
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP";

/// The picker on fixed ports, so a restarted one is where Envoy expects it.
struct PickerPorts {
    grpc: u16,
    health: u16,
    metrics: u16,
}

fn spawn_picker(dir: &Path, name: &str, ports: &PickerPorts, generation: u32) -> ChildGuard {
    let mut cmd = Command::new(picker_binary());
    cmd.arg("--config")
        .arg(dir.join(format!("{name}.json")))
        .args(["--grpc", &format!("127.0.0.1:{}", ports.grpc)])
        .args(["--grpc-health", &format!("127.0.0.1:{}", ports.health)])
        .args(["--metrics", &format!("127.0.0.1:{}", ports.metrics)])
        .arg("--cert")
        .arg(dir.join("tls.crt"))
        .arg("--key")
        .arg(dir.join("tls.key"))
        .env("RUST_LOG", "info");
    let log = dir.join(format!("{name}-{generation}.log"));
    ChildGuard::spawn("endpoint-picker", &mut cmd, Some(&log)).unwrap_or_else(|e| panic!("{e}"))
}

fn members_yaml(endpoints: &[String]) -> String {
    endpoints
        .iter()
        .map(|e| {
            let (h, p) = e.rsplit_once(':').unwrap();
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}\n"
            )
        })
        .collect()
}

async fn start_envoy(settings: &EnvoySettings, yaml: &str, dir: &Path, name: &str) -> Envoy {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let s = settings.clone();
    tokio::task::spawn_blocking(move || Envoy::start(&s, &config, &dir))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("Envoy {name} did not start: {e}"))
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// One completion request's outcome as the assertions need it.
#[derive(Debug)]
struct Outcome {
    status: u16,
    picked: String,
    served: String,
    upstream: String,
}

async fn complete(client: &reqwest::Client, base: &str, subset: Option<&str>) -> Outcome {
    let mut req = client
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(json!({"model": "m", "prompt": "p", "max_tokens": 2}).to_string());
    if let Some(s) = subset {
        req = req.header("x-test-subset", s);
    }
    match req.send().await {
        Ok(resp) => {
            let o = Outcome {
                status: resp.status().as_u16(),
                picked: header(&resp, "x-test-picked"),
                served: header(&resp, "x-test-served"),
                upstream: header(&resp, "x-test-upstream"),
            };
            let _ = resp.bytes().await;
            o
        }
        Err(_) => Outcome {
            status: 0,
            picked: String::new(),
            served: String::new(),
            upstream: String::new(),
        },
    }
}

/// Chat, completions and a streamed chat with the official client; every answer
/// must come from a pool member (the `x-test-upstream` echo, where the gateway has it).
fn openai_script(bases: &[String], endpoints: &[String]) -> String {
    format!(
        r#"
import json, openai
members = set(json.loads('{members}'))
for base in json.loads('{bases}'):
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=20)
    raw = c.chat.completions.with_raw_response.create(
        model="m", messages=[{{"role": "user", "content": "hello"}}], max_tokens=8)
    up = raw.headers.get("x-test-upstream")
    assert up is None or up in members, (base, up)
    r = raw.parse()
    assert r.choices[0].message.content, (base, r)
    raw = c.completions.with_raw_response.create(model="m", prompt="once upon a time", max_tokens=4)
    up = raw.headers.get("x-test-upstream")
    assert up is None or up in members, (base, up)
    assert raw.parse().choices[0].text is not None, base
    s = c.chat.completions.create(
        model="m", messages=[{{"role": "user", "content": "stream"}}], max_tokens=16, stream=True)
    chunks = [ch for ch in s]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(chunks) >= 3 and text, (base, len(chunks), text)
    print(base, "ok", len(chunks), "chunks")
"#,
        members = serde_json::to_string(endpoints).unwrap(),
        bases = serde_json::to_string(bases).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_behind_envoy_in_the_conformant_variants_with_failure_modes_and_fallbacks() {
    support::envoy::runtime();
    let dir = tempfile::Builder::new()
        .prefix("e2e-picker-variants-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let mut sims: Vec<Sim> = (0..3)
        .map(|i| {
            Sim::start(&format!("sim-{i}"), &SimOptions::default(), d)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let endpoints: Vec<String> = sims.iter().map(Sim::endpoint).collect();
    let (cert_pem, key_pem) = inference_gateway::picker::server::self_signed().unwrap();
    std::fs::write(d.join("tls.crt"), &cert_pem).unwrap();
    std::fs::write(d.join("tls.key"), &key_pem).unwrap();
    // Static members. The override-host clusters take a list (the pick, then its
    // fallbacks); an ORIGINAL_DST cluster only one address: a picker each.
    let port = || process::free_port().expect("free port");
    let mut pickers = Vec::new();
    for (name, list) in [("picker-list", true), ("picker-single", false)] {
        let plugin = json!({
            "pools": [{"name": "pool", "endpoints": endpoints}],
            "models": [{"name": "m", "pool": "pool"}],
            "destination_list": list
        });
        std::fs::write(
            d.join(format!("{name}.json")),
            json!({"plugin": plugin}).to_string(),
        )
        .unwrap();
        let ports = PickerPorts {
            grpc: port(),
            health: port(),
            metrics: port(),
        };
        let guard = spawn_picker(d, name, &ports, 0);
        process::wait_for_tcp(
            format!("127.0.0.1:{}", ports.grpc).parse().unwrap(),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", guard.log_tail(4096)));
        pickers.push((name, ports, guard));
    }
    let (list_grpc, single_grpc) = (pickers[0].1.grpc, pickers[1].1.grpc);

    let rendered = |lb, failure_mode, grpc: u16| EnvoySettings {
        gateway_port: port(),
        control_port: port(),
        admin_port: port(),
        wasm_path: "/nonexistent.wasm".into(),
        // The override-host cluster's members: the pool's endpoints.
        gateway_config: json!({"pools": [{"name": "pool", "endpoints": endpoints}]}),
        concurrency: Some(1),
        log_level: "warning".into(),
        component_log_level: "ext_proc:info".into(),
        log_flush_interval_ms: 100,
        fallback_retries: 2,
        routing: Routing::EndpointPicker {
            grpc: format!("127.0.0.1:{grpc}"),
            lb,
            failure_mode,
        },
        ..EnvoySettings::demo()
    };
    let with_test_filters = |yaml: String, lua: bool| {
        let yaml = if lua {
            yaml.replacen(
                "          - name: envoy.filters.http.ext_proc",
                &format!("{SUBSET_LUA}          - name: envoy.filters.http.ext_proc"),
                1,
            )
        } else {
            yaml
        };
        // Route-level keys: right after the catch-all route's match.
        yaml.replacen(
            "              - match: {prefix: /}\n",
            &format!("              - match: {{prefix: /}}\n{ECHO}"),
            1,
        )
    };

    let over_s = rendered(PickerLb::OverrideHost, FailureMode::FailOpen, list_grpc);
    let over_yaml = with_test_filters(envoy_config::render(&over_s), true);
    assert!(over_yaml.contains("failure_mode_allow: true"));
    let over = start_envoy(&over_s, &over_yaml, d, "override").await;

    let orig_s = rendered(PickerLb::OriginalDst, FailureMode::FailClose, single_grpc);
    let orig_yaml = with_test_filters(envoy_config::render(&orig_s), false);
    let orig = start_envoy(&orig_s, &orig_yaml, d, "original").await;

    // The foreign-style bootstrap: only its ports come from the settings.
    let foreign_s = rendered(PickerLb::OverrideHost, FailureMode::FailClose, list_grpc);
    let foreign_style = |s: &EnvoySettings, mode: &str| {
        FOREIGN_STYLE
            .replace("@ADMIN@", &s.admin_port.to_string())
            .replace("@GATEWAY@", &s.gateway_port.to_string())
            .replace("@PICKER@", &list_grpc.to_string())
            .replace("@MEMBERS@", &members_yaml(&endpoints))
            .replace("@ECHO@", ECHO)
            .replace(FULL_DUPLEX, mode)
    };
    let foreign_yaml = foreign_style(&foreign_s, FULL_DUPLEX);
    let foreign = start_envoy(&foreign_s, &foreign_yaml, d, "foreign").await;
    let buffered_s = rendered(PickerLb::OverrideHost, FailureMode::FailClose, list_grpc);
    let buffered_yaml = foreign_style(&buffered_s, BUFFERED);
    assert!(buffered_yaml.contains("request_body_mode: BUFFERED"));
    let buffered = start_envoy(&buffered_s, &buffered_yaml, d, "buffered").await;

    let bases = [
        over_s.gateway_url(),
        foreign_s.gateway_url(),
        orig_s.gateway_url(),
        buffered_s.gateway_url(),
    ];
    // The gateways whose cluster is the pool with the override-host policy.
    let listing = [0, 1, 3];
    let client = support::http_client();
    let diagnostics = |pickers: &[(&str, PickerPorts, ChildGuard)]| {
        let logs: String = pickers
            .iter()
            .map(|(n, _, g)| format!("--- {n} ---\n{}\n", g.log_tail(4096)))
            .collect();
        format!(
            "{logs}--- override ---\n{}\n--- foreign ---\n{}\n--- original ---\n{}\n--- buffered ---\n{}",
            over.logs(),
            foreign.logs(),
            orig.logs(),
            buffered.logs()
        )
    };

    // 1. The official client: chat, completions, a streamed chat through each.
    if let Some(python) = support::api::openai_python("openai client through the picker variants") {
        let script = openai_script(&bases, &endpoints);
        tokio::task::spawn_blocking(move || support::api::run_python(&python, &script))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    // The picker routes in every variant: a list of all members (pick first), and
    // the override-host policy connected to the first and says so in `envoy.lb`.
    for base in listing.map(|i| &bases[i]) {
        for _ in 0..6 {
            let o = complete(&client, base, None).await;
            assert_eq!(o.status, 200, "{base}: {o:?}\n{}", diagnostics(&pickers));
            let list: Vec<&str> = o.picked.split(',').collect();
            assert_eq!(list.len(), endpoints.len(), "{o:?}");
            assert!(list.iter().all(|e| endpoints.iter().any(|m| m == e)));
            assert_eq!(o.upstream, list[0], "{o:?}");
        }
    }
    let o = complete(&client, &bases[0], None).await;
    assert_eq!(o.served, o.upstream, "selected_host_key reports the host");
    let o = complete(&client, &bases[2], None).await;
    assert_eq!(
        (o.status, o.upstream.as_str()),
        (200, o.picked.split(',').next().unwrap())
    );

    // 2. The subset hint (override-host variant): only the hinted endpoints.
    let hint = format!("{},{}", endpoints[2], endpoints[1]);
    for _ in 0..8 {
        let o = complete(&client, &bases[0], Some(&hint)).await;
        assert_eq!(o.status, 200, "{o:?}");
        let mut list: Vec<&str> = o.picked.split(',').collect();
        list.sort();
        let mut want = vec![endpoints[1].as_str(), endpoints[2].as_str()];
        want.sort();
        assert_eq!(list, want, "only the hinted endpoints are listed");
        assert!(
            o.upstream == endpoints[1] || o.upstream == endpoints[2],
            "{o:?}"
        );
    }

    // 3. The picker killed. FailOpen: every request is served, by Envoy's own
    // round robin over the pool. FailClose: every request is dropped with a 5xx.
    for (_, _, guard) in &mut pickers {
        guard.kill();
    }
    // Envoy can only fail open before the first body chunk went to the picker:
    // once its health check has marked the picker down (see envoy_config).
    let mut down = false;
    for _ in 0..50 {
        let stats = process::http_get(&format!(
            "{}/stats?filter=extproc_picker.membership_healthy",
            over_s.admin_url()
        ));
        if stats.is_ok_and(|(_, t)| t.contains("membership_healthy: 0")) {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "the picker's health check never failed");
    const N: usize = 12;
    let mut open_served: BTreeMap<String, usize> = BTreeMap::new();
    let (mut open_ok, mut foreign_5xx, mut orig_5xx, mut buffered_5xx) = (0, 0, 0, 0);
    let mut open_failed = Vec::new();
    for _ in 0..N {
        let o = complete(&client, &bases[0], None).await;
        if o.status == 200 && o.picked.is_empty() && endpoints.contains(&o.upstream) {
            open_ok += 1;
            *open_served.entry(o.upstream).or_default() += 1;
        } else {
            open_failed.push(o);
        }
        let o = complete(&client, &bases[1], None).await;
        foreign_5xx += usize::from((500..600).contains(&o.status));
        let o = complete(&client, &bases[2], None).await;
        orig_5xx += usize::from((500..600).contains(&o.status));
        let o = complete(&client, &bases[3], None).await;
        buffered_5xx += usize::from((500..600).contains(&o.status));
    }
    assert_eq!(
        open_ok,
        N,
        "FailOpen serves every request without the picker: {open_failed:?}\n{}",
        diagnostics(&pickers)
    );
    assert_eq!(
        open_served.len(),
        endpoints.len(),
        "spread over the pool: {open_served:?}"
    );
    assert_eq!(foreign_5xx, N, "FailClose drops every request");
    assert_eq!(orig_5xx, N, "FailClose drops every request");
    assert_eq!(buffered_5xx, N, "FailClose drops every request");

    // 4. The picker back (same ports): routing by the picker again, within the
    // health-check interval.
    for (name, ports, guard) in &mut pickers {
        *guard = spawn_picker(d, name, ports, 1);
    }
    let mut back = [false; 4];
    for _ in 0..100 {
        for (i, base) in bases.iter().enumerate() {
            if !back[i] {
                let o = complete(&client, base, None).await;
                back[i] = o.status == 200 && !o.picked.is_empty();
            }
        }
        if back.iter().all(|&b| b) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        back,
        [true; 4],
        "picker routing resumed\n{}",
        diagnostics(&pickers)
    );

    // 5. A replica killed: the picker still lists it (static members, no
    // scraping), so whenever it is first, the retry goes to the next listed host.
    let dead = endpoints[0].clone();
    sims[0].kill();
    for base in listing.map(|i| &bases[i]) {
        let mut fell_back = 0;
        for _ in 0..60 {
            let o = complete(&client, base, None).await;
            assert_eq!(o.status, 200, "{base}: {o:?}\n{}", diagnostics(&pickers));
            assert_ne!(o.upstream, dead, "{o:?}");
            let list: Vec<&str> = o.picked.split(',').collect();
            if list[0] == dead {
                assert_eq!(o.upstream, list[1], "the next listed host served: {o:?}");
                if base == &bases[0] {
                    assert_eq!(o.served, list[1], "{o:?}");
                }
                fell_back += 1;
                if fell_back == 3 {
                    break;
                }
            }
        }
        assert_eq!(
            fell_back, 3,
            "{base}: the dead replica was never listed first"
        );
    }
    support::announce(&format!(
        "picker variants: FailOpen served {open_ok}/{N} over {open_served:?}; FailClose 5xx \
         {foreign_5xx}/{N} (foreign), {orig_5xx}/{N} (ORIGINAL_DST), {buffered_5xx}/{N} (buffered); \
         3 fallbacks each past {dead}"
    ));

    // Every in-flight count the picker took is released, also for the requests a
    // fallback served (the served endpoint comes back in `envoy.lb`).
    let metrics = format!("http://127.0.0.1:{}/metrics", pickers[0].1.metrics);
    let mut last = String::new();
    let mut settled = false;
    for _ in 0..50 {
        last = client
            .get(&metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counts: Vec<f64> = endpoints
            .iter()
            .filter_map(|e| {
                support::sim::sample(
                    &last,
                    &format!("inference_gateway_endpoint_in_flight{{endpoint=\"{e}\"}}"),
                )
            })
            .collect();
        if counts.len() == endpoints.len() && counts.iter().all(|&n| n == 0.0) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "in-flight counts not back to 0:\n{last}");

    drop((over, foreign, orig, buffered));
    for (_, _, guard) in &mut pickers {
        guard.stop(Duration::from_secs(5));
    }
}
