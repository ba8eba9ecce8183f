//! Per-endpoint in-flight request counters in proxy-wasm shared data.
//!
//! Every worker thread runs its own VM; shared data (scoped by `vm_id`) is the only
//! state they share. Each endpoint has its own key, so a request touches one key
//! to acquire and one to release, and updates are compare-and-swap loops so that
//! concurrent workers never lose an increment.

use std::collections::HashMap;

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

/// How often an update retries after losing a CAS race before giving up. Losing
/// 64 races in a row needs 64 concurrent writers to one key; giving up leaves the
/// counter unchanged (never corrupt), and the caller logs it.
const MAX_CAS_ATTEMPTS: usize = 64;

pub fn key(endpoint: &str) -> String {
    format!("igw.inflight.{endpoint}")
}

fn decode(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// The current count for `endpoint` (0 when absent or unreadable).
pub fn read(store: &dyn SharedStore, endpoint: &str) -> u64 {
    decode(store.get(&key(endpoint)).0.as_deref())
}

/// Creates the counter at 0 if it does not exist yet. Call at configure time: the
/// host's CAS only guards existing keys, so creation must not race with traffic.
pub fn ensure(store: &dyn SharedStore, endpoint: &str) -> Result<(), StoreError> {
    let k = key(endpoint);
    match store.get(&k) {
        (Some(_), _) => Ok(()),
        (None, _) => store.set(&k, &0u64.to_le_bytes(), None),
    }
}

/// Adds `delta` (negative to release), saturating at 0, and returns the new count.
pub fn add(store: &dyn SharedStore, endpoint: &str, delta: i64) -> Result<u64, StoreError> {
    let k = key(endpoint);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = store.get(&k);
        let current = decode(value.as_deref());
        let next = current.saturating_add_signed(delta);
        match store.set(&k, &next.to_le_bytes(), cas) {
            Ok(()) => return Ok(next),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// Counts for every endpoint in `endpoints`.
pub fn snapshot(store: &dyn SharedStore, endpoints: &[String]) -> HashMap<String, u64> {
    endpoints
        .iter()
        .map(|e| (e.clone(), read(store, e)))
        .collect()
}

/// An in-memory store with the host's semantics (CAS checked only on existing keys),
/// for native tests of the counter logic.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::sync::Mutex;

    /// Key → (value, cas), and the last cas handed out.
    type Slots = (HashMap<String, (Vec<u8>, u32)>, u32);

    #[derive(Default)]
    pub struct MemoryStore {
        inner: Mutex<Slots>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            let g = self.inner.lock().unwrap();
            match g.0.get(key) {
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            }
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut g = self.inner.lock().unwrap();
            g.1 += 1;
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

    #[test]
    fn add_and_release() {
        let s = MemoryStore::default();
        ensure(&s, "a").unwrap();
        assert_eq!(read(&s, "a"), 0);
        assert_eq!(add(&s, "a", 1).unwrap(), 1);
        assert_eq!(add(&s, "a", 1).unwrap(), 2);
        assert_eq!(add(&s, "a", -1).unwrap(), 1);
        assert_eq!(add(&s, "a", -5).unwrap(), 0, "saturates at zero");
        assert_eq!(read(&s, "b"), 0);
    }

    #[test]
    fn ensure_keeps_existing_counts() {
        let s = MemoryStore::default();
        add(&s, "a", 3).unwrap();
        ensure(&s, "a").unwrap();
        assert_eq!(read(&s, "a"), 3);
    }

    #[test]
    fn garbage_values_read_as_zero() {
        let s = MemoryStore::default();
        s.set(&key("a"), b"xyz", None).unwrap();
        assert_eq!(read(&s, "a"), 0);
        assert_eq!(add(&s, "a", 1).unwrap(), 1);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let s = Arc::new(MemoryStore::default());
        ensure(s.as_ref(), "e").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        add(s.as_ref(), "e", 1).unwrap();
                        add(s.as_ref(), "e", -1).unwrap();
                        add(s.as_ref(), "e", 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(read(s.as_ref(), "e"), 8_000);
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
        assert_eq!(add(&Refusing, "a", 1), Err(StoreError::Host));
    }
}
