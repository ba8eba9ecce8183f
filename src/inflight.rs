//! Per-endpoint in-flight request counters in proxy-wasm shared data.
//!
//! Every worker thread runs its own VM; shared data (scoped by `vm_id`) is the only
//! state they share. All counters live packed in one key, so a request reads every
//! candidate's count with one host call (one key per endpoint cost a host call per
//! candidate: ~9 ms a request at 1000 endpoints). Updates are compare-and-swap
//! loops, so concurrent workers never lose an increment.
//!
//! The key is a table of entries, each the endpoint's [`key`] (a 64-bit hash of its
//! address) and its count. Membership changes with every snapshot, so there is no
//! registry of endpoints: an entry whose count is 0 holds no stream and is free for
//! any endpoint to take. A stream's release finds its entry by the same hash, and
//! an entry with a count above 0 is never taken over, so a departed endpoint's entry
//! is reused only after its last stream ended. The table therefore never holds more
//! entries than the most endpoints that had requests in flight at the same time
//! (members, plus departed endpoints still finishing streams), whatever the churn.
//!
//! A host may hold back its changes: the filter's busy worker routes on its own
//! view of the table and writes its takes and releases together at most every
//! few milliseconds ([`Ledger`]); a host that reads the table corrects it by its
//! unwritten changes and writes them with its next take ([`read_with`],
//! [`take_after`]), or writes them alone ([`write`]).

use std::collections::{BTreeMap, HashMap};
use xxhash_rust::xxh3::xxh3_64_with_seed;

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
    /// The table is full: more endpoints than [`MAX_ENTRIES`] hold requests.
    Full,
}

/// How often an update retries after losing a CAS race before giving up. Every
/// request updates the one packed key twice, so workers do race; losing 1024
/// races in a row means the key is hopelessly contended. Giving up leaves the
/// counter unchanged (never corrupt), and the caller logs it.
const MAX_CAS_ATTEMPTS: usize = 1024;

/// The packed counters.
pub const COUNTS_KEY: &str = "igw.inflight";
/// Bytes per entry: the endpoint's key (u64 LE) and its count (u32 LE).
const ENTRY_BYTES: usize = 12;
/// A hard bound on the table (768 KiB): beyond it a request goes uncounted rather
/// than grow shared data without limit.
pub const MAX_ENTRIES: usize = 65_536;

/// The counter key of the endpoint at `address` (`ip:port` as routed). 64 bits of
/// xxh3: two live addresses sharing a key (about 2^-50 for a thousand endpoints)
/// would only share a count, which skews balancing, nothing else.
pub fn key(address: &str) -> u64 {
    xxh3_64_with_seed(address.as_bytes(), 0x1f1_9e7)
}

/// The table's entries, `(key, count)` in table order; a malformed tail is ignored.
pub fn decode(bytes: &[u8]) -> impl Iterator<Item = (u64, u32)> + '_ {
    bytes.chunks_exact(ENTRY_BYTES).map(|c| {
        let mut k = [0u8; 8];
        k.copy_from_slice(&c[..8]);
        let mut n = [0u8; 4];
        n.copy_from_slice(&c[8..]);
        (u64::from_le_bytes(k), u32::from_le_bytes(n))
    })
}

/// The stored table, as raw bytes (one host read per request).
pub fn table(store: &dyn SharedStore) -> Vec<u8> {
    store.get(COUNTS_KEY).0.unwrap_or_default()
}

/// Count changes a host made and has not written yet (one key per stream, a key
/// may repeat): the table is read corrected by them, and the next write carries
/// them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwritten<'a> {
    /// Counts taken.
    pub taken: &'a [u64],
    /// Counts given back.
    pub released: &'a [u64],
}

impl Unwritten<'_> {
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty() && self.released.is_empty()
    }
}

/// The table as read, with its CAS token: a later [`take_after`] starts from it
/// instead of reading it again.
pub struct Read<'a> {
    pub table: Vec<u8>,
    cas: Option<u32>,
    /// The changes `table` is corrected by (see [`read_with`]).
    unwritten: Unwritten<'a>,
}

/// Reads the table for counting now and one [`take_after`] later.
pub fn read(store: &dyn SharedStore) -> Read<'static> {
    read_with(store, Unwritten::default())
}

/// [`read`], with the table corrected by `unwritten`; a later [`take_after`]
/// writes them, so the host forgets them once it succeeds.
pub fn read_with<'a>(store: &dyn SharedStore, unwritten: Unwritten<'a>) -> Read<'a> {
    let (value, cas) = store.get(COUNTS_KEY);
    Read {
        table: corrected(value.unwrap_or_default(), unwritten),
        cas,
        unwritten,
    }
}

/// `table` cut to whole entries, with `unwritten` applied (takes first, so a
/// stream taken and given back nets out whatever the table held).
fn corrected(mut table: Vec<u8>, unwritten: Unwritten<'_>) -> Vec<u8> {
    table.truncate(table.len() / ENTRY_BYTES * ENTRY_BYTES);
    for &k in unwritten.taken {
        apply(&mut table, k, 1);
    }
    for &k in unwritten.released {
        apply(&mut table, k, -1);
    }
    table
}

/// Changes the count of `k` in a table held in memory (a host's own view of
/// it): an increment the table has no room for, or a release of an endpoint
/// without an entry, changes nothing.
pub fn apply(table: &mut Vec<u8>, k: u64, delta: i64) {
    table.truncate(table.len() / ENTRY_BYTES * ENTRY_BYTES);
    let _ = change(table, k, delta, None);
}

/// [`add`] of one count, first trying the table as `read` saw it (one host read
/// fewer per routed request); a table changed since fails the CAS and is read
/// again. The changes `read` was corrected by are written with it. Returns the
/// table as written.
pub fn take_after(store: &dyn SharedStore, read: Read<'_>, k: u64) -> Result<Vec<u8>, StoreError> {
    update(
        store,
        Some((k, 1, None)),
        Some((read.table, read.cas)),
        read.unwritten,
    )
    .map(|w| w.map(|(_, table)| table).unwrap_or_default())
}

/// [`take_after`], returning the endpoint's new count instead of the table.
pub fn add_after(
    store: &dyn SharedStore,
    read: Read<'_>,
    k: u64,
    delta: i64,
) -> Result<u64, StoreError> {
    update(
        store,
        Some((k, delta, None)),
        Some((read.table, read.cas)),
        read.unwritten,
    )
    .map(|w| w.map_or(0, |(n, _)| n))
}

/// Writes a host's unwritten changes alone (unknown keys of releases change
/// nothing); the table as written, `None` when there was nothing to write.
pub fn write(
    store: &dyn SharedStore,
    unwritten: Unwritten<'_>,
) -> Result<Option<Vec<u8>>, StoreError> {
    if unwritten.is_empty() {
        return Ok(None);
    }
    update(store, None, None, unwritten).map(|w| w.map(|(_, table)| table))
}

/// Writes held-back releases (one key per stream; unknown keys change nothing).
pub fn release(store: &dyn SharedStore, released: &[u64]) -> Result<(), StoreError> {
    write(
        store,
        Unwritten {
            taken: &[],
            released,
        },
    )
    .map(|_| ())
}

/// At most this many unwritten changes wait in a [`Ledger`]; the next one is
/// written with them.
pub const MAX_UNWRITTEN: usize = 256;

/// At most this many takes on a [`Ledger`]'s view before they are written,
/// however young the view: other workers route without seeing them, and each
/// could send as many to the endpoints all of them rank first.
pub const MAX_VIEW_TAKES: usize = 16;

/// A worker's side of the counts (the filter keeps one per VM): the changes it
/// has not written yet and its view of the table.
///
/// A take is a read and a compare-and-swap write of the one shared key, the
/// costliest host calls a request makes, and every worker races on that key. A
/// busy worker (other requests open) therefore routes on its view and notes its
/// takes and releases there, and writes them all at once when its view is
/// `window_ms` old or holds [`MAX_VIEW_TAKES`] takes; a worker alone writes at
/// once. Its own changes are always
/// in its view; other workers' reach it within the window. A take given back
/// before it was written cancels out and is never written. Configurations with
/// capacity caps never route on a view (a cap is checked against the stored
/// counts), the host's choice.
#[derive(Debug, Default)]
pub struct Ledger {
    taken: Vec<u64>,
    released: Vec<u64>,
    /// The table as last read or written, with the changes since applied.
    view: Option<Vec<u8>>,
    /// When `view` was read or written (host ms).
    read_ms: u64,
}

impl Ledger {
    /// The changes not written yet.
    pub fn unwritten(&self) -> Unwritten<'_> {
        Unwritten {
            taken: &self.taken,
            released: &self.released,
        }
    }

    /// The view to route on at `now_ms`, if the worker may: it is `busy`, the
    /// view is younger than `window_ms`, and the changes waiting are few.
    pub fn recent(&self, now_ms: u64, busy: bool, window_ms: u64) -> Option<&[u8]> {
        let young = !crate::observe::pending::elapsed(self.read_ms, now_ms, window_ms);
        let room = self.taken.len() < MAX_VIEW_TAKES
            && self.taken.len() + self.released.len() < MAX_UNWRITTEN;
        self.view.as_deref().filter(|_| busy && young && room)
    }

    /// The unwritten changes are in `table`, written at `now_ms` (`None`: at a
    /// time not read, the view keeps its age).
    pub fn written(&mut self, table: Vec<u8>, now_ms: Option<u64>) {
        self.taken.clear();
        self.released.clear();
        self.view = Some(table);
        if let Some(now) = now_ms {
            self.read_ms = now;
        }
    }

    /// A count taken on the view, not written.
    pub fn took(&mut self, k: u64) {
        self.taken.push(k);
        if let Some(view) = &mut self.view {
            apply(view, k, 1);
        }
    }

    /// A count given back: it cancels an unwritten take of the same key, or
    /// waits to be written. Whether a write is due (too many wait).
    pub fn release(&mut self, k: u64) -> bool {
        match self.taken.iter().position(|&t| t == k) {
            Some(i) => {
                self.taken.swap_remove(i);
            }
            None => self.released.push(k),
        }
        if let Some(view) = &mut self.view {
            apply(view, k, -1);
        }
        self.taken.len() + self.released.len() >= MAX_UNWRITTEN
    }

    /// A write failed past its retries: a host that keeps refusing loses counts
    /// (as a failed write always did), not memory; the view is read again.
    pub fn write_failed(&mut self) {
        self.view = None;
        if self.taken.len() + self.released.len() >= MAX_UNWRITTEN {
            self.taken.clear();
            self.released.clear();
        }
    }
}

/// The count of the endpoint with key `k` in `table`.
pub fn count(table: &[u8], k: u64) -> u64 {
    decode(table)
        .find(|&(e, _)| e == k)
        .map_or(0, |(_, n)| u64::from(n))
}

/// Creates the counters if absent. Call at configure time: the host's CAS only
/// guards existing keys, so creation must not race with traffic.
pub fn init(store: &dyn SharedStore) -> Result<(), StoreError> {
    if store.get(COUNTS_KEY).0.is_none() {
        store.set(COUNTS_KEY, &[], None)?;
    }
    Ok(())
}

/// Adds `delta` (negative to release) to the endpoint with key `k`, saturating at
/// 0, and returns the new count. An increment takes the endpoint's entry, else the
/// first free one, else appends; a release of an endpoint without an entry changes
/// nothing. Trailing free entries are dropped, so the table shrinks as load falls.
pub fn add(store: &dyn SharedStore, k: u64, delta: i64) -> Result<u64, StoreError> {
    update(store, Some((k, delta, None)), None, Unwritten::default())
        .map(|w| w.map_or(0, |(n, _)| n))
}

/// Takes one count of the endpoint with key `k` unless it already holds `cap`
/// (or more): `Ok(Some(new count))`, or `Ok(None)` when refused at the cap. The
/// check and the increment are one compare-and-swap, so the cap holds across
/// every worker sharing the store: a writer that raced in first makes this one
/// re-read and see the cap.
pub fn add_capped(store: &dyn SharedStore, k: u64, cap: u64) -> Result<Option<u64>, StoreError> {
    if cap == 0 {
        return Ok(None);
    }
    update(store, Some((k, 1, Some(cap))), None, Unwritten::default()).map(|w| w.map(|(n, _)| n))
}

/// Adds `delta` to `own`'s key (an increment from a count at or above its cap
/// refused: `Ok(None)`) with `unwritten` applied in the same write; `first`,
/// when given, is a read already corrected by `unwritten`. Returns the key's new
/// count and the table as written (as read, when nothing changed).
#[inline(always)]
fn update(
    store: &dyn SharedStore,
    own: Option<(u64, i64, Option<u64>)>,
    mut first: Option<(Vec<u8>, Option<u32>)>,
    unwritten: Unwritten<'_>,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (mut bytes, cas) = first.take().unwrap_or_else(|| {
            let (value, cas) = store.get(COUNTS_KEY);
            (corrected(value.unwrap_or_default(), unwritten), cas)
        });
        bytes.truncate(bytes.len() / ENTRY_BYTES * ENTRY_BYTES);
        let next = match own {
            None => 0,
            Some((k, delta, cap)) => match change(&mut bytes, k, delta, cap)? {
                Change::To(next) => next,
                Change::Refused => return Ok(None),
                Change::Nothing if unwritten.is_empty() => return Ok(Some((0, bytes))),
                Change::Nothing => 0,
            },
        };
        while bytes.len() >= ENTRY_BYTES && bytes[bytes.len() - 4..] == [0, 0, 0, 0] {
            bytes.truncate(bytes.len() - ENTRY_BYTES);
        }
        match store.set(COUNTS_KEY, &bytes, cas) {
            Ok(()) => return Ok(Some((next, bytes))),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// What [`change`] did to a table.
enum Change {
    /// The entry's count is now this.
    To(u64),
    /// An increment refused at the cap.
    Refused,
    /// A release of an endpoint without an entry: nothing.
    Nothing,
}

/// Adds `delta` to the entry of `k` in a table held in memory (whole entries
/// only). An increment takes the endpoint's entry, else the first free one, else
/// appends.
fn change(bytes: &mut Vec<u8>, k: u64, delta: i64, cap: Option<u64>) -> Result<Change, StoreError> {
    let mut own = None;
    let mut free = None;
    for (i, (e, n)) in decode(bytes).enumerate() {
        if e == k && n > 0 {
            own = Some((i, n));
            break;
        }
        if n == 0 && free.is_none() {
            free = Some(i);
        }
    }
    if let Some(cap) = cap {
        if own.map_or(0, |(_, n)| u64::from(n)) >= cap {
            return Ok(Change::Refused);
        }
    }
    let (at, current) = match (own, free) {
        (Some((i, n)), _) => (i, n),
        (None, _) if delta <= 0 => return Ok(Change::Nothing),
        (None, Some(i)) => (i, 0),
        (None, None) if bytes.len() / ENTRY_BYTES >= MAX_ENTRIES => return Err(StoreError::Full),
        (None, None) => {
            bytes.resize(bytes.len() + ENTRY_BYTES, 0);
            (bytes.len() / ENTRY_BYTES - 1, 0)
        }
    };
    let next = u64::from(current)
        .saturating_add_signed(delta)
        .min(u64::from(u32::MAX));
    let entry = &mut bytes[at * ENTRY_BYTES..(at + 1) * ENTRY_BYTES];
    entry[..8].copy_from_slice(&k.to_le_bytes());
    entry[8..].copy_from_slice(&(next as u32).to_le_bytes());
    Ok(Change::To(next))
}

/// The configured (bootstrap) endpoints of every gateway configuration, a JSON
/// list, so that the control listener can name their counts before a snapshot
/// does. Bounded by the configurations, not by traffic or churn.
pub const NAMES_KEY: &str = "igw.endpoint_names";

/// Adds `endpoints` to [`NAMES_KEY`] (at configure time, like [`init`]).
pub fn name_endpoints(store: &dyn SharedStore, endpoints: &[String]) -> Result<(), StoreError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(NAMES_KEY);
        let mut names: Vec<String> = bytes
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let before = names.len();
        for e in endpoints {
            if !names.contains(e) {
                names.push(e.clone());
            }
        }
        if names.len() == before && cas.is_some() {
            return Ok(());
        }
        match store.set(
            NAMES_KEY,
            &serde_json::to_vec(&names).unwrap_or_default(),
            cas,
        ) {
            Err(StoreError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(StoreError::CasMismatch)
}

/// Every endpoint named by `addresses` (the members the caller knows) or by
/// [`NAMES_KEY`], by [`key`].
pub fn names<'a>(
    store: &dyn SharedStore,
    addresses: impl IntoIterator<Item = &'a str>,
) -> HashMap<u64, String> {
    let configured: Vec<String> = store
        .get(NAMES_KEY)
        .0
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    configured
        .into_iter()
        .chain(addresses.into_iter().map(str::to_string))
        .map(|a| (key(&a), a))
        .collect()
}

/// Counts by endpoint, for `/debug/state` and `/metrics`: every endpoint of
/// `names` (from [`names`]) with its count; an entry above 0 no name matches (an
/// endpoint that left while streams still run) shows as `departed:<key>`.
pub fn by_endpoint(store: &dyn SharedStore, names: &HashMap<u64, String>) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = names.values().map(|a| (a.clone(), 0)).collect();
    for (k, n) in decode(&table(store)).filter(|&(_, n)| n > 0) {
        let name = names
            .get(&k)
            .cloned()
            .unwrap_or_else(|| format!("departed:{k:016x}"));
        *out.entry(name).or_default() += u64::from(n);
    }
    out
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

    fn entries(s: &dyn SharedStore) -> usize {
        table(s).len() / ENTRY_BYTES
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
        init(&s).unwrap();
        let (a, b) = (key("127.0.0.1:1"), key("127.0.0.1:2"));
        assert_ne!(a, b);
        assert_eq!(count(&table(&s), a), 0);
        assert_eq!(add(&s, a, 1).unwrap(), 1);
        assert_eq!(add(&s, a, 1).unwrap(), 2);
        assert_eq!(add(&s, b, 1).unwrap(), 1);
        assert_eq!(add(&s, a, -1).unwrap(), 1);
        assert_eq!(add(&s, a, -5).unwrap(), 0, "saturates at zero");
        assert_eq!(count(&table(&s), b), 1);
        assert_eq!(
            count(&table(&s), key("x")),
            0,
            "unknown endpoints read as zero"
        );
        assert_eq!(add(&s, key("x"), -1).unwrap(), 0, "nothing to release");
        assert_eq!(entries(&s), 2, "a's free entry stays before b's");
        add(&s, b, -1).unwrap();
        assert_eq!(entries(&s), 0, "trailing free entries are dropped");
    }

    /// An add from an earlier read: no read of its own when nothing changed, and
    /// the count another writer took in between is kept (the CAS fails, re-read).
    #[test]
    fn an_add_after_a_read_reuses_it_or_reads_again() {
        let s = MemoryStore::default();
        init(&s).unwrap();
        let (a, b) = (key("127.0.0.1:1"), key("127.0.0.1:2"));
        let r = read(&s);
        let reads = s.reads();
        assert_eq!(add_after(&s, r, a, 1).unwrap(), 1);
        assert_eq!(s.reads(), reads, "the read was reused");
        let stale = read(&s);
        add(&s, b, 1).unwrap();
        add(&s, a, 1).unwrap();
        assert_eq!(add_after(&s, stale, a, 1).unwrap(), 3);
        assert_eq!((count(&table(&s), a), count(&table(&s), b)), (3, 1));
    }

    /// Changes held back by a host correct the table the next take reads and
    /// are written with it, once, also when another writer forces a re-read;
    /// alone, `write` writes them all (a key per stream, repeats allowed).
    #[test]
    fn unwritten_changes_ride_on_the_next_take() {
        let s = MemoryStore::default();
        init(&s).unwrap();
        let (a, b, gone) = (key("a:1"), key("b:1"), key("gone:1"));
        for _ in 0..3 {
            add(&s, a, 1).unwrap();
        }
        add(&s, b, 1).unwrap();
        // Two of a's streams and one of an unknown endpoint ended, one was taken
        // for b: not written.
        let held = Unwritten {
            taken: &[b],
            released: &[a, gone, a],
        };
        let r = read_with(&s, held);
        assert_eq!(
            (count(&r.table, a), count(&r.table, b)),
            (1, 2),
            "corrected"
        );
        assert_eq!(count(&table(&s), a), 3, "not written by the read");
        let reads = s.reads();
        let written = take_after(&s, r, b).unwrap();
        assert_eq!(s.reads(), reads, "one write, no read");
        assert_eq!(written, table(&s), "the table as written");
        assert_eq!((count(&table(&s), a), count(&table(&s), b)), (1, 3));

        // Another writer between the read and the take: re-read, re-corrected.
        let held = Unwritten {
            taken: &[],
            released: &[b],
        };
        let r = read_with(&s, held);
        add(&s, a, 1).unwrap();
        assert_eq!(add_after(&s, r, a, 1).unwrap(), 3);
        assert_eq!((count(&table(&s), a), count(&table(&s), b)), (3, 2));

        release(&s, &[a, b, a, a, b]).unwrap();
        assert_eq!(entries(&s), 0, "all given back, trailing entries dropped");
        assert_eq!(write(&s, Unwritten::default()).unwrap(), None);
        let reads = s.reads();
        release(&s, &[gone]).unwrap();
        assert_eq!(s.reads(), reads + 1);
    }

    /// A busy worker routes on its view with its own changes in it; a take given
    /// back before it is written never reaches shared data; the view ages out,
    /// and a worker alone gets none.
    #[test]
    fn a_ledger_keeps_a_busy_workers_changes_in_its_view() {
        let s = MemoryStore::default();
        init(&s).unwrap();
        let (a, b, gone) = (key("a:1"), key("b:1"), key("gone:1"));
        let mut l = Ledger::default();
        assert!(l.recent(0, true, 10).is_none(), "nothing read yet");
        // A decision read and wrote at t=100 (a's take).
        let r = read_with(&s, l.unwritten());
        l.written(take_after(&s, r, a).unwrap(), Some(100));
        assert!(l.recent(105, false, 10).is_none(), "alone: shared data");
        assert!(l.recent(110, true, 10).is_none(), "aged out");
        assert!(l.recent(99, true, 10).is_none(), "the clock stepped back");
        let view = l.recent(109, true, 10).expect("busy and young");
        assert_eq!(count(view, a), 1);

        l.took(b);
        l.took(a);
        let view = l.recent(109, true, 10).unwrap();
        assert_eq!((count(view, a), count(view, b)), (2, 1), "own takes seen");
        assert_eq!(count(&table(&s), b), 0, "not written");
        // b's stream ends before its take was written: they cancel out.
        assert!(!l.release(b));
        assert_eq!(l.unwritten().taken, &[a]);
        assert!(l.unwritten().released.is_empty());
        // A stream of a ends: the unwritten take of a goes (a count is per
        // endpoint, not per stream); another: its release waits.
        l.release(a);
        assert!(l.unwritten().is_empty());
        assert_eq!(count(l.recent(109, true, 10).unwrap(), a), 1);
        l.release(a);
        assert_eq!(l.unwritten().released, &[a]);
        assert_eq!(count(l.recent(109, true, 10).unwrap(), a), 0);

        // Another worker took b meanwhile; the write carries ours and reads theirs.
        add(&s, b, 1).unwrap();
        let table_now = write(&s, l.unwritten()).unwrap().unwrap();
        l.written(table_now, None);
        assert_eq!((count(&table(&s), a), count(&table(&s), b)), (0, 1));
        assert!(l.unwritten().is_empty());
        assert_eq!(count(l.recent(109, true, 10).unwrap(), b), 1);
        assert!(
            l.recent(110, true, 10).is_none(),
            "a write without a time keeps the age"
        );

        // A window's takes are bounded: no view after MAX_VIEW_TAKES.
        for _ in 0..MAX_VIEW_TAKES - 1 {
            l.took(b);
        }
        assert!(l.recent(109, true, 10).is_some());
        l.took(b);
        assert!(l.recent(109, true, 10).is_none());
        // Too many waiting: a release says a write is due.
        for _ in 0..MAX_UNWRITTEN - MAX_VIEW_TAKES - 1 {
            assert!(!l.release(gone));
        }
        assert!(l.release(a));
        l.write_failed();
        assert!(
            l.unwritten().is_empty(),
            "a host that keeps refusing loses counts, not memory"
        );
        assert!(l.recent(109, true, 10).is_none());
    }

    #[test]
    fn a_free_entry_is_reused_and_a_held_one_never_is() {
        let s = MemoryStore::default();
        init(&s).unwrap();
        let (a, b, c) = (key("a:1"), key("b:1"), key("c:1"));
        add(&s, a, 1).unwrap();
        add(&s, b, 1).unwrap();
        // a leaves with no stream: c takes its entry; b still holds one stream.
        add(&s, a, -1).unwrap();
        add(&s, c, 2).unwrap();
        assert_eq!(entries(&s), 2);
        assert_eq!(count(&table(&s), a), 0);
        assert_eq!(count(&table(&s), c), 2);
        // a's late release (a stream it never held) cannot touch c's count.
        add(&s, a, -1).unwrap();
        assert_eq!(count(&table(&s), c), 2);
        assert_eq!(count(&table(&s), b), 1);
        name_endpoints(&s, &["y:1".to_string()]).unwrap();
        let named = by_endpoint(&s, &names(&s, ["b:1", "z:1"]));
        assert_eq!(named.get("b:1"), Some(&1));
        assert_eq!(named.get("z:1"), Some(&0));
        assert_eq!(named.get("y:1"), Some(&0), "configured names count too");
        assert_eq!(named.get(&format!("departed:{c:016x}")), Some(&2));
    }

    #[test]
    fn garbage_values_read_as_zero() {
        let s = MemoryStore::default();
        s.set(COUNTS_KEY, b"xyz", None).unwrap();
        assert!(table(&s).len() < ENTRY_BYTES);
        assert_eq!(count(&table(&s), key("a")), 0);
        assert_eq!(add(&s, key("a"), 1).unwrap(), 1);
        assert_eq!(entries(&s), 1, "the malformed tail is dropped");
    }

    #[test]
    fn churn_keeps_the_table_bounded_and_counts_exact() {
        // Thousands of endpoints come and go, at most `live` hold requests at once.
        let s = MemoryStore::default();
        init(&s).unwrap();
        let live = 10;
        let mut held: std::collections::VecDeque<(u64, u64)> = Default::default();
        for i in 0..5_000u64 {
            let k = key(&format!("10.0.{}.{}:8000", i / 250, i % 250));
            add(&s, k, 3).unwrap();
            held.push_back((k, 3));
            if held.len() > live {
                let (k, n) = held.pop_front().unwrap();
                assert_eq!(count(&table(&s), k), n);
                add(&s, k, -(n as i64)).unwrap();
            }
            assert!(entries(&s) <= live + 1, "{} entries", entries(&s));
        }
        for (k, n) in held.drain(..) {
            assert_eq!(count(&table(&s), k), n);
            add(&s, k, -(n as i64)).unwrap();
        }
        assert_eq!(entries(&s), 0);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let s = Arc::new(MemoryStore::default());
        init(s.as_ref()).unwrap();
        // An update that gave up (a preempted thread can lose every race) changed
        // nothing: the test retries it, and no increment that succeeded is lost.
        fn add_until_done(s: &MemoryStore, k: u64, delta: i64) {
            for _ in 0..100 {
                if add(s, k, delta).is_ok() {
                    return;
                }
            }
            panic!("no update succeeded in 100 rounds of retries");
        }
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let s = Arc::clone(&s);
                let k = key(if i % 2 == 0 { "e" } else { "f" });
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        add_until_done(&s, k, 1);
                        add_until_done(&s, k, -1);
                        add_until_done(&s, k, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = by_endpoint(s.as_ref(), &names(s.as_ref(), ["e", "f"]));
        assert_eq!(all.get("e"), Some(&4_000));
        assert_eq!(all.get("f"), Some(&4_000));
    }

    #[test]
    fn a_capped_add_refuses_at_the_cap_and_never_overshoots_across_threads() {
        let s = MemoryStore::default();
        init(&s).unwrap();
        let k = key("a:1");
        assert_eq!(add_capped(&s, k, 0).unwrap(), None, "cap 0: drained");
        assert_eq!(add_capped(&s, k, 2).unwrap(), Some(1));
        assert_eq!(add_capped(&s, k, 2).unwrap(), Some(2));
        assert_eq!(add_capped(&s, k, 2).unwrap(), None);
        assert_eq!(count(&table(&s), k), 2, "a refusal changes nothing");
        add(&s, k, -1).unwrap();
        assert_eq!(add_capped(&s, k, 2).unwrap(), Some(2), "room again");

        // Threads race for 3 slots; each holds what it got, briefly, and counts
        // the most ever held at once.
        let s = Arc::new(MemoryStore::default());
        init(s.as_ref()).unwrap();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (s, peak, held) = (Arc::clone(&s), Arc::clone(&peak), Arc::clone(&held));
                std::thread::spawn(move || {
                    use std::sync::atomic::Ordering::SeqCst;
                    let mut admitted = 0;
                    for _ in 0..2_000 {
                        if let Ok(Some(n)) = add_capped(s.as_ref(), k, 3) {
                            assert!(n <= 3, "count {n} over the cap");
                            let now = held.fetch_add(1, SeqCst) + 1;
                            peak.fetch_max(now, SeqCst);
                            admitted += 1;
                            held.fetch_sub(1, SeqCst);
                            while add(s.as_ref(), k, -1).is_err() {}
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(admitted > 0);
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        assert_eq!(count(&table(s.as_ref()), k), 0);
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
        assert_eq!(add(&Refusing, key("a"), 1), Err(StoreError::Host));
        assert_eq!(init(&Refusing), Err(StoreError::Host));
    }
}
