//! Snapshot ingest on the control listener, as pure decisions: is this push
//! allowed, and does its body replace the snapshot we have? A push that fails any
//! check never touches the stored snapshot.

use crate::config::IngestConfig;
use crate::openai::ApiError;
use crate::snapshot::Snapshot;

/// Header of a snapshot push carrying how many gateway replicas the collector
/// feeds (each enforces its share of an API key's limits, `auth::quota`).
pub const REPLICAS_HEADER: &str = "x-gateway-replicas";
/// More replicas than this in the header is not believed.
pub const MAX_REPLICAS: u32 = 1024;

/// A push's `x-gateway-replicas` value: a count in `1..=MAX_REPLICAS`, else none
/// (the stored count is then left as it was).
pub fn parse_replicas(value: Option<&str>) -> Option<u32> {
    value
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| (1..=MAX_REPLICAS).contains(n))
}

pub const INGEST_PATH: &str = "/v1/snapshot";

/// Checks a push's headers: method, bearer token, declared size.
pub fn check_head(
    cfg: &IngestConfig,
    method: &str,
    authorization: Option<&str>,
    content_length: Option<&str>,
) -> Result<(), ApiError> {
    if !method.eq_ignore_ascii_case("POST") {
        return Err(ApiError::method_not_allowed(method, "POST"));
    }
    if !bearer_ok(authorization, &cfg.token) {
        return Err(unauthorized("push snapshots"));
    }
    if let Some(len) = content_length.and_then(|l| l.trim().parse::<usize>().ok()) {
        if len > cfg.max_snapshot_bytes {
            return Err(ApiError::body_too_large(cfg.max_snapshot_bytes));
        }
    }
    Ok(())
}

/// Whether an `authorization` header carries `Bearer <token>`.
pub fn bearer_ok(authorization: Option<&str>, token: &str) -> bool {
    crate::auth::bearer_token(authorization).is_some_and(|t| token_eq(t, token))
}

/// The 401 for a request without the right bearer token, to do `what`.
pub fn unauthorized(what: &str) -> ApiError {
    ApiError::new(
        401,
        "authentication_error",
        "invalid_token",
        format!("A valid bearer token is required to {what}."),
    )
    .with_header("www-authenticate", "Bearer")
}

/// Length-independent-time comparison, so the token cannot be guessed byte by
/// byte from response timings.
pub fn token_eq(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0 && !b.is_empty()
}

/// Decides whether `body` replaces `current` (the stored encoded snapshot).
/// Returns the decoded new snapshot.
pub fn accept(current: Option<&[u8]>, body: &[u8]) -> Result<Snapshot, ApiError> {
    let new = Snapshot::decode(body).map_err(|e| {
        ApiError::invalid_request("invalid_snapshot", format!("Snapshot rejected: {e}."))
    })?;
    // A KV utilization the scheduler cannot compare (NaN sorts above every score)
    // would steer traffic: refused, not skipped. Found by the `snapshot` fuzz target.
    for pool in &new.pools {
        for e in &pool.endpoints {
            if !(0.0..=1.0).contains(&e.kv_cache_utilization) {
                return Err(ApiError::invalid_request(
                    "invalid_snapshot",
                    format!(
                        "Snapshot rejected: pool '{}' endpoint '{}' has kv_cache_utilization {} (must be 0..1).",
                        pool.name, e.address, e.kv_cache_utilization
                    ),
                ));
            }
        }
    }
    if let Some(old) = current.and_then(|b| Snapshot::decode(b).ok()) {
        if !new.is_newer_than(&old) {
            return Err(ApiError::new(
                409,
                "invalid_request_error",
                "stale_snapshot",
                format!(
                    "Snapshot (generated at {} ms, round {}) is not newer than the stored one ({} ms, round {}).",
                    new.generated_at_ms, new.sequence, old.generated_at_ms, old.sequence
                ),
            ));
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> IngestConfig {
        IngestConfig {
            token: "s3cret".into(),
            max_snapshot_bytes: 100,
        }
    }

    #[test]
    fn the_bearer_scheme_in_any_case_and_nothing_else() {
        for ok in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER  s3cret ",
            " Bearer s3cret",
        ] {
            assert!(bearer_ok(Some(ok), "s3cret"), "{ok:?}");
        }
        for bad in [
            "Basic s3cret",
            "Bearers3cret",
            "Bearer",
            "Bearer s3cre",
            "s3cret",
            "",
        ] {
            assert!(!bearer_ok(Some(bad), "s3cret"), "{bad:?}");
        }
        assert!(!bearer_ok(None, "s3cret"));
    }

    #[test]
    fn snapshots_with_a_kv_utilization_out_of_range_are_refused() {
        use crate::snapshot::{EndpointMetrics, PoolSnapshot};
        let with_kv = |kv: f32| Snapshot {
            generated_at_ms: 1,
            sequence: 1,
            pools: vec![PoolSnapshot {
                name: "p".into(),
                endpoints: vec![EndpointMetrics {
                    address: "127.0.0.1:8000".into(),
                    kv_cache_utilization: kv,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        for kv in [f32::NAN, f32::INFINITY, -0.1, 1.5] {
            let e = accept(None, &with_kv(kv).encode()).unwrap_err();
            assert_eq!((e.status, e.code), (400, "invalid_snapshot"), "{kv}");
        }
        for kv in [0.0, 0.5, 1.0] {
            assert!(accept(None, &with_kv(kv).encode()).is_ok(), "{kv}");
        }
    }

    #[test]
    fn head_checks() {
        let c = cfg();
        assert!(check_head(&c, "POST", Some("Bearer s3cret"), Some("10")).is_ok());
        assert_eq!(
            check_head(&c, "GET", Some("Bearer s3cret"), None)
                .unwrap_err()
                .status,
            405
        );
        for auth in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Bearer "),
            Some("Bearer s3cret2"),
        ] {
            assert_eq!(
                check_head(&c, "POST", auth, None).unwrap_err().status,
                401,
                "{auth:?}"
            );
        }
        assert_eq!(
            check_head(&c, "POST", Some("Bearer s3cret"), Some("101"))
                .unwrap_err()
                .status,
            413
        );
    }

    #[test]
    fn empty_expected_token_matches_nothing() {
        assert!(!token_eq("", ""));
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abd", "abc"));
        assert!(!token_eq("ab", "abc"));
    }

    #[test]
    fn accepts_only_newer_good_snapshots() {
        let mut s = Snapshot {
            generated_at_ms: 10,
            sequence: 1,
            ..Default::default()
        };
        let first = s.encode();
        assert!(accept(None, &first).is_ok());
        assert!(
            accept(Some(b"corrupt"), &first).is_ok(),
            "a corrupt store is replaced"
        );
        assert_eq!(accept(Some(&first), &first).unwrap_err().status, 409);
        s.sequence = 2;
        assert!(accept(Some(&first), &s.encode()).is_ok());
        assert_eq!(
            accept(Some(&first), &first[..first.len() - 1])
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            accept(Some(&first), &[0u8; 1000]).unwrap_err().code,
            "invalid_snapshot"
        );
    }
}
