//! The simulated engine's KV memory: one pool of `capacity` blocks shared by the running
//! requests and the prefix cache, as vLLM V1's `BlockPool` / `KVCacheManager`.
//!
//! * Each block has a reference count: the running requests holding it. A block held by
//!   several requests (a shared prefix) counts once.
//! * A full prompt block, once computed, is *cached* under the engine's chained hash of its
//!   prefix; a later request whose prompt starts with the same blocks references them
//!   ([`BlockPool::touch`]) instead of computing them.
//! * Blocks whose count drops to 0 go to the tail of the free queue *and keep their hash*:
//!   they stay cached until a new block is needed, which takes the head of the queue (least
//!   recently freed first) and evicts its hash. Requests free their blocks last to first, so a
//!   prompt's tail is evicted before its head.
//!
//! Changes of the cache go to an optional [`CacheEvents`] receiver as vLLM's KV events:
//! `stored` when full prompt blocks have been computed (runs of consecutive blocks with their
//! parent's hash and token ids), `removed` when a cached block is evicted, `cleared` on reset.
//! A hash already cached by another block (two requests computing the same prefix at once) is
//! not cached twice and not reported twice.
//!
//! A capacity of 0 means no KV limit and no prefix caching (blocks are handed out without
//! bound and never cached).
//!
//! The free queue is an intrusive doubly-linked list over the block array: every operation is
//! O(1) per block.

use std::collections::HashMap;
use std::sync::Arc;

use super::cache_events::{CacheEvents, StoredBlocks};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    /// Free-queue links (towards the head / the tail); `NIL` when not queued.
    prev: u32,
    next: u32,
    queued: bool,
}

/// The block pool of one engine.
#[derive(Debug)]
pub(crate) struct BlockPool {
    capacity: usize,
    block_size: usize,
    events: Option<Arc<dyn CacheEvents>>,
    blocks: Vec<Block>,
    cached: HashMap<u64, u32>,
    /// Free blocks, least recently freed at the head (taken first).
    head: u32,
    tail: u32,
    free: usize,
}

impl BlockPool {
    /// A pool of `capacity` blocks of `block_size` tokens (0: unbounded, no caching),
    /// reporting its changes to `events`.
    pub(crate) fn new(
        capacity: usize,
        block_size: usize,
        events: Option<Arc<dyn CacheEvents>>,
    ) -> BlockPool {
        let capacity = capacity.min(NIL as usize - 1);
        let mut pool = BlockPool {
            capacity,
            block_size: block_size.max(1),
            events,
            blocks: Vec::with_capacity(capacity),
            cached: HashMap::new(),
            head: NIL,
            tail: NIL,
            free: 0,
        };
        for _ in 0..capacity {
            pool.push_block();
        }
        pool
    }

    fn push_block(&mut self) -> u32 {
        let id = self.blocks.len() as u32;
        self.blocks.push(Block {
            refs: 0,
            hash: None,
            prev: NIL,
            next: NIL,
            queued: false,
        });
        self.push_tail(id);
        id
    }

    /// Whether the pool is bounded (a capacity above 0).
    pub(crate) fn bounded(&self) -> bool {
        self.capacity > 0
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks not held by any request (cached or not).
    pub(crate) fn free_blocks(&self) -> usize {
        if self.bounded() {
            self.free
        } else {
            usize::MAX
        }
    }

    /// Blocks held by at least one running request.
    pub(crate) fn used_blocks(&self) -> usize {
        if self.bounded() {
            self.capacity - self.free
        } else {
            0
        }
    }

    /// Blocks in use over capacity (0 when unbounded).
    pub(crate) fn usage(&self) -> f64 {
        if self.bounded() {
            self.used_blocks() as f64 / self.capacity as f64
        } else {
            0.0
        }
    }

    /// Cached blocks (held or not).
    #[cfg(test)]
    pub(crate) fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// The cached blocks of the leading run of `hashes` (no side effect).
    pub(crate) fn lookup(&self, hashes: &[u64]) -> Vec<u32> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// How many of `ids` are free (cached blocks no request holds): referencing them takes
    /// them off the free queue.
    pub(crate) fn free_among(&self, ids: &[u32]) -> usize {
        ids.iter()
            .filter(|&&i| self.blocks[i as usize].refs == 0)
            .count()
    }

    /// References cached blocks (a prefix hit).
    pub(crate) fn touch(&mut self, ids: &[u32]) {
        for &i in ids {
            if self.blocks[i as usize].refs == 0 {
                self.unlink(i);
            }
            self.blocks[i as usize].refs += 1;
        }
    }

    /// Takes `n` new blocks, evicting the cached hashes of the least recently freed ones
    /// (reported `removed`); `None` (and nothing taken) if fewer than `n` are free.
    pub(crate) fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if !self.bounded() {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let id = if self.head == NIL {
                    let id = self.push_block();
                    self.unlink(id);
                    id
                } else {
                    let id = self.head;
                    self.unlink(id);
                    id
                };
                self.blocks[id as usize].refs = 1;
                out.push(id);
            }
            return Some(out);
        }
        if n > self.free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            let b = &mut self.blocks[id as usize];
            b.refs = 1;
            if let Some(h) = b.hash.take() {
                self.cached.remove(&h);
                evicted.push(h);
            }
            out.push(id);
        }
        if let (Some(ev), false) = (&self.events, evicted.is_empty()) {
            ev.removed(&evicted);
        }
        Some(out)
    }

    /// Releases a request's blocks, last to first: those no other request holds go to the
    /// tail of the free queue (keeping their hash: still cached).
    pub(crate) fn free(&mut self, ids: &[u32]) {
        for &i in ids.iter().rev() {
            let b = &mut self.blocks[i as usize];
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                self.push_tail(i);
            }
        }
    }

    /// Caches the computed full prompt blocks `ids[from..to]` under `hashes[from..to]`, and
    /// reports them `stored` (with their token ids from `token_ids`).
    pub(crate) fn cache(
        &mut self,
        ids: &[u32],
        hashes: &[u64],
        token_ids: &[u32],
        from: usize,
        to: usize,
    ) {
        if !self.bounded() {
            return;
        }
        let bs = self.block_size;
        let mut run_start: Option<usize> = None;
        for i in from..=to {
            let fresh = i < to && {
                let (id, h) = (ids[i], hashes[i]);
                let b = &mut self.blocks[id as usize];
                if b.hash.is_none() && !self.cached.contains_key(&h) {
                    b.hash = Some(h);
                    self.cached.insert(h, id);
                    true
                } else {
                    false
                }
            };
            match (fresh, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    run_start = None;
                    if let Some(ev) = &self.events {
                        ev.stored(StoredBlocks {
                            parent: s.checked_sub(1).map(|p| hashes[p]),
                            block_hashes: hashes[s..i].to_vec(),
                            token_ids: token_ids.get(s * bs..i * bs).unwrap_or_default().to_vec(),
                            block_size: bs,
                            lora_name: None,
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// Drops every cached hash (vLLM's prefix-cache reset), reported `cleared`. Blocks held by
    /// running requests stay held, uncached.
    pub(crate) fn reset(&mut self) {
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        if let Some(ev) = &self.events {
            ev.cleared();
        }
    }

    fn unlink(&mut self, i: u32) {
        let Block {
            prev, next, queued, ..
        } = self.blocks[i as usize];
        if !queued {
            return;
        }
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[i as usize];
        b.prev = NIL;
        b.next = NIL;
        b.queued = false;
        self.free -= 1;
    }

    fn push_tail(&mut self, i: u32) {
        let tail = self.tail;
        let b = &mut self.blocks[i as usize];
        if b.queued {
            return;
        }
        b.prev = tail;
        b.next = NIL;
        b.queued = true;
        if tail == NIL {
            self.head = i;
        } else {
            self.blocks[tail as usize].next = i;
        }
        self.tail = i;
        self.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub(crate) struct Recorder(pub(crate) Mutex<Vec<Event>>);

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Event {
        Stored(Vec<u64>, Option<u64>),
        Removed(Vec<u64>),
        Cleared,
    }

    impl CacheEvents for Recorder {
        fn stored(&self, b: StoredBlocks) {
            self.0
                .lock()
                .unwrap()
                .push(Event::Stored(b.block_hashes, b.parent));
        }
        fn removed(&self, h: &[u64]) {
            self.0.lock().unwrap().push(Event::Removed(h.to_vec()));
        }
        fn cleared(&self) {
            self.0.lock().unwrap().push(Event::Cleared);
        }
    }

    fn pool(capacity: usize) -> (BlockPool, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let ev: Arc<dyn CacheEvents> = rec.clone();
        (BlockPool::new(capacity, 2, Some(ev)), rec)
    }

    fn take(rec: &Recorder) -> Vec<Event> {
        std::mem::take(&mut *rec.0.lock().unwrap())
    }

    #[test]
    fn shared_prefix_blocks_count_once_and_stay_cached_when_freed() {
        let (mut p, rec) = pool(10);
        let a = p.allocate(3).unwrap();
        p.cache(&a, &[11, 12, 13], &[0; 6], 0, 3);
        assert_eq!(take(&rec), vec![Event::Stored(vec![11, 12, 13], None)]);
        // A second request shares the first two blocks and adds one of its own.
        let hit = p.lookup(&[11, 12, 99]);
        assert_eq!(hit, a[..2].to_vec());
        assert_eq!(p.free_among(&hit), 0, "held by the first request");
        p.touch(&hit);
        let own = p.allocate(1).unwrap();
        assert_eq!(p.used_blocks(), 4, "3 + 1, the shared two counted once");
        assert_eq!(p.usage(), 0.4);
        p.free(&a);
        assert_eq!(p.used_blocks(), 3, "the shared blocks are still held");
        p.free(&[hit, own].concat());
        assert_eq!((p.used_blocks(), p.cached_blocks()), (0, 3));
        assert_eq!(p.lookup(&[11, 12, 13]).len(), 3, "freed blocks stay cached");
        assert!(take(&rec).is_empty());
    }

    #[test]
    fn only_unreferenced_blocks_are_evicted_least_recently_freed_first_tail_first() {
        let (mut p, rec) = pool(6);
        let a = p.allocate(2).unwrap();
        p.cache(&a, &[1, 2], &[0; 4], 0, 2);
        let b = p.allocate(2).unwrap();
        p.cache(&b, &[5, 6], &[0; 4], 0, 2);
        let held = p.allocate(2).unwrap();
        p.cache(&held, &[8, 9], &[0; 4], 0, 2);
        take(&rec);
        p.free(&a);
        p.free(&b);
        // Free queue: 2, 1, 6, 5 (each request's tail first). Three new blocks evict 2, 1, 6;
        // the held blocks 8, 9 are never candidates.
        assert!(p.allocate(5).is_none(), "only 4 blocks are free");
        p.allocate(3).unwrap();
        assert_eq!(take(&rec), vec![Event::Removed(vec![2, 1, 6])]);
        assert_eq!(p.lookup(&[5]).len(), 1);
        assert_eq!(p.lookup(&[8, 9]).len(), 2);
        assert_eq!(p.free_blocks(), 1);
    }

    #[test]
    fn a_hit_on_a_free_cached_block_takes_it_off_the_free_queue() {
        let (mut p, _rec) = pool(3);
        let a = p.allocate(2).unwrap();
        p.cache(&a, &[1, 2], &[0; 4], 0, 2);
        p.free(&a);
        let hit = p.lookup(&[1, 2]);
        assert_eq!(p.free_among(&hit), 2);
        p.touch(&hit);
        assert_eq!(p.free_blocks(), 1);
        assert!(p.allocate(2).is_none());
    }

    #[test]
    fn duplicate_hashes_are_cached_and_reported_once_and_runs_split_around_them() {
        let (mut p, rec) = pool(8);
        let a = p.allocate(1).unwrap();
        p.cache(&a, &[2], &[0; 2], 0, 1);
        take(&rec);
        let b = p.allocate(3).unwrap();
        p.cache(&b, &[1, 2, 3], &[7, 7, 8, 8, 9, 9], 0, 3);
        assert_eq!(
            take(&rec),
            vec![
                Event::Stored(vec![1], None),
                Event::Stored(vec![3], Some(2))
            ]
        );
        assert_eq!(p.cached_blocks(), 3);
    }

    #[test]
    fn reset_clears_hashes_and_an_unbounded_pool_never_caches() {
        let (mut p, rec) = pool(4);
        let a = p.allocate(2).unwrap();
        p.cache(&a, &[1, 2], &[0; 4], 0, 2);
        p.reset();
        assert_eq!(take(&rec).last(), Some(&Event::Cleared));
        assert!(p.lookup(&[1]).is_empty());
        assert_eq!(p.used_blocks(), 2, "running requests keep their blocks");

        let (mut u, rec) = pool(0);
        let x = u.allocate(1000).unwrap();
        u.cache(&x, &[1], &[0; 2], 0, 1);
        assert!(u.lookup(&[1]).is_empty());
        assert_eq!(u.usage(), 0.0);
        u.free(&x);
        assert_eq!(u.allocate(1000).unwrap().len(), 1000);
        assert!(take(&rec).is_empty());
    }
}
