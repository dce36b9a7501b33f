//! The exact index: what each engine really holds in its KV cache, learned from the engine's
//! own KV events (vLLM's `BlockStored` / `BlockRemoved` / `AllBlocksCleared`, see
//! `engines::kv_events`), as opposed to the approximate [`super::PrefixIndex`] of what the
//! router sent where.
//!
//! **Keys.** Blocks are keyed by the router's own chained hash of their token ids
//! ([`crate::tokens::token_block_hash`], seeded per LoRA adapter name by
//! [`crate::tokens::token_chain_seed`]), so the engine's hash function and seed never matter
//! and a tokenized prompt is looked up with the same hashes. Each engine's block hashes are
//! mapped to the router's: removals name the engine's hashes, and a stored run is chained from
//! its `parent_block_hash`'s content. A run whose parent the view does not know cannot be
//! keyed by content from the event alone: the view looks for it in the requests the router
//! recently sent to the engine ([`anchor`]): found, the parent is keyed from that request and
//! its ancestors held as implied by it ([`StoreOutcome::Anchored`]); else the run is skipped
//! ([`StoreOutcome::Unanchored`]).
//!
//! **Media.** A block counts as held while it is on any medium (GPU, or CPU-offloaded: loading
//! it back beats recomputing it); removal from one medium keeps it while another holds it.
//!
//! **Groups.** Hybrid models publish one event per KV-cache group (`group_idx`); only group 0
//! (or no group) is indexed, the caller skips the others: a prefix hit needs every group, and
//! group 0 is the full-attention group in vLLM's layouts.
//!
//! **Memory.** The index is bounded by `max_bytes` (accounted per block: the engine-hash slot,
//! the content-hash slot and the store-order entry, ~76 bytes). Past the budget, the engine
//! with the largest view loses its blocks stored longest ago (first in, first out by last
//! store), down to the budget less 1/64 of it. Under pressure a view under-reports (old
//! prefixes are forgotten first, as the engine's own LRU would), never over-reports. Anchors
//! and the blocks they imply are accounted too. The requests noted for anchoring are not: at
//! most [`anchor::RECENT_REQUESTS`] requests and [`anchor::RECENT_TOKENS`] token ids per
//! engine with a view that is not complete, shared with the requests themselves.
//!
//! **Ranks.** A vLLM engine run with data parallelism has one KV cache and one event stream per
//! rank; the index keeps one view per (engine, rank) and answers per engine: its match is the
//! best over its live ranks (the engine's API server may hand the request to any rank), and it
//! is live while one of its ranks is.
//!
//! **Complete and partial** ([`ViewState`]). A view that has followed the engine since its
//! cache state was known is complete: the engine holds exactly what it holds. A view that
//! started mid-stream is partial: what it holds is held for certain (stored since the view
//! started, and not removed since), but the engine may hold more, stored before; the caller
//! weighs it against another source ([`ExactMatch::complete`]). The subscriber decides which
//! (`engines::kv_events::subscriber`).
//!
//! **Lookup** hashes the prompt once per distinct block size and walks each view until its
//! first missing block: O(blocks in the prompt) per view.

pub mod anchor;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use anchor::RecentRequests;
pub use view::{EngineView, Medium, StoreOutcome, StoredRun, ViewState};

use crate::tokens::{token_block_hashes, token_chain_seed};

/// The default memory budget: 256 MiB, about 3.5 million blocks at ~76 bytes each: the GPU
/// caches of ~100 engines serving an 8B model on 80 GB (~30,000 16-token blocks each), or ~25
/// engines of a 1B model (whose smaller KV per token fits ~4× the blocks).
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// An engine's exact match of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactMatch {
    /// Prompt tokens held (leading blocks × block size), the best over the engine's ranks.
    pub tokens: usize,
    /// Every rank's view is complete: the engine holds no more of the prompt than `tokens`.
    /// When false, it holds at least `tokens`, maybe more.
    pub complete: bool,
}

/// Every engine's exact views, one per (engine, data-parallel rank): each rank of a vLLM
/// engine has its own KV cache and event stream. An engine's figures are the best over its
/// ranks (a request sent to the engine may land on any of them). All methods take `&self`.
#[derive(Debug)]
pub struct ExactIndex {
    max_bytes: usize,
    engines: RwLock<HashMap<u32, Ranks>>,
    /// Sum of the views' accounted bytes, and of their blocks.
    bytes: AtomicUsize,
    blocks: AtomicUsize,
}

type ViewRef = Arc<RwLock<EngineView>>;

/// One engine's views and the requests the router recently sent it.
#[derive(Debug, Default)]
struct Ranks {
    /// (rank, view), sorted by rank.
    views: Vec<(u32, ViewRef)>,
    /// Noted while one of the views is not complete, to anchor runs ([`anchor`]).
    recent: Arc<RecentRequests>,
}

impl Default for ExactIndex {
    fn default() -> Self {
        ExactIndex::new(DEFAULT_MAX_BYTES)
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic mid-update can at worst leave one view inexact, which is no worse than losing
    // it: a poisoned lock is reused.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl ExactIndex {
    pub fn new(max_bytes: usize) -> ExactIndex {
        ExactIndex {
            max_bytes,
            engines: RwLock::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            blocks: AtomicUsize::new(0),
        }
    }

    /// Per engine id in `engines`: Some(tokens of `token_ids` the engine holds: the best over
    /// its live ranks of their leading held blocks × block size) while one of its views is
    /// live (partial or complete); None when none is. See [`ExactIndex::matches`].
    pub fn match_tokens(
        &self,
        token_ids: &[u32],
        lora_name: Option<&str>,
        engines: &[u32],
    ) -> Vec<Option<usize>> {
        self.matches(token_ids, lora_name, engines)
            .into_iter()
            .map(|m| m.map(|m| m.tokens))
            .collect()
    }

    /// Per engine id in `engines`: its match while one of its views is live, None when none
    /// is. The match is complete when every rank's view is: the engine holds no more of the
    /// prompt than that. Otherwise it is partial: the engine holds at least that much.
    pub fn matches(
        &self,
        token_ids: &[u32],
        lora_name: Option<&str>,
        engines: &[u32],
    ) -> Vec<Option<ExactMatch>> {
        // (position in `engines`, view) for every rank of every engine asked.
        let views: Vec<(usize, ViewRef)> = {
            let map = read(&self.engines);
            engines
                .iter()
                .enumerate()
                .filter_map(|(i, e)| map.get(e).map(|r| (i, r)))
                .flat_map(|(i, ranks)| ranks.views.iter().map(move |(_, v)| (i, Arc::clone(v))))
                .collect()
        };
        let seed = token_chain_seed(lora_name);
        // The prompt's hashes per block size (engines almost always share one).
        let mut chains: Vec<(usize, Vec<u64>)> = Vec::with_capacity(1);
        // Per engine: (best tokens over live ranks, every rank complete so far).
        let mut best: Vec<(Option<usize>, bool)> = vec![(None, true); engines.len()];
        for (i, v) in &views {
            let view = read(v);
            let b = &mut best[*i];
            b.1 &= view.state == ViewState::Complete;
            if view.state == ViewState::Off {
                continue;
            }
            let held = match view.block_size() {
                None => 0,
                Some(bs) => {
                    let at = match chains.iter().position(|(b, _)| *b == bs) {
                        Some(at) => at,
                        None => {
                            chains.push((bs, token_block_hashes(token_ids, bs, seed)));
                            chains.len() - 1
                        }
                    };
                    chains[at].1.iter().take_while(|h| view.holds(**h)).count() * bs
                }
            };
            b.0 = Some(b.0.map_or(held, |t| t.max(held)));
        }
        best.into_iter()
            .map(|(tokens, complete)| tokens.map(|tokens| ExactMatch { tokens, complete }))
            .collect()
    }

    /// Notes that the router sends a request with these token ids (under adapter `lora_name`)
    /// to `engine`, so that its views can anchor the blocks the engine stores for it under a
    /// parent they do not know ([`anchor`]). Nothing when the engine has no view or all of
    /// them are complete; else a push onto a bounded ring under its own lock (the ids are
    /// shared, not copied).
    pub fn note_sent(&self, engine: u32, token_ids: &Arc<[u32]>, lora_name: Option<&str>) {
        if let Some(ranks) = read(&self.engines).get(&engine) {
            ranks.recent.note(token_ids, lora_name);
        }
    }

    /// Whether one of `engine`'s views is live (partial or complete).
    pub fn is_live(&self, engine: u32) -> bool {
        self.state(engine) != ViewState::Off
    }

    /// How routing uses `engine`'s views: complete when every rank's is, off when none is
    /// live (or it has none), else partial.
    pub fn state(&self, engine: u32) -> ViewState {
        let map = read(&self.engines);
        let Some(ranks) = map.get(&engine) else {
            return ViewState::Off;
        };
        let states = ranks.views.iter().map(|(_, v)| read(v).state);
        let (mut live, mut complete) = (false, true);
        for s in states {
            live |= s != ViewState::Off;
            complete &= s == ViewState::Complete;
        }
        match (live, complete) {
            (false, _) => ViewState::Off,
            (true, true) => ViewState::Complete,
            (true, false) => ViewState::Partial,
        }
    }

    /// Starts an empty, not live view for `engine`'s rank 0 (kept if it exists).
    pub fn add_engine(&self, engine: u32) {
        self.add_rank(engine, 0);
    }

    /// Starts an empty, not live view for data-parallel rank `rank` of `engine` (kept if it
    /// exists).
    pub fn add_rank(&self, engine: u32, rank: u32) {
        let mut map = write(&self.engines);
        let ranks = map.entry(engine).or_default();
        if let Err(at) = ranks.views.binary_search_by_key(&rank, |(r, _)| *r) {
            let view = EngineView::with_recent(Arc::clone(&ranks.recent));
            ranks.views.insert(at, (rank, Arc::new(RwLock::new(view))));
        }
    }

    /// Drops all of `engine`'s views; later updates to them are ignored.
    pub fn remove_engine(&self, engine: u32) {
        let Some(ranks) = write(&self.engines).remove(&engine) else {
            return;
        };
        for (_, view) in ranks.views {
            let mut v = write(&view);
            v.removed = true;
            self.bytes.fetch_sub(v.bytes(), Ordering::Relaxed);
            self.blocks.fetch_sub(v.len(), Ordering::Relaxed);
            v.clear();
            v.state = ViewState::Off;
        }
    }

    /// [`ExactIndex::update_rank`] of rank 0.
    pub fn update<R>(&self, engine: u32, f: impl FnOnce(&mut EngineView) -> R) -> Option<R> {
        self.update_rank(engine, 0, f)
    }

    /// Changes the view of `engine`'s rank `rank` under its lock (one batch of events at a
    /// time), then enforces the memory budget. `None` when there is no such view.
    pub fn update_rank<R>(
        &self,
        engine: u32,
        rank: u32,
        f: impl FnOnce(&mut EngineView) -> R,
    ) -> Option<R> {
        let view = {
            let map = read(&self.engines);
            let ranks = map.get(&engine)?;
            let at = ranks.views.binary_search_by_key(&rank, |(r, _)| *r).ok()?;
            Arc::clone(&ranks.views[at].1)
        };
        let r = {
            let mut v = write(&view);
            if v.removed {
                return None;
            }
            let (bytes, blocks) = (v.bytes(), v.len());
            let r = f(&mut v);
            self.account(bytes, v.bytes(), blocks, v.len());
            r
        };
        if self.bytes.load(Ordering::Relaxed) > self.max_bytes {
            self.enforce_budget();
        }
        Some(r)
    }

    fn account(&self, bytes_before: usize, bytes_after: usize, before: usize, after: usize) {
        if bytes_after >= bytes_before {
            self.bytes
                .fetch_add(bytes_after - bytes_before, Ordering::Relaxed);
        } else {
            self.bytes
                .fetch_sub(bytes_before - bytes_after, Ordering::Relaxed);
        }
        if after >= before {
            self.blocks.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.blocks.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Evicts from the largest views, oldest blocks first, until the index is below its budget
    /// less 1/64 (so that the next few stores do not evict again).
    fn enforce_budget(&self) {
        let target = self.max_bytes - self.max_bytes / 64;
        loop {
            let total = self.bytes.load(Ordering::Relaxed);
            if total <= target {
                return;
            }
            let views: Vec<ViewRef> = read(&self.engines)
                .values()
                .flat_map(|ranks| ranks.views.iter().map(|(_, v)| Arc::clone(v)))
                .collect();
            let Some(largest) = views.iter().max_by_key(|v| read(v).bytes()) else {
                return;
            };
            let mut v = write(largest);
            if v.removed {
                continue;
            }
            let (bytes, blocks) = (v.bytes(), v.len());
            let keep = bytes.saturating_sub(total - target);
            let mut evicted = false;
            while v.bytes() > keep && v.evict_oldest() {
                evicted = true;
            }
            self.account(bytes, v.bytes(), blocks, v.len());
            if !evicted {
                return;
            }
        }
    }

    /// The configured budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes accounted to all views.
    pub fn accounted_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Engine blocks in all views.
    pub fn blocks(&self) -> usize {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Engines with a live view (of any rank).
    pub fn live_engines(&self) -> usize {
        read(&self.engines)
            .values()
            .filter(|ranks| ranks.views.iter().any(|(_, v)| read(v).is_live()))
            .count()
    }
}

#[cfg(test)]
mod tests;
