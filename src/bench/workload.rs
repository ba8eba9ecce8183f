//! Deterministic request streams for the routing-quality suite: arrival times,
//! models, prompts and output lengths, all from a seed.
//!
//! Lengths follow log-normal distributions shaped like ShareGPT conversations
//! (prompts: median ~180 tokens, long tail to 2000; outputs: median ~48 tokens),
//! scaled down in output length so that 8 simulated replicas saturate at a few
//! requests per second (see BENCHMARKS.md). Prompts are words (`w123`): the
//! simulator counts one token per word.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Independent conversations, ShareGPT-like lengths, Poisson arrivals.
    Sharegpt,
    /// Many users over a few long system prompts (RAG / agents): prefix reuse.
    SharedPrefix,
    /// Requests spread over more LoRA adapters than a replica can hold at once.
    LoraMix,
    /// ShareGPT lengths, arrivals in on/off bursts with the same mean rate.
    Bursty,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Sharegpt,
        Kind::SharedPrefix,
        Kind::LoraMix,
        Kind::Bursty,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sharegpt => "sharegpt",
            Kind::SharedPrefix => "shared-prefix",
            Kind::LoraMix => "lora-mix",
            Kind::Bursty => "bursty",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Shape parameters shared by the generator and the capacity estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub kind: Kind,
    pub base_model: String,
    /// LoRA adapters requests are spread over (LoRA mix only).
    pub adapters: usize,
    /// Distinct system prompts (shared prefix only).
    pub system_prompts: usize,
    /// Words per system prompt.
    pub system_prompt_words: usize,
    /// Bursts: `on_s` seconds at `rate × period/on`, then silence, per `period_s`.
    pub burst_on_s: f64,
    pub burst_period_s: f64,
}

impl Spec {
    pub fn new(kind: Kind) -> Spec {
        Spec {
            kind,
            base_model: "base".into(),
            adapters: 16,
            system_prompts: 16,
            system_prompt_words: 1500,
            burst_on_s: 2.0,
            burst_period_s: 5.0,
        }
    }

    pub fn adapter_names(&self) -> Vec<String> {
        (0..self.adapters).map(|i| format!("lora-{i:02}")).collect()
    }

    /// Mean prompt and output tokens (for the capacity estimate).
    pub fn mean_lengths(&self) -> (f64, f64) {
        match self.kind {
            Kind::SharedPrefix => (self.system_prompt_words as f64 + 50.0, 40.0),
            _ => (
                lognormal_mean(PROMPT_MEDIAN, PROMPT_SIGMA),
                lognormal_mean(OUTPUT_MEDIAN, OUTPUT_SIGMA),
            ),
        }
    }
}

const PROMPT_MEDIAN: f64 = 180.0;
const PROMPT_SIGMA: f64 = 0.9;
const OUTPUT_MEDIAN: f64 = 48.0;
const OUTPUT_SIGMA: f64 = 0.7;

fn lognormal_mean(median: f64, sigma: f64) -> f64 {
    median * (sigma * sigma / 2.0).exp()
}

/// One request to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    /// Send time, from the start of the run.
    pub at_ms: f64,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
}

/// Standard normal by Box–Muller.
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn lognormal(rng: &mut fastrand::Rng, median: f64, sigma: f64, lo: f64, hi: f64) -> f64 {
    (median * (sigma * normal(rng)).exp()).clamp(lo, hi)
}

fn words(rng: &mut fastrand::Rng, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push('w');
        s.push_str(&rng.u32(0..5000).to_string());
    }
    s
}

/// Exponential inter-arrival gap for `rate` per second, in ms.
fn gap_ms(rng: &mut fastrand::Rng, rate: f64) -> f64 {
    -(1.0 - rng.f64()).ln() / rate * 1000.0
}

/// The request stream: `rate` requests/s on average for `duration_s`, from `seed`.
/// Bounded: at most `rate × duration × 4 + 16` requests.
pub fn generate(spec: &Spec, rate: f64, duration_s: f64, seed: u64) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Fixed content per seed: system prompts do not depend on the rate.
    let mut content = fastrand::Rng::with_seed(seed ^ 0x5eed_cafe);
    let systems: Vec<String> = match spec.kind {
        Kind::SharedPrefix => (0..spec.system_prompts)
            .map(|_| words(&mut content, spec.system_prompt_words))
            .collect(),
        _ => Vec::new(),
    };
    let adapters = spec.adapter_names();
    let end_ms = duration_s * 1000.0;
    let cap = (rate * duration_s * 4.0) as usize + 16;
    let mut out = Vec::new();
    let mut t = 0.0;
    if rate <= 0.0 {
        return out;
    }
    while out.len() < cap {
        t += match spec.kind {
            // Poisson at the burst rate, but only inside the "on" part of each period.
            Kind::Bursty => {
                let on_rate = rate * spec.burst_period_s / spec.burst_on_s;
                let mut next = t + gap_ms(&mut rng, on_rate);
                let period = spec.burst_period_s * 1000.0;
                let on = spec.burst_on_s * 1000.0;
                if next % period >= on {
                    next = (next / period).floor() * period + period;
                }
                next - t
            }
            _ => gap_ms(&mut rng, rate),
        };
        if t >= end_ms {
            break;
        }
        let (model, prompt, max_tokens) = match spec.kind {
            Kind::SharedPrefix => {
                let sys = &systems[rng.usize(0..systems.len())];
                let q = lognormal(&mut rng, 40.0, 0.5, 5.0, 200.0) as usize;
                let out = lognormal(&mut rng, 36.0, 0.5, 4.0, 200.0) as u32;
                (
                    spec.base_model.clone(),
                    format!("{sys} user: {}", words(&mut rng, q)),
                    out,
                )
            }
            _ => {
                let p = lognormal(&mut rng, PROMPT_MEDIAN, PROMPT_SIGMA, 4.0, 2000.0) as usize;
                let o = lognormal(&mut rng, OUTPUT_MEDIAN, OUTPUT_SIGMA, 4.0, 300.0) as u32;
                let model = if spec.kind == Kind::LoraMix {
                    adapters[rng.usize(0..adapters.len())].clone()
                } else {
                    spec.base_model.clone()
                };
                (model, words(&mut rng, p), o)
            }
        };
        out.push(Planned {
            at_ms: t,
            model,
            prompt,
            max_tokens,
        });
    }
    out
}

/// The simulator's cost model (docs/simulator.md), for the capacity estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub per_token_ms: f64,
    pub prefill_ms_per_token: f64,
    pub decode_ms_per_seq: f64,
    pub max_num_seqs: f64,
    pub replicas: f64,
}

/// Requests/s the replicas sustain with full batches when every prompt token is
/// prefilled (no cache hits: what round robin gets on these workloads). A
/// prefill stalls the whole batch, so it costs the replica its full time; decode
/// steps are shared by the batch.
pub fn estimated_capacity(spec: &Spec, c: &Costs) -> f64 {
    let (prompt, output) = spec.mean_lengths();
    let step = c.per_token_ms + c.decode_ms_per_seq * (c.max_num_seqs - 1.0);
    let per_request_ms = prompt * c.prefill_ms_per_token + output * step / c.max_num_seqs;
    c.replicas * 1000.0 / per_request_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_rate_shaped() {
        let spec = Spec::new(Kind::Sharegpt);
        let a = generate(&spec, 10.0, 60.0, 7);
        let b = generate(&spec, 10.0, 60.0, 7);
        assert_eq!(a, b);
        assert!((450..750).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(a.iter().all(|p| p.at_ms < 60_000.0 && p.max_tokens >= 4));
        let median_words = {
            let mut w: Vec<usize> = a.iter().map(|p| p.prompt.split(' ').count()).collect();
            w.sort();
            w[w.len() / 2]
        };
        assert!((120..260).contains(&median_words), "{median_words}");
        assert_ne!(a, generate(&spec, 10.0, 60.0, 8));
        assert!(generate(&spec, 0.0, 10.0, 1).is_empty());
    }

    #[test]
    fn shared_prefixes_and_adapters() {
        let spec = Spec::new(Kind::SharedPrefix);
        let r = generate(&spec, 5.0, 20.0, 1);
        let prefixes: std::collections::BTreeSet<&str> =
            r.iter().map(|p| &p.prompt[..200]).collect();
        assert!(prefixes.len() <= spec.system_prompts && prefixes.len() > 4);
        let spec = Spec::new(Kind::LoraMix);
        let r = generate(&spec, 20.0, 20.0, 1);
        let models: std::collections::BTreeSet<&str> = r.iter().map(|p| p.model.as_str()).collect();
        assert_eq!(models.len(), spec.adapters);
    }

    #[test]
    fn bursts_keep_the_mean_and_leave_gaps() {
        let spec = Spec::new(Kind::Bursty);
        let r = generate(&spec, 10.0, 100.0, 3);
        assert!((800..1200).contains(&r.len()), "{}", r.len());
        assert!(r.iter().all(|p| p.at_ms % 5000.0 < 2000.0));
    }

    #[test]
    fn capacity_follows_the_cost_model() {
        let c = Costs {
            per_token_ms: 40.0,
            prefill_ms_per_token: 0.4,
            decode_ms_per_seq: 0.8,
            max_num_seqs: 8.0,
            replicas: 8.0,
        };
        let sharegpt = estimated_capacity(&Spec::new(Kind::Sharegpt), &c);
        let prefix = estimated_capacity(&Spec::new(Kind::SharedPrefix), &c);
        assert!(sharegpt > 10.0 && sharegpt < 30.0, "{sharegpt}");
        assert!(prefix < sharegpt);
    }
}
