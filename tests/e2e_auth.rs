//! API keys, per-key objectives and limits (issue 14) with the real Envoy and the
//! filter: keys from either header (the official `openai` client sends Bearer),
//! never forwarded; 401/403/429 in OpenAI's shape with `x-ratelimit-*` headers;
//! tokens charged from the responses' `usage`; exact request limits across two
//! Envoy workers and the per-replica share with two gateways; a batch key's
//! requests shed first.

mod support;

use inference_gateway::auth::digest_hex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::api::{openai_error, streamed_completion};
use support::collector::Collector;
use support::deploy::envoy_config::DEMO_POOL;
use support::gateway::{Gateway, GatewayOptions};
use support::sim::{self, SimOptions};

const INGEST_TOKEN: &str = "e2e-auth-ingest-token";

/// Keys (plaintext, as clients hold them) and the `auth` section (digests only).
fn auth_config(keys: &[(&str, &str, Value)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(id, key, extra)| {
            let mut k = json!({"id": id, "sha256": digest_hex(key)});
            if let (Some(k), Some(e)) = (k.as_object_mut(), extra.as_object()) {
                k.extend(e.clone());
            }
            k
        })
        .collect();
    json!({"keys": keys})
}

async fn gateway(keys: &[(&str, &str, Value)], sim: SimOptions, extra: Value) -> Gateway {
    let auth = auth_config(keys);
    Gateway::start(GatewayOptions {
        replicas: 2,
        sim,
        configure: Box::new(move |s| {
            s.gateway_config["auth"] = auth;
            s.gateway_config["objectives"] = json!([{"name": "bulk", "priority": -1}]);
            if let (Some(c), Some(e)) = (s.gateway_config.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            s.control_config = json!({"role": "control", "ingest": {"token": INGEST_TOKEN}});
        }),
    })
    .await
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

async fn post(gw: &Gateway, key: Option<(&str, &str)>, body: &Value) -> reqwest::Response {
    let mut r = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some((name, value)) = key {
        r = r.header(name, value);
    }
    r.send().await.expect("request")
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// Seconds into the current UTC minute.
fn second_of_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60
}

/// Waits (at most a minute) until at least `need` seconds of the UTC minute are
/// left, so a phase that asserts per-minute counts stays in one window.
async fn fresh_window(need: u64) {
    while 60 - second_of_minute() < need {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `/debug/state` (every 100 ms, `timeout` at most) until `pred` holds.
async fn wait_state(gw: &Gateway, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let state = gw.debug_state().await;
        if pred(&state) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key_state(state: &Value, id: &str) -> Value {
    state["api_keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no key {id} in {state}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_never_forwarded_and_the_official_client_sees_openai_errors() {
    let gw = gateway(
        &[
            (
                "team-a",
                "sk-team-a-0123456789",
                json!({"models": ["chat"]}),
            ),
            ("ops", "sk-ops-0123456789", json!({})),
        ],
        SimOptions::default(),
        json!({}),
    )
    .await;

    // x-api-key and Bearer both work; the model server never sees either.
    for key in [
        ("x-api-key", "sk-ops-0123456789"),
        ("authorization", "Bearer sk-ops-0123456789"),
    ] {
        let resp = post(&gw, Some(key), &chat("hi", 3)).await;
        assert_eq!(
            resp.status(),
            200,
            "{key:?}: {}",
            resp.text().await.unwrap()
        );
    }
    for s in &gw.sims {
        for r in s.requests(&gw.client).await {
            assert_eq!(sim::header(&r, "x-api-key"), None, "{r}");
            assert_eq!(sim::header(&r, "authorization"), None, "{r}");
        }
    }

    // Missing, unknown and wrong keys: 401 invalid_api_key, nothing upstream.
    for s in &gw.sims {
        s.clear(&gw.client).await;
    }
    for key in [
        None,
        Some(("x-api-key", "sk-nobody")),
        Some(("authorization", "Bearer sk-team-a-012345678")),
        Some(("authorization", "Basic c2stb3Bz")),
    ] {
        let (status, err) = openai_error(post(&gw, key, &chat("hi", 3)).await).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (401, Some("invalid_api_key")),
            "{key:?}: {err}"
        );
    }
    // A model the key may not use: 403.
    let body = json!({"model": "food-review", "messages": [{"role": "user", "content": "hi"}]});
    let (status, err) =
        openai_error(post(&gw, Some(("x-api-key", "sk-team-a-0123456789")), &body).await).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    for s in &gw.sims {
        assert!(
            s.requests(&gw.client).await.is_empty(),
            "refused requests never go upstream"
        );
    }

    // The official client, with api_key= (sent as Bearer).
    if let Some(python) = support::api::openai_python("auth with the openai client") {
        let script = format!(
            r#"
import openai
base = "{base}/v1"
c = openai.OpenAI(base_url=base, api_key="sk-team-a-0123456789", max_retries=0)
r = c.chat.completions.create(model="chat", messages=[{{"role": "user", "content": "hi"}}], max_tokens=3)
assert r.choices[0].message.content
n = sum(1 for _ in c.chat.completions.create(model="chat", messages=[{{"role": "user", "content": "hi"}}], max_tokens=4, stream=True))
assert n >= 2, n
try:
    c.chat.completions.create(model="food-review", messages=[{{"role": "user", "content": "hi"}}])
    raise SystemExit("expected PermissionDeniedError")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403 and e.code == "model_not_allowed", e
try:
    openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e
print("ok")
"#,
            base = gw.url("")
        );
        tokio::task::spawn_blocking(move || support::api::run_python(&python, &script))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    // Usage per consumer: counters by key id and model (never the key), the id in
    // the access log, the keys in /debug/state.
    let stats = gw.admin_text("/stats/prometheus").await;
    let requests = |id: &str| {
        sim::sample(
            &stats,
            &format!(
                r#"inference_gateway_consumer_requests_total{{model_name="chat",consumer="{id}"}}"#
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(
        requests("ops") >= 2.0 && requests("team-a") >= 2.0,
        "{stats}"
    );
    assert!(!stats.contains("sk-"), "a key in the stats");
    let state = gw.debug_state().await;
    assert!(key_state(&state, "team-a")["used"].is_object(), "{state}");
    assert!(!state.to_string().contains(&digest_hex("sk-ops-0123456789")));
    let logs = gw.wait_until(
        "the access log names the consumer",
        Duration::from_secs(10),
        || {
            let l = gw.envoy_logs();
            if l.contains("consumer=team-a") {
                support::deploy::process::Check::Ready(l)
            } else {
                support::deploy::process::Check::NotYet("no consumer=team-a yet".into())
            }
        },
    );
    assert!(!logs.contains("sk-team-a"), "a key in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_is_charged_from_usage_refused_at_its_end_and_refilled_after_the_window() {
    let key = ("x-api-key", "sk-tiny-0123456789");
    let gw = gateway(
        &[("tiny", key.1, json!({"tokens_per_minute": 100}))],
        SimOptions::default(),
        json!({}),
    )
    .await;
    fresh_window(40).await;
    let mut charged = 0u64;
    let mut served = 0;
    let mut refused = None;
    for i in 0..40 {
        // Every other request streamed, asking for usage as the official client does.
        let resp = if i % 2 == 0 {
            post(&gw, Some(key), &chat("count me", 8)).await
        } else {
            let mut body = chat("count me", 8);
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            post(&gw, Some(key), &body).await
        };
        if resp.status() == 429 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-ratelimit-limit-tokens").as_deref(),
            Some("100")
        );
        let remaining: u64 = header(&resp, "x-ratelimit-remaining-tokens")
            .and_then(|v| v.parse().ok())
            .expect("x-ratelimit-remaining-tokens");
        assert!(
            remaining < 100 - charged,
            "{remaining} after {charged} charged"
        );
        let text = resp.text().await.unwrap();
        let usage = if i % 2 == 0 {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        } else {
            support::api::sse_data(&text)
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
                .expect("a usage chunk")
        };
        charged +=
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
        served += 1;
    }
    let resp = refused.expect("the budget ran out");
    assert!(served >= 2, "{served}");
    let retry: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    let remaining = header(&resp, "x-ratelimit-remaining-tokens").unwrap();
    let (_, err) = openai_error(resp).await;
    assert_eq!(
        (err["error"]["type"].as_str(), err["error"]["code"].as_str()),
        (Some("tokens"), Some("rate_limit_exceeded"))
    );
    assert_eq!(remaining, 100u64.saturating_sub(charged).to_string());
    // What the gateway charged is exactly the responses' usage.
    let used = key_state(&gw.debug_state().await, "tiny")["used"].clone();
    assert_eq!(used["tokens_this_minute"], charged, "{used}");
    assert_eq!(used["concurrent"], 0);
    assert!(retry <= 60);

    // After the window: served again.
    tokio::time::sleep(Duration::from_secs(retry + 1)).await;
    let resp = post(&gw, Some(key), &chat("again", 2)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_per_minute_limit_is_exact_under_32_concurrent_clients() {
    const LIMIT: usize = 20;
    let key = "sk-burst-0123456789";
    let gw = gateway(
        &[("burst", key, json!({"requests_per_minute": LIMIT}))],
        SimOptions::default(),
        json!({}),
    )
    .await;
    fresh_window(30).await;
    let url = gw.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (client, url) = (gw.client.clone(), url.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for j in 0..3 {
                    let r = client
                        .post(&url)
                        .header("x-api-key", key)
                        .header("content-type", "application/json")
                        .body(chat(&format!("c{i} r{j}"), 1).to_string())
                        .send()
                        .await
                        .expect("request");
                    codes.push(r.status().as_u16());
                }
                codes
            })
        })
        .collect();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        for c in t.await.unwrap() {
            *by_status.entry(c).or_default() += 1;
        }
    }
    assert!(
        60 - second_of_minute() > 1,
        "the burst must fit in one window"
    );
    assert_eq!(by_status.get(&200), Some(&LIMIT), "{by_status:?}");
    assert_eq!(by_status.get(&429), Some(&(96 - LIMIT)), "{by_status:?}");
    let upstream: usize = {
        let mut n = 0;
        for s in &gw.sims {
            n += s.requests(&gw.client).await.len();
        }
        n
    };
    assert_eq!(
        upstream, LIMIT,
        "only admitted requests reach a model server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_gateway_replicas_each_admits_its_share() {
    const LIMIT: usize = 10;
    let key = "sk-shared-0123456789";
    let keys = [("shared", key, json!({"requests_per_minute": LIMIT}))];
    let a = gateway(&keys, SimOptions::default(), json!({})).await;
    let b = gateway(&keys, SimOptions::default(), json!({})).await;
    // One collector feeds both: it tells each that there are two replicas.
    let dir = tempfile::tempdir().unwrap();
    let endpoints: Vec<String> = a.sims.iter().map(|s| s.endpoint()).collect();
    let mut yaml = format!(
        "scrape_interval_ms: 100\nscrape_timeout_ms: 500\npush_targets: [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\npools:\n  - name: {DEMO_POOL}\n    endpoints:\n",
        a.settings.control_port, b.settings.control_port
    );
    for e in &endpoints {
        yaml.push_str(&format!("      - \"{e}\"\n"));
    }
    let _collector = tokio::task::block_in_place(|| {
        Collector::start(dir.path(), "collector", &yaml, INGEST_TOKEN)
    });
    for gw in [&a, &b] {
        wait_state(gw, "two replicas known", Duration::from_secs(20), |s| {
            key_state(s, "shared")["replicas"] == 2
        })
        .await;
    }
    fresh_window(20).await;
    let mut admitted = Vec::new();
    for gw in [&a, &b] {
        let mut ok = 0;
        for i in 0..LIMIT {
            let resp = post(gw, Some(("x-api-key", key)), &chat(&format!("r{i}"), 1)).await;
            if resp.status() == 200 {
                ok += 1;
                assert_eq!(
                    header(&resp, "x-ratelimit-limit-requests").as_deref(),
                    Some("5")
                );
            } else {
                assert_eq!(resp.status(), 429);
            }
        }
        admitted.push(ok);
    }
    assert_eq!(
        admitted,
        vec![LIMIT / 2, LIMIT / 2],
        "each replica its share, together the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keys_requests_are_shed_before_a_standard_keys() {
    let gw = gateway(
        &[
            ("batch", "sk-batch-0123456789", json!({"objective": "bulk"})),
            ("standard", "sk-standard-0123456789", json!({})),
        ],
        SimOptions {
            per_token_ms: 10,
            extra_args: vec!["--max-num-seqs".into(), "1".into()],
            ..SimOptions::default()
        },
        json!({"scheduling": {"saturation": {"queue_depth": 2}}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let control = format!("127.0.0.1:{}", gw.settings.control_port);
    let config = support::collector::pool_config(DEMO_POOL, &endpoints, &control, 50);
    let _collector = tokio::task::block_in_place(|| {
        Collector::start(dir.path(), "collector", &config, INGEST_TOKEN)
    });
    // Every replica busy with one running and three waiting.
    let mut holders = Vec::new();
    for s in &gw.sims {
        for i in 0..4 {
            holders.push(support::api::hold_stream(
                s.url("/v1/completions"),
                streamed_completion("chat", &format!("busy {i}"), 200),
            ));
        }
    }
    wait_state(
        &gw,
        "every replica queueing",
        Duration::from_secs(20),
        |state| {
            state["snapshot"]["pools"][0]["endpoints"]
                .as_array()
                .is_some_and(|eps| {
                    eps.len() == endpoints.len()
                        && eps.iter().all(|e| e["waiting"].as_u64() >= Some(2))
                })
        },
    )
    .await;
    // The batch key is shed even when its request asks for a high priority.
    let mut body = chat("can wait", 2);
    body["priority"] = json!(5);
    let resp = post(&gw, Some(("x-api-key", "sk-batch-0123456789")), &body).await;
    assert!(header(&resp, "retry-after").is_some());
    let (status, err) = openai_error(resp).await;
    assert_eq!(status, 429, "{err}");
    let resp = post(
        &gw,
        Some(("x-api-key", "sk-standard-0123456789")),
        &chat("now", 2),
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    for h in holders {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart_through_ecds() {
    let (old, new) = ("sk-old-0123456789", "sk-new-0123456789");
    let with_keys = |base: &Value, keys: &[(&str, &str, Value)]| {
        let mut c = base.clone();
        c["auth"] = auth_config(keys);
        c
    };
    let mut gw = Gateway::start_ecds(GatewayOptions {
        replicas: 1,
        configure: Box::new(move |s| {
            s.gateway_config["auth"] =
                auth_config(&[("app", old, json!({"requests_per_minute": 1000}))]);
        }),
        ..GatewayOptions::default()
    })
    .await;
    assert_eq!((status(&gw, old).await, status(&gw, new).await), (200, 401));
    // Both keys while clients move (the same id: one consumer, one budget)...
    let base = gw.settings.gateway_config.clone();
    gw.apply_gateway_config_and_wait(with_keys(
        &base,
        &[
            ("app", old, json!({"requests_per_minute": 1000})),
            ("app-next", new, json!({"requests_per_minute": 1000})),
        ],
    ))
    .await;
    assert_eq!((status(&gw, old).await, status(&gw, new).await), (200, 200));
    // ...then only the new one: the old key is refused at once.
    gw.apply_gateway_config_and_wait(with_keys(&base, &[("app-next", new, json!({}))]))
        .await;
    assert_eq!((status(&gw, old).await, status(&gw, new).await), (401, 200));
    gw.check_envoy_alive().expect("the same Envoy throughout");
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    post(gw, Some(("x-api-key", key)), &chat("hi", 1))
        .await
        .status()
        .as_u16()
}
