//! The KV cache as vLLM's V1 block manager sees it: a fixed pool of blocks of
//! `block_size` tokens, reference-counted by the requests that use them, and an
//! automatic prefix cache: a full prompt block is keyed by a hash chained over all
//! the tokens before it, so a block matches only when the whole prefix matches.
//!
//! Unreferenced blocks sit in one free queue in LRU order; cached ones keep their
//! contents (and stay findable) until allocation reuses them, so "free" includes
//! "cached but evictable", exactly as vLLM counts KV usage.

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    caching: bool,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<u64>>,
    /// The block's key in `free` while it is unreferenced.
    free_key: Vec<Option<i64>>,
    /// Free queue: smallest key is reused first. Hashed blocks get increasing
    /// positive keys (LRU order); blocks holding nothing reusable get decreasing
    /// negative keys, so they are reused before any cached content is evicted.
    free: BTreeMap<i64, BlockId>,
    next_back: i64,
    next_front: i64,
    cached: HashMap<u64, BlockId>,
    evictions: u64,
}

/// Chained block hashes of the full blocks of `tokens`, keyed also by `salt`
/// (the LoRA adapter: the same text under another adapter is other KV).
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: u64) -> Vec<u64> {
    let mut prev = salt ^ 0x9e37_79b9_7f4a_7c15;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            let mut h = prev;
            for t in block {
                h = mix(h ^ u64::from(*t));
            }
            prev = h;
            h
        })
        .collect()
}

/// A stable hash of a name, for `block_hashes`' salt.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finalizer: cheap, well spread, deterministic.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl KvCache {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        let mut kv = KvCache {
            block_size: block_size.max(1),
            caching,
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            free_key: vec![None; num_blocks],
            free: BTreeMap::new(),
            next_back: 1,
            next_front: -1,
            cached: HashMap::new(),
            evictions: 0,
        };
        for b in 0..num_blocks {
            let key = kv.next_back;
            kv.next_back += 1;
            kv.free.insert(key, b as BlockId);
            kv.free_key[b] = Some(key);
        }
        kv
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks not referenced by any request (cached ones included).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks holding a reusable cached prefix.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// vLLM's `kv_cache_usage_perc`: referenced blocks over all blocks, 0..1.
    pub fn usage(&self) -> f64 {
        match self.num_blocks() {
            0 => 0.0,
            n => 1.0 - self.num_free() as f64 / n as f64,
        }
    }

    /// Tokens `n` blocks hold.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached blocks matching `hashes` from the start.
    pub fn lookup(&self, hashes: &[u64]) -> Vec<BlockId> {
        if !self.caching {
            return Vec::new();
        }
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// How many of `blocks` are unreferenced (taking them shrinks the free pool).
    pub fn unreferenced_among(&self, blocks: &[BlockId]) -> usize {
        blocks
            .iter()
            .filter(|b| self.ref_cnt[**b as usize] == 0)
            .count()
    }

    /// Takes a reference on cache-hit blocks.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let i = b as usize;
            if self.ref_cnt[i] == 0 {
                if let Some(k) = self.free_key[i].take() {
                    self.free.remove(&k);
                }
            }
            self.ref_cnt[i] += 1;
        }
    }

    /// `n` fresh blocks, evicting the least recently used cached ones if needed;
    /// None (and nothing taken) when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first()?;
            let i = b as usize;
            self.free_key[i] = None;
            if let Some(h) = self.hash[i].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
                self.evictions += 1;
            }
            self.ref_cnt[i] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Records that `block` now holds the full block with `hash`. A block with the
    /// same hash already cached wins (two requests prefilled the same prefix at
    /// once); this one then holds nothing reusable.
    pub fn commit(&mut self, block: BlockId, hash: u64) {
        let i = block as usize;
        if !self.caching || self.hash[i].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash[i] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Drops a request's references. Blocks are queued tail first, so a request's
    /// last blocks (the least shared part of a prefix) are evicted before its first.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let i = b as usize;
            debug_assert!(self.ref_cnt[i] > 0, "double free of block {b}");
            self.ref_cnt[i] = self.ref_cnt[i].saturating_sub(1);
            if self.ref_cnt[i] == 0 {
                let key = if self.hash[i].is_some() {
                    self.next_back += 1;
                    self.next_back
                } else {
                    self.next_front -= 1;
                    self.next_front
                };
                self.free.insert(key, b);
                self.free_key[i] = Some(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2, 0);
        assert_eq!(a.len(), 3, "only full blocks");
        let b = block_hashes(&[1, 2, 9, 9, 5, 6], 2, 0);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2], "same block after a different prefix differs");
        assert_ne!(a[0], block_hashes(&[1, 2], 2, 7)[0], "salt separates");
    }

    #[test]
    fn allocate_release_and_usage() {
        let mut kv = KvCache::new(4, 16, true);
        assert_eq!(kv.usage(), 0.0);
        let a = kv.allocate(3).unwrap();
        assert_eq!(kv.num_free(), 1);
        assert!((kv.usage() - 0.75).abs() < 1e-9);
        assert!(kv.allocate(2).is_none(), "all or nothing");
        assert_eq!(kv.num_free(), 1);
        kv.release(&a);
        assert_eq!(kv.num_free(), 4);
        assert_eq!(kv.usage(), 0.0);
    }

    #[test]
    fn cached_blocks_survive_release_and_are_found() {
        let mut kv = KvCache::new(4, 2, true);
        let h = block_hashes(&[1, 2, 3, 4], 2, 0);
        let a = kv.allocate(2).unwrap();
        kv.commit(a[0], h[0]);
        kv.commit(a[1], h[1]);
        kv.release(&a);
        assert_eq!(kv.num_free(), 4, "cached blocks count as free");
        let hit = kv.lookup(&h);
        assert_eq!(hit, a);
        assert_eq!(kv.unreferenced_among(&hit), 2);
        kv.touch(&hit);
        assert_eq!(kv.num_free(), 2);
        // A second user of the same blocks: refcounted.
        kv.touch(&hit);
        kv.release(&hit);
        assert_eq!(kv.num_free(), 2);
        kv.release(&hit);
        assert_eq!(kv.num_free(), 4);
    }

    #[test]
    fn eviction_is_lru_and_prefers_empty_blocks() {
        let mut kv = KvCache::new(3, 1, true);
        let h = block_hashes(&[1, 2, 3], 1, 0);
        let a = kv.allocate(3).unwrap();
        kv.commit(a[0], h[0]);
        kv.commit(a[1], h[1]);
        // a[2] holds nothing cacheable.
        kv.release(&a[..1]);
        kv.release(&a[1..]);
        // The empty block goes first, then the least recently freed cached one.
        let b = kv.allocate(1).unwrap();
        assert_eq!(b, vec![a[2]]);
        assert_eq!(kv.lookup(&h[..1]), vec![a[0]]);
        let c = kv.allocate(1).unwrap();
        assert_eq!(c, vec![a[0]], "LRU cached block evicted");
        assert_eq!(kv.evictions(), 1);
        assert!(kv.lookup(&h[..1]).is_empty());
        assert_eq!(kv.num_cached(), 1);
    }

    #[test]
    fn touching_a_block_protects_it_from_eviction() {
        let mut kv = KvCache::new(2, 1, true);
        let h = block_hashes(&[7], 1, 0);
        let a = kv.allocate(1).unwrap();
        kv.commit(a[0], h[0]);
        kv.release(&a);
        let hit = kv.lookup(&h);
        kv.touch(&hit);
        assert!(kv.allocate(2).is_none());
        let b = kv.allocate(1).unwrap();
        assert_ne!(b, a);
        assert_eq!(kv.lookup(&h), a);
    }

    #[test]
    fn duplicate_prefix_keeps_the_first_and_caching_can_be_off() {
        let mut kv = KvCache::new(2, 1, true);
        let a = kv.allocate(2).unwrap();
        kv.commit(a[0], 42);
        kv.commit(a[1], 42);
        assert_eq!(kv.num_cached(), 1);
        assert_eq!(kv.lookup(&[42]), vec![a[0]]);
        let mut off = KvCache::new(2, 1, false);
        let b = off.allocate(1).unwrap();
        off.commit(b[0], 42);
        assert!(off.lookup(&[42]).is_empty());
    }
}
