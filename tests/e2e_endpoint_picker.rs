//! The `endpoint-picker` behind the real Envoy, wired as conformant Gateway API
//! inference gateways wire an InferencePool's endpoint picker: ext_proc with
//! FULL_DUPLEX_STREAMED bodies and trailers SEND, over TLS without verification,
//! an ORIGINAL_DST cluster on `x-gateway-destination-endpoint`. The picker finds
//! the simulators through its own discovery section and scrapes them itself.
//!
//! A Lua filter before ext_proc turns the test header `x-test-subset` into the
//! protocol's subset hint (`envoy.lb.subset_hint`), as a data plane would set it.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::deploy::envoy_config::{self, EnvoySettings};
use support::envoy::Envoy;
use support::picker::{PickerProcess, SUBSET_LUA};
use support::sim::{self, Sim, SimOptions};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const METRICS_TOKEN: &str = "picker-metrics-token-1234";

/// The route echoes what the picker decided, for the assertions: the
/// `envoy.lb` metadata value and the upstream Envoy connected to.
const ECHO_PICK: &str = r#"                response_headers_to_add:
                - header: {key: x-test-picked-metadata, value: "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"}
                - header: {key: x-test-upstream, value: "%UPSTREAM_REMOTE_ADDRESS%"}
"#;

fn picker_config(sims: &[Sim]) -> Value {
    let endpoints: Vec<String> = sims.iter().map(Sim::endpoint).collect();
    json!({
        "plugin": {
            "pools": [{"name": "pool", "endpoints": []}],
            "models": [
                {"name": "m", "pool": "pool"},
                {"name": "r", "pool": "pool", "target_models": [{"name": "r-lora", "weight": 1}]}
            ]
        },
        "discovery": {
            "scrape_interval_ms": 50,
            "pools": [{"name": "pool", "endpoints": endpoints}]
        }
    })
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

async fn metrics(client: &reqwest::Client, port: u16, token: Option<&str>) -> (u16, String) {
    let mut req = client.get(format!("http://127.0.0.1:{port}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET /metrics");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_picker_routes_behind_envoy_as_a_conformant_gateway_wires_it() {
    support::envoy::runtime();
    let dir = tempfile::Builder::new()
        .prefix("e2e-picker-")
        .tempdir()
        .unwrap();
    let sims = sim::start_n(3, &SimOptions::default(), dir.path());
    let (cert_pem, key_pem) = inference_gateway::picker::server::self_signed().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    // Ready once discovery has produced a snapshot (readiness on the plain-text
    // probe port); liveness at once.
    let mut picker = PickerProcess::start(
        dir.path(),
        &picker_config(&sims),
        Some((&cert, &key)),
        &["--metrics-token-env", "PICKER_METRICS_TOKEN"],
        &[("PICKER_METRICS_TOKEN", METRICS_TOKEN)],
    )
    .await;

    // The gRPC port itself speaks TLS and answers health for every protocol name.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://127.0.0.1:{}", picker.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS gRPC connection to the picker");
    let mut health = HealthClient::new(ch);
    for service in [
        "",
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(
            check(&mut health, service).await.unwrap(),
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    assert_eq!(
        check(&mut health, "no.such.Service")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    // Plain text on the TLS port fails: the gateway must use TLS.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", picker.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(check(&mut HealthClient::new(ch), "").await.is_err());
    }

    // Envoy, wired as a conformant gateway, plus the subset-hint Lua filter and the echo.
    let settings = EnvoySettings {
        component_log_level: "ext_proc:info,lua:info".into(),
        ..picker.envoy_settings()
    };
    let yaml = envoy_config::render(&settings);
    assert!(yaml.contains("request_body_mode: FULL_DUPLEX_STREAMED"));
    let yaml = yaml.replacen(
        "          - name: envoy.filters.http.ext_proc",
        &format!("{SUBSET_LUA}          - name: envoy.filters.http.ext_proc"),
        1,
    );
    let yaml = yaml.replacen(
        "                  timeout: 0s\n",
        &format!("                  timeout: 0s\n{ECHO_PICK}"),
        1,
    );
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let envoy = {
        let (s, c, d) = (settings.clone(), config.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || Envoy::start(&s, &c, &d))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("Envoy did not start: {e}"))
    };
    let client = support::http_client();
    let url = |p: &str| format!("{}{p}", settings.gateway_url());
    let endpoints: Vec<String> = sims.iter().map(Sim::endpoint).collect();
    let post = |path: &str, body: Value, subset: Option<String>| {
        let mut r = client
            .post(url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(s) = subset {
            r = r.header("x-test-subset", s);
        }
        r.send()
    };
    let diagnostics = |what: &str| {
        format!(
            "{what}\n--- picker ---\n{}\n--- envoy ---\n{}",
            picker.guard.log_tail(8192),
            envoy.logs()
        )
    };

    // Chat and completions: routed to a discovered simulator; header and envoy.lb
    // metadata carry the same value, and that is where Envoy connected.
    for (path, body) in [
        ("/v1/chat/completions", support::api::chat("m", "hello")),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "once upon a time", "max_tokens": 4}),
        ),
    ] {
        let resp = post(path, body, None).await.unwrap();
        let status = resp.status().as_u16();
        let (picked, upstream) = (
            header(&resp, "x-test-picked-metadata"),
            header(&resp, "x-test-upstream"),
        );
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "{}", diagnostics(&format!("{path}: {text}")));
        assert!(endpoints.contains(&picked), "{picked} not in {endpoints:?}");
        assert_eq!(picked, upstream);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["choices"][0].is_object(), "{v}");
        // The model server got the destination header with the same value.
        let sim = sims.iter().find(|s| s.endpoint() == picked).unwrap();
        let got = sim.requests(&client).await;
        let last = got.last().unwrap();
        assert_eq!(
            sim::header(last, "x-gateway-destination-endpoint"),
            Some(picked.as_str())
        );
        assert_eq!(sim::body_json(last).unwrap()["model"], "m");
    }

    // A weighted rewrite travels in the streamed body.
    let resp = post(
        "/v1/completions",
        json!({"model": "r", "prompt": "x"}),
        None,
    )
    .await
    .unwrap();
    let picked = header(&resp, "x-test-picked-metadata");
    assert_eq!(resp.status().as_u16(), 200);
    let sim = sims.iter().find(|s| s.endpoint() == picked).unwrap();
    assert_eq!(
        sim::body_json(sim.requests(&client).await.last().unwrap()).unwrap()["model"],
        "r-lora"
    );

    // A streamed response comes through chunk by chunk to [DONE].
    let resp = post(
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "stream"}],
               "max_tokens": 16, "stream": true}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events = text.matches("data: ").count();
    assert!(
        events >= 3 && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );

    // The subset hint: only the hinted endpoint; none eligible is a 503 in the
    // OpenAI shape from the picker.
    let only = endpoints[1].clone();
    for _ in 0..6 {
        let resp = post(
            "/v1/completions",
            json!({"model": "m", "prompt": "p"}),
            Some(only.clone()),
        )
        .await
        .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{}", diagnostics("subset"));
        assert_eq!(header(&resp, "x-test-picked-metadata"), only);
    }
    let resp = post(
        "/v1/completions",
        json!({"model": "m", "prompt": "p"}),
        Some("10.255.0.1:8000".into()),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_healthy_upstream", "{v}");

    // Errors come back as the filter's: bad JSON 400, unknown model 404.
    let resp = client
        .post(url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let resp = post(
        "/v1/completions",
        json!({"model": "nope", "prompt": "p"}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 404);

    // Metrics: 401 without the token; with it the request metrics, the pool
    // gauges, and every in-flight count back at 0 once the streams are over.
    let (status, _) = metrics(&client, picker.metrics, None).await;
    assert_eq!(status, 401);
    let (status, _) = metrics(&client, picker.metrics, Some("wrong-token-xxxx")).await;
    assert_eq!(status, 401);
    let mut last = String::new();
    let mut settled = false;
    for _ in 0..50 {
        let (status, text) = metrics(&client, picker.metrics, Some(METRICS_TOKEN)).await;
        assert_eq!(status, 200);
        let counts: Vec<f64> = endpoints
            .iter()
            .filter_map(|e| {
                sim::sample(
                    &text,
                    &format!("inference_gateway_endpoint_in_flight{{endpoint=\"{e}\"}}"),
                )
            })
            .collect();
        last = text;
        if counts.len() == endpoints.len() && counts.iter().all(|&n| n == 0.0) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "in-flight counts not back to 0:\n{last}");
    assert!(
        sim::sample(
            &last,
            r#"inference_model_request_total{model_name="m",target_model_name="m"}"#
        )
        .is_some_and(|n| n >= 9.0),
        "{last}"
    );
    assert!(
        last.contains("inference_model_request_error_total{"),
        "{last}"
    );
    assert_eq!(
        sim::sample(&last, r#"inference_pool_ready_pods{name="pool"}"#),
        Some(3.0),
        "{last}"
    );

    // A real Prometheus scrapes it as the GKE guide's ClusterPodMonitoring does:
    // with the bearer token the target is up and has the series; without, the
    // scrape fails (401).
    if let Some(_prom) = inference_gateway::deploy::prometheus::find_prometheus() {
        use inference_gateway::deploy::prometheus::{start_prometheus, Target};
        let address = format!("127.0.0.1:{}", picker.metrics);
        let prom = start_prometheus(
            &dir.path().join("prometheus"),
            &[
                Target::new("picker", &address).bearer(METRICS_TOKEN),
                Target::new("picker-no-token", &address),
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let prom = std::sync::Arc::new(prom);
        let p = std::sync::Arc::clone(&prom);
        let (samples, health) = tokio::task::spawn_blocking(move || {
            let samples = p
                .wait_for(
                    r#"inference_pool_ready_pods{job="picker",name="pool"}"#,
                    Duration::from_secs(30),
                    |s| s.iter().any(|s| s.value == 3.0),
                )
                .unwrap_or_else(|e| panic!("{e}\n{}", p.log_tail(3000)));
            let mut health = Vec::new();
            for _ in 0..60 {
                health = p.target_health().unwrap_or_default();
                if health
                    .iter()
                    .any(|(j, h)| j == "picker-no-token" && h != "unknown")
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (samples, health)
        })
        .await
        .unwrap();
        assert!(!samples.is_empty());
        assert!(
            health.contains(&("picker".to_string(), "up".to_string())),
            "{health:?}"
        );
        assert!(
            health.contains(&("picker-no-token".to_string(), "down".to_string())),
            "{health:?}"
        );
    } else {
        support::announce("SKIPPED the picker's Prometheus scrape: no prometheus binary");
    }

    drop(envoy);
    picker.guard.stop(Duration::from_secs(5));
}

/// A BUFFERED request body at the plugin's default limit (4 MiB) is one gRPC
/// message of more than 4 MiB: the picker reads it and routes (tonic's default
/// message limit refused it, and the request failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_body_at_the_default_limit_is_routed() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        external_processor_client::ExternalProcessorClient, processing_request,
        processing_response, HttpBody, HttpHeaders, ProcessingRequest,
    };
    let dir = tempfile::Builder::new()
        .prefix("e2e-picker-big-")
        .tempdir()
        .unwrap();
    let endpoint = "127.0.0.1:18000";
    let config = json!({"plugin": {
        "pools": [{"name": "pool", "endpoints": [endpoint]}],
        "models": [{"name": "m", "pool": "pool"}]
    }});
    let picker = PickerProcess::start(dir.path(), &config, None, &["--insecure"], &[]).await;
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{}", picker.grpc))
        .await
        .expect("picker gRPC")
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);

    let limit = inference_gateway::config::DEFAULT_MAX_REQUEST_BODY_BYTES;
    let head = r#"{"model":"m","prompt":""#;
    let body = format!("{head}{}\"}}", "a".repeat(limit - head.len() - 2));
    assert_eq!(body.len(), limit);
    let hv = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    };
    let msg = |r| ProcessingRequest {
        request: Some(r),
        ..Default::default()
    };
    let len = limit.to_string();
    let requests = vec![
        msg(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    hv(":method", "POST"),
                    hv(":path", "/v1/completions"),
                    hv("content-type", "application/json"),
                    hv("content-length", &len),
                ],
            }),
            ..Default::default()
        })),
        msg(processing_request::Request::RequestBody(HttpBody {
            body: body.into_bytes(),
            end_of_stream: true,
            ..Default::default()
        })),
    ];
    let mut responses = client
        .process(futures_util::stream::iter(requests))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", picker.guard.log_tail(4096)))
        .into_inner();
    let mut routed = false;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("the picker answers")
        .unwrap_or_else(|e| panic!("the stream failed: {e}\n{}", picker.guard.log_tail(4096)))
    {
        let mutation = match r.response {
            Some(processing_response::Response::RequestBody(b)) => {
                b.response.and_then(|c| c.header_mutation)
            }
            Some(processing_response::Response::RequestHeaders(h)) => {
                h.response.and_then(|c| c.header_mutation)
            }
            Some(processing_response::Response::ImmediateResponse(i)) => {
                panic!("refused: {:?}", String::from_utf8_lossy(&i.body))
            }
            _ => None,
        };
        let set = mutation.map(|m| m.set_headers).unwrap_or_default();
        if set.iter().filter_map(|h| h.header.as_ref()).any(|h| {
            h.key == "x-gateway-destination-endpoint" && h.raw_value == endpoint.as_bytes()
        }) {
            routed = true;
            break;
        }
    }
    assert!(
        routed,
        "no destination set\n{}",
        picker.guard.log_tail(4096)
    );
}
