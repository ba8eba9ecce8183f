//! The cost of screening streamed responses (`bench safety-stream`): what a client
//! sees of a streamed chat completion with no response check, with `detect` and
//! with `hold` (the default), against a safety service with a realistic latency.
//! Measured at the client: time to the first generated text, the gaps between
//! chunks that carry text, and the whole stream.

use super::report::{meta_block, RunMeta};
use super::stats::{quantile, sorted};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One streamed request as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct StreamTiming {
    /// Send to the first chunk carrying generated text.
    pub ttft_ms: f64,
    /// Between consecutive chunks carrying generated text.
    pub gaps_ms: Vec<f64>,
    pub total_ms: f64,
    /// Generated characters received.
    pub chars: usize,
    pub completed: bool,
}

/// Sends `body` to `url` and times the text chunks of the SSE stream.
pub async fn measure_stream(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<StreamTiming, String> {
    let start = Instant::now();
    let mut resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut t = StreamTiming::default();
    let mut last: Option<Instant> = None;
    let mut carry = String::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        let now = Instant::now();
        carry.push_str(&String::from_utf8_lossy(&chunk));
        let mut chars = 0;
        // Complete lines only; the rest waits for the next chunk.
        while let Some(nl) = carry.find('\n') {
            let line: String = carry.drain(..=nl).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                t.completed = true;
                continue;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
                if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                    chars += text.chars().count();
                }
            }
        }
        if chars > 0 {
            match last {
                None => t.ttft_ms = ms(now - start),
                Some(prev) => t.gaps_ms.push(ms(now - prev)),
            }
            last = Some(now);
            t.chars += chars;
        }
    }
    t.total_ms = ms(start.elapsed());
    Ok(t)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One variant's numbers over its requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// `none` (prompt check only), `detect`, `hold`.
    pub variant: String,
    pub requests: usize,
    pub failed: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub gap_p50_ms: f64,
    pub gap_p99_ms: f64,
    pub gap_max_ms: f64,
    pub total_p50_ms: f64,
    /// Chunks carrying text per request (bursts in hold mode mean fewer).
    pub text_chunks_mean: f64,
    pub chars_mean: f64,
    /// Response-check calls per request (from the filter's counter).
    pub response_checks_per_request: f64,
}

pub fn summarize(
    variant: &str,
    timings: &[StreamTiming],
    failed: usize,
    response_checks: u64,
) -> VariantResult {
    let n = timings.len().max(1) as f64;
    let ttft = sorted(timings.iter().map(|t| t.ttft_ms).collect());
    let gaps = sorted(timings.iter().flat_map(|t| t.gaps_ms.clone()).collect());
    let total = sorted(timings.iter().map(|t| t.total_ms).collect());
    let q = |v: &[f64], p: f64| quantile(v, p).unwrap_or(f64::NAN);
    VariantResult {
        variant: variant.into(),
        requests: timings.len(),
        failed,
        ttft_p50_ms: q(&ttft, 0.5),
        ttft_p90_ms: q(&ttft, 0.9),
        gap_p50_ms: q(&gaps, 0.5),
        gap_p99_ms: q(&gaps, 0.99),
        gap_max_ms: gaps.last().copied().unwrap_or(f64::NAN),
        total_p50_ms: q(&total, 0.5),
        text_chunks_mean: timings.iter().map(|t| t.gaps_ms.len() + 1).sum::<usize>() as f64 / n,
        chars_mean: timings.iter().map(|t| t.chars).sum::<usize>() as f64 / n,
        response_checks_per_request: response_checks as f64 / n,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafetyStreamResults {
    pub meta: RunMeta,
    /// The setup in words (token pace, safety latency, window settings).
    pub setup: String,
    pub variants: Vec<VariantResult>,
}

/// The BENCHMARKS.md section.
pub fn section(r: &SafetyStreamResults) -> String {
    let mut o = String::new();
    o.push_str(&meta_block(&r.meta));
    let _ = writeln!(o, "\n{}\n", r.setup);
    o.push_str(
        "| response check | requests (failed) | TTFT p50 / p90 | added TTFT p50 | text-chunk gap p50 / p99 / max | stream p50 | text chunks / request | checks / request |\n|---|---|---|---|---|---|---|---|\n",
    );
    let base = r
        .variants
        .iter()
        .find(|v| v.variant == "none")
        .map(|v| v.ttft_p50_ms);
    for v in &r.variants {
        let added = match base {
            Some(b) if v.variant != "none" => format!("{:+.0} ms", v.ttft_p50_ms - b),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} ({}) | {:.0} / {:.0} ms | {added} | {:.1} / {:.0} / {:.0} ms | {:.0} ms | {:.1} | {:.1} |",
            v.variant,
            v.requests,
            v.failed,
            v.ttft_p50_ms,
            v.ttft_p90_ms,
            v.gap_p50_ms,
            v.gap_p99_ms,
            v.gap_max_ms,
            v.total_p50_ms,
            v.text_chunks_mean,
            v.response_checks_per_request,
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_timings() {
        let t = |ttft: f64, gaps: &[f64]| StreamTiming {
            ttft_ms: ttft,
            gaps_ms: gaps.to_vec(),
            total_ms: ttft + gaps.iter().sum::<f64>(),
            chars: 10,
            completed: true,
        };
        let r = summarize("hold", &[t(100.0, &[1.0, 200.0]), t(300.0, &[2.0])], 0, 6);
        assert_eq!(r.requests, 2);
        assert_eq!(r.ttft_p50_ms, 100.0, "nearest rank");
        assert_eq!(r.gap_max_ms, 200.0);
        assert_eq!(r.text_chunks_mean, 2.5);
        assert_eq!(r.response_checks_per_request, 3.0);
    }
}
