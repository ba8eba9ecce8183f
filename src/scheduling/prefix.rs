//! Prefix-cache affinity: which endpoints have recently served a prompt that starts
//! like this one, and so probably still hold its KV blocks in their prefix cache.
//!
//! The prompt is cut into fixed-size blocks and hashed as a chain (each block's hash
//! covers everything before it), as vLLM's automatic prefix cache does, so equal
//! hashes mean equal prefixes. The index lives in shared data so every Envoy worker
//! sees what the others routed. It is a fixed table of `slots` keys (bounded memory:
//! up to about 750 bytes a slot): the blocks go in groups of [`BLOCKS_PER_SLOT`], a
//! group maps to slot `hash of its first block % slots`, which keeps the most
//! recently used (endpoint, the group's hashes) entries. Collisions and evictions
//! only make the index forget, never lie: entries carry the full hashes.

use crate::inflight::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh64::xxh64;

/// Entries kept per slot: a hot prefix served by a few replicas, plus collisions.
const ENTRIES_PER_SLOT: usize = 4;

/// Chained hashes of the prompt's full blocks (a partial last block is not cached
/// by the server either), seeded by the model: different models share no cache.
/// xxh64 rather than xxh3: xxh3 folds 128-bit products, which Wasm has no
/// instruction for (a `__multi3` call each); xxh64 needs only 64-bit multiplies
/// (16 KB prompt: 16,000 fewer Wasm instructions). A hash change only makes the
/// index forget what was recorded before it: entries carry the full hashes.
pub fn block_hashes(model: &str, prompt: &str, block_bytes: usize, max_blocks: usize) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut prev = xxh64(model.as_bytes(), 0x1f0d_5eed);
    prompt
        .as_bytes()
        .chunks_exact(block_bytes)
        .take(max_blocks)
        .map(|block| {
            prev = xxh64(block, prev);
            prev
        })
        .collect()
}

/// Blocks per index slot: one shared-data read covers this many consecutive
/// blocks. A read is a host call that copies the slot (Envoy takes a lock and calls
/// back into the module to allocate: about 12,000 of Envoy's instructions, `bench
/// instructions`); per block, a 16 KB prompt cost 64 of them, at 8 per slot 8, at
/// 16 per slot 4 (with the default 256-byte blocks: a group is 4 KB of prompt).
pub const BLOCKS_PER_SLOT: usize = 16;

/// One endpoint's recent prompt through one group of [`BLOCKS_PER_SLOT`] blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// The chained hashes of the group's blocks it served, from the group's first
    /// (the slot's key), at most [`BLOCKS_PER_SLOT`].
    blocks: Vec<u64>,
    at_ms: u64,
    endpoint: String,
}

impl Entry {
    /// How many of `group`'s blocks this entry holds, from the first (hashes are
    /// chained: equal at a position means equal before it).
    fn shared(&self, group: &[u64]) -> usize {
        self.blocks
            .iter()
            .zip(group)
            .take_while(|(a, b)| a == b)
            .count()
    }
}

/// What [`PrefixIndex::matches`] found.
#[derive(Debug, Default)]
pub struct Matches {
    /// Endpoint → leading blocks it served: a handful of endpoints at most (a slot
    /// keeps four entries), so a list, searched per candidate without hashing.
    runs: Vec<(String, usize)>,
    /// The slots read, in group order, for [`PrefixIndex::record_after`].
    read: Vec<(Vec<Entry>, Option<u32>)>,
}

impl Matches {
    /// The leading blocks `endpoint` served, if any.
    pub fn get(&self, endpoint: &str) -> Option<usize> {
        self.runs
            .iter()
            .find(|(e, _)| e == endpoint)
            .map(|&(_, n)| n)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Every endpoint that served leading blocks, with how many.
    pub fn runs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.runs.iter().map(|(e, n)| (e.as_str(), *n))
    }
}

/// The shared prefix index, over any [`SharedStore`].
pub struct PrefixIndex<'s> {
    store: &'s dyn SharedStore,
    slots: u64,
    ttl_ms: u64,
}

impl<'s> PrefixIndex<'s> {
    pub fn new(store: &'s dyn SharedStore, slots: u32, ttl_ms: u64) -> Self {
        PrefixIndex {
            store,
            slots: u64::from(slots.max(1)),
            ttl_ms,
        }
    }

    /// The slot of the group whose first block hashes to `first`. (Earlier
    /// layouts used `igw.prefix8`, groups of 8 blocks, and `igw.prefix`, a slot
    /// per block: a new layout never reads an old one's entries.)
    fn key(&self, first: u64) -> String {
        format!("igw.prefix16.{}", first % self.slots)
    }

    fn read(&self, first: u64) -> (Vec<Entry>, Option<u32>) {
        let (bytes, cas) = self.store.get(&self.key(first));
        let entries = bytes
            .and_then(|b| postcard::from_bytes::<Vec<Entry>>(&b).ok())
            .unwrap_or_default();
        (entries, cas)
    }

    /// For each endpoint, how many leading blocks of `hashes` it recently served.
    /// One read per group of blocks; reads stop at the first group no endpoint
    /// holds whole, so a miss costs one read.
    pub fn matches(&self, hashes: &[u64], now_ms: u64) -> Matches {
        let mut m = Matches::default();
        for (g, group) in hashes.chunks(BLOCKS_PER_SLOT).enumerate() {
            let before = g * BLOCKS_PER_SLOT;
            let (entries, cas) = self.read(group[0]);
            let mut whole = false;
            for e in entries
                .iter()
                .filter(|e| now_ms.saturating_sub(e.at_ms) <= self.ttl_ms)
            {
                let shared = e.shared(group);
                if shared == 0 {
                    continue;
                }
                // Only an endpoint that matched every block so far extends its run.
                let run = match m.runs.iter_mut().find(|(ep, _)| *ep == e.endpoint) {
                    Some((_, run)) => run,
                    None if g == 0 => {
                        m.runs.push((e.endpoint.clone(), 0));
                        &mut m.runs.last_mut().expect("just pushed").1
                    }
                    None => continue,
                };
                if *run >= before && before + shared > *run {
                    *run = before + shared;
                    whole |= shared == group.len();
                }
            }
            m.read.push((entries, cas));
            if !whole {
                break;
            }
        }
        m.runs.retain(|(_, n)| *n > 0);
        m
    }

    /// Records that `endpoint` now holds the blocks of `hashes`. Entries younger than
    /// a quarter of the TTL are not rewritten, so a hot prefix costs no writes.
    /// Best effort: a lost CAS race skips that group.
    pub fn record(&self, hashes: &[u64], endpoint: &str, now_ms: u64) {
        self.record_after(hashes, endpoint, now_ms, Matches::default());
    }

    /// [`PrefixIndex::record`] after [`PrefixIndex::matches`] on the same hashes:
    /// the slots that read are not read again (a changed slot fails its CAS and is
    /// skipped, as a lost race is).
    pub fn record_after(&self, hashes: &[u64], endpoint: &str, now_ms: u64, matched: Matches) {
        let mut already_read = matched.read.into_iter();
        for group in hashes.chunks(BLOCKS_PER_SLOT) {
            let (mut entries, cas) = already_read.next().unwrap_or_else(|| self.read(group[0]));
            let fresh_enough = |e: &Entry| now_ms.saturating_sub(e.at_ms) < self.ttl_ms / 4;
            // This endpoint's entry for the same blocks, or for a prompt that shares
            // the group's start with this one (the longer of the two is kept).
            match entries.iter_mut().find(|e| {
                e.endpoint == endpoint && e.shared(group) >= e.blocks.len().min(group.len())
            }) {
                Some(e) if e.blocks.len() >= group.len() && fresh_enough(e) => continue,
                Some(e) => {
                    if group.len() > e.blocks.len() {
                        e.blocks = group.to_vec();
                    }
                    e.at_ms = now_ms;
                }
                None => entries.push(Entry {
                    blocks: group.to_vec(),
                    at_ms: now_ms,
                    endpoint: endpoint.to_string(),
                }),
            }
            // Keep the most recent entries; expired ones go first.
            entries.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
            entries.truncate(ENTRIES_PER_SLOT);
            let Ok(bytes) = postcard::to_allocvec(&entries) else {
                continue;
            };
            match self.store.set(&self.key(group[0]), &bytes, cas) {
                Ok(()) | Err(StoreError::CasMismatch) => {}
                Err(StoreError::Host | StoreError::Full) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;

    #[test]
    fn hashes_chain_and_depend_on_the_model() {
        let a = block_hashes("m", "abcdefgh", 4, 10);
        let b = block_hashes("m", "abcdXXXX", 4, 10);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Same second block after a different first block: different hash (chained).
        let c = block_hashes("m", "zzzzefgh", 4, 10);
        assert_ne!(a[1], c[1]);
        assert_ne!(
            block_hashes("other", "abcd", 4, 10),
            block_hashes("m", "abcd", 4, 10)
        );
        assert_eq!(
            block_hashes("m", "abc", 4, 10),
            Vec::<u64>::new(),
            "partial blocks are not hashed"
        );
        assert_eq!(block_hashes("m", &"x".repeat(100), 4, 3).len(), 3);
        assert!(block_hashes("m", "abcd", 0, 3).is_empty());
    }

    #[test]
    fn finds_the_longest_shared_prefix_per_endpoint() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 1024, 60_000);
        let system = "You are a helpful assistant. ".repeat(8);
        let p1 = block_hashes("m", &format!("{system}question one"), 16, 64);
        let p2 = block_hashes("m", &format!("{system}another question"), 16, 64);
        ix.record(&p1, "10.0.0.1:8000", 1_000);
        let m = ix.matches(&p2, 2_000);
        let shared = system.len() / 16;
        let run = m.get("10.0.0.1:8000").unwrap();
        assert!(run >= shared, "{m:?} vs {shared}");
        assert!(run < p2.len());
        assert_eq!(ix.matches(&p1, 2_000).get("10.0.0.1:8000"), Some(p1.len()));
        assert!(ix
            .matches(&block_hashes("m", &"q".repeat(200), 16, 64), 2_000)
            .is_empty());
    }

    #[test]
    fn entries_expire() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 64, 1_000);
        let h = block_hashes("m", &"a".repeat(64), 16, 8);
        ix.record(&h, "e1", 0);
        assert_eq!(ix.matches(&h, 1_000).get("e1"), Some(4));
        assert!(ix.matches(&h, 1_001).is_empty());
    }

    #[test]
    fn a_run_must_start_at_the_first_block() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 4096, 60_000);
        let h = block_hashes("m", &"b".repeat(64), 16, 8);
        ix.record(&h[..2], "e1", 0);
        ix.record(&h, "e2", 0);
        ix.record(&h[3..], "e1", 0); // e1 "has" block 4 too, but not block 3
        let m = ix.matches(&h, 1);
        assert_eq!(m.get("e1"), Some(2));
        assert_eq!(m.get("e2"), Some(4));
    }

    #[test]
    fn recording_after_a_match_reads_no_slot_twice() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 4096, 60_000);
        let h = block_hashes("m", &"d".repeat(64), 16, 8);
        ix.record(&h, "e1", 0);
        let reads = store.reads();
        let m = ix.matches(&h, 1);
        ix.record_after(&h, "e2", 1, m);
        assert_eq!(store.reads() - reads, 1, "one read per group of blocks");
        let m = ix.matches(&h, 2);
        assert_eq!((m.get("e1"), m.get("e2")), (Some(4), Some(4)));
        // A miss stops the matching reads; recording reads the rest.
        let other = block_hashes("m", &"e".repeat(64), 16, 8);
        let reads = store.reads();
        let m = ix.matches(&other, 3);
        assert!(m.is_empty());
        ix.record_after(&other, "e1", 3, m);
        assert_eq!(store.reads() - reads, 1);
        assert_eq!(ix.matches(&other, 4).get("e1"), Some(4));
    }

    /// Prompts longer than a group: one read per group, runs continue across
    /// groups only for an endpoint that held every block before, and a longer
    /// prompt's entry serves the shorter prompts that start like it.
    #[test]
    fn runs_cross_groups_with_one_read_per_group() {
        const B: usize = BLOCKS_PER_SLOT;
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 4096, 60_000);
        // Three groups: a whole one, one that differs after 3 blocks, 4 blocks.
        let system = "s".repeat(16 * (B + 3));
        let long = block_hashes(
            "m",
            &format!("{system}{}", "x".repeat(16 * (B + 1))),
            16,
            64,
        );
        let other = block_hashes(
            "m",
            &format!("{system}{}", "y".repeat(16 * (B + 1))),
            16,
            64,
        );
        assert_eq!((long.len(), other.len()), (2 * B + 4, 2 * B + 4));
        ix.record(&long, "e1", 0);
        ix.record(&other[..5], "e2", 0);
        ix.record(&other[B..], "e2", 0); // the second group without the first: no run
        let reads = store.reads();
        let m = ix.matches(&other, 1);
        assert_eq!(
            store.reads() - reads,
            2,
            "groups 0 and 1; group 1 is not whole"
        );
        assert_eq!((m.get("e1"), m.get("e2")), (Some(B + 3), Some(5)));
        ix.record_after(&other, "e2", 1, m);
        let m = ix.matches(&other, 2);
        assert_eq!((m.get("e1"), m.get("e2")), (Some(B + 3), Some(2 * B + 4)));
        // The first B + 5 blocks of `long`: e1's entries cover them.
        assert_eq!(ix.matches(&long[..B + 5], 2).get("e1"), Some(B + 5));
        let (reads, (_, cas)) = (store.reads(), store.get(&ix.key(long[B])));
        ix.record(&long[..B + 5], "e1", 3);
        assert_eq!(store.reads() - reads, 3, "one read per group, and ours");
        assert_eq!(store.get(&ix.key(long[B])).1, cas, "fresh: not rewritten");
        let (entries, _) = ix.read(long[B]);
        let e1 = entries.iter().find(|e| e.endpoint == "e1").unwrap();
        assert_eq!(e1.blocks.len(), B, "the longer prompt's entry is kept");
    }

    #[test]
    fn slots_stay_bounded() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 1, 60_000); // everything collides
        for i in 0..20u64 {
            let h = block_hashes("m", &format!("{i:016}"), 16, 1);
            ix.record(&h, &format!("e{i}"), i);
        }
        let (entries, _) = ix.read(0);
        assert_eq!(entries.len(), ENTRIES_PER_SLOT);
        assert_eq!(entries[0].endpoint, "e19", "most recent first");
    }

    #[test]
    fn hot_prefixes_are_not_rewritten() {
        let store = MemoryStore::default();
        let ix = PrefixIndex::new(&store, 64, 1_000);
        let h = block_hashes("m", &"c".repeat(16), 16, 1);
        ix.record(&h, "e", 0);
        let (_, cas1) = store.get(&ix.key(h[0]));
        ix.record(&h, "e", 100);
        assert_eq!(store.get(&ix.key(h[0])).1, cas1, "no write within ttl/4");
        ix.record(&h, "e", 300);
        assert_ne!(store.get(&ix.key(h[0])).1, cas1);
    }
}
