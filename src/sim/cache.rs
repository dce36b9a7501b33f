//! The simulated engine's prefix cache: an LRU set of chained block hashes.
//!
//! Blocks are identified by the engine's own chained hashes of their token ids (see
//! `super::prompt`), so a hash stands for the whole prefix up to and including its block,
//! exactly as in vLLM's automatic prefix caching. Only prompt blocks are cached (never generated
//! tokens), and only full blocks.
//!
//! Every change is reported to an optional [`CacheEvents`] receiver, as vLLM reports KV events:
//! blocks evicted (`removed`, in LRU order) before the blocks stored by the same admission
//! (`stored`, in runs of consecutive new blocks with their parent's hash and token ids). A
//! block stored and evicted again within one admission (a prompt longer than the cache) is
//! reported neither way.
//!
//! The LRU is an intrusive doubly-linked list over a slab, indexed by a hash map: every
//! operation is O(1) per block.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::cache_events::{CacheEvents, StoredBlocks};

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
    block_size: usize,
    events: Option<Arc<dyn CacheEvents>>,
    /// Blocks cached before the current admission and evicted by it, in eviction order.
    evicted: Vec<u64>,
    /// Blocks inserted by the current admission.
    fresh: HashSet<u64>,
    index: HashMap<u64, usize>,
    nodes: Vec<Node>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: evicted first.
    tail: usize,
}

impl PrefixCache {
    /// A cache holding at most `capacity` blocks of `block_size` tokens (0 disables caching),
    /// reporting its changes to `events`.
    pub(crate) fn new(
        capacity: usize,
        block_size: usize,
        events: Option<Arc<dyn CacheEvents>>,
    ) -> PrefixCache {
        PrefixCache {
            capacity,
            block_size: block_size.max(1),
            events,
            evicted: Vec::new(),
            fresh: HashSet::new(),
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
    ///
    /// `token_ids` are the prompt's ids (at least `hashes.len() * block_size` of them), reported
    /// with the blocks stored.
    pub(crate) fn admit(&mut self, hashes: &[u64], token_ids: &[u32]) -> usize {
        let hits = self.matched_blocks(hashes);
        if self.capacity == 0 {
            return hits;
        }
        let Some(events) = self.events.clone() else {
            for &h in hashes.iter().rev() {
                self.touch_or_insert(h);
            }
            return hits;
        };
        let mut inserted = vec![false; hashes.len()];
        self.evicted.clear();
        self.fresh.clear();
        for (i, &h) in hashes.iter().enumerate().rev() {
            inserted[i] = self.touch_or_insert(h);
        }
        self.fresh.clear();
        if !self.evicted.is_empty() {
            events.removed(&self.evicted);
            self.evicted.clear();
        }
        let bs = self.block_size;
        let mut i = 0;
        while i < hashes.len() {
            if !(inserted[i] && self.index.contains_key(&hashes[i])) {
                i += 1;
                continue;
            }
            let start = i;
            while i < hashes.len() && inserted[i] && self.index.contains_key(&hashes[i]) {
                i += 1;
            }
            let ids = token_ids.get(start * bs..i * bs).unwrap_or_default();
            events.stored(StoredBlocks {
                parent: start.checked_sub(1).map(|p| hashes[p]),
                block_hashes: hashes[start..i].to_vec(),
                token_ids: ids.to_vec(),
                block_size: bs,
                lora_name: None,
            });
        }
        hits
    }

    /// Drops every block (vLLM's prefix-cache reset), reported as `cleared`.
    pub(crate) fn clear(&mut self) {
        self.index.clear();
        self.nodes.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
        if let Some(events) = &self.events {
            events.cleared();
        }
    }

    /// Makes `hash` the most recently used block, inserting it if missing; returns whether it
    /// was inserted.
    fn touch_or_insert(&mut self, hash: u64) -> bool {
        if let Some(&i) = self.index.get(&hash) {
            self.unlink(i);
            self.push_front(i);
            return false;
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
        if self.events.is_some() {
            self.fresh.insert(hash);
        }
        true
    }

    fn evict_lru(&mut self) {
        let i = self.tail;
        if i == NIL {
            return;
        }
        self.unlink(i);
        let hash = self.nodes[i].hash;
        self.index.remove(&hash);
        self.free.push(i);
        // Blocks inserted by the admission under way were never reported stored.
        if self.events.is_some() && !self.fresh.contains(&hash) {
            self.evicted.push(hash);
        }
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
    use std::sync::Mutex;

    fn cache(capacity: usize) -> PrefixCache {
        PrefixCache::new(capacity, 16, None)
    }

    /// Records every event, in order.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<Event>>);

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Stored(StoredBlocks),
        Removed(Vec<u64>),
        Cleared,
    }

    impl CacheEvents for Recorder {
        fn stored(&self, blocks: StoredBlocks) {
            self.0.lock().unwrap().push(Event::Stored(blocks));
        }
        fn removed(&self, block_hashes: &[u64]) {
            self.0
                .lock()
                .unwrap()
                .push(Event::Removed(block_hashes.to_vec()));
        }
        fn cleared(&self) {
            self.0.lock().unwrap().push(Event::Cleared);
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn recorded(capacity: usize, block_size: usize) -> (PrefixCache, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let events: Arc<dyn CacheEvents> = rec.clone();
        (PrefixCache::new(capacity, block_size, Some(events)), rec)
    }

    fn stored(parent: Option<u64>, hashes: &[u64], ids: &[u32]) -> Event {
        Event::Stored(StoredBlocks {
            parent,
            block_hashes: hashes.to_vec(),
            token_ids: ids.to_vec(),
            block_size: 2,
            lora_name: None,
        })
    }

    #[test]
    fn stored_blocks_carry_their_token_ids_and_parent_and_repeats_store_nothing() {
        let (mut c, rec) = recorded(100, 2);
        // Three full blocks of 2 ids and a partial one (never cached).
        let ids = [10, 11, 12, 13, 14, 15, 16];
        assert_eq!(c.admit(&[1, 2, 3], &ids), 0);
        assert_eq!(
            rec.take(),
            vec![stored(None, &[1, 2, 3], &[10, 11, 12, 13, 14, 15])]
        );
        // The same prompt again: all hits, no event.
        assert_eq!(c.admit(&[1, 2, 3], &ids), 3);
        assert_eq!(rec.take(), vec![]);
        // A prompt sharing the first two blocks stores only its new block, after parent 2.
        assert_eq!(c.admit(&[1, 2, 7, 8], &[10, 11, 12, 13, 20, 21, 22, 23]), 2);
        assert_eq!(
            rec.take(),
            vec![stored(Some(2), &[7, 8], &[20, 21, 22, 23])]
        );
    }

    #[test]
    fn evictions_are_reported_removed_in_lru_order_before_the_new_blocks() {
        let (mut c, rec) = recorded(4, 2);
        c.admit(&[1, 2], &[1, 1, 2, 2]);
        c.admit(&[5, 6], &[5, 5, 6, 6]);
        rec.take();
        // LRU order now (oldest first): 2, 1, 6, 5. Three new blocks evict 2, 1, 6.
        c.admit(&[7, 8, 9], &[7, 7, 8, 8, 9, 9]);
        assert_eq!(
            rec.take(),
            vec![
                Event::Removed(vec![2, 1, 6]),
                stored(None, &[7, 8, 9], &[7, 7, 8, 8, 9, 9]),
            ]
        );
        assert!(c.contains(5) && !c.contains(6));
    }

    #[test]
    fn a_prompt_longer_than_the_cache_reports_only_what_stays() {
        let (mut c, rec) = recorded(3, 1);
        c.admit(&[1, 2, 3, 4, 5], &[11, 12, 13, 14, 15]);
        // Blocks 5 and 4 were inserted then evicted by the same admission: never reported.
        let ev = rec.take();
        assert_eq!(
            ev,
            vec![Event::Stored(StoredBlocks {
                parent: None,
                block_hashes: vec![1, 2, 3],
                token_ids: vec![11, 12, 13],
                block_size: 1,
                lora_name: None,
            })]
        );
        // A cached head evicted while its prompt's tail is inserted is removed, then stored
        // again: the receiver ends up with what the cache holds.
        let (mut c, rec) = recorded(1, 1);
        c.admit(&[1], &[11]);
        rec.take();
        assert_eq!(c.admit(&[1, 2], &[11, 12]), 1);
        let ev = rec.take();
        assert_eq!(ev[0], Event::Removed(vec![1]));
        assert_eq!(
            ev[1],
            Event::Stored(StoredBlocks {
                parent: None,
                block_hashes: vec![1],
                token_ids: vec![11],
                block_size: 1,
                lora_name: None,
            })
        );
        assert_eq!(ev.len(), 2);
        assert!(c.contains(1) && !c.contains(2));
    }

    #[test]
    fn a_reset_drops_everything_and_is_reported_cleared() {
        let (mut c, rec) = recorded(4, 1);
        c.admit(&[1, 2], &[11, 12]);
        rec.take();
        c.clear();
        assert_eq!(rec.take(), vec![Event::Cleared]);
        assert_eq!(c.len(), 0);
        assert_eq!(
            c.admit(&[1, 2], &[11, 12]),
            0,
            "nothing cached after a reset"
        );
        assert_eq!(rec.take(), vec![stored_1(&[1, 2], &[11, 12])]);
        // The LRU list was rebuilt from scratch: evictions still go oldest first.
        c.admit(&[5, 6, 7], &[15, 16, 17]);
        assert_eq!(rec.take()[0], Event::Removed(vec![2]));
    }

    fn stored_1(hashes: &[u64], ids: &[u32]) -> Event {
        Event::Stored(StoredBlocks {
            parent: None,
            block_hashes: hashes.to_vec(),
            token_ids: ids.to_vec(),
            block_size: 1,
            lora_name: None,
        })
    }

    #[test]
    fn repeated_prompt_hits_every_block() {
        let mut c = cache(100);
        let h = tokens::block_hashes("a".repeat(64 * 5 + 3).as_bytes(), 16);
        assert_eq!(h.len(), 5);
        assert_eq!(c.admit(&h, &[]), 0);
        assert_eq!(c.len(), 5);
        assert_eq!(c.admit(&h, &[]), 5);
        assert_eq!(c.len(), 5);
    }

    #[test]
    fn only_the_leading_run_counts() {
        let mut c = cache(100);
        let a = "a".repeat(64 * 4);
        c.admit(&tokens::block_hashes(a.as_bytes(), 16), &[]);
        // Same first two blocks, then diverges: chained hashes differ from block 2 on.
        let mut b = a.clone();
        b.replace_range(130..131, "b");
        assert_eq!(c.admit(&tokens::block_hashes(b.as_bytes(), 16), &[]), 2);
        // A prompt that merely shares a later block (but not the first) hits nothing.
        assert_eq!(c.matched_blocks(&[1, 2, 3]), 0);
    }

    #[test]
    fn evicts_least_recently_used_and_tails_first() {
        let mut c = cache(4);
        c.admit(&[1, 2, 3], &[]);
        c.admit(&[10, 11], &[]);
        // 5 blocks offered to a capacity of 4: the LRU one goes, which is the tail (3) of the
        // first prompt, not its head.
        assert_eq!(c.len(), 4);
        assert!(!c.contains(3));
        assert!(c.contains(1) && c.contains(2));
        assert_eq!(c.matched_blocks(&[1, 2, 3]), 2);
        // Touching [1, 2] makes them recent; the next insertion evicts 11 then 10.
        c.admit(&[1, 2], &[]);
        c.admit(&[20], &[]);
        assert!(!c.contains(11));
        c.admit(&[21], &[]);
        assert!(!c.contains(10));
        assert!(c.contains(1) && c.contains(2) && c.contains(20) && c.contains(21));
    }

    #[test]
    fn prompt_longer_than_capacity_keeps_its_head() {
        let mut c = cache(3);
        assert_eq!(c.admit(&[1, 2, 3, 4, 5], &[]), 0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.matched_blocks(&[1, 2, 3, 4, 5]), 3);
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let mut c = cache(0);
        assert_eq!(c.admit(&[1, 2], &[]), 0);
        assert_eq!(c.admit(&[1, 2], &[]), 0);
        assert_eq!(c.len(), 0);
    }
}
