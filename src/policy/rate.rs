//! `maxRatePerEndpoint`: a token bucket per endpoint in shared data, so every
//! Envoy worker takes from the same bucket (docs/backend-policy.md).
//!
//! The bucket refills at `rate` tokens a second and holds at most `burst(rate)`
//! (a tenth of a second's worth, at least 1), so any one-second window admits at
//! most `rate + burst(rate)` requests: within 10 % (plus one) of the rate.
//! Stored as 16 bytes: the last refill (Unix ms) and the tokens in thousandths.

use crate::inflight::{SharedStore, StoreError};

/// Shared-data key prefix of an endpoint's bucket (`igw.rate.<key as hex>`).
pub const KEY_PREFIX: &str = "igw.rate.";
/// Thousandths of a token in one token.
const ONE: u64 = 1_000;
/// Bounded CAS retries, as for the in-flight table.
const MAX_CAS_ATTEMPTS: usize = 256;

/// Tokens the bucket holds at most.
pub fn burst(rate: u64) -> u64 {
    rate.div_ceil(10).max(1)
}

/// The bucket after `now_ms`, from its stored bytes (absent or malformed: full),
/// and whether one token could be taken.
pub fn take(stored: Option<&[u8]>, now_ms: u64, rate: u64) -> (bool, [u8; 16]) {
    let cap = burst(rate) * ONE;
    let (last, tokens) = match stored.filter(|b| b.len() == 16) {
        Some(b) => {
            let mut l = [0u8; 8];
            let mut t = [0u8; 8];
            l.copy_from_slice(&b[..8]);
            t.copy_from_slice(&b[8..]);
            (u64::from_le_bytes(l), u64::from_le_bytes(t))
        }
        None => (now_ms, cap),
    };
    // `rate` tokens a second are `rate` thousandths a millisecond. A clock that
    // went back refills nothing.
    let refilled = tokens
        .saturating_add(now_ms.saturating_sub(last).saturating_mul(rate))
        .min(cap);
    let (ok, left) = if rate > 0 && refilled >= ONE {
        (true, refilled - ONE)
    } else {
        (false, refilled)
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&now_ms.max(last).to_le_bytes());
    out[8..].copy_from_slice(&left.to_le_bytes());
    (ok, out)
}

/// Takes one token from the bucket of the endpoint with in-flight key `k`:
/// `Ok(false)` when it is empty. A bucket that does not exist yet is created
/// full; two workers creating it at the same moment can each take from a full
/// bucket once (the host's CAS guards only existing keys).
pub fn take_shared(
    store: &dyn SharedStore,
    k: u64,
    now_ms: u64,
    rate: u64,
) -> Result<bool, StoreError> {
    let key = format!("{KEY_PREFIX}{k:016x}");
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = store.get(&key);
        let (ok, next) = take(value.as_deref(), now_ms, rate);
        if !ok {
            return Ok(false);
        }
        match store.set(&key, &next, cas) {
            Ok(()) => return Ok(true),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;

    #[test]
    fn a_bucket_admits_the_rate_plus_its_burst_in_any_second() {
        let s = MemoryStore::default();
        let rate = 40;
        assert_eq!(burst(rate), 4);
        assert_eq!(burst(3), 1);
        // Requests every millisecond for 5 s: count admissions per sliding
        // one-second window.
        let mut admitted = Vec::new();
        for ms in 0..5_000u64 {
            if take_shared(&s, 7, 1_000_000 + ms, rate).unwrap() {
                admitted.push(ms);
            }
        }
        for (i, &start) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|&&t| t < start + 1_000)
                .count() as u64;
            assert!(in_window <= rate + burst(rate), "{in_window} at {start}");
        }
        let total = admitted.len() as u64;
        assert!(
            (5 * rate..=5 * rate + burst(rate)).contains(&total),
            "{total}"
        );
    }

    #[test]
    fn zero_rate_admits_nothing_and_garbage_reads_full() {
        let s = MemoryStore::default();
        assert!(!take_shared(&s, 1, 5, 0).unwrap());
        assert!(take(Some(b"junk"), 10, 5).0);
        // A clock that goes back neither panics nor refills.
        let (_, b) = take(None, 10_000, 1);
        let (ok, _) = take(Some(&b), 5_000, 1);
        assert!(!ok);
    }

    #[test]
    fn workers_share_one_bucket() {
        let s = MemoryStore::default();
        let admitted = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    sc.spawn(|| {
                        (0..200)
                            .filter(|_| take_shared(&s, 9, 1_000, 10).unwrap_or(false))
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
        });
        // The same instant: the burst of 1 only (created full by the first).
        assert!(admitted <= 4, "{admitted}");
        assert!(admitted >= 1);
    }
}
