//! Per-endpoint in-flight request counters in proxy-wasm shared data.
//!
//! Every worker thread runs its own VM; shared data (scoped by `vm_id`) is the only
//! state they share. All counters live packed in one key, one little-endian `u32`
//! per endpoint, so a request reads every candidate's count with one host call
//! (one key per endpoint cost a host call per candidate: ~9 ms a request at 1000
//! endpoints). Slots come from an append-only registry of endpoints, so a slot
//! never moves and every VM agrees on it. Updates are compare-and-swap loops, so
//! concurrent workers never lose an increment.

use std::collections::{BTreeMap, HashMap};

/// A shared key-value store with compare-and-swap, as proxy-wasm's shared data.
pub trait SharedStore {
    /// The value and its CAS token, or `(None, None)` when the key is absent.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Sets the value if `cas` still matches (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer got there first: read again and retry.
    CasMismatch,
    /// The host refused for another reason.
    Host,
}

/// How often an update retries after losing a CAS race before giving up. Every
/// request updates the one packed key twice, so workers do race; losing 1024
/// races in a row means the key is hopelessly contended. Giving up leaves the
/// counter unchanged (never corrupt), and the caller logs it.
const MAX_CAS_ATTEMPTS: usize = 1024;

/// The packed counters: `u32` little-endian per registry slot.
pub const COUNTS_KEY: &str = "igw.inflight";
/// The registry: a JSON list of endpoints, append-only; an endpoint's index is its slot.
pub const REGISTRY_KEY: &str = "igw.endpoints";

fn decode(bytes: Option<&[u8]>) -> Vec<u32> {
    bytes
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn encode(counts: &[u32]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// The registered endpoints, in slot order (empty when absent or unreadable).
pub fn registry(store: &dyn SharedStore) -> Vec<String> {
    registry_from(store.get(REGISTRY_KEY).0.as_deref())
}

fn registry_from(bytes: Option<&[u8]>) -> Vec<String> {
    bytes
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

/// Appends the endpoints the registry lacks and creates the counters if absent;
/// returns every endpoint's slot. Call at configure time: the host's CAS only
/// guards existing keys, so creation must not race with traffic.
pub fn register(
    store: &dyn SharedStore,
    endpoints: &[String],
) -> Result<HashMap<String, usize>, StoreError> {
    if store.get(COUNTS_KEY).0.is_none() {
        store.set(COUNTS_KEY, &[], None)?;
    }
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(REGISTRY_KEY);
        let mut known = registry_from(bytes.as_deref());
        let before = known.len();
        for e in endpoints {
            if !known.contains(e) {
                known.push(e.clone());
            }
        }
        if known.len() > before || bytes.is_none() {
            let json = serde_json::to_vec(&known).unwrap_or_default();
            match store.set(REGISTRY_KEY, &json, cas) {
                Ok(()) => {}
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        return Ok(slots(&known));
    }
    Err(StoreError::CasMismatch)
}

/// Endpoint → slot for a registry list.
pub fn slots(registry: &[String]) -> HashMap<String, usize> {
    registry
        .iter()
        .enumerate()
        .map(|(i, e)| (e.clone(), i))
        .collect()
}

/// Each configured endpoint's slot: by address (to give a count back) and by pool
/// and position, which a decision reads for every candidate of every request
/// without hashing an address.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    by_address: HashMap<String, usize>,
    /// `[pool][position in the pool]`.
    by_pool: Vec<Vec<Option<usize>>>,
}

impl Slots {
    /// `by_address` from [`register`]; `pools` the configured pools' endpoints, in
    /// configuration order.
    pub fn new<'a>(
        by_address: HashMap<String, usize>,
        pools: impl IntoIterator<Item = &'a [String]>,
    ) -> Slots {
        let by_pool = pools
            .into_iter()
            .map(|eps| eps.iter().map(|e| by_address.get(e).copied()).collect())
            .collect();
        Slots {
            by_address,
            by_pool,
        }
    }

    /// The slot of the endpoint at `address`.
    pub fn of(&self, address: &str) -> Option<usize> {
        self.by_address.get(address).copied()
    }

    /// The slot of endpoint `i` of pool `pool` (`address`, looked up by name only
    /// for a pool these slots were not built for).
    pub fn at(&self, pool: usize, i: usize, address: &str) -> Option<usize> {
        match self.by_pool.get(pool).and_then(|eps| eps.get(i)) {
            Some(&slot) => slot,
            None => self.of(address),
        }
    }
}

/// Every counter, by slot: one read per request.
pub fn counts(store: &dyn SharedStore) -> Vec<u32> {
    decode(store.get(COUNTS_KEY).0.as_deref())
}

/// The count in `slot` of `counts` (0 past the end: a slot registered after the
/// last write).
pub fn count(counts: &[u32], slot: usize) -> u64 {
    counts.get(slot).copied().map_or(0, u64::from)
}

/// Adds `delta` (negative to release) to `slot`, saturating at 0, and returns the
/// new count.
pub fn add(store: &dyn SharedStore, slot: usize, delta: i64) -> Result<u64, StoreError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = store.get(COUNTS_KEY);
        let mut counts = decode(value.as_deref());
        if counts.len() <= slot {
            counts.resize(slot + 1, 0);
        }
        let next = u64::from(counts[slot])
            .saturating_add_signed(delta)
            .min(u64::from(u32::MAX));
        counts[slot] = next as u32;
        match store.set(COUNTS_KEY, &encode(&counts), cas) {
            Ok(()) => return Ok(next),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// Counts by endpoint, for `/debug/state` and `/metrics`.
pub fn by_endpoint(store: &dyn SharedStore) -> BTreeMap<String, u64> {
    let counts = counts(store);
    registry(store)
        .into_iter()
        .enumerate()
        .map(|(slot, e)| (e, count(&counts, slot)))
        .collect()
}

/// An in-memory store with the host's semantics (CAS checked only on existing keys,
/// cas 0 means unconditional, as in Envoy), for native tests and for the ext_proc
/// picker, which keeps its state in its own process.
#[cfg(not(target_arch = "wasm32"))]
pub mod memory {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Key → (value, cas), and the last cas handed out.
    type Entries = (HashMap<String, (Vec<u8>, u32)>, u32);

    #[derive(Default)]
    pub struct MemoryStore {
        inner: Mutex<Entries>,
        reads: AtomicUsize,
    }

    impl MemoryStore {
        /// Reads so far (tests count round trips with it).
        pub fn reads(&self) -> usize {
            self.reads.load(Ordering::Relaxed)
        }
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match g.0.get(key) {
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            }
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.1 = g.1.wrapping_add(1).max(1);
            let next = g.1;
            if let Some((v, c)) = g.0.get_mut(key) {
                if matches!(cas, Some(want) if want != 0 && want != *c) {
                    return Err(StoreError::CasMismatch);
                }
                *v = value.to_vec();
                *c = next;
            } else {
                g.0.insert(key.to_string(), (value.to_vec(), next));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;
    use std::sync::Arc;

    fn eps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn memory_store_checks_cas_on_existing_keys() {
        let s = MemoryStore::default();
        s.set("k", b"1", None).unwrap();
        let (_, cas) = s.get("k");
        s.set("k", b"2", cas).unwrap();
        assert_eq!(s.set("k", b"3", cas), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").0.as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn add_and_release() {
        let s = MemoryStore::default();
        let slots = register(&s, &eps(&["a", "b"])).unwrap();
        let (a, b) = (slots["a"], slots["b"]);
        assert_eq!(count(&counts(&s), a), 0);
        assert_eq!(add(&s, a, 1).unwrap(), 1);
        assert_eq!(add(&s, a, 1).unwrap(), 2);
        assert_eq!(add(&s, b, 1).unwrap(), 1);
        assert_eq!(add(&s, a, -1).unwrap(), 1);
        assert_eq!(add(&s, a, -5).unwrap(), 0, "saturates at zero");
        assert_eq!(count(&counts(&s), b), 1);
        assert_eq!(count(&counts(&s), 99), 0, "unknown slots read as zero");
    }

    #[test]
    fn slots_are_stable_as_endpoints_are_registered() {
        let s = MemoryStore::default();
        let first = register(&s, &eps(&["a", "b"])).unwrap();
        add(&s, first["b"], 3).unwrap();
        // Another configuration (or a reload) adds endpoints: old slots stay.
        let second = register(&s, &eps(&["c", "b"])).unwrap();
        assert_eq!(second["a"], first["a"]);
        assert_eq!(second["b"], first["b"]);
        assert_eq!(second["c"], 2);
        assert_eq!(
            add(&s, second["c"], 1).unwrap(),
            1,
            "grows the packed value"
        );
        let all = by_endpoint(&s);
        assert_eq!(all.get("b"), Some(&3));
        assert_eq!(all.get("c"), Some(&1));
        assert_eq!(all.get("a"), Some(&0));
        // Registering again keeps the counts.
        register(&s, &eps(&["a"])).unwrap();
        assert_eq!(by_endpoint(&s).get("b"), Some(&3));
    }

    #[test]
    fn garbage_values_read_as_zero() {
        let s = MemoryStore::default();
        s.set(COUNTS_KEY, b"xyz", None).unwrap();
        s.set(REGISTRY_KEY, b"not json", None).unwrap();
        assert!(counts(&s).is_empty());
        assert!(registry(&s).is_empty());
        assert_eq!(add(&s, 0, 1).unwrap(), 1);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let s = Arc::new(MemoryStore::default());
        let slots = register(s.as_ref(), &eps(&["e", "f"])).unwrap();
        // An update that gave up (a preempted thread can lose every race) changed
        // nothing: the test retries it, and no increment that succeeded is lost.
        fn add_until_done(s: &MemoryStore, slot: usize, delta: i64) {
            for _ in 0..100 {
                if add(s, slot, delta).is_ok() {
                    return;
                }
            }
            panic!("no update succeeded in 100 rounds of retries");
        }
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let s = Arc::clone(&s);
                let slot = if i % 2 == 0 { slots["e"] } else { slots["f"] };
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        add_until_done(&s, slot, 1);
                        add_until_done(&s, slot, -1);
                        add_until_done(&s, slot, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = by_endpoint(s.as_ref());
        assert_eq!(all.get("e"), Some(&4_000));
        assert_eq!(all.get("f"), Some(&4_000));
    }

    struct Refusing;
    impl SharedStore for Refusing {
        fn get(&self, _: &str) -> (Option<Vec<u8>>, Option<u32>) {
            (None, None)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::Host)
        }
    }

    #[test]
    fn host_errors_surface() {
        assert_eq!(add(&Refusing, 0, 1), Err(StoreError::Host));
        assert_eq!(register(&Refusing, &eps(&["a"])), Err(StoreError::Host));
    }
}
