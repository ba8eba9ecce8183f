//! A key's limits and its use, kept in shared data so every Envoy worker sees
//! the same counts: one entry per key (`igw.auth.<id>`), updated by
//! compare-and-swap, so admissions are exact across workers.
//!
//! Windows are fixed: the UTC minute (requests, tokens) and the UTC day (tokens).
//! A request is admitted only if, counting it, no limit is passed: one more
//! request in flight, one more request this minute, and its input-token estimate
//! (reserved now) within the minute's and the day's remaining tokens. When the
//! response ends, its real `usage` replaces the reservation (charged to the
//! windows current then). A request admitted near the edge may therefore end
//! above the budget by its output tokens (and by what the estimate missed); the
//! overshoot stays counted, so the key's next requests are refused until the
//! window turns.

use crate::inflight::{SharedStore, StoreError};
use crate::openai::ApiError;

/// A key's limits (each optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

impl Limits {
    pub fn is_limited(&self) -> bool {
        *self != Limits::default()
    }

    /// What one of `replicas` gateway replicas enforces: the limit divided by the
    /// replicas (rounded down, so together they never admit more than the limit),
    /// at least 1 (a limit below the replica count admits up to one per replica).
    pub fn share(&self, replicas: u32) -> Limits {
        let n = replicas.max(1);
        let div32 = |v: Option<u32>| v.map(|v| (v / n).max(1));
        let div64 = |v: Option<u64>| v.map(|v| (v / u64::from(n)).max(1));
        Limits {
            requests_per_minute: div32(self.requests_per_minute),
            concurrent_requests: div32(self.concurrent_requests),
            tokens_per_minute: div64(self.tokens_per_minute),
            tokens_per_day: div64(self.tokens_per_day),
        }
    }
}

/// A key's use in its current windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// The UTC minute (`unix_ms / 60 000`) the minute counters are for.
    pub minute: u64,
    pub requests: u32,
    pub concurrent: u32,
    pub tokens_minute: u64,
    /// The UTC day (`unix_ms / 86 400 000`) `tokens_day` is for.
    pub day: u64,
    pub tokens_day: u64,
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
const USAGE_BYTES: usize = 40;
/// Losing this many CAS races in a row: the entry is hopelessly contended.
const MAX_CAS_ATTEMPTS: usize = 1024;

impl Usage {
    fn decode(b: &[u8]) -> Usage {
        if b.len() != USAGE_BYTES {
            return Usage::default();
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Usage {
            minute: u64_at(0),
            requests: u32_at(8),
            concurrent: u32_at(12),
            tokens_minute: u64_at(16),
            day: u64_at(24),
            tokens_day: u64_at(32),
        }
    }

    fn encode(&self) -> [u8; USAGE_BYTES] {
        let mut b = [0u8; USAGE_BYTES];
        b[0..8].copy_from_slice(&self.minute.to_le_bytes());
        b[8..12].copy_from_slice(&self.requests.to_le_bytes());
        b[12..16].copy_from_slice(&self.concurrent.to_le_bytes());
        b[16..24].copy_from_slice(&self.tokens_minute.to_le_bytes());
        b[24..32].copy_from_slice(&self.day.to_le_bytes());
        b[32..40].copy_from_slice(&self.tokens_day.to_le_bytes());
        b
    }

    /// The same use with windows that ended by `now_ms` emptied.
    pub fn at(mut self, now_ms: u64) -> Usage {
        let (minute, day) = (now_ms / MINUTE_MS, now_ms / DAY_MS);
        if self.minute != minute {
            self.minute = minute;
            self.requests = 0;
            self.tokens_minute = 0;
        }
        if self.day != day {
            self.day = day;
            self.tokens_day = 0;
        }
        self
    }
}

/// The shared-data key of a key's use.
pub fn usage_key(id: &str) -> String {
    format!("igw.auth.{id}")
}

/// Creates the entry if it is missing (the root context does it for every key at
/// configuration, so updates can always compare-and-swap).
pub fn init(store: &dyn SharedStore, id: &str) -> Result<(), StoreError> {
    let key = usage_key(id);
    match store.get(&key) {
        (Some(_), _) => Ok(()),
        (None, _) => store.set(&key, &Usage::default().encode(), None),
    }
}

/// The key's use now (windows that ended are empty).
pub fn read(store: &dyn SharedStore, id: &str, now_ms: u64) -> Usage {
    let (b, _) = store.get(&usage_key(id));
    Usage::decode(b.as_deref().unwrap_or_default()).at(now_ms)
}

fn update<T>(
    store: &dyn SharedStore,
    id: &str,
    mut f: impl FnMut(&mut Usage) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let key = usage_key(id);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(&key);
        let Some(bytes) = bytes else {
            // Not created at configuration (a race with a reload): create it.
            let _ = init(store, id);
            continue;
        };
        let mut u = Usage::decode(&bytes);
        let out = f(&mut u)?;
        match store.set(&key, &u.encode(), cas) {
            Ok(()) => return Ok(out),
            Err(StoreError::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    // Never admit what could not be counted.
    Err(ApiError::new(
        503,
        "server_error",
        "rate_limit_state_unavailable",
        "The gateway could not update the API key's usage; try again.".into(),
    ))
}

/// What an admission reserved, to settle when the response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub reserved_tokens: u64,
    /// The key's use just after the admission (for the `x-ratelimit-*` headers).
    pub after: Usage,
    /// The limits it was admitted under (this replica's share), for the same
    /// headers: the replica count is not read again.
    pub limits: Limits,
}

/// Admits one request of key `id` with `estimate` input tokens, or the 429 it
/// gets (with `retry-after` and the `x-ratelimit-*` headers).
pub fn admit(
    store: &dyn SharedStore,
    id: &str,
    limits: &Limits,
    now_ms: u64,
    estimate: u64,
) -> Result<Admitted, ApiError> {
    update(store, id, |u| {
        *u = u.at(now_ms);
        if let Some(refusal) = refusal(id, limits, u, now_ms, estimate) {
            return Err(refusal);
        }
        u.requests = u.requests.saturating_add(1);
        u.concurrent = u.concurrent.saturating_add(1);
        u.tokens_minute = u.tokens_minute.saturating_add(estimate);
        u.tokens_day = u.tokens_day.saturating_add(estimate);
        Ok(Admitted {
            reserved_tokens: estimate,
            after: *u,
            limits: *limits,
        })
    })
}

/// The request is over: its slot is free, and `tokens` (its real usage, or the
/// estimate when the response had none) replace the reservation.
pub fn finish(store: &dyn SharedStore, id: &str, admitted: &Admitted, now_ms: u64, tokens: u64) {
    let _ = update(store, id, |u| {
        let before = *u;
        *u = u.at(now_ms);
        u.concurrent = u.concurrent.saturating_sub(1);
        // The reservation counts where it was made; if that window is gone, the
        // whole usage is charged to the current one.
        let same_minute = before.minute == admitted.after.minute && u.minute == before.minute;
        let same_day = before.day == admitted.after.day && u.day == before.day;
        let settle = |counter: &mut u64, same: bool| {
            if same {
                *counter = counter
                    .saturating_sub(admitted.reserved_tokens)
                    .saturating_add(tokens);
            } else {
                *counter = counter.saturating_add(tokens);
            }
        };
        settle(&mut u.tokens_minute, same_minute);
        settle(&mut u.tokens_day, same_day);
        Ok(())
    });
}

fn seconds_left(now_ms: u64, window_ms: u64) -> u64 {
    (window_ms - now_ms % window_ms).div_ceil(1000)
}

fn refusal(id: &str, l: &Limits, u: &Usage, now_ms: u64, estimate: u64) -> Option<ApiError> {
    let minute_left = seconds_left(now_ms, MINUTE_MS);
    let (kind, what, limit, used, retry) =
        if let Some(c) = l.concurrent_requests.filter(|&c| u.concurrent >= c) {
            (
                "requests",
                "concurrent requests",
                u64::from(c),
                u64::from(u.concurrent),
                1,
            )
        } else if let Some(r) = l.requests_per_minute.filter(|&r| u.requests >= r) {
            (
                "requests",
                "requests per minute",
                u64::from(r),
                u64::from(u.requests),
                minute_left,
            )
        } else if let Some(t) = l
            .tokens_per_minute
            .filter(|&t| u.tokens_minute.saturating_add(estimate) > t)
        {
            (
                "tokens",
                "tokens per minute",
                t,
                u.tokens_minute,
                minute_left,
            )
        } else if let Some(t) = l
            .tokens_per_day
            .filter(|&t| u.tokens_day.saturating_add(estimate) > t)
        {
            (
                "tokens",
                "tokens per day",
                t,
                u.tokens_day,
                seconds_left(now_ms, DAY_MS),
            )
        } else {
            return None;
        };
    let mut e = ApiError::new(
        429,
        kind,
        "rate_limit_exceeded",
        format!(
            "Rate limit reached for {what} of API key '{id}': limit {limit}, used {used}{}.",
            if kind == "tokens" {
                format!(", this request needs about {estimate}")
            } else {
                String::new()
            }
        ),
    );
    e.headers.push(("retry-after", retry.to_string()));
    e.headers.extend(headers(l, u, now_ms));
    Some(e)
}

/// OpenAI's `x-ratelimit-*` headers for the limits the key has: limit,
/// remaining and time to reset, for requests (per minute) and tokens (per
/// minute).
pub fn headers(l: &Limits, u: &Usage, now_ms: u64) -> Vec<(&'static str, String)> {
    let reset = format!("{}s", seconds_left(now_ms, MINUTE_MS));
    let mut out = Vec::new();
    if let Some(r) = l.requests_per_minute {
        out.push(("x-ratelimit-limit-requests", r.to_string()));
        out.push((
            "x-ratelimit-remaining-requests",
            r.saturating_sub(u.requests).to_string(),
        ));
        out.push(("x-ratelimit-reset-requests", reset.clone()));
    }
    if let Some(t) = l.tokens_per_minute {
        out.push(("x-ratelimit-limit-tokens", t.to_string()));
        out.push((
            "x-ratelimit-remaining-tokens",
            t.saturating_sub(u.tokens_minute).to_string(),
        ));
        out.push(("x-ratelimit-reset-tokens", reset));
    }
    out
}

/// The input-token estimate a request is admitted with: about four bytes of
/// prompt text per token (OpenAI's rule of thumb), at least 1.
pub fn estimate_tokens(prompt: &str) -> u64 {
    (prompt.len() as u64).div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;

    const T0: u64 = 1_700_000_020_000; // 40 s into a UTC minute

    fn limits(rpm: Option<u32>, conc: Option<u32>, tpm: Option<u64>, tpd: Option<u64>) -> Limits {
        Limits {
            requests_per_minute: rpm,
            concurrent_requests: conc,
            tokens_per_minute: tpm,
            tokens_per_day: tpd,
        }
    }

    fn header<'a>(e: &'a ApiError, name: &str) -> Option<&'a str> {
        e.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn requests_per_minute_admits_exactly_the_limit_per_window() {
        let s = MemoryStore::default();
        init(&s, "k").unwrap();
        let l = limits(Some(3), None, None, None);
        for _ in 0..3 {
            admit(&s, "k", &l, T0, 1).unwrap();
        }
        let e = admit(&s, "k", &l, T0 + 1_000, 1).unwrap_err();
        assert_eq!(
            (e.status, e.kind, e.code),
            (429, "requests", "rate_limit_exceeded")
        );
        assert_eq!(header(&e, "retry-after"), Some("19"));
        assert_eq!(header(&e, "x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(header(&e, "x-ratelimit-reset-requests"), Some("19s"));
        // The next minute starts empty.
        let a = admit(&s, "k", &l, T0 + 20_000, 1).unwrap();
        assert_eq!(a.after.requests, 1);
    }

    #[test]
    fn concurrency_is_a_slot_given_back_at_the_end() {
        let s = MemoryStore::default();
        init(&s, "k").unwrap();
        let l = limits(None, Some(2), None, None);
        let a = admit(&s, "k", &l, T0, 1).unwrap();
        admit(&s, "k", &l, T0, 1).unwrap();
        assert_eq!(admit(&s, "k", &l, T0, 1).unwrap_err().status, 429);
        finish(&s, "k", &a, T0, 5);
        admit(&s, "k", &l, T0, 1).unwrap();
        assert_eq!(read(&s, "k", T0).concurrent, 2);
    }

    #[test]
    fn tokens_reserve_the_estimate_then_charge_the_usage() {
        let s = MemoryStore::default();
        init(&s, "k").unwrap();
        let l = limits(None, None, Some(100), Some(1_000));
        let a = admit(&s, "k", &l, T0, 10).unwrap();
        assert_eq!(read(&s, "k", T0).tokens_minute, 10, "reserved");
        finish(&s, "k", &a, T0 + 500, 70);
        let u = read(&s, "k", T0 + 500);
        assert_eq!(
            (u.tokens_minute, u.tokens_day),
            (70, 70),
            "replaced by the usage"
        );
        // 30 left: an estimate of 31 is refused, 30 admitted; then over budget.
        let e = admit(&s, "k", &l, T0 + 600, 31).unwrap_err();
        assert_eq!(
            (e.kind, header(&e, "x-ratelimit-remaining-tokens")),
            ("tokens", Some("30"))
        );
        let a = admit(&s, "k", &l, T0 + 600, 30).unwrap();
        finish(&s, "k", &a, T0 + 700, 45); // ended above the budget: counted
        assert_eq!(read(&s, "k", T0 + 700).tokens_minute, 115);
        assert_eq!(admit(&s, "k", &l, T0 + 800, 1).unwrap_err().status, 429);
        // The next minute: served again; the day still remembers.
        let a = admit(&s, "k", &l, T0 + 20_000, 1).unwrap();
        assert_eq!(a.after.tokens_day, 116);
    }

    #[test]
    fn a_request_across_the_minute_charges_its_usage_to_the_new_window() {
        let s = MemoryStore::default();
        init(&s, "k").unwrap();
        let l = limits(None, None, Some(100), None);
        let a = admit(&s, "k", &l, T0, 10).unwrap();
        finish(&s, "k", &a, T0 + 25_000, 40);
        assert_eq!(read(&s, "k", T0 + 25_000).tokens_minute, 40);
    }

    #[test]
    fn a_day_limit_refuses_until_midnight_utc() {
        let s = MemoryStore::default();
        init(&s, "k").unwrap();
        let l = limits(None, None, None, Some(50));
        let a = admit(&s, "k", &l, T0, 5).unwrap();
        finish(&s, "k", &a, T0, 50);
        let e = admit(&s, "k", &l, T0 + 120_000, 1).unwrap_err();
        let retry: u64 = header(&e, "retry-after").unwrap().parse().unwrap();
        assert!(retry > 60 && retry <= 86_400, "{retry}");
        assert!(e.message.contains("tokens per day"), "{}", e.message);
    }

    #[test]
    fn shares_never_add_up_to_more_than_the_limit() {
        let l = limits(Some(10), Some(3), Some(1_001), None);
        assert_eq!(l.share(1), l);
        let two = l.share(2);
        assert_eq!(
            (
                two.requests_per_minute,
                two.concurrent_requests,
                two.tokens_per_minute
            ),
            (Some(5), Some(1), Some(500))
        );
        assert_eq!(l.share(0), l, "an unknown count is one replica");
        assert_eq!(
            limits(Some(1), None, None, None)
                .share(4)
                .requests_per_minute,
            Some(1)
        );
        assert!(!Limits::default().is_limited());
    }

    #[test]
    fn the_entry_survives_garbage_and_missing_keys() {
        let s = MemoryStore::default();
        s.set(&usage_key("k"), b"garbage", None).unwrap();
        let l = limits(Some(1), None, None, None);
        admit(&s, "k", &l, T0, 1).unwrap();
        // Never created: created on first use.
        admit(&s, "new", &l, T0, 1).unwrap();
        assert_eq!(read(&s, "new", T0).requests, 1);
    }

    #[test]
    fn estimates_are_a_quarter_of_the_bytes() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
