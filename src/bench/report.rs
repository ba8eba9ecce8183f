//! Result records of both suites (what the harness writes as JSON/CSV) and the
//! Markdown of BENCHMARKS.md rendered from them.

use super::machine::Machine;
use super::stats::{Quantiles, Spread};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// How and where a suite ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RunMeta {
    pub suite: String,
    pub command: String,
    pub machine: Machine,
    pub git_commit: String,
    pub started_utc: String,
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    pub duration_s: f64,
    pub quick: bool,
    pub notes: Vec<String>,
}

/// One repetition of one overhead configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OverheadRep {
    /// Constant-rate run: latency in ms (coordinated-omission corrected).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ok: u64,
    pub failed: u64,
    /// Closed-loop run at saturation.
    pub saturation_rps: f64,
    /// Envoy user+system CPU per request in the saturation run, µs.
    pub envoy_cpu_us: f64,
    /// The ext_proc picker's CPU per request, µs (0 for the variants without one).
    pub picker_cpu_us: f64,
}

/// The overhead suite's variants, in the order it runs and reports them.
pub const OVERHEAD_VARIANTS: [&str; 5] = ["plain", "floor", "filter", "ext_proc", "ext_proc_fd"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OverheadRow {
    /// One of [`OVERHEAD_VARIANTS`]: `plain` (Envoy's round robin), `floor` (the
    /// minimal body-based router in Wasm, `bench-floor-filter/`), `filter`,
    /// `ext_proc` (the `endpoint-picker`, BUFFERED request bodies) or `ext_proc_fd`
    /// (the same picker in FULL_DUPLEX_STREAMED, as the Endpoint Picker Protocol
    /// wires it).
    pub variant: String,
    /// Endpoints in the pool and snapshot (0 for plain and floor: they route over
    /// the two live simulators and have no pool or snapshot).
    pub endpoints: usize,
    pub body_bytes: usize,
    pub rate_rps: f64,
    pub reps: Vec<OverheadRep>,
}

impl OverheadRow {
    pub fn spread(&self, f: impl Fn(&OverheadRep) -> f64) -> Spread {
        let v: Vec<f64> = self.reps.iter().map(f).collect();
        Spread::of(&v).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OverheadResults {
    pub meta: RunMeta,
    pub load_generator: String,
    pub rows: Vec<OverheadRow>,
}

/// One measured point of the routing suite (one repetition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RoutingPoint {
    pub workload: String,
    pub policy: String,
    /// Offered load as a fraction of the estimated round-robin capacity.
    pub load: f64,
    pub rate_rps: f64,
    pub rep: u32,
    /// Requests sent after the warm-up (the measured ones).
    pub measured: u64,
    pub ok: u64,
    pub shed_429: u64,
    pub failed: u64,
    pub ttft_ms: Quantiles,
    pub e2e_ms: Quantiles,
    pub output_tokens_per_s: f64,
    /// Successful requests per second whose TTFT met the SLO.
    pub goodput_rps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RoutingResults {
    pub meta: RunMeta,
    pub slo_ttft_ms: f64,
    pub setup: Vec<String>,
    pub points: Vec<RoutingPoint>,
}

/// The repetitions of one (workload, policy, load), and the median of a figure.
pub fn group<'a>(
    points: &'a [RoutingPoint],
    workload: &str,
    policy: &str,
    load: f64,
) -> Vec<&'a RoutingPoint> {
    points
        .iter()
        .filter(|p| p.workload == workload && p.policy == policy && (p.load - load).abs() < 1e-9)
        .collect()
}

pub fn median_of(points: &[&RoutingPoint], f: impl Fn(&RoutingPoint) -> f64) -> Option<Spread> {
    let v: Vec<f64> = points.iter().map(|p| f(p)).collect();
    Spread::of(&v)
}

fn uniq<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn fmt_spread(s: Spread, digits: usize) -> String {
    if (s.max - s.min).abs() < f64::EPSILON {
        format!("{:.*}", digits, s.median)
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        )
    }
}

pub fn meta_block(m: &RunMeta) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "```sh\n{}\n```\n", m.command);
    let _ = writeln!(
        o,
        "- machine: {} cores, {}, {} GiB RAM, Linux {}",
        m.machine.cores, m.machine.cpu_model, m.machine.memory_gib, m.machine.kernel
    );
    let _ = writeln!(
        o,
        "- run: {} UTC, {:.0} s, commit `{}`{}",
        m.started_utc,
        m.duration_s,
        m.git_commit,
        if m.quick { ", **quick mode**" } else { "" }
    );
    let la = |l: [f64; 3]| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]);
    let _ = writeln!(
        o,
        "- load average (1/5/15 min): {} at start, {} at end",
        la(m.loadavg_start),
        la(m.loadavg_end)
    );
    for n in &m.notes {
        let _ = writeln!(o, "- {n}");
    }
    o
}

/// The overhead tables: latency and added latency over plain Envoy, throughput,
/// CPU per request and its multiple of plain Envoy's; then Envoy's CPU per
/// request of every variant side by side, per body size.
pub fn overhead_section(r: &OverheadResults) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", meta_block(&r.meta));
    let _ = writeln!(o, "Load generator: {}\n", r.load_generator);
    let plain = |body: usize| {
        r.rows
            .iter()
            .find(|x| x.variant == "plain" && x.body_bytes == body)
    };
    let _ = writeln!(
        o,
        "| variant | endpoints | body | rate | p50 ms | p99 ms | added p50 ms | added p99 ms | saturation req/s | Envoy CPU µs/req | Envoy CPU × plain | picker CPU µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.rows {
        let p50 = row.spread(|x| x.p50_ms);
        let p99 = row.spread(|x| x.p99_ms);
        let (a50, a99) = match plain(row.body_bytes).filter(|_| row.variant != "plain") {
            Some(base) => (
                format!("{:+.3}", p50.median - base.spread(|x| x.p50_ms).median),
                format!("{:+.3}", p99.median - base.spread(|x| x.p99_ms).median),
            ),
            None => ("–".into(), "–".into()),
        };
        let cpu_x = match envoy_cpu_x_plain(r, row) {
            Some(x) if row.variant != "plain" => format!("{x:.2}×"),
            _ => "–".into(),
        };
        let picker = row.spread(|x| x.picker_cpu_us);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.variant,
            endpoints_cell(row),
            human_bytes(row.body_bytes),
            row.rate_rps,
            fmt_spread(p50, 3),
            fmt_spread(p99, 3),
            a50,
            a99,
            fmt_spread(row.spread(|x| x.saturation_rps), 0),
            fmt_spread(row.spread(|x| x.envoy_cpu_us), 0),
            cpu_x,
            if picker.max == 0.0 {
                "–".into()
            } else {
                fmt_spread(picker, 0)
            },
        );
    }
    o.push_str(&envoy_cpu_table(r));
    o
}

fn endpoints_cell(row: &OverheadRow) -> String {
    if row.endpoints == 0 {
        "–".to_string()
    } else {
        row.endpoints.to_string()
    }
}

/// Median Envoy CPU per request of `row` over plain Envoy's at the same body size.
pub fn envoy_cpu_x_plain(r: &OverheadResults, row: &OverheadRow) -> Option<f64> {
    let base = row_of(r, "plain", 0, row.body_bytes)?
        .spread(|x| x.envoy_cpu_us)
        .median;
    (base > 0.0).then(|| row.spread(|x| x.envoy_cpu_us).median / base)
}

/// Envoy's CPU per request side by side: one line per body size, one column per
/// (variant, endpoints) in [`OVERHEAD_VARIANTS`] order, each with its multiple of
/// plain Envoy's. Empty without a plain row.
fn envoy_cpu_table(r: &OverheadResults) -> String {
    let mut columns: Vec<(&str, usize)> = Vec::new();
    for variant in OVERHEAD_VARIANTS.iter().filter(|v| **v != "plain") {
        let mut ns = uniq(
            r.rows
                .iter()
                .filter(|x| x.variant == *variant)
                .map(|x| x.endpoints),
        );
        ns.sort_unstable();
        columns.extend(ns.into_iter().map(|n| (*variant, n)));
    }
    let bodies = uniq(
        r.rows
            .iter()
            .filter(|x| x.variant == "plain")
            .map(|x| x.body_bytes),
    );
    if bodies.is_empty() || columns.is_empty() {
        return String::new();
    }
    let mut o = String::from(
        "\nEnvoy CPU per request side by side, µs (× plain Envoy's), medians: `filter` minus \
         `floor` is the filter's own work; for ext_proc, Envoy's side only (the picker's CPU is \
         its own column above).",
    );
    if !r.rows.iter().any(|x| x.variant == "floor") {
        o.push_str(" These results have no `floor`: they predate it.");
    }
    o.push_str("\n\n| body | plain |");
    for (v, n) in &columns {
        match n {
            0 => {
                let _ = write!(o, " {v} |");
            }
            n => {
                let _ = write!(o, " {v} {n} |");
            }
        }
    }
    let _ = writeln!(o, "\n|---|{}", "---:|".repeat(columns.len() + 1));
    for body in bodies {
        let Some(base) = row_of(r, "plain", 0, body) else {
            continue;
        };
        let _ = write!(
            o,
            "| {} | {:.0} |",
            human_bytes(body),
            base.spread(|x| x.envoy_cpu_us).median
        );
        for (v, n) in &columns {
            let cell = row_of(r, v, *n, body).map(|row| {
                let us = row.spread(|x| x.envoy_cpu_us).median;
                match envoy_cpu_x_plain(r, row) {
                    Some(x) => format!("{us:.0} ({x:.2}×)"),
                    None => format!("{us:.0}"),
                }
            });
            let _ = write!(o, " {} |", cell.unwrap_or_else(|| "–".into()));
        }
        o.push('\n');
    }
    o
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn human_bytes(b: usize) -> String {
    if b >= 1024 && b.is_multiple_of(1024) {
        format!("{} KB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// Per workload: one table over policies × loads.
pub fn routing_section(r: &RoutingResults) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", meta_block(&r.meta));
    for s in &r.setup {
        let _ = writeln!(o, "- {s}");
    }
    let _ = writeln!(o);
    for w in uniq(r.points.iter().map(|p| p.workload.clone())) {
        let _ = writeln!(o, "#### {w}\n");
        let _ = writeln!(
            o,
            "| policy | load | req/s | reps | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | E2E p50 ms | E2E p90 ms | output tok/s | goodput req/s (TTFT < {:.0} ms) | 429 | failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            r.slo_ttft_ms
        );
        let loads = {
            let mut l = uniq(r.points.iter().filter(|p| p.workload == w).map(|p| p.load));
            l.sort_by(f64::total_cmp);
            l
        };
        let policies = uniq(
            r.points
                .iter()
                .filter(|p| p.workload == w)
                .map(|p| p.policy.clone()),
        );
        for load in loads {
            for pol in &policies {
                let g = group(&r.points, &w, pol, load);
                if g.is_empty() {
                    continue;
                }
                let m = |f: &dyn Fn(&RoutingPoint) -> f64, d| {
                    median_of(&g, f)
                        .map(|s| fmt_spread(s, d))
                        .unwrap_or_default()
                };
                let _ = writeln!(
                    o,
                    "| {pol} | {load:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    g[0].rate_rps,
                    g.len(),
                    m(&|p| p.ttft_ms.p50, 0),
                    m(&|p| p.ttft_ms.p90, 0),
                    m(&|p| p.ttft_ms.p99, 0),
                    m(&|p| p.e2e_ms.p50, 0),
                    m(&|p| p.e2e_ms.p90, 0),
                    m(&|p| p.output_tokens_per_s, 0),
                    m(&|p| p.goodput_rps, 2),
                    m(&|p| p.shed_429 as f64, 0),
                    m(&|p| p.failed as f64, 0),
                );
            }
        }
        let _ = writeln!(o);
    }
    o
}

/// Ratio of round robin's p90 TTFT to `policy`'s (medians over repetitions) at `load`.
pub fn p90_ttft_ratio(
    r: &RoutingResults,
    workload: &str,
    baseline: &str,
    policy: &str,
    load: f64,
) -> Option<f64> {
    let b = median_of(&group(&r.points, workload, baseline, load), |p| {
        p.ttft_ms.p90
    })?;
    let x = median_of(&group(&r.points, workload, policy, load), |p| p.ttft_ms.p90)?;
    (x.median > 0.0).then(|| b.median / x.median)
}

/// CSV of the routing points (one line per repetition).
pub fn routing_csv(r: &RoutingResults) -> String {
    let mut o = String::from("workload,policy,load,rate_rps,rep,measured,ok,shed_429,failed,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,output_tokens_per_s,goodput_rps\n");
    for p in &r.points {
        let _ = writeln!(
            o,
            "{},{},{},{:.3},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.3}",
            p.workload,
            p.policy,
            p.load,
            p.rate_rps,
            p.rep,
            p.measured,
            p.ok,
            p.shed_429,
            p.failed,
            p.ttft_ms.p50,
            p.ttft_ms.p90,
            p.ttft_ms.p99,
            p.e2e_ms.p50,
            p.e2e_ms.p90,
            p.e2e_ms.p99,
            p.output_tokens_per_s,
            p.goodput_rps
        );
    }
    o
}

/// CSV of the overhead repetitions. `envoy_cpu_x_plain`: the repetition's Envoy
/// CPU per request over plain Envoy's median at the same body size (empty without
/// a plain row).
pub fn overhead_csv(r: &OverheadResults) -> String {
    let mut o = String::from("variant,endpoints,body_bytes,rate_rps,rep,p50_ms,p99_ms,ok,failed,saturation_rps,envoy_cpu_us_per_req,envoy_cpu_x_plain,picker_cpu_us_per_req\n");
    for row in &r.rows {
        let base = row_of(r, "plain", 0, row.body_bytes)
            .map(|p| p.spread(|x| x.envoy_cpu_us).median)
            .filter(|b| *b > 0.0);
        for (i, x) in row.reps.iter().enumerate() {
            let _ = writeln!(
                o,
                "{},{},{},{},{},{:.4},{:.4},{},{},{:.1},{:.1},{},{:.1}",
                row.variant,
                row.endpoints,
                row.body_bytes,
                row.rate_rps,
                i,
                x.p50_ms,
                x.p99_ms,
                x.ok,
                x.failed,
                x.saturation_rps,
                x.envoy_cpu_us,
                base.map(|b| format!("{:.3}", x.envoy_cpu_us / b))
                    .unwrap_or_default(),
                x.picker_cpu_us
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(148_414_641), "148,414,641");
    }

    fn rep(p50: f64, p99: f64) -> OverheadRep {
        OverheadRep {
            p50_ms: p50,
            p99_ms: p99,
            ok: 10,
            saturation_rps: 1000.0,
            envoy_cpu_us: 100.0,
            ..Default::default()
        }
    }

    #[test]
    fn overhead_table_subtracts_plain() {
        let r = OverheadResults {
            rows: vec![
                OverheadRow {
                    variant: "plain".into(),
                    body_bytes: 1024,
                    rate_rps: 200.0,
                    reps: vec![rep(0.5, 1.0), rep(0.6, 1.2), rep(0.4, 0.9)],
                    ..Default::default()
                },
                OverheadRow {
                    variant: "filter".into(),
                    endpoints: 100,
                    body_bytes: 1024,
                    rate_rps: 200.0,
                    reps: vec![rep(0.6, 1.1)],
                },
            ],
            ..Default::default()
        };
        let md = overhead_section(&r);
        assert!(
            md.contains("| filter | 100 | 1 KB | 200 | 0.600 | 1.100 | +0.100 | +0.100 |"),
            "{md}"
        );
        assert!(md.contains("0.500 (0.400–0.600)"), "{md}");
        assert!(overhead_csv(&r).lines().count() == 5);
    }

    fn cpu_row(variant: &str, endpoints: usize, body: usize, cpu: &[f64]) -> OverheadRow {
        OverheadRow {
            variant: variant.into(),
            endpoints,
            body_bytes: body,
            rate_rps: 200.0,
            reps: cpu
                .iter()
                .map(|&c| OverheadRep {
                    envoy_cpu_us: c,
                    ..rep(1.0, 2.0)
                })
                .collect(),
        }
    }

    /// Issue 16's verdicts: CPU against the cheaper picker wiring, latency against
    /// the BUFFERED picker, the 1.3× ratio at 1 KB / 100 endpoints.
    #[test]
    fn cost_targets_are_judged_at_every_point() {
        let with =
            |variant: &str, n: usize, body: usize, cpu: f64, picker: f64, p50: f64| OverheadRow {
                reps: vec![OverheadRep {
                    envoy_cpu_us: cpu,
                    picker_cpu_us: picker,
                    ..rep(p50, p50 * 2.0)
                }],
                ..cpu_row(variant, n, body, &[])
            };
        let r = OverheadResults {
            rows: vec![
                with("plain", 0, 1024, 100.0, 0.0, 1.0),
                with("plain", 0, 16384, 100.0, 0.0, 1.0),
                with("filter", 100, 1024, 125.0, 0.0, 1.1),
                with("filter", 100, 16384, 200.0, 0.0, 1.3),
                with("ext_proc", 100, 1024, 120.0, 50.0, 1.4),
                with("ext_proc_fd", 100, 1024, 130.0, 60.0, 1.4),
                with("ext_proc", 100, 16384, 120.0, 60.0, 1.5),
                with("ext_proc_fd", 100, 16384, 110.0, 30.0, 1.5),
            ],
            ..Default::default()
        };
        let v = cost_verdicts(&r);
        assert_eq!(v[0].met, Some(true), "1.25× plain: {:?}", v[0]);
        assert_eq!(v[1].met, Some(false));
        assert!(
            v[1].measured
                .contains("misses 1 of 2 points: 100 endpoints 16 KB: 200 vs 140 µs"),
            "the cheaper wiring (fd) is the bar: {}",
            v[1].measured
        );
        // 16 KB: +0.3 vs +0.5 p50 (over half), +0.6 vs +1.0 p99 (over half).
        assert_eq!(v[2].met, Some(false));
        assert!(
            v[2].measured.starts_with("misses 2 of 4 percentiles"),
            "{}",
            v[2].measured
        );
    }

    #[test]
    fn envoy_cpu_is_a_multiple_of_plain_next_to_the_floor() {
        let r = OverheadResults {
            rows: vec![
                cpu_row("plain", 0, 1024, &[90.0, 100.0, 110.0]),
                cpu_row("floor", 0, 1024, &[150.0]),
                cpu_row("filter", 10, 1024, &[250.0]),
                cpu_row("filter", 100, 1024, &[300.0]),
                cpu_row("ext_proc", 10, 1024, &[200.0]),
                cpu_row("ext_proc_fd", 10, 1024, &[260.0]),
                cpu_row("filter", 10, 16384, &[400.0]), // no plain at 16 KB
            ],
            ..Default::default()
        };
        let md = overhead_section(&r);
        // Per row: the median over plain Envoy's median at the same body size.
        assert!(
            md.contains(
                "| floor | – | 1 KB | 200 | 1.000 | 2.000 | +0.000 | +0.000 | 1000 | 150 | 1.50× | – |"
            ),
            "{md}"
        );
        assert!(md.contains("| 1000 | 250 | 2.50× | – |"), "{md}");
        assert!(md.contains("| 1000 | 100 (90–110) | – | – |"), "{md}");
        assert!(md.contains("| 1000 | 400 | – | – |"), "{md}");
        // Side by side, in the suite's order: the filter and both picker wirings.
        assert!(
            md.contains(
                "| body | plain | floor | filter 10 | filter 100 | ext_proc 10 | ext_proc_fd 10 |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| 1 KB | 100 | 150 (1.50×) | 250 (2.50×) | 300 (3.00×) | 200 (2.00×) | 260 (2.60×) |\n"
            ),
            "{md}"
        );
        // No side-by-side line without a plain row to compare with.
        assert!(!md.contains("\n| 16 KB |"), "{md}");
        let csv = overhead_csv(&r);
        assert!(csv
            .lines()
            .next()
            .unwrap()
            .contains(",envoy_cpu_us_per_req,envoy_cpu_x_plain,picker_cpu_us_per_req"));
        assert!(
            csv.contains("\nfloor,0,1024,200,0,1.0000,2.0000,10,0,1000.0,150.0,1.500,0.0\n"),
            "{csv}"
        );
        assert!(
            csv.contains("\nplain,0,1024,200,2,1.0000,2.0000,10,0,1000.0,110.0,1.100,0.0\n"),
            "{csv}"
        );
        assert!(
            csv.contains("\nfilter,10,16384,200,0,1.0000,2.0000,10,0,1000.0,400.0,,0.0\n"),
            "{csv}"
        );
        // Results without a floor (older runs) still render, without its column.
        let old = OverheadResults {
            rows: vec![r.rows[0].clone(), r.rows[2].clone()],
            ..Default::default()
        };
        let md = overhead_section(&old);
        assert!(md.contains("| body | plain | filter 10 |\n"), "{md}");
        assert!(md.contains("These results have no `floor`"), "{md}");
    }

    #[test]
    fn routing_table_and_ratio() {
        let pt = |policy: &str, p90: f64| RoutingPoint {
            workload: "shared-prefix".into(),
            policy: policy.into(),
            load: 0.8,
            rate_rps: 8.0,
            ttft_ms: Quantiles {
                n: 10,
                p50: p90 / 2.0,
                p90,
                p99: p90 * 2.0,
                mean: p90,
            },
            ..Default::default()
        };
        let r = RoutingResults {
            slo_ttft_ms: 1000.0,
            points: vec![pt("round-robin", 900.0), pt("default", 300.0)],
            ..Default::default()
        };
        assert_eq!(
            p90_ttft_ratio(&r, "shared-prefix", "round-robin", "default", 0.8),
            Some(3.0)
        );
        assert_eq!(
            p90_ttft_ratio(&r, "lora-mix", "round-robin", "default", 0.8),
            None
        );
        let md = routing_section(&r);
        assert!(md.contains("#### shared-prefix"));
        assert!(
            md.contains("| default | 0.8 | 8.0 | 1 | 150 | 300 | 600 |"),
            "{md}"
        );
        assert_eq!(routing_csv(&r).lines().count(), 3);
    }
}

/// A target and whether the numbers meet it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn row_of<'a>(
    r: &'a OverheadResults,
    variant: &str,
    n: usize,
    body: usize,
) -> Option<&'a OverheadRow> {
    r.rows
        .iter()
        .find(|x| x.variant == variant && x.endpoints == n && x.body_bytes == body)
}

/// Added p99 over plain Envoy (medians over repetitions), ms.
pub fn added_p99(r: &OverheadResults, variant: &str, n: usize, body: usize) -> Option<f64> {
    let base = row_of(r, "plain", 0, body)?.spread(|x| x.p99_ms).median;
    Some(row_of(r, variant, n, body)?.spread(|x| x.p99_ms).median - base)
}

/// Added p50 and p99 over plain Envoy (medians over repetitions), ms.
fn added(r: &OverheadResults, variant: &str, n: usize, body: usize) -> Option<(f64, f64)> {
    let base = row_of(r, "plain", 0, body)?;
    let row = row_of(r, variant, n, body)?;
    let m = |row: &OverheadRow, f: fn(&OverheadRep) -> f64| row.spread(f).median;
    Some((
        m(row, |x| x.p50_ms) - m(base, |x| x.p50_ms),
        m(row, |x| x.p99_ms) - m(base, |x| x.p99_ms),
    ))
}

/// Issue 16's targets, over every (pool size, body) point the run has: the
/// filter's Envoy CPU below the ext_proc picker's (Envoy + picker, the cheaper of
/// its two wirings), and its added p50 and p99 at most half the BUFFERED
/// picker's; at 1 KB / 100 endpoints at most 1.3× plain Envoy's CPU.
fn cost_verdicts(r: &OverheadResults) -> Vec<Verdict> {
    let cpu = |row: &OverheadRow| row.spread(|x| x.envoy_cpu_us + x.picker_cpu_us).median;
    let points = uniq(
        r.rows
            .iter()
            .filter(|x| x.variant == "filter")
            .map(|x| (x.endpoints, x.body_bytes)),
    );
    let name = |(n, b): (usize, usize)| format!("{n} endpoints {}", human_bytes(b));
    let (mut cpu_misses, mut lat_misses, mut compared) = (Vec::new(), Vec::new(), 0);
    for &(n, b) in &points {
        let Some(filter) = row_of(r, "filter", n, b) else {
            continue;
        };
        let pickers: Vec<f64> = ["ext_proc", "ext_proc_fd"]
            .iter()
            .filter_map(|v| row_of(r, v, n, b).map(cpu))
            .collect();
        let Some(cheapest) = pickers.into_iter().reduce(f64::min) else {
            continue;
        };
        compared += 1;
        if cpu(filter) >= cheapest {
            cpu_misses.push(format!(
                "{}: {:.0} vs {cheapest:.0} µs",
                name((n, b)),
                cpu(filter)
            ));
        }
        if let (Some((f50, f99)), Some((e50, e99))) =
            (added(r, "filter", n, b), added(r, "ext_proc", n, b))
        {
            for (what, f, e) in [("p50", f50, e50), ("p99", f99, e99)] {
                if f > 0.5 * e.max(0.0) {
                    lat_misses.push(format!("{} {what}: {f:+.3} vs {e:+.3} ms", name((n, b))));
                }
            }
        }
    }
    let all = |misses: &[String], of: usize, what: &str| {
        if compared == 0 {
            "not measured".to_string()
        } else if misses.is_empty() {
            format!("all {of} {what}")
        } else {
            format!(
                "misses {} of {of} {what}: {}",
                misses.len(),
                misses.join("; ")
            )
        }
    };
    let ratio = row_of(r, "filter", 100, 1024).and_then(|row| envoy_cpu_x_plain(r, row));
    vec![
        Verdict {
            target: "filter's Envoy CPU at 1 KB / 100 endpoints at most 1.3× plain Envoy's".into(),
            measured: ratio
                .map(|x| format!("{x:.2}×"))
                .unwrap_or("not measured".into()),
            met: ratio.map(|x| x <= 1.3),
        },
        Verdict {
            target: "filter's CPU below the ext_proc picker's (Envoy + picker) at every body and pool size".into(),
            measured: all(&cpu_misses, compared, "points"),
            met: (compared > 0).then_some(cpu_misses.is_empty()),
        },
        Verdict {
            target: "filter's added p50 and p99 at most half the ext_proc picker's at every body and pool size".into(),
            measured: all(&lat_misses, 2 * compared, "percentiles"),
            met: (compared > 0).then_some(lat_misses.is_empty()),
        },
    ]
}

pub fn overhead_verdicts(r: &OverheadResults) -> Vec<Verdict> {
    let f = added_p99(r, "filter", 100, 1024);
    let e = added_p99(r, "ext_proc", 100, 1024);
    let mut verdicts = vec![
        Verdict {
            target: "filter adds ≤ 0.2 ms p99 at 1 KB / 100 endpoints".into(),
            measured: f
                .map(|v| format!("{v:+.3} ms"))
                .unwrap_or("not measured".into()),
            met: f.map(|v| v <= 0.2),
        },
        Verdict {
            target:
                "filter adds at least 5× less p99 than the ext_proc picker (1 KB / 100 endpoints)"
                    .into(),
            measured: match (f, e) {
                (Some(f), Some(e)) => format!("ext_proc {e:+.3} ms vs filter {f:+.3} ms"),
                _ => "not measured".into(),
            },
            met: match (f, e) {
                (Some(f), Some(e)) => Some(e >= 5.0 * f.max(0.0) && e > f),
                _ => None,
            },
        },
    ];
    verdicts.extend(cost_verdicts(r));
    verdicts
}

pub fn routing_verdicts(r: &RoutingResults) -> Vec<Verdict> {
    let mut v = Vec::new();
    for w in ["shared-prefix", "lora-mix"] {
        let ratio = p90_ttft_ratio(r, w, "envoy-round-robin", "gateway-default", 0.8);
        v.push(Verdict {
            target: format!("{w}, load 0.8: p90 TTFT at least 2× lower than round robin"),
            measured: ratio
                .map(|x| format!("{x:.2}× lower"))
                .unwrap_or("not measured".into()),
            met: ratio.map(|x| x >= 2.0),
        });
    }
    // "Never worse than least request": every workload and load, p90 TTFT.
    let mut worse = Vec::new();
    let mut compared = 0;
    let keys = uniq(
        r.points
            .iter()
            .map(|p| (p.workload.clone(), format!("{:.1}", p.load))),
    );
    for (w, l) in keys {
        let load: f64 = l.parse().unwrap_or(0.0);
        if let Some(x) = p90_ttft_ratio(r, &w, "envoy-least-request", "gateway-default", load) {
            compared += 1;
            if x < 1.0 {
                worse.push(format!("{w} at {l}: {:.2}× of least request's", 1.0 / x));
            }
        }
    }
    v.push(Verdict {
        target: "never worse than Envoy least request (p90 TTFT, every workload and load)".into(),
        measured: if worse.is_empty() {
            format!("not worse in {compared} of {compared} points")
        } else {
            format!(
                "worse in {} of {compared}: {}",
                worse.len(),
                worse.join("; ")
            )
        },
        met: (compared > 0).then_some(worse.is_empty()),
    });
    v
}

fn verdict_table(v: &[Verdict]) -> String {
    let mut o = String::from("| target | measured | met |\n|---|---|---|\n");
    for x in v {
        let met = match x.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(o, "| {} | {} | {met} |", x.target, x.measured);
    }
    o
}

/// A path for a link from the Markdown file at `md` to `file` in `dir`.
fn rel(md: &std::path::Path, dir: &std::path::Path, file: &str) -> String {
    let full = dir.join(file);
    md.parent()
        .and_then(|base| full.strip_prefix(base).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| full.to_string_lossy().into_owned())
}

/// The scheduler's own cost, natively (no Envoy, no Wasm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SchedulerRow {
    pub endpoints: usize,
    /// `scheduling::schedule` over N candidates, µs per call.
    pub schedule_us: f64,
    /// `extproc::Picker::route` (parse, plan, N in-flight reads, schedule,
    /// prefix index), 1 KB body, µs per call.
    pub picker_route_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SchedulerResults {
    pub meta: RunMeta,
    pub rows: Vec<SchedulerRow>,
}

pub fn scheduler_section(r: &SchedulerResults) -> String {
    let mut o = meta_block(&r.meta);
    o.push_str(
        "\n| endpoints | `schedule` µs/call | picker `route` µs/call (1 KB) |\n|---:|---:|---:|\n",
    );
    for x in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {:.1} | {:.1} |",
            x.endpoints, x.schedule_us, x.picker_route_us
        );
    }
    o
}

/// What the overhead suite's variants are, above its tables.
const OVERHEAD_VARIANTS_TEXT: &str = "Variants, in this order: **plain** (Envoy's own round \
robin over the two simulators, no filter), **floor** (a minimal proxy-wasm filter, \
`bench-floor-filter/`, in the filter's place with the same Envoy wiring: it holds the \
request headers, copies the whole body into the VM and sets \
`x-gateway-destination-endpoint` round robin over the two simulators, nothing else), \
**filter** (the inference-gateway filter, per pool size), **ext_proc** (the same \
scheduler out of process: the `endpoint-picker` over plain-text gRPC, Envoy's ext_proc with \
the headers and the BUFFERED body sent and responses skipped, per pool size) and \
**ext_proc_fd** (the same picker wired as the Endpoint Picker Protocol wires it: request and \
response bodies FULL_DUPLEX_STREAMED through the picker, response headers and trailers sent; \
plain-text gRPC, not TLS, per pool size). Results measured before `ext_proc_fd` existed ran \
`ext_proc` with the former `extproc-picker` binary (the same scheduler, its own BUFFERED-only \
ext_proc loop). The floor is the least any body-based \
router in Wasm costs Envoy: the filter's cost above it is the filter's own work (parsing, \
scheduling, metrics), the part optimising the filter can remove; the floor's cost above \
plain Envoy (holding the request, the body copy, the calls into the VM) is the price of \
routing on the body in Wasm at all.\n\n";

/// The whole BENCHMARKS.md.
pub fn document(
    overhead: Option<&OverheadResults>,
    scheduler: Option<&SchedulerResults>,
    routing: Option<&RoutingResults>,
    plots: &[String],
    dir: &std::path::Path,
    md: &std::path::Path,
) -> String {
    let mut o = String::from(
        "# Benchmarks\n\n\
GENERATED by `cargo run --release --features bench --bin bench -- report` from the results in \
`benches/results/` (the suites below write them, then render this file). How the harness works, \
what each variant is and what the numbers mean: [benches/README.md](benches/README.md).\n\n\
The claim: *GIE-grade routing without the sidecar hop*. The overhead suite measures the hop \
(the filter in Envoy against plain Envoy, against the floor any body-based router in Wasm pays, \
and against an ext_proc picker running the same scheduler out of process); the routing suite \
measures the routing (the filter's scheduler against Envoy's round robin and least request over \
simulated vLLM replicas).\n\n",
    );
    let mut verdicts = Vec::new();
    if let Some(r) = overhead {
        verdicts.extend(overhead_verdicts(r));
    }
    if let Some(r) = routing {
        verdicts.extend(routing_verdicts(r));
    }
    o.push_str("## Targets\n\n");
    o.push_str(&verdict_table(&verdicts));
    o.push('\n');
    let img = |o: &mut String, prefix: &str| {
        for p in plots.iter().filter(|p| p.starts_with(prefix)) {
            let _ = writeln!(o, "![{p}]({})\n", rel(md, dir, p));
        }
    };
    o.push_str("## Overhead: filter vs plain Envoy, the floor and an ext_proc picker\n\n");
    o.push_str(OVERHEAD_VARIANTS_TEXT);
    match overhead {
        Some(r) => {
            o.push_str(&overhead_section(r));
            o.push('\n');
            img(&mut o, "overhead");
        }
        None => o.push_str("Not run yet.\n\n"),
    }
    o.push_str("### The scheduler alone (native, in process)\n\n");
    match scheduler {
        Some(r) => {
            o.push_str(&scheduler_section(r));
            o.push('\n');
        }
        None => o.push_str("Not run yet.\n\n"),
    }
    o.push_str("## Routing quality: gateway scheduler vs Envoy round robin and least request\n\n");
    match routing {
        Some(r) => {
            o.push_str(&routing_section(r));
            img(&mut o, "routing");
        }
        None => o.push_str("Not run yet.\n\n"),
    }
    o
}
