//! The metrics snapshot the collector pushes into the filter: pools → endpoints →
//! metrics, labels and freshness. One module encodes and decodes it, for both sides.
//!
//! Wire format (documented in `docs/snapshot.md`):
//! `b"IGWS"` · format version (u16, little-endian) · [postcard] encoding of
//! [`Snapshot`]. Postcard is compact (varints, no field names) and fast to decode,
//! which matters because every Envoy worker decodes each new snapshot.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use serde::{Deserialize, Serialize};
use std::fmt;

pub const MAGIC: &[u8; 4] = b"IGWS";
/// Bump when the layout of [`Snapshot`] changes; decoders reject other versions.
pub const FORMAT_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Snapshot {
    /// Collector wall clock when the round finished (Unix ms).
    pub generated_at_ms: u64,
    /// Per-collector-process round counter, from 1.
    pub sequence: u64,
    /// Which collector instance produced it (random per process).
    pub collector: String,
    pub pools: Vec<PoolSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PoolSnapshot {
    pub name: String,
    pub endpoints: Vec<EndpointMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EndpointMetrics {
    /// `ip:port`, as written to `x-gateway-destination-endpoint`.
    pub address: String,
    /// The last scrape succeeded (and, for servers that report it, the server is up).
    pub healthy: bool,
    /// Last successful scrape (Unix ms); 0 when never scraped successfully.
    pub scraped_at_ms: u64,
    /// KV-cache utilization, 0..1.
    pub kv_cache_utilization: f32,
    /// Requests waiting in the server's queue.
    pub waiting: u32,
    /// Requests running (in the batch).
    pub running: u32,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    /// LoRA slots; 0 when the server reports none.
    pub max_lora: u32,
    /// Server type as configured in the collector (`vllm`, `sglang`, …).
    pub server_type: String,
    /// Discovery labels (cluster, region, zone, …), sorted by key.
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    BadMagic,
    UnsupportedVersion(u16),
    Malformed(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "snapshot is shorter than its header"),
            DecodeError::BadMagic => write!(f, "not a snapshot (bad magic)"),
            DecodeError::UnsupportedVersion(v) => write!(
                f,
                "snapshot format version {v} is not supported (expected {FORMAT_VERSION})"
            ),
            DecodeError::Malformed(e) => write!(f, "malformed snapshot: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 96 * self.endpoint_count());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // Serialising plain owned data into a Vec cannot fail.
        postcard::to_extend(self, out).unwrap_or_default()
    }

    /// Decodes a snapshot; trailing bytes are an error (a truncated or padded push
    /// must never be taken for a good one).
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
        if bytes.len() < 6 {
            return Err(DecodeError::TooShort);
        }
        if &bytes[..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let (snapshot, rest) = postcard::take_from_bytes::<Snapshot>(&bytes[6..])
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        Ok(snapshot)
    }

    pub fn endpoint_count(&self) -> usize {
        self.pools.iter().map(|p| p.endpoints.len()).sum()
    }

    /// Whether `self` is newer than `other`: later generation time, or the same time
    /// and a later round of the same collector.
    pub fn is_newer_than(&self, other: &Snapshot) -> bool {
        (self.generated_at_ms, self.sequence) > (other.generated_at_ms, other.sequence)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolSnapshot> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The collector has not pushed for longer than `stale_after_ms`.
    pub fn is_stale(&self, now_ms: u64, stale_after_ms: u64) -> bool {
        now_ms.saturating_sub(self.generated_at_ms) > stale_after_ms
    }

    /// `endpoint`'s metrics can be trusted: the snapshot is not stale and the
    /// endpoint was scraped successfully within `stale_after_ms`.
    pub fn endpoint_is_fresh(
        &self,
        endpoint: &EndpointMetrics,
        now_ms: u64,
        stale_after_ms: u64,
    ) -> bool {
        !self.is_stale(now_ms, stale_after_ms)
            && endpoint.scraped_at_ms != 0
            && now_ms.saturating_sub(endpoint.scraped_at_ms) <= stale_after_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Snapshot {
        Snapshot {
            generated_at_ms: 1_700_000_000_123,
            sequence: 42,
            collector: "c-1".into(),
            pools: vec![PoolSnapshot {
                name: "main".into(),
                endpoints: vec![
                    EndpointMetrics {
                        address: "127.0.0.1:8001".into(),
                        healthy: true,
                        scraped_at_ms: 1_700_000_000_100,
                        kv_cache_utilization: 0.25,
                        waiting: 3,
                        running: 7,
                        running_adapters: vec!["sql-lora".into()],
                        waiting_adapters: vec![],
                        max_lora: 4,
                        server_type: "vllm".into(),
                        labels: vec![("zone".into(), "a".into())],
                    },
                    EndpointMetrics {
                        address: "[::1]:8002".into(),
                        ..Default::default()
                    },
                ],
            }],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(&bytes[..4], MAGIC);
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        assert_eq!(
            Snapshot::decode(&Snapshot::default().encode()).unwrap(),
            Snapshot::default()
        );
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                Snapshot::decode(&bytes[..len]).is_err(),
                "accepted a {len}-byte prefix"
            );
        }
    }

    #[test]
    fn rejects_trailing_bytes_bad_magic_and_versions() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(
            Snapshot::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert_eq!(Snapshot::decode(&bytes), Err(DecodeError::BadMagic));
        let mut bytes = sample().encode();
        bytes[4] = 9;
        assert_eq!(
            Snapshot::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn junk_never_panics() {
        let mut rng = fastrand::Rng::with_seed(3);
        let good = sample().encode();
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..rng.usize(1..6) {
                let i = rng.usize(..b.len());
                b[i] = rng.u8(..);
            }
            let _ = Snapshot::decode(&b);
            let junk: Vec<u8> = (0..rng.usize(..200)).map(|_| rng.u8(..)).collect();
            let _ = Snapshot::decode(&[&good[..6], &junk[..]].concat());
        }
    }

    #[test]
    fn ordering() {
        let a = sample();
        let mut b = sample();
        b.sequence += 1;
        assert!(b.is_newer_than(&a));
        assert!(!a.is_newer_than(&b));
        assert!(!a.is_newer_than(&a));
        b.sequence = 1;
        b.generated_at_ms += 1;
        assert!(
            b.is_newer_than(&a),
            "a restarted collector with a later clock wins"
        );
    }

    #[test]
    fn freshness() {
        let s = sample();
        let t = s.generated_at_ms;
        assert!(!s.is_stale(t + 2_000, 2_000));
        assert!(s.is_stale(t + 2_001, 2_000));
        assert!(
            !s.is_stale(t - 50, 2_000),
            "a collector clock ahead is not stale"
        );
        let scraped = &s.pools[0].endpoints[0];
        let never = &s.pools[0].endpoints[1];
        assert!(s.endpoint_is_fresh(scraped, t + 100, 2_000));
        assert!(!s.endpoint_is_fresh(scraped, t + 5_000, 2_000));
        assert!(!s.endpoint_is_fresh(never, t, 2_000));
    }

    #[test]
    fn compact_enough() {
        let mut s = sample();
        let template = s.pools[0].endpoints[0].clone();
        s.pools[0].endpoints = (0..1000)
            .map(|i| EndpointMetrics {
                address: format!("10.0.{}.{}:8000", i / 250, i % 250),
                ..template.clone()
            })
            .collect();
        let len = s.encode().len();
        assert!(len < 80 * 1000, "1000 endpoints take {len} bytes");
    }
}
