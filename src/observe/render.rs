//! The Prometheus text exposition (format 0.0.4) of the shared-data metrics, as
//! the control listener serves it on `GET /metrics`.

use super::{Hist, Series};
use std::collections::BTreeMap;
use std::fmt::Write;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Gateway state rendered next to the request metrics.
#[derive(Debug, Clone, Default)]
pub struct GatewayState {
    /// Age of the stored metrics snapshot; `None` when none was pushed.
    pub snapshot_age_seconds: Option<f64>,
    pub snapshot_stale: Option<bool>,
    /// In-flight requests per endpoint, as the scheduler counts them.
    pub in_flight: Vec<(String, u64)>,
    /// The addresses the gateway knows (snapshot members, configured endpoints)
    /// by [`crate::inflight::key`], to name the pick counters.
    pub endpoint_names: std::collections::HashMap<u64, String>,
}

/// Escapes a label value (backslash, quote, newline).
pub fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(series: &[(String, String, Series)], state: &GatewayState) -> String {
    let mut out = String::with_capacity(2048 + series.len() * 4096);
    let labels =
        |m: &str, t: &str| format!("model_name=\"{}\",target_model_name=\"{}\"", esc(m), esc(t));

    head(
        &mut out,
        "inference_model_request_total",
        "counter",
        "Counter of inference model requests broken out for each model and target model.",
    );
    for (m, t, s) in series.iter().filter(|(m, _, _)| !m.is_empty()) {
        let _ = writeln!(
            out,
            "inference_model_request_total{{{}}} {}",
            labels(m, t),
            s.requests
        );
    }

    head(
        &mut out,
        "inference_model_request_error_total",
        "counter",
        "Counter of inference model requests errors broken out for each model and target model.",
    );
    for (m, t, s) in series {
        for (code, n) in &s.errors {
            let _ = writeln!(
                out,
                "inference_model_request_error_total{{{},error_code=\"{}\"}} {n}",
                labels(m, t),
                esc(code)
            );
        }
    }

    for kind in Hist::ALL {
        let name = kind.name();
        head(&mut out, name, "histogram", kind.help());
        for (m, t, s) in series {
            // Series of known models are rendered from zero, so that rate() sees
            // their first requests; the empty-label series only ever has errors.
            let Some(h) = s.hist(kind).filter(|h| h.count > 0 || !m.is_empty()) else {
                continue;
            };
            let l = labels(m, t);
            for (le, c) in kind.buckets().iter().zip(h.cumulative()) {
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {c}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{{l},le=\"+Inf\"}} {count}\n{name}_sum{{{l}}} {sum}\n{name}_count{{{l}}} {count}",
                count = h.count,
                sum = h.sum
            );
        }
    }

    head(
        &mut out,
        "inference_model_running_requests",
        "gauge",
        "Inference model number of running requests in each model.",
    );
    let mut running: BTreeMap<&str, u64> = BTreeMap::new();
    for (m, _, s) in series.iter().filter(|(m, _, _)| !m.is_empty()) {
        *running.entry(m).or_default() += s.running;
    }
    for (m, n) in running {
        let _ = writeln!(
            out,
            "inference_model_running_requests{{model_name=\"{}\"}} {n}",
            esc(m)
        );
    }

    head(
        &mut out,
        "inference_gateway_endpoint_picks_total",
        "counter",
        "Requests the gateway routed to each endpoint, by model and target model.",
    );
    for (m, t, s) in series {
        // An endpoint no longer known (it left) counts under "departed".
        let mut named: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, n) in s.picks() {
            let name = match state.endpoint_names.get(&key) {
                Some(a) => a.as_str(),
                None if key == super::OTHER_PICKS => "other",
                None => "departed",
            };
            *named.entry(name).or_default() += n;
        }
        for (endpoint, n) in named {
            let _ = writeln!(
                out,
                "inference_gateway_endpoint_picks_total{{{},endpoint=\"{}\"}} {n}",
                labels(m, t),
                esc(endpoint)
            );
        }
    }

    head(
        &mut out,
        "inference_gateway_endpoint_in_flight",
        "gauge",
        "Requests the gateway has in flight to each endpoint (all workers).",
    );
    for (endpoint, n) in &state.in_flight {
        let _ = writeln!(
            out,
            "inference_gateway_endpoint_in_flight{{endpoint=\"{}\"}} {n}",
            esc(endpoint)
        );
    }

    if let Some(age) = state.snapshot_age_seconds {
        head(
            &mut out,
            "inference_gateway_snapshot_age_seconds",
            "gauge",
            "Age of the model-server metrics snapshot the scheduler uses.",
        );
        let _ = writeln!(out, "inference_gateway_snapshot_age_seconds {age}");
    }
    if let Some(stale) = state.snapshot_stale {
        head(
            &mut out,
            "inference_gateway_snapshot_stale",
            "gauge",
            "1 when the snapshot is older than snapshot_stale_after_ms (scheduling ignores it).",
        );
        let _ = writeln!(out, "inference_gateway_snapshot_stale {}", u8::from(stale));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::request::{apply_finished, apply_routed, RequestObs};
    use std::collections::HashMap;

    /// A minimal text-format parser: `name{labels}` → value.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("value");
            out.insert(series.to_string(), value.parse::<f64>().expect("number"));
        }
        out
    }

    fn sample() -> Vec<(String, String, Series)> {
        let mut s = Series::default();
        apply_routed(&mut s, "10.0.0.1:8000");
        apply_routed(&mut s, "10.0.0.1:8000");
        let done = RequestObs {
            started_ns: Some(0),
            labels: Some(("food".into(), "food-v1".into())),
            request_bytes: 100,
            running: true,
            ..Default::default()
        };
        apply_finished(&mut s, &done, 300_000_000);
        let mut err = Series::default();
        err.add_error("BadRequest");
        vec![
            ("food".into(), "food-v1".into(), s),
            ("we\"ird\n".into(), "x".into(), Series::default()),
            (String::new(), String::new(), err),
        ]
    }

    #[test]
    fn renders_gie_names_labels_and_cumulative_buckets() {
        let text = render(
            &sample(),
            &GatewayState {
                snapshot_age_seconds: Some(0.25),
                snapshot_stale: Some(false),
                in_flight: vec![("10.0.0.1:8000".into(), 1)],
                endpoint_names: [("10.0.0.1:8000".to_string())]
                    .into_iter()
                    .map(|a| (crate::inflight::key(&a), a))
                    .collect(),
            },
        );
        let m = parse(&text);
        let l = r#"model_name="food",target_model_name="food-v1""#;
        assert_eq!(m[&format!("inference_model_request_total{{{l}}}")], 1.0);
        assert_eq!(
            m[&format!("inference_model_request_duration_seconds_bucket{{{l},le=\"0.2\"}}")],
            0.0
        );
        assert_eq!(
            m[&format!("inference_model_request_duration_seconds_bucket{{{l},le=\"0.4\"}}")],
            1.0
        );
        assert_eq!(
            m[&format!("inference_model_request_duration_seconds_bucket{{{l},le=\"+Inf\"}}")],
            1.0
        );
        assert!(
            (m[&format!("inference_model_request_duration_seconds_sum{{{l}}}")] - 0.3).abs() < 1e-9
        );
        assert_eq!(
            m[r#"inference_model_running_requests{model_name="food"}"#],
            1.0
        );
        assert_eq!(
            m[&format!("inference_gateway_endpoint_picks_total{{{l},endpoint=\"10.0.0.1:8000\"}}")],
            2.0
        );
        assert_eq!(
            m[r#"inference_model_request_error_total{model_name="",target_model_name="",error_code="BadRequest"}"#],
            1.0
        );
        assert_eq!(m["inference_gateway_snapshot_age_seconds"], 0.25);
        assert_eq!(m["inference_gateway_snapshot_stale"], 0.0);
        assert!(text.contains(r#"model_name="we\"ird\n""#), "{text}");
        assert!(text.contains("# TYPE inference_model_request_duration_seconds histogram"));
        // Known models' histograms start at zero; the empty-label series has only
        // errors (no request_total, no histograms).
        assert_eq!(
            m[&format!("inference_model_ttft_seconds_bucket{{{l},le=\"+Inf\"}}")],
            0.0
        );
        assert!(!text.contains(r#"inference_model_request_total{model_name="""#));
        assert!(!text.contains(r#"_bucket{model_name="""#));
    }
}
