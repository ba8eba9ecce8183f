//! The shipped observability assets under `envoy/observability/`: the alert rules
//! pass `promtool check rules`, the scrape configuration passes `promtool check
//! config`, the Grafana dashboard is JSON whose queries name only metrics the
//! gateway, the collector or the filter's Envoy counters export, and the HPA
//! scales on GIE's external pool metric.

use inference_gateway::collector::telemetry::Telemetry;
use inference_gateway::deploy::prometheus::{alert_rules_path, find_promtool};
use inference_gateway::deploy::repo_root;
use inference_gateway::observe::render::{render, GatewayState};
use inference_gateway::observe::request::{apply_finished, apply_routed, RequestObs};
use inference_gateway::observe::Series;
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::process::Command;

fn asset(name: &str) -> std::path::PathBuf {
    repo_root().join("envoy/observability").join(name)
}

fn promtool(args: &[&str]) -> Option<String> {
    let Some(tool) = find_promtool() else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED promtool {args:?}: no promtool (/usr/bin/promtool, $PROMTOOL or PATH); \
             install it with `apt-get install -y prometheus` ***\n"
        );
        return None;
    };
    let out = Command::new(tool)
        .args(args)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn promtool_checks_the_alert_rules() {
    let rules = alert_rules_path();
    if let Some(out) = promtool(&["check", "rules", &rules.to_string_lossy()]) {
        assert!(out.contains("SUCCESS: 4 rules found"), "{out}");
    }
}

#[test]
fn promtool_checks_the_scrape_config() {
    let config = asset("prometheus.yml");
    if let Some(out) = promtool(&["check", "config", &config.to_string_lossy()]) {
        assert!(
            out.contains("is valid prometheus config file syntax"),
            "{out}"
        );
    }
}

#[test]
fn alert_rules_are_the_gke_ones() {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(alert_rules_path()).unwrap()).unwrap();
    let names: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "HighInferenceRequestLatencyP99",
            "HighInferenceErrorRate",
            "HighInferencePoolAvgQueueSize",
            "HighInferencePoolAvgKVCacheUtilization"
        ]
    );
}

/// Every metric name the three sources export, from their own renderers.
fn exported_names() -> BTreeSet<String> {
    let mut s = Series::default();
    apply_routed(&mut s, "10.0.0.1:8000");
    apply_finished(
        &mut s,
        &RequestObs {
            started_ns: Some(0),
            labels: Some(("m".into(), "t".into())),
            error: Some("BadRequest"),
            ..Default::default()
        },
        1,
    );
    let gateway = render(
        &[("m".into(), "t".into(), Series::decode(Some(&s.encode())))],
        &GatewayState {
            snapshot_age_seconds: Some(1.0),
            snapshot_stale: Some(false),
            in_flight: vec![("10.0.0.1:8000".into(), 0)],
            ..Default::default()
        },
    );
    let snapshot = Snapshot {
        generated_at_ms: 1,
        sequence: 1,
        collector: "c".into(),
        pools: vec![PoolSnapshot {
            name: "p".into(),
            endpoints: vec![EndpointMetrics {
                address: "10.0.0.1:8000".into(),
                healthy: true,
                ..Default::default()
            }],
        }],
    };
    let collector = Telemetry::default().render(&snapshot);
    // The backend-policy gauges (control /metrics, the picker's /metrics).
    let cfg = inference_gateway::config::Config::from_json(
        br#"{"pools": [{"name": "p", "endpoints": []}], "models": [{"name": "m", "pool": "p"}],
             "backend_policies": [{"pool": "p", "default":
                {"max_in_flight_per_endpoint": 2, "max_rate_per_endpoint": 5}}]}"#,
    )
    .expect("a configuration with a backend policy");
    let policy = cfg.policy(0).expect("the policy");
    let policy_gauges = inference_gateway::policy::render_gauges(
        &inference_gateway::policy::endpoint_capacities([("p", policy)], &snapshot, 1, &|_| 0),
    );
    let mut names: BTreeSet<String> = format!("{gateway}\n{collector}\n{policy_gauges}")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    // The filter's Envoy counters (admin /stats/prometheus, labels from stats_tags).
    for c in [
        "inference_gateway_shed_total",
        "inference_gateway_safety_checks_total",
        "inference_gateway_safety_failures_total",
        "inference_gateway_safety_fail_open_total",
        "inference_gateway_safety_blocks_total",
        "inference_pool_spill_total",
        "inference_pool_capacity_refused_total",
    ] {
        names.insert(c.into());
    }
    names
}

#[test]
fn dashboard_queries_name_only_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(asset("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let known = exported_names();
    let name = regex::Regex::new(r"\b(inference_[a-z0-9_]+)\b").unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for m in name.captures_iter(expr) {
                assert!(
                    known.contains(&m[1]),
                    "panel '{}' names `{}`, which nobody exports",
                    panel["title"],
                    &m[1]
                );
                used.insert(m[1].to_string());
            }
        }
    }
    for must in [
        "inference_model_request_total",
        "inference_model_request_duration_seconds_bucket",
        "inference_model_request_error_total",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_endpoint_queue_size",
        "inference_gateway_endpoint_picks_total",
        "inference_pool_endpoint_in_flight_cap",
        "inference_pool_spill_total",
    ] {
        assert!(used.contains(must), "the dashboard shows {must}");
    }
}

#[test]
fn hpa_scales_on_the_external_pool_metric() {
    let text = std::fs::read_to_string(asset("hpa.yaml")).unwrap();
    let hpa: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(hpa["kind"].as_str(), Some("HorizontalPodAutoscaler"));
    let first = &hpa["spec"]["metrics"][0];
    assert_eq!(first["type"].as_str(), Some("External"));
    assert_eq!(
        first["external"]["metric"]["name"].as_str(),
        Some("inference_pool_average_kv_cache_utilization")
    );
    assert!(
        text.contains("externalRules:"),
        "the prometheus-adapter rule"
    );
}
