//! One worker's request-metric updates, batched before they reach shared data.
//!
//! Written straight through, every request read and rewrote its series in shared
//! data twice (when routed, when finished): four host calls and about 5 KB copied
//! across the VM boundary per request, on a key every worker contends for. As
//! Envoy does with its own per-thread stats, a worker records into local deltas
//! instead and merges them into shared data ([`Pending::flush`]) when
//! [`Pending::due`] says so:
//! - when it has no other request open: one request at a time (tests, light
//!   traffic) is in shared data as soon as it is recorded, exactly as before;
//! - under load, when a request records [`FLUSH_INTERVAL_MS`] or more after the
//!   last merge, and on the root's tick of that period (the filter's glue): so
//!   `/metrics` lags by at most about that much, and the merge's cost is shared by
//!   every request of the interval;
//! - when it holds [`MAX_PENDING_SERIES`] series (clients can name many models)
//!   or [`MAX_PENDING_OBSERVATIONS`] histogram observations;
//!
//! Host-free: the filter passes its `SharedStore`.

use super::{update, Hist, Record, RegisterError};
use crate::inflight::SharedStore;

/// Longest a worker under load keeps updates to itself.
pub const FLUSH_INTERVAL_MS: u64 = 100;
/// Most series with updates waiting; one more is merged at once.
pub const MAX_PENDING_SERIES: usize = 64;

/// Updates not yet in shared data, each kept as cheaply as it is merged.
#[derive(Debug, Default)]
pub struct Delta {
    pub requests: u64,
    /// The running gauge's change: a request routed before the last merge and
    /// finished after it takes one away.
    pub running: i64,
    /// Histogram observations in arrival order (a request makes a handful),
    /// merged by the same in-place update a direct write makes.
    pub observed: Vec<(Hist, f64)>,
    pub errors: Vec<(String, u64)>,
    /// `(endpoint key, picks)`.
    pub picks: Vec<(u64, u64)>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.requests == 0
            && self.running == 0
            && self.observed.is_empty()
            && self.errors.is_empty()
            && self.picks.is_empty()
    }

    /// Empties it, keeping its allocations for the next batch.
    fn clear(&mut self) {
        self.requests = 0;
        self.running = 0;
        self.observed.clear();
        self.errors.clear();
        self.picks.clear();
    }
}

impl Record for Delta {
    fn add_request(&mut self) {
        self.requests += 1;
    }
    fn add_running(&mut self, up: bool) {
        self.running += if up { 1 } else { -1 };
    }
    fn observe(&mut self, kind: Hist, value: f64) {
        self.observed.push((kind, value));
    }
    fn add_error(&mut self, code: &str) {
        super::bump(&mut self.errors, code, super::MAX_ERROR_CODES);
    }
    fn add_pick(&mut self, endpoint: &str) {
        let key = crate::inflight::key(endpoint);
        match self.picks.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.picks.push((key, 1)),
        }
    }
}

/// A worker's deltas by series key, and the requests it has open.
#[derive(Debug, Default)]
pub struct Pending {
    /// Merged deltas stay (empty) for the series' next requests.
    deltas: Vec<(String, Delta)>,
    /// Histogram observations waiting, over every delta.
    observed: usize,
    open: u32,
    last_flush_ms: u64,
}

/// `interval_ms` or more passed from `since_ms` to `now_ms`, or the host clock (wall
/// time) stepped back: a clock set back must not hold a merge (or a cache) until it
/// catches up.
pub fn elapsed(since_ms: u64, now_ms: u64, interval_ms: u64) -> bool {
    now_ms < since_ms || now_ms - since_ms >= interval_ms
}

/// Most observations waiting (a few per request); one more merges at once.
pub const MAX_PENDING_OBSERVATIONS: usize = 4096;

impl Pending {
    /// A request started being observed on this worker.
    pub fn opened(&mut self) {
        self.open = self.open.saturating_add(1);
    }

    /// An observed request ended (or was dropped unfinished).
    pub fn closed(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// Observed requests open on this worker.
    pub fn open(&self) -> u32 {
        self.open
    }

    /// Records `f` into the delta of the series `key`.
    pub fn record(&mut self, key: &str, f: impl FnOnce(&mut Delta)) {
        let d = match self.deltas.iter().position(|(k, _)| k == key) {
            Some(i) => &mut self.deltas[i].1,
            None => {
                self.deltas.push((key.to_string(), Delta::default()));
                &mut self.deltas.last_mut().expect("just pushed").1
            }
        };
        let before = d.observed.len();
        f(d);
        self.observed += d.observed.len().saturating_sub(before);
    }

    /// Whether to merge now, at host time `now_ms`, with `own_open` requests of
    /// the caller still open (1 while routing, 0 once finished).
    pub fn due(&self, now_ms: u64, own_open: u32) -> bool {
        !self.is_empty()
            && (self.open <= own_open
                || elapsed(self.last_flush_ms, now_ms, FLUSH_INTERVAL_MS)
                || self.deltas.len() >= MAX_PENDING_SERIES
                || self.observed >= MAX_PENDING_OBSERVATIONS)
    }

    /// Nothing waiting (the tick merges only otherwise).
    pub fn is_empty(&self) -> bool {
        self.deltas.iter().all(|(_, d)| d.is_empty())
    }

    /// Merges every delta into its series in `store` (one compare-and-swap each).
    /// A delta the store refused stays for the next merge; the first error is
    /// returned for the log.
    pub fn flush(&mut self, store: &dyn SharedStore, now_ms: u64) -> Result<(), RegisterError> {
        self.last_flush_ms = now_ms;
        let mut first_err = None;
        for (key, d) in self.deltas.iter_mut().filter(|(_, d)| !d.is_empty()) {
            match update(store, key, |s| s.merge(d)) {
                Ok(()) => d.clear(),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.observed = self.deltas.iter().map(|(_, d)| d.observed.len()).sum();
        // Many series (clients naming many models): keep only what still waits.
        if self.deltas.len() >= MAX_PENDING_SERIES {
            self.deltas.retain(|(_, d)| !d.is_empty());
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;
    use crate::observe::{read_all, register, series_key, Series, SeriesBytes};

    fn finished(d: &mut Delta, seconds: f64) {
        d.add_running(false);
        d.add_request();
        d.observe(Hist::Duration, seconds);
    }

    #[test]
    fn merged_deltas_equal_direct_updates() {
        // The same updates written straight to a series and batched in a delta.
        let mut direct = Series::decode(None);
        let mut delta = Delta::default();
        type Step<'a> = &'a dyn Fn(&mut dyn Record);
        let steps: [Step; 10] = [
            &|r| r.add_running(true),
            &|r| r.add_pick("127.0.0.1:1"),
            &|r| r.add_running(true),
            &|r| r.add_pick("127.0.0.1:2"),
            &|r| r.add_running(false),
            &|r| r.add_request(),
            &|r| r.observe(Hist::Duration, 0.3),
            &|r| r.observe(Hist::OutputTokens, 12.0),
            &|r| r.add_error("ModelServerError"),
            &|r| r.add_error("ModelServerError"),
        ];
        for step in steps {
            step(&mut direct);
            step(&mut delta);
        }
        // On top of a series that already has counts, errors and picks.
        let mut base = Series::decode(None);
        base.running = 3;
        base.requests = 5;
        base.add_error("BadRequest");
        base.add_pick("127.0.0.1:1");
        base.observe(Hist::Duration, 2.0);
        let mut merged = SeriesBytes::new(Some(base.encode()));
        merged.merge(&delta);
        let got = merged.decode();
        assert_eq!(got.running, 3 + 1);
        assert_eq!(got.requests, 5 + 1);
        assert_eq!(
            got.errors,
            vec![("BadRequest".into(), 1), ("ModelServerError".into(), 2)]
        );
        assert_eq!(
            got.picks().collect::<Vec<_>>(),
            vec![
                (crate::inflight::key("127.0.0.1:1"), 2),
                (crate::inflight::key("127.0.0.1:2"), 1)
            ]
        );
        let h = got.hist(Hist::Duration).unwrap();
        assert_eq!(h.count, 2);
        assert!((h.sum - 2.3).abs() < 1e-12, "{}", h.sum);
        let cum: Vec<u64> = h.cumulative().collect();
        assert_eq!((cum[5], cum[11]), (1, 2), "0.3 <= 0.4, 2.0 <= 2.0");
        assert_eq!(
            got.hist(Hist::OutputTokens),
            direct.hist(Hist::OutputTokens)
        );
    }

    #[test]
    fn running_goes_down_across_merges() {
        let store = MemoryStore::default();
        let key = series_key("m", "m");
        register(&store, std::slice::from_ref(&key)).unwrap();
        let mut p = Pending::default();
        p.record(&key, |d| d.add_running(true));
        p.flush(&store, 0).unwrap();
        // Finished after the merge: the delta is -1 and takes the gauge to 0.
        p.record(&key, |d| finished(d, 0.1));
        p.flush(&store, 1).unwrap();
        let all = read_all(&store);
        assert_eq!((all[0].2.running, all[0].2.requests), (0, 1));
        assert!(p.is_empty());
    }

    #[test]
    fn due_when_alone_after_the_interval_or_when_full() {
        let mut p = Pending::default();
        assert!(!p.due(1_000, 0), "nothing to merge");
        p.opened();
        p.record("k", |d| d.add_running(true));
        assert!(p.due(0, 1), "the only open request: merged at once");
        p.opened();
        assert!(!p.due(0, 1), "another request is open");
        assert!(
            p.due(FLUSH_INTERVAL_MS, 1),
            "but not for longer than the interval"
        );
        p.closed();
        assert!(!p.due(0, 0), "one is still open");
        p.closed();
        assert!(p.due(0, 0), "the last open request finished");
        for i in 0..MAX_PENDING_SERIES {
            p.record(&format!("k{i}"), |d| d.add_request());
        }
        p.opened();
        p.opened();
        assert!(p.due(0, 1), "too many series waiting");
        let store = MemoryStore::default();
        p.flush(&store, 0).unwrap();
        assert!(p.is_empty() && !p.due(0, 1));
        for _ in 0..MAX_PENDING_OBSERVATIONS {
            p.record("k", |d| d.observe(Hist::Duration, 0.1));
        }
        assert!(p.due(0, 1), "too many observations waiting");
    }

    #[test]
    fn a_clock_set_back_does_not_hold_the_merge() {
        let mut p = Pending::default();
        p.opened();
        p.opened();
        p.record("k", |d| d.add_request());
        p.flush(&MemoryStore::default(), 5_000).unwrap();
        p.record("k", |d| d.add_request());
        assert!(!p.due(5_050, 1), "within the interval");
        assert!(p.due(4_000, 1), "the host clock stepped back");
        assert!(elapsed(5_000, 4_999, 10) && !elapsed(5_000, 5_009, 10));
    }

    #[test]
    fn a_refused_merge_keeps_the_delta() {
        struct Refusing;
        impl SharedStore for Refusing {
            fn get(&self, _: &str) -> (Option<Vec<u8>>, Option<u32>) {
                (Some(Series::decode(None).encode()), Some(1))
            }
            fn set(
                &self,
                _: &str,
                _: &[u8],
                _: Option<u32>,
            ) -> Result<(), crate::inflight::StoreError> {
                Err(crate::inflight::StoreError::Host)
            }
        }
        let mut p = Pending::default();
        p.record("k", |d| d.add_request());
        assert!(p.flush(&Refusing, 0).is_err());
        assert!(!p.is_empty(), "kept for the next merge");
        let store = MemoryStore::default();
        register(&store, &["k".to_string()]).unwrap();
        p.flush(&store, 1).unwrap();
        assert!(p.is_empty());
        let stored = Series::decode(store.get("k").0.as_deref());
        assert_eq!(stored.requests, 1, "merged once, not lost, not twice");
    }
}
