//! The simulated engine's prefix cache: an LRU set of chained block hashes.
//!
//! Blocks are identified by the chained hashes of [`crate::tokens::block_hashes`], so a hash
//! stands for the whole prefix up to and including its block, exactly as in vLLM's automatic
//! prefix caching. Only prompt blocks are cached (never generated tokens), and only full blocks.
//!
//! The LRU is an intrusive doubly-linked list over a slab, indexed by a hash map: every
//! operation is O(1) per block.

use std::collections::HashMap;

const NIL: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// An LRU set of at most `capacity` block hashes.
#[derive(Debug)]
pub(crate) struct PrefixCache {
    capacity: usize,
    index: HashMap<u64, usize>,
    nodes: Vec<Node>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: evicted first.
    tail: usize,
}

impl PrefixCache {
    /// A cache holding at most `capacity` blocks; 0 disables caching.
    pub(crate) fn new(capacity: usize) -> PrefixCache {
        PrefixCache {
            capacity,
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// Number of blocks held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether `hash` is cached (does not touch it).
    #[cfg(test)]
    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.index.contains_key(&hash)
    }

    /// Number of leading blocks of `hashes` that are cached (does not touch them).
    pub(crate) fn matched_blocks(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }

    /// Admits a prompt: returns its number of leading cached blocks, then makes all of its
    /// blocks most recently used, inserting the missing ones and evicting the least recently
    /// used blocks as needed.
    ///
    /// Blocks are touched from last to first, so the prompt's first block ends up the most
    /// recently used and a prompt's tail blocks are evicted before its head, as vLLM does (it
    /// frees a request's blocks in reverse order): shared prefixes survive longest.
    pub(crate) fn admit(&mut self, hashes: &[u64]) -> usize {
        let hits = self.matched_blocks(hashes);
        if self.capacity == 0 {
            return hits;
        }
        for &h in hashes.iter().rev() {
            self.touch_or_insert(h);
        }
        hits
    }

    fn touch_or_insert(&mut self, hash: u64) {
        if let Some(&i) = self.index.get(&hash) {
            self.unlink(i);
            self.push_front(i);
            return;
        }
        if self.index.len() >= self.capacity {
            self.evict_lru();
        }
        let node = Node {
            hash,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.index.insert(hash, i);
        self.push_front(i);
    }

    fn evict_lru(&mut self) {
        let i = self.tail;
        if i == NIL {
            return;
        }
        self.unlink(i);
        self.index.remove(&self.nodes[i].hash);
        self.free.push(i);
    }

    fn unlink(&mut self, i: usize) {
        let Node { prev, next, .. } = self.nodes[i];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
        self.nodes[i].prev = NIL;
        self.nodes[i].next = NIL;
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head != NIL {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens;

    #[test]
    fn repeated_prompt_hits_every_block() {
        let mut c = PrefixCache::new(100);
        let h = tokens::block_hashes("a".repeat(64 * 5 + 3).as_bytes(), 16);
        assert_eq!(h.len(), 5);
        assert_eq!(c.admit(&h), 0);
        assert_eq!(c.len(), 5);
        assert_eq!(c.admit(&h), 5);
        assert_eq!(c.len(), 5);
    }

    #[test]
    fn only_the_leading_run_counts() {
        let mut c = PrefixCache::new(100);
        let a = "a".repeat(64 * 4);
        c.admit(&tokens::block_hashes(a.as_bytes(), 16));
        // Same first two blocks, then diverges: chained hashes differ from block 2 on.
        let mut b = a.clone();
        b.replace_range(130..131, "b");
        assert_eq!(c.admit(&tokens::block_hashes(b.as_bytes(), 16)), 2);
        // A prompt that merely shares a later block (but not the first) hits nothing.
        assert_eq!(c.matched_blocks(&[1, 2, 3]), 0);
    }

    #[test]
    fn evicts_least_recently_used_and_tails_first() {
        let mut c = PrefixCache::new(4);
        c.admit(&[1, 2, 3]);
        c.admit(&[10, 11]);
        // 5 blocks offered to a capacity of 4: the LRU one goes, which is the tail (3) of the
        // first prompt, not its head.
        assert_eq!(c.len(), 4);
        assert!(!c.contains(3));
        assert!(c.contains(1) && c.contains(2));
        assert_eq!(c.matched_blocks(&[1, 2, 3]), 2);
        // Touching [1, 2] makes them recent; the next insertion evicts 11 then 10.
        c.admit(&[1, 2]);
        c.admit(&[20]);
        assert!(!c.contains(11));
        c.admit(&[21]);
        assert!(!c.contains(10));
        assert!(c.contains(1) && c.contains(2) && c.contains(20) && c.contains(21));
    }

    #[test]
    fn prompt_longer_than_capacity_keeps_its_head() {
        let mut c = PrefixCache::new(3);
        assert_eq!(c.admit(&[1, 2, 3, 4, 5]), 0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.matched_blocks(&[1, 2, 3, 4, 5]), 3);
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let mut c = PrefixCache::new(0);
        assert_eq!(c.admit(&[1, 2]), 0);
        assert_eq!(c.admit(&[1, 2]), 0);
        assert_eq!(c.len(), 0);
    }
}
