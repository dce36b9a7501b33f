//! One engine's exact view: the blocks its KV events say it holds, keyed by the router's own
//! chained hash of their token ids, with the engine's block hashes mapped to them; and the
//! blocks implied by runs anchored on the router's own requests ([`super::anchor`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::anchor::{RecentRequests, find_anchor};
use crate::tokens::{token_block_hash, token_chain_seed};

/// A hasher for keys that are already hashes (or small engine ints): one multiply-rotate.
#[derive(Default, Clone, Copy)]
pub(super) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<MixHasher>>;
type Set = HashSet<u64, BuildHasherDefault<MixHasher>>;

/// Where a block is held. A block counts as held while it is on any medium: vLLM's CPU
/// offloading reports blocks it can load back, which beats recomputing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// `"GPU"`, or no medium (releases before the field: the GPU).
    Gpu,
    /// `"CPU"` (offloaded).
    Cpu,
    /// Any other tier (disk, remote store...).
    Other,
}

impl Medium {
    /// The medium named in an event (case-insensitive; `None` is the GPU).
    pub fn from_wire(medium: Option<&str>) -> Medium {
        match medium {
            None => Medium::Gpu,
            Some(m) if m.eq_ignore_ascii_case("gpu") => Medium::Gpu,
            Some(m) if m.eq_ignore_ascii_case("cpu") => Medium::Cpu,
            Some(_) => Medium::Other,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Medium::Gpu => 1,
            Medium::Cpu => 2,
            Medium::Other => 4,
        }
    }
}

/// A run of stored blocks, as a `BlockStored` event gives it (engine hashes as 64-bit keys).
#[derive(Debug, Clone, Copy)]
pub struct StoredRun<'a> {
    /// The engine's hash of the block before the first one; `None` at the start of a prompt.
    pub parent: Option<u64>,
    pub block_hashes: &'a [u64],
    /// The token ids of all the blocks, concatenated.
    pub token_ids: &'a [u32],
    pub block_size: usize,
    pub lora_name: Option<&'a str>,
    pub medium: Medium,
}

/// What [`EngineView::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The blocks are in the view.
    Stored(usize),
    /// The parent block was unknown, but the run was found in a request the router sent to
    /// the engine ([`super::anchor`]): the parent is keyed from that request, its ancestors
    /// are held as implied by it, and the blocks are in the view.
    Anchored(usize),
    /// The parent block is unknown (stored before the view started, or evicted from it) and
    /// the run is in no recent request of the router's: the blocks cannot be keyed by content
    /// and are skipped. The view remembers the parent and the blocks as held but unkeyed
    /// ([`EngineView::unkeyed`]) until the engine removes them.
    Unanchored,
    /// `token_ids` is not `block_hashes × block_size` long: skipped.
    BadLength,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    /// The router's hash of the block's content and its whole prefix.
    router: u64,
    /// When it was (last) stored, to find it in `order`.
    stamp: u64,
    /// [`Medium`] bits.
    media: u8,
}

/// Whether, and how, routing uses a view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ViewState {
    /// Not used: not following the stream (not connected, or out of sequence).
    #[default]
    Off,
    /// Following the stream since a point where the engine's cache state was unknown (it
    /// started mid-stream): every block it holds is held, but the engine may hold more.
    Partial,
    /// Following the stream since a point where the engine's cache state was known: the
    /// engine holds what the view holds.
    Complete,
}

impl ViewState {
    /// `off`, `partial` or `complete`.
    pub fn as_str(self) -> &'static str {
        match self {
            ViewState::Off => "off",
            ViewState::Partial => "partial",
            ViewState::Complete => "complete",
        }
    }
}

/// Accounted bytes per engine block (hash-table slot with its control byte and spare capacity
/// at hashbrown's 7/8 load), per distinct router hash, and per entry of the store order.
const BLOCK_BYTES: usize = 40;
const HELD_BYTES: usize = 20;
const ORDER_BYTES: usize = 16;
/// Per unkeyed engine hash (set slot at 7/8 load).
const UNKEYED_BYTES: usize = 10;
/// Per anchor (map slot and its boxed list), and per ancestor hash in the lists.
const ANCHOR_BYTES: usize = 48;
const ANCESTOR_BYTES: usize = 8;

/// One engine's blocks. Changed only through [`super::ExactIndex::update`].
#[derive(Debug, Default)]
pub struct EngineView {
    pub(super) state: ViewState,
    pub(super) removed: bool,
    block_size: Option<usize>,
    data_parallel_rank: Option<i64>,
    /// Engine hash → block.
    blocks: Map<Block>,
    /// Router hash → number of engine blocks with that content (usually 1).
    held: Map<u32>,
    /// (engine hash, stamp) oldest first; entries whose stamp no longer matches are stale.
    order: VecDeque<(u64, u64)>,
    /// Engine hashes of blocks the engine holds whose content the view does not know: the
    /// parents and the blocks of unanchored runs, until removed.
    unkeyed: Set,
    /// Engine hash of an anchored parent block → router hashes of its ancestors, which it
    /// implies (see [`super::anchor`]).
    anchors: Map<Box<[u64]>>,
    /// Router hash → number of anchors implying the block (held while any is).
    implied: Map<u32>,
    /// Ancestor hashes in `anchors`, for the accounting.
    ancestors: usize,
    /// The engine's recent requests, shared by its rank views (none outside an index).
    recent: Option<Arc<RecentRequests>>,
    next_stamp: u64,
}

impl EngineView {
    /// Whether and how routing uses the view (see the subscriber for when it is which). The
    /// router notes its requests to the engine while one of its views is not complete.
    pub fn set_state(&mut self, state: ViewState) {
        if let Some(r) = &self.recent {
            r.view_changed(
                self.state == ViewState::Complete,
                state == ViewState::Complete,
            );
        }
        self.state = state;
    }

    /// A view of an engine in an index, sharing its recent requests.
    pub(super) fn with_recent(recent: Arc<RecentRequests>) -> EngineView {
        recent.view_added();
        EngineView {
            recent: Some(recent),
            ..EngineView::default()
        }
    }

    pub fn state(&self) -> ViewState {
        self.state
    }

    /// [`ViewState::Complete`] when `live`, else [`ViewState::Off`].
    pub fn set_live(&mut self, live: bool) {
        self.set_state(if live {
            ViewState::Complete
        } else {
            ViewState::Off
        });
    }

    /// Whether routing uses the view (partial or complete).
    pub fn is_live(&self) -> bool {
        self.state != ViewState::Off
    }

    /// Tokens per block, learned from the engine's events.
    pub fn block_size(&self) -> Option<usize> {
        self.block_size
    }

    /// The data-parallel rank the engine's batches carry (informational).
    pub fn data_parallel_rank(&self) -> Option<i64> {
        self.data_parallel_rank
    }

    pub fn set_data_parallel_rank(&mut self, rank: Option<i64>) {
        if rank.is_some() {
            self.data_parallel_rank = rank;
        }
    }

    /// Engine blocks in the view.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes accounted to the view.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
            + self.held.len() * HELD_BYTES
            + self.order.len() * ORDER_BYTES
            + self.unkeyed.len() * UNKEYED_BYTES
            + self.anchors.len() * ANCHOR_BYTES
            + self.ancestors * ANCESTOR_BYTES
            + self.implied.len() * HELD_BYTES
    }

    /// Blocks the engine is known to hold (the parent, or one of the blocks, of a run stored
    /// under an unknown parent, not removed since) whose content the view does not know: while
    /// there are any, the view is certainly missing part of the engine's cache. A view that
    /// started mid-stream learns them when the engine stores a prompt that hangs off a block
    /// it cached before: every chat after the template's first block, typically.
    pub fn unkeyed(&self) -> usize {
        self.unkeyed.len()
    }

    /// Anchored parent blocks (runs keyed from the router's own requests) still held.
    pub fn anchors(&self) -> usize {
        self.anchors.len()
    }

    /// Blocks held as implied by an anchor (ancestors whose engine hashes are unknown).
    pub fn implied(&self) -> usize {
        self.implied.len()
    }

    /// Whether the block with this router hash is held (keyed, or implied by an anchor).
    pub(super) fn holds(&self, router_hash: u64) -> bool {
        self.held.contains_key(&router_hash)
            || (!self.implied.is_empty() && self.implied.contains_key(&router_hash))
    }

    /// Forgets every block (`AllBlocksCleared`, an engine restart, a lost stream). The learned
    /// block size is kept.
    pub fn clear(&mut self) {
        self.blocks = Map::default();
        self.held = Map::default();
        self.order = VecDeque::new();
        self.unkeyed = Set::default();
        self.anchors = Map::default();
        self.implied = Map::default();
        self.ancestors = 0;
    }

    /// Adds a run of stored blocks, keyed by content chained from its parent's content.
    pub fn store(&mut self, run: &StoredRun<'_>) -> StoreOutcome {
        let bs = run.block_size.max(1);
        if run.token_ids.len() != run.block_hashes.len() * bs {
            return StoreOutcome::BadLength;
        }
        if self.block_size != Some(bs) {
            if self.block_size.is_some() {
                // The engine now uses another block size (restarted with a new config): the
                // old blocks cannot be matched with the new size.
                self.clear();
            }
            self.block_size = Some(bs);
        }
        let bit = run.medium.bit();
        let mut anchored = false;
        let mut prev = match run.parent {
            None => token_chain_seed(run.lora_name),
            Some(p) => match self.blocks.get(&p) {
                Some(b) => b.router,
                None => match self.anchor(p, run, bit) {
                    Some(router) => {
                        anchored = true;
                        router
                    }
                    None => {
                        self.unkeyed.insert(p);
                        self.unkeyed.extend(run.block_hashes.iter().copied());
                        return StoreOutcome::Unanchored;
                    }
                },
            },
        };
        for (i, &eh) in run.block_hashes.iter().enumerate() {
            prev = token_block_hash(prev, &run.token_ids[i * bs..(i + 1) * bs]);
            self.insert(eh, prev, bit);
        }
        if anchored {
            StoreOutcome::Anchored(run.block_hashes.len())
        } else {
            StoreOutcome::Stored(run.block_hashes.len())
        }
    }

    /// Keys the unknown `parent` of `run` from a recent request of the router's to the engine
    /// that holds the run ([`find_anchor`]), and holds its ancestors as implied by it: the
    /// parent's router hash, or `None` if no request (or more than one prefix) fits.
    fn anchor(&mut self, parent: u64, run: &StoredRun<'_>, bit: u8) -> Option<u64> {
        let recent = self.recent.as_ref()?;
        if run.token_ids.is_empty() {
            return None;
        }
        // The Arcs are cloned under the ring's lock, the search runs outside it.
        let requests = recent.snapshot();
        let found = find_anchor(&requests, run.token_ids, run.block_size, run.lora_name)?;
        self.insert(parent, found.parent, bit);
        for &h in &found.ancestors {
            *self.implied.entry(h).or_insert(0) += 1;
        }
        self.ancestors += found.ancestors.len();
        if let Some(old) = self
            .anchors
            .insert(parent, found.ancestors.into_boxed_slice())
        {
            self.release_anchor(&old);
        }
        Some(found.parent)
    }

    /// Drops what the anchor with these ancestors implied.
    fn release_anchor(&mut self, ancestors: &[u64]) {
        self.ancestors -= ancestors.len();
        for h in ancestors {
            Self::release(&mut self.implied, *h);
        }
    }

    /// `engine_hash` left the view: what it implied as an anchor goes with it.
    fn forget_anchor(&mut self, engine_hash: u64) {
        if !self.anchors.is_empty()
            && let Some(ancestors) = self.anchors.remove(&engine_hash)
        {
            self.release_anchor(&ancestors);
        }
    }

    fn insert(&mut self, engine_hash: u64, router: u64, bit: u8) {
        if !self.unkeyed.is_empty() {
            self.unkeyed.remove(&engine_hash);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        match self.blocks.get_mut(&engine_hash) {
            Some(b) => {
                let old = b.router;
                b.router = router;
                b.media |= bit;
                b.stamp = stamp;
                if old != router {
                    Self::release(&mut self.held, old);
                    *self.held.entry(router).or_insert(0) += 1;
                }
            }
            None => {
                self.blocks.insert(
                    engine_hash,
                    Block {
                        router,
                        stamp,
                        media: bit,
                    },
                );
                *self.held.entry(router).or_insert(0) += 1;
            }
        }
        self.order.push_back((engine_hash, stamp));
        self.compact();
    }

    fn release(held: &mut Map<u32>, router: u64) {
        if let Some(n) = held.get_mut(&router) {
            *n -= 1;
            if *n == 0 {
                held.remove(&router);
            }
        }
    }

    /// Removes the blocks from `medium` (a block stays held while on another medium); returns
    /// how many of the hashes were unknown to the view (neither held nor unkeyed).
    pub fn remove(&mut self, block_hashes: &[u64], medium: Medium) -> usize {
        let bit = medium.bit();
        let mut unknown = 0;
        for eh in block_hashes {
            if !self.unkeyed.is_empty() && self.unkeyed.remove(eh) {
                continue;
            }
            match self.blocks.get_mut(eh) {
                Some(b) => {
                    b.media &= !bit;
                    if b.media == 0 {
                        let router = b.router;
                        self.blocks.remove(eh);
                        Self::release(&mut self.held, router);
                        self.forget_anchor(*eh);
                    }
                }
                None => unknown += 1,
            }
        }
        self.compact();
        unknown
    }

    /// Drops the block stored longest ago; false when the view is empty.
    pub(super) fn evict_oldest(&mut self) -> bool {
        while let Some((eh, stamp)) = self.order.pop_front() {
            if let Some(b) = self.blocks.get(&eh)
                && b.stamp == stamp
            {
                let router = b.router;
                self.blocks.remove(&eh);
                Self::release(&mut self.held, router);
                self.forget_anchor(eh);
                return true;
            }
        }
        false
    }

    /// Drops stale order entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.blocks.len() + 1024 {
            let blocks = &self.blocks;
            self.order
                .retain(|(eh, stamp)| blocks.get(eh).is_some_and(|b| b.stamp == *stamp));
        }
    }
}
