//! One shard of the prefix index: an open-addressing table (linear probing, backward-shift
//! deletion, so no tombstones) over a slab of entries threaded on an LRU list.
//!
//! Every container is sized against the shard's byte budget up front: the slab never holds
//! more than `max_entries` entries and the table never grows past the size needed for them, so
//! the bytes accounted from the containers' real capacities stay within the budget.

use std::mem::size_of;

const NIL: u32 = u32::MAX;
/// Entries inline in a slot before the engine list spills to the heap.
const INLINE: usize = 3;
/// Table load factor: at most 3 entries per 4 buckets.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
/// Bytes kept free for spilled engine lists when sizing the slab.
const SPILL_HEADROOM_PERCENT: usize = 3;

/// The engines holding one block: a few inline, more on the heap.
#[derive(Debug)]
enum Ids {
    Inline { len: u8, ids: [u32; INLINE] },
    Heap(Vec<u32>),
}

impl Ids {
    fn one(id: u32) -> Ids {
        Ids::Inline {
            len: 1,
            ids: [id, 0, 0],
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            Ids::Inline { len, ids } => &ids[..usize::from(*len)],
            Ids::Heap(v) => v,
        }
    }

    fn contains(&self, id: u32) -> bool {
        self.as_slice().contains(&id)
    }

    /// Adds `id`; returns the change in heap bytes.
    fn add(&mut self, id: u32) -> isize {
        if self.contains(id) {
            return 0;
        }
        match self {
            Ids::Inline { len, ids } if usize::from(*len) < INLINE => {
                ids[usize::from(*len)] = id;
                *len += 1;
                0
            }
            Ids::Inline { ids, .. } => {
                let mut v = Vec::with_capacity(INLINE * 2);
                v.extend_from_slice(ids);
                v.push(id);
                let bytes = heap_bytes(&v);
                *self = Ids::Heap(v);
                bytes as isize
            }
            Ids::Heap(v) => {
                let before = heap_bytes(v);
                v.push(id);
                heap_bytes(v) as isize - before as isize
            }
        }
    }

    /// Removes `id`; returns whether it was present.
    fn remove(&mut self, id: u32) -> bool {
        match self {
            Ids::Inline { len, ids } => {
                let n = usize::from(*len);
                match ids[..n].iter().position(|&x| x == id) {
                    Some(p) => {
                        ids.copy_within(p + 1..n, p);
                        *len -= 1;
                        true
                    }
                    None => false,
                }
            }
            Ids::Heap(v) => match v.iter().position(|&x| x == id) {
                Some(p) => {
                    v.remove(p);
                    true
                }
                None => false,
            },
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Ids::Inline { .. } => 0,
            Ids::Heap(v) => heap_bytes(v),
        }
    }
}

fn heap_bytes(v: &Vec<u32>) -> usize {
    v.capacity() * size_of::<u32>()
}

#[derive(Debug)]
struct Slot {
    hash: u64,
    /// Towards the most recently used end (or the next free slot when free).
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
    ids: Ids,
}

/// One shard. Not thread-safe by itself; [`super::PrefixIndex`] wraps each in a mutex.
#[derive(Debug)]
pub(super) struct Shard {
    /// Slot index per bucket, `NIL` if empty. Length is zero or a power of two.
    table: Vec<u32>,
    slots: Vec<Slot>,
    free: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: usize,
    max_entries: usize,
    max_buckets: usize,
    spill_bytes: usize,
    budget: usize,
}

fn buckets_for(entries: usize) -> usize {
    (entries * LOAD_DEN)
        .div_ceil(LOAD_NUM)
        .max(1)
        .next_power_of_two()
}

impl Shard {
    /// A shard whose accounted bytes stay within `budget`.
    pub(super) fn new(budget: usize) -> Shard {
        let usable = budget - budget * SPILL_HEADROOM_PERCENT / 100;
        let per_entry = size_of::<Slot>() + size_of::<u32>() * 2 * LOAD_DEN / LOAD_NUM;
        let mut max_entries = usable / per_entry;
        // Shrink until the fully grown table and slab fit.
        while max_entries > 0
            && buckets_for(max_entries) * size_of::<u32>() + max_entries * size_of::<Slot>()
                > usable
        {
            max_entries -= max_entries.div_ceil(64);
        }
        Shard {
            table: Vec::new(),
            slots: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            max_entries,
            max_buckets: if max_entries == 0 {
                0
            } else {
                buckets_for(max_entries)
            },
            spill_bytes: 0,
            budget,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by this shard's containers, from their real capacities.
    pub(super) fn accounted_bytes(&self) -> usize {
        self.table.capacity() * size_of::<u32>()
            + self.slots.capacity() * size_of::<Slot>()
            + self.spill_bytes
    }

    fn mask(&self) -> usize {
        self.table.len() - 1
    }

    fn find(&self, hash: u64) -> Option<(usize, u32)> {
        if self.table.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let s = self.table[i];
            if s == NIL {
                return None;
            }
            if self.slots[s as usize].hash == hash {
                return Some((i, s));
            }
            i = (i + 1) & mask;
        }
    }

    /// The engines holding block `hash`, if any.
    pub(super) fn holders(&self, hash: u64) -> Option<&[u32]> {
        self.find(hash)
            .map(|(_, s)| self.slots[s as usize].ids.as_slice())
    }

    fn table_put(&mut self, hash: u64, slot: u32) {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        while self.table[i] != NIL {
            i = (i + 1) & mask;
        }
        self.table[i] = slot;
    }

    fn table_remove_at(&mut self, mut i: usize) {
        let mask = self.mask();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.table[j];
            if s == NIL {
                break;
            }
            let ideal = self.slots[s as usize].hash as usize & mask;
            // Move the entry at j back to i unless its ideal bucket lies cyclically in (i, j].
            let stays = if i <= j {
                i < ideal && ideal <= j
            } else {
                i < ideal || ideal <= j
            };
            if !stays {
                self.table[i] = s;
                i = j;
            }
        }
        self.table[i] = NIL;
    }

    fn grow_table_if_needed(&mut self) {
        let needed = buckets_for(self.len + 1).min(self.max_buckets);
        if needed <= self.table.len() {
            return;
        }
        let mut table = Vec::new();
        table.reserve_exact(needed);
        table.resize(needed, NIL);
        self.table = table;
        let mut s = self.head;
        while s != NIL {
            let slot = &self.slots[s as usize];
            let (hash, next) = (slot.hash, slot.next);
            self.table_put(hash, s);
            s = next;
        }
    }

    fn unlink(&mut self, s: u32) {
        let (prev, next) = {
            let slot = &self.slots[s as usize];
            (slot.prev, slot.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, s: u32) {
        let old = self.head;
        {
            let slot = &mut self.slots[s as usize];
            slot.prev = NIL;
            slot.next = old;
        }
        if old == NIL {
            self.tail = s;
        } else {
            self.slots[old as usize].prev = s;
        }
        self.head = s;
    }

    /// Removes slot `s` (found at bucket `bucket`) and puts it on the free list.
    fn drop_slot(&mut self, bucket: usize, s: u32) {
        self.table_remove_at(bucket);
        self.unlink(s);
        let slot = &mut self.slots[s as usize];
        self.spill_bytes -= slot.ids.heap_bytes();
        slot.ids = Ids::Inline {
            len: 0,
            ids: [0; INLINE],
        };
        slot.next = self.free;
        self.free = s;
        self.len -= 1;
    }

    fn evict_lru(&mut self) {
        let s = self.tail;
        if s == NIL {
            return;
        }
        let hash = self.slots[s as usize].hash;
        if let Some((bucket, found)) = self.find(hash) {
            debug_assert_eq!(found, s);
            self.drop_slot(bucket, s);
        }
    }

    fn alloc_slot(&mut self, hash: u64, engine: u32) -> u32 {
        if self.free != NIL {
            let s = self.free;
            let slot = &mut self.slots[s as usize];
            self.free = slot.next;
            slot.hash = hash;
            slot.ids = Ids::one(engine);
            return s;
        }
        if self.slots.len() == self.slots.capacity() {
            let target = (self.slots.capacity() * 2).max(16).min(self.max_entries);
            self.slots.reserve_exact(target - self.slots.len());
        }
        self.slots.push(Slot {
            hash,
            prev: NIL,
            next: NIL,
            ids: Ids::one(engine),
        });
        (self.slots.len() - 1) as u32
    }

    /// Records that `engine` holds block `hash` and marks the block most recently used.
    pub(super) fn insert(&mut self, hash: u64, engine: u32) {
        if let Some((_, s)) = self.find(hash) {
            let delta = self.slots[s as usize].ids.add(engine);
            self.spill_bytes = (self.spill_bytes as isize + delta) as usize;
            self.unlink(s);
            self.push_front(s);
        } else {
            if self.max_entries == 0 {
                return;
            }
            if self.len >= self.max_entries {
                self.evict_lru();
            }
            self.grow_table_if_needed();
            let s = self.alloc_slot(hash, engine);
            self.table_put(hash, s);
            self.push_front(s);
            self.len += 1;
        }
        while self.accounted_bytes() > self.budget && self.len > 0 {
            self.evict_lru();
        }
    }

    /// Drops `engine` from every block; blocks left without engines are freed.
    pub(super) fn remove_engine(&mut self, engine: u32) {
        let mut s = self.head;
        while s != NIL {
            let next = self.slots[s as usize].next;
            let slot = &mut self.slots[s as usize];
            let before = slot.ids.heap_bytes();
            if slot.ids.remove(engine) {
                let empty = slot.ids.is_empty();
                let after = slot.ids.heap_bytes();
                let hash = slot.hash;
                self.spill_bytes = self.spill_bytes + after - before;
                if empty && let Some((bucket, _)) = self.find(hash) {
                    self.drop_slot(bucket, s);
                }
            }
            s = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_with_colliding_buckets() {
        let mut sh = Shard::new(1 << 16);
        // Hashes sharing their low bits all probe from the same bucket.
        let hs: Vec<u64> = (0..40u64).map(|i| (i << 32) | 7).collect();
        for &h in &hs {
            sh.insert(h, 1);
        }
        for &h in &hs {
            assert_eq!(sh.holders(h), Some(&[1u32][..]));
        }
        sh.remove_engine(1);
        assert_eq!(sh.len(), 0);
        for &h in &hs {
            assert_eq!(sh.holders(h), None);
        }
        for &h in hs.iter().step_by(2) {
            sh.insert(h, 2);
        }
        for (i, &h) in hs.iter().enumerate() {
            assert_eq!(sh.holders(h).is_some(), i % 2 == 0);
        }
    }

    #[test]
    fn spills_past_inline_capacity() {
        let mut sh = Shard::new(1 << 16);
        for e in 0..10 {
            sh.insert(42, e);
        }
        assert_eq!(sh.holders(42).map(<[u32]>::len), Some(10));
        assert!(sh.spill_bytes > 0);
        for e in 0..10 {
            sh.remove_engine(e);
        }
        assert_eq!(sh.spill_bytes, 0);
        assert_eq!(sh.len(), 0);
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut sh = Shard::new(4096);
        let cap = sh.max_entries;
        assert!(cap > 10);
        for h in 0..(cap as u64 * 5) {
            sh.insert(h.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0);
            assert!(sh.accounted_bytes() <= 4096);
        }
        assert_eq!(sh.len(), cap);
        let last = cap as u64 * 5 - 1;
        assert!(
            sh.holders(last.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .is_some()
        );
        assert!(sh.holders(0).is_none());
    }
}
