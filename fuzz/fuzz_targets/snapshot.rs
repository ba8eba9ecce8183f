//! Snapshot wire format and ingest: `snapshot::Snapshot::decode`,
//! `ingest::accept` (replace-if-newer against a stored snapshot) and
//! `ingest::check_head` (method, bearer token, declared length).
//!
//! Input: byte 0 picks the mode. Mode 0: the rest is a push body, decoded and
//! accepted against a fixed stored snapshot. Mode 1: a snapshot is built from
//! structure (`arbitrary`), encoded, optionally corrupted at one position or
//! truncated, and decoded. Mode 2: the rest feeds `check_head`.
//! Invariants: a decoded snapshot re-encodes to bytes that decode to the same
//! encoding; an intact encoding decodes; an accepted push is newer than the stored
//! one; `check_head` passes only a POST with exactly the configured token.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use fuzz_support::plant;
use inference_gateway::config::IngestConfig;
use inference_gateway::ingest::{accept, check_head};
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct ArbEndpoint {
    address: String,
    healthy: bool,
    scraped_at_ms: u64,
    kv_cache_utilization: f32,
    waiting: u32,
    running: u32,
    running_adapters: Vec<String>,
    waiting_adapters: Vec<String>,
    max_lora: u32,
    server_type: String,
    labels: Vec<(String, String)>,
}

#[derive(Arbitrary, Debug)]
struct ArbSnapshot {
    generated_at_ms: u64,
    sequence: u64,
    collector: String,
    pools: Vec<(String, Vec<ArbEndpoint>)>,
    /// Corruption: (position, xor) or a truncation length.
    flip: Option<(u16, u8)>,
    truncate: Option<u16>,
}

impl ArbSnapshot {
    fn build(self) -> Snapshot {
        Snapshot {
            generated_at_ms: self.generated_at_ms,
            sequence: self.sequence,
            collector: self.collector,
            pools: self
                .pools
                .into_iter()
                .map(|(name, eps)| PoolSnapshot {
                    name,
                    endpoints: eps
                        .into_iter()
                        .map(|e| EndpointMetrics {
                            address: e.address,
                            healthy: e.healthy,
                            scraped_at_ms: e.scraped_at_ms,
                            kv_cache_utilization: e.kv_cache_utilization,
                            waiting: e.waiting,
                            running: e.running,
                            running_adapters: e.running_adapters,
                            waiting_adapters: e.waiting_adapters,
                            max_lora: e.max_lora,
                            server_type: e.server_type,
                            labels: e.labels,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// What is stored when a push arrives: generated at 1_700_000_000_000 ms, round 42.
fn stored() -> Vec<u8> {
    Snapshot {
        generated_at_ms: 1_700_000_000_000,
        sequence: 42,
        collector: "c-1".into(),
        pools: vec![],
    }
    .encode()
}

/// Decoded snapshots re-encode stably (compared as bytes: a NaN is not equal to
/// itself, its encoding is).
fn check_roundtrip(s: &Snapshot) {
    let e = s.encode();
    let again = Snapshot::decode(&e).expect("an encoding decodes");
    assert_eq!(again.encode(), e);
}

fn deep(s: &Snapshot) -> bool {
    s.pools.len() >= 2
        && s.pools.iter().any(|p| {
            p.endpoints
                .iter()
                .any(|e| e.healthy && e.labels.len() >= 2 && e.waiting > 100)
        })
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = fuzz_support::split_first(data) else {
        return;
    };
    match mode % 3 {
        0 => {
            let decoded = Snapshot::decode(rest);
            if let Ok(s) = &decoded {
                check_roundtrip(s);
            }
            let current = stored();
            match accept(Some(&current), rest) {
                Ok(new) => {
                    assert_eq!(Some(&new), decoded.as_ref().ok());
                    let old = Snapshot::decode(&current).unwrap();
                    assert!(new.is_newer_than(&old));
                    plant("snapshot", || deep(&new));
                }
                Err(e) => assert!(e.status == 400 || e.status == 409, "{}", e.status),
            }
            // With nothing stored, anything that decodes is accepted unless a KV
            // utilization is outside 0..1 (NaN included: found by this target).
            let in_range = decoded.as_ref().is_ok_and(|s| {
                s.pools.iter().all(|p| {
                    p.endpoints
                        .iter()
                        .all(|e| (0.0..=1.0).contains(&e.kv_cache_utilization))
                })
            });
            assert_eq!(accept(None, rest).is_ok(), in_range);
        }
        1 => {
            let Ok(arb) = ArbSnapshot::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let (flip, truncate) = (arb.flip, arb.truncate);
            let s = arb.build();
            let mut bytes = s.encode();
            let decoded = Snapshot::decode(&bytes).expect("an intact encoding decodes");
            assert_eq!(decoded.encode(), bytes);
            if let Some(n) = truncate {
                let n = n as usize % (bytes.len() + 1);
                if n < bytes.len() {
                    bytes.truncate(n);
                    assert!(
                        Snapshot::decode(&bytes).is_err(),
                        "a truncated snapshot decoded"
                    );
                }
            }
            if let Some((at, x)) = flip {
                if !bytes.is_empty() {
                    let at = at as usize % bytes.len();
                    bytes[at] ^= x;
                }
            }
            if let Ok(d) = Snapshot::decode(&bytes) {
                check_roundtrip(&d);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let mut it = text.splitn(4, '\n');
            let (method, auth, len, token) = (
                it.next().unwrap_or(""),
                it.next(),
                it.next(),
                it.next().unwrap_or("s3cret-token"),
            );
            let cfg = IngestConfig {
                token: token.to_string(),
                max_snapshot_bytes: 1024,
            };
            if check_head(&cfg, method, auth, len).is_ok() {
                assert!(method.eq_ignore_ascii_case("POST"));
                // The header, trimmed, is "Bearer" in any case, one space, then
                // the token (surrounding whitespace allowed). Slicing at 7 found a
                // false crash on " Bearer t" before the header was trimmed here.
                let header = auth.unwrap().trim();
                let (scheme, presented) = header.split_at_checked(7).unwrap();
                assert!(scheme.eq_ignore_ascii_case("bearer "), "{header:?}");
                assert_eq!(presented.trim(), cfg.token);
                assert!(!cfg.token.is_empty());
            }
        }
    }
});
