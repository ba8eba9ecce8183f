//! Shared data through the host, behind the pure `SharedStore` trait.

use crate::gateway::{Choice, Counts, Refused};
use crate::inflight::{self, SharedStore, StoreError};
use crate::membership::Membership;
use crate::observe;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

/// Creates the in-flight counters (if the host refuses, requests go uncounted,
/// not failed).
pub fn init_in_flight(config: &crate::config::Config) {
    if let Err(err) = inflight::init(&HostStore)
        .and_then(|()| inflight::name_endpoints(&HostStore, &config.all_endpoints()))
    {
        log::warn!("inference-gateway: cannot create the in-flight counters: {err:?}");
    }
}

/// Publishes the pools' backend policies for the control listener's
/// `/debug/state` (an empty list when none: a replaced configuration clears them).
pub fn publish_policies(config: &crate::config::Config) {
    let policies: Vec<(&str, &crate::policy::PoolPolicy)> = config
        .pools
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((p.name.as_str(), config.policy(i)?)))
        .collect();
    let bytes = serde_json::to_vec(&policies).unwrap_or_default();
    if let Err(err) = HostStore.set(crate::policy::POLICIES_KEY, &bytes, None) {
        log::warn!("inference-gateway: backend policies not published: {err:?}");
    }
}

/// Creates the request-metric series of every configured model (and the one for
/// errors before a model is known), so that traffic only ever updates existing
/// keys, which the host's compare-and-swap guards.
pub fn register_series(config: &crate::config::Config) {
    let mut keys = vec![observe::series_key("", "")];
    for (name, route) in &config.models {
        if route.targets.is_empty() {
            keys.push(observe::series_key(name, name));
        }
        for t in &route.targets {
            keys.push(observe::series_key(name, &t.name));
        }
    }
    if let Err(err) = observe::register(&HostStore, &keys) {
        log::warn!("inference-gateway: request metrics not registered: {err:?}");
    }
}

/// The latest accepted snapshot, encoded as pushed.
pub const SNAPSHOT_KEY: &str = "igw.snapshot";
/// 16 bytes: the stored snapshot's `generated_at_ms` and `sequence` (LE). Routing
/// VMs read only this per request and decode the snapshot when it changes.
pub const SNAPSHOT_VERSION_KEY: &str = "igw.snapshot.version";

pub fn snapshot_version(s: &crate::snapshot::Snapshot) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&s.generated_at_ms.to_le_bytes());
    v[8..].copy_from_slice(&s.sequence.to_le_bytes());
    v
}

/// Stores a pushed snapshot if it is valid and newer than the stored one.
/// CAS on the snapshot key keeps concurrent pushes on different workers ordered.
pub fn publish_snapshot(body: &[u8]) -> Result<crate::snapshot::Snapshot, crate::openai::ApiError> {
    for _ in 0..16 {
        let (current, cas) = HostStore.get(SNAPSHOT_KEY);
        let snapshot = crate::ingest::accept(current.as_deref(), body)?;
        match HostStore.set(SNAPSHOT_KEY, body, cas) {
            Err(StoreError::CasMismatch) => continue,
            Err(e) => {
                return Err(crate::openai::ApiError::internal(format!(
                    "could not store the snapshot: {e:?}"
                )))
            }
            Ok(()) => {
                // The version key only has to change; readers reload the snapshot key.
                if let Err(e) =
                    HostStore.set(SNAPSHOT_VERSION_KEY, &snapshot_version(&snapshot), None)
                {
                    log::warn!("inference-gateway: snapshot version not updated: {e:?}");
                }
                return Ok(snapshot);
            }
        }
    }
    Err(crate::openai::ApiError::internal(
        "snapshot store busy; retry the push",
    ))
}

/// The stored snapshot, decoded; `None` when there is none or it is unreadable.
pub fn stored_snapshot() -> Option<crate::snapshot::Snapshot> {
    let bytes = HostStore.get(SNAPSHOT_KEY).0?;
    crate::snapshot::Snapshot::decode(&bytes).ok()
}

/// A routing VM's copy of the snapshot and the pools' members under it, rebuilt
/// only when the stored snapshot's version changes.
#[derive(Default)]
pub struct SnapshotCache {
    version: Option<Vec<u8>>,
    /// Host time (ms) the version was last read.
    checked_ms: u64,
    members: Option<std::rc::Rc<Membership>>,
    /// What was last logged as refused (logged again only when it changes).
    refused: Vec<String>,
}

impl SnapshotCache {
    /// The members of `config`'s pools under the newest snapshot (the bootstrap
    /// lists before one arrives). The cache belongs to one configuration: the
    /// root makes a new one on reconfigure.
    ///
    /// The version is read for every request while this worker has no other one
    /// open; under load at most every [`VERSION_CHECK_MS`] (a host call and a
    /// buffer allocated in the VM per request otherwise), so a new snapshot is
    /// routed on within that long: collectors scrape every 50 ms at the least.
    pub fn current(
        &mut self,
        config: &crate::config::Config,
        now_ms: u64,
    ) -> std::rc::Rc<Membership> {
        if let Some(members) = &self.members {
            let recent = !observe::pending::elapsed(self.checked_ms, now_ms, VERSION_CHECK_MS);
            if others_open(1) && recent {
                return std::rc::Rc::clone(members);
            }
        }
        self.checked_ms = now_ms;
        let version = HostStore.get(SNAPSHOT_VERSION_KEY).0;
        if version.is_some() && version != self.version {
            match stored_snapshot() {
                Some(s) => {
                    let members = Membership::new(config, Some(s));
                    if members.refused != self.refused && !members.refused.is_empty() {
                        log::warn!(
                            "inference-gateway: snapshot members never routed to (outside allowed_endpoint_cidrs, or not ip:port): {}",
                            members.refused.join(", ")
                        );
                    }
                    self.refused.clone_from(&members.refused);
                    self.members = Some(std::rc::Rc::new(members));
                }
                None => log::warn!(
                    "inference-gateway: stored snapshot unreadable; keeping the last one"
                ),
            }
            self.version = version;
        }
        std::rc::Rc::clone(
            self.members
                .get_or_insert_with(|| std::rc::Rc::new(Membership::new(config, None))),
        )
    }
}

thread_local! {
    /// This worker's copies of prefix-index slots (`scheduling::recent_slots`).
    static PREFIX_COPIES: std::cell::RefCell<Vec<crate::scheduling::recent_slots::Copy>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// How long a busy worker routes on its copy of a prefix-index slot (as on its
/// snapshot: [`VERSION_CHECK_MS`]).
pub const PREFIX_COPY_MS: u64 = VERSION_CHECK_MS;

/// Runs `f` with the prefix index as this worker sees it at `now_ms`: slots read
/// less than [`PREFIX_COPY_MS`] ago served from its copies while it has other
/// requests open.
pub fn with_prefix_store<T>(now_ms: u64, f: impl FnOnce(&dyn SharedStore) -> T) -> T {
    PREFIX_COPIES.with(|copies| {
        f(&crate::scheduling::recent_slots::RecentSlots {
            store: &HostStore,
            copies,
            now_ms,
            busy: others_open(1),
            window_ms: PREFIX_COPY_MS,
        })
    })
}

thread_local! {
    /// This worker VM's request-metric updates not yet in shared data
    /// (`observe::pending`: merged when the worker has no other request open, at
    /// least every 100 ms under load: on a request or the root's tick).
    static PENDING: std::cell::RefCell<observe::pending::Pending> = std::cell::RefCell::default();
}

/// How long a worker under load routes on its snapshot before it checks for a
/// newer one.
pub const VERSION_CHECK_MS: u64 = 10;

/// Whether this worker has observed requests open besides the caller's `own`.
pub fn others_open(own: u32) -> bool {
    PENDING
        .try_with(|p| p.borrow().open() > own)
        .unwrap_or(false)
}

thread_local! {
    /// This worker's in-flight changes not in shared data yet and its view of
    /// the counts (`inflight::Ledger`): written at most every
    /// [`COUNTS_WRITE_MS`] while the worker has other requests open, at once
    /// when it has none, on the root's tick at the latest.
    static LEDGER: std::cell::RefCell<inflight::Ledger> = std::cell::RefCell::default();
}

/// How long a busy worker routes on its view of the in-flight counts before it
/// writes its changes and reads the other workers' (as on its snapshot).
pub const COUNTS_WRITE_MS: u64 = VERSION_CHECK_MS;

/// Gives back one count of the in-flight key `key`: noted (if `may_wait`) while
/// this worker has other requests open (the caller's own is still counted
/// open), written now otherwise, with everything noted before.
pub fn release_in_flight(key: u64, may_wait: bool) {
    let _ = LEDGER.try_with(|ledger| {
        if let Ok(mut ledger) = ledger.try_borrow_mut() {
            let due = ledger.release(key);
            if due || !may_wait || !others_open(1) {
                write_counts(&mut ledger);
            }
        }
    });
}

/// The tick, and a pool whose backend policy caps need exact counts: writes
/// the changes noted.
pub fn flush_counts() {
    let _ = LEDGER.try_with(|ledger| {
        if let Ok(mut ledger) = ledger.try_borrow_mut() {
            write_counts(&mut ledger);
        }
    });
}

fn write_counts(ledger: &mut inflight::Ledger) {
    match inflight::write(&HostStore, ledger.unwritten()) {
        Ok(Some(table)) => ledger.written(table, None),
        Ok(None) => {}
        Err(err) => {
            let u = ledger.unwritten();
            log::warn!(
                "inference-gateway: {} in-flight change(s) not written: {err:?}",
                u.taken.len() + u.released.len()
            );
            ledger.write_failed();
        }
    }
}

/// Runs a routing decision on the in-flight counts as this worker may see them
/// at `now_ms` (its own recent view while busy, unless the configuration needs
/// `exact` counts), then keeps what the decision wrote or took.
pub fn with_counts(
    now_ms: u64,
    exact: bool,
    decide: impl FnOnce(Counts<'_>) -> Result<Choice, Refused>,
) -> Result<Choice, Refused> {
    LEDGER.with_borrow_mut(|ledger| {
        let busy = others_open(1) && !exact;
        let counts = match ledger.recent(now_ms, busy, COUNTS_WRITE_MS) {
            Some(view) => Counts::Recent(view),
            None => Counts::Shared(ledger.unwritten()),
        };
        let mut out = decide(counts);
        if let Ok(choice) = &mut out {
            if let Some(table) = choice.written.take() {
                ledger.written(table, Some(now_ms));
            }
            if let (true, Some(k)) = (choice.take_unwritten, choice.holding) {
                ledger.took(k);
            }
        }
        out
    })
}

/// An observed request opened (`true`) or ended (`false`) on this worker.
pub fn metrics_request(open: bool) {
    // `try_with`: also called from a stream's `Drop`, which must never panic.
    let _ = PENDING.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if open {
                p.opened()
            } else {
                p.closed()
            }
        }
    });
}

/// Records `f` into the series `key`, then merges this worker's updates into
/// shared data if due; `own_open`: the caller's request is still open (1) or
/// finished (0).
pub fn record_metrics(
    key: &str,
    now_ms: u64,
    own_open: u32,
    f: impl FnOnce(&mut observe::pending::Delta),
) {
    PENDING.with_borrow_mut(|p| {
        p.record(key, f);
        if p.due(now_ms, own_open) {
            flush(p, now_ms);
        }
    });
}

/// The tick: merges whatever waits (a worker whose traffic stopped while a long
/// stream stays open).
pub fn flush_metrics(now_ms: u64) {
    PENDING.with_borrow_mut(|p| {
        if !p.is_empty() {
            flush(p, now_ms);
        }
    });
}

fn flush(p: &mut observe::pending::Pending, now_ms: u64) {
    if let Err(err) = p.flush(&HostStore, now_ms) {
        log::debug!("inference-gateway: request metrics not merged yet: {err:?}");
    }
}
