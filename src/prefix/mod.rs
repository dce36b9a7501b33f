//! The router-side KV-prefix index behind `kv_lookup`.
//!
//! The index remembers, per prompt block, which engines the router sent that block to. Block
//! hashes are chained ([`crate::tokens`]), so a hash identifies the whole prefix up to and
//! including its block; an engine's match for a new prompt is the number of *leading* blocks it
//! holds, counted until the first block it does not hold.
//!
//! Memory is bounded: the index is split into [`SHARDS`] shards (by the top bits of the block
//! hash), each an LRU-ordered table sized against its share of the byte budget. Inserting a
//! prompt touches its blocks from the last to the first, so within a prompt the first blocks are
//! the most recently used and eviction erodes prefixes from their tail, never leaving a hole at
//! the front. A block's recency is shared by all engines holding it. Lookups do not refresh
//! recency: the proxy inserts every routed prompt, which does.
//!
//! All methods take `&self`; each touches one shard mutex per block, held for one table probe.

pub mod exact;
mod shard;

use std::sync::{Mutex, MutexGuard};

use shard::Shard;

/// Number of independently locked shards.
pub const SHARDS: usize = 16;

/// The default memory budget: 64 MiB.
pub const DEFAULT_BUDGET_BYTES: usize = 64 << 20;

/// Records which engine each prompt's blocks were routed to.
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Box<[Mutex<Shard>]>,
    budget: usize,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::new(DEFAULT_BUDGET_BYTES)
    }
}

fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARDS.trailing_zeros())) as usize
}

impl PrefixIndex {
    /// An index bounded to `budget_bytes` of memory (its tables, entries and engine lists).
    pub fn new(budget_bytes: usize) -> PrefixIndex {
        let per_shard = budget_bytes / SHARDS;
        PrefixIndex {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            budget: budget_bytes,
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard cannot leave it inconsistent in a way that matters
        // more than losing the index, so a poisoned lock is simply reused.
        self.shards[shard_of(hash)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// For each engine id in `engines`, the number of leading blocks of `hashes` it holds.
    pub fn match_blocks(&self, hashes: &[u64], engines: &[u32]) -> Vec<usize> {
        let mut out = vec![0; engines.len()];
        if engines.is_empty() {
            return out;
        }
        for (i, &h) in hashes.iter().enumerate() {
            let shard = self.shard(h);
            let Some(holders) = shard.holders(h) else {
                break;
            };
            let mut alive = 0;
            for (n, e) in out.iter_mut().zip(engines) {
                if *n == i && holders.contains(e) {
                    *n = i + 1;
                    alive += 1;
                }
            }
            if alive == 0 {
                break;
            }
        }
        out
    }

    /// Records that the prompt with these block hashes was routed to `engine`.
    pub fn insert(&self, engine: u32, hashes: &[u64]) {
        // Last block first: the first blocks end up most recently used.
        for &h in hashes.iter().rev() {
            self.shard(h).insert(h, engine);
        }
    }

    /// Drops every entry of `engine`.
    pub fn remove_engine(&self, engine: u32) {
        for s in self.shards.iter() {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove_engine(engine);
        }
    }

    /// The configured budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    /// Bytes currently held by the index's containers (from their capacities).
    pub fn accounted_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .accounted_bytes()
            })
            .sum()
    }

    /// Number of blocks stored.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::block_hashes;

    #[test]
    fn longest_consecutive_match_per_engine() {
        let idx = PrefixIndex::new(1 << 20);
        let a = "a".repeat(64 * 4);
        let mut b = a.clone();
        b.replace_range(64 * 2.., &"b".repeat(64 * 2));
        let ha = block_hashes(a.as_bytes(), 16);
        let hb = block_hashes(b.as_bytes(), 16);
        idx.insert(1, &ha);
        idx.insert(2, &hb[..3]);
        assert_eq!(idx.match_blocks(&ha, &[1, 2, 3]), vec![4, 2, 0]);
        assert_eq!(idx.match_blocks(&hb, &[1, 2, 3]), vec![2, 3, 0]);
        assert_eq!(idx.match_blocks(&[], &[1]), vec![0]);
        assert_eq!(idx.match_blocks(&ha, &[]), Vec::<usize>::new());
        idx.remove_engine(1);
        assert_eq!(idx.match_blocks(&ha, &[1, 2]), vec![0, 2]);
    }
}
