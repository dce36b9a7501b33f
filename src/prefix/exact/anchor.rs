//! Anchoring a stored run whose parent block a partial view does not know, from the router's
//! own recent requests to the engine.
//!
//! A view that joined mid-stream keys blocks by the router's chained hash of their content,
//! so a `BlockStored` run hanging off a block stored before the join (its `parent_block_hash`
//! unknown to the view) cannot be keyed from the event alone. For chats that is nearly every
//! run: the template's opening block was cached before the join and every chat hits it.
//!
//! But the router knows what it sent. While an engine has a view that is not complete, every
//! request the router tokenized and sends to it is noted ([`RecentRequests::note`]: a push
//! onto a small ring, the token ids shared with the request). When the engine's stream
//! delivers a run with an unknown parent `X` and tokens `T`, [`find_anchor`] looks for a noted
//! request whose tokens at a block-aligned offset `k × block_size` start with the whole of
//! `T`. vLLM's prefix-cache hits are a contiguous prefix and `X` is the parent of the run's
//! first block, so the engine held the request's blocks `0..k` and `X` is block `k - 1`: its
//! router hash is the chained hash of those blocks. The view keys `X` with it (its removal is
//! then tracked by its engine hash) and stores the run as anchored. Blocks `0..k - 1` (the
//! ancestors of `X`) the engine held too, but their engine hashes are unknown: the view holds
//! them as *implied* by `X`, for as long as some anchor implying them is held.
//!
//! **What it never does**: invent content. Every block keyed this way has the tokens of a
//! request the router really sent to that engine, at the position the engine's own event
//! puts them. **What it can get wrong**: an implied ancestor the engine evicts while `X`
//! stays (its removal names an engine hash the view never learned). vLLM frees a request's
//! blocks tail first, so a prefix outlives its descendants and this is rare; the error is an
//! over-report, which vLLM answers by recomputing the missing blocks. A run whose tokens sit
//! in two noted requests under different prefixes is ambiguous and stays unanchored.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::tokens::{token_block_hashes, token_chain_seed};

/// Most requests noted per engine.
pub const RECENT_REQUESTS: usize = 128;

/// Most token ids noted per engine (4 MiB): the oldest requests go first past it (the newest
/// is always kept).
pub const RECENT_TOKENS: usize = 1 << 20;

/// Most token ids one search compares (about a millisecond): a search past it gives up (the
/// run stays unanchored). Natural prompts need a small part of it; prompts built to match
/// at every offset but the last could otherwise cost the square of their length, under the
/// view's write lock.
pub const MAX_COMPARED_TOKENS: usize = 4 * RECENT_TOKENS;

/// A request the router sent to an engine: its token ids (shared with the request) and the
/// LoRA adapter its blocks are keyed under.
#[derive(Debug, Clone)]
pub struct SentRequest {
    pub token_ids: Arc<[u32]>,
    pub lora_name: Option<Arc<str>>,
}

/// One engine's recent requests, noted while one of its views is not complete. Shared by the
/// engine's rank views (a request may land on any rank).
#[derive(Debug, Default)]
pub struct RecentRequests {
    /// The engine's views that are not complete (a view starts so).
    incomplete: AtomicUsize,
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Oldest first.
    requests: VecDeque<SentRequest>,
    tokens: usize,
}

impl RecentRequests {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic mid-push leaves at worst a ring of valid requests.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a request sent to the engine, unless all its views are complete (then nothing
    /// needs anchoring). A push and at most a few pops under the ring's own lock.
    pub fn note(&self, token_ids: &Arc<[u32]>, lora_name: Option<&str>) {
        if self.incomplete.load(Ordering::Relaxed) == 0 || token_ids.is_empty() {
            return;
        }
        let mut ring = self.ring();
        ring.tokens += token_ids.len();
        ring.requests.push_back(SentRequest {
            token_ids: Arc::clone(token_ids),
            lora_name: lora_name.map(Arc::from),
        });
        while ring.requests.len() > RECENT_REQUESTS
            || (ring.tokens > RECENT_TOKENS && ring.requests.len() > 1)
        {
            if let Some(old) = ring.requests.pop_front() {
                ring.tokens -= old.token_ids.len();
            }
        }
    }

    /// The noted requests, newest first.
    pub fn snapshot(&self) -> Vec<SentRequest> {
        self.ring().requests.iter().rev().cloned().collect()
    }

    /// Requests noted.
    pub fn len(&self) -> usize {
        self.ring().requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A view of the engine starts (not complete).
    pub(super) fn view_added(&self) {
        self.incomplete.fetch_add(1, Ordering::Relaxed);
    }

    /// One of the engine's views went from complete to not (or back). When none is left
    /// incomplete, the ring is emptied: nothing will need it.
    pub(super) fn view_changed(&self, was_complete: bool, complete: bool) {
        if was_complete && !complete {
            self.incomplete.fetch_add(1, Ordering::Relaxed);
        } else if !was_complete && complete && self.incomplete.fetch_sub(1, Ordering::Relaxed) == 1
        {
            *self.ring() = Ring::default();
        }
    }
}

/// Where a run sits in a noted request: the router hash of its parent block and of the
/// parent's ancestors (the request's blocks before it), root first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub parent: u64,
    pub ancestors: Vec<u64>,
}

/// Finds where the run `tokens` (whole blocks of `block_size`, under adapter `lora_name`) was
/// stored after a parent block: a noted request whose tokens at some block-aligned offset
/// `k × block_size` (`k ≥ 1`: the run has a parent) start with all of `tokens`. `None` when
/// no request matches, when matches disagree on the parent's content (ambiguous), or when
/// the search compares more than [`MAX_COMPARED_TOKENS`].
pub fn find_anchor(
    requests: &[SentRequest],
    tokens: &[u32],
    block_size: usize,
    lora_name: Option<&str>,
) -> Option<Anchor> {
    let bs = block_size.max(1);
    let first = *tokens.first()?;
    let seed = token_chain_seed(lora_name);
    let mut found: Option<Anchor> = None;
    let mut compared = 0usize;
    for r in requests {
        if r.lora_name.as_deref() != lora_name {
            continue;
        }
        let ids = &r.token_ids[..];
        let mut at = bs;
        while at + tokens.len() <= ids.len() {
            compared += 1;
            if ids[at] == first
                && ids[at..at + tokens.len()]
                    .chunks(bs)
                    .zip(tokens.chunks(bs))
                    .all(|(a, b)| {
                        compared += bs;
                        a == b
                    })
            {
                let mut chain = token_block_hashes(&ids[..at], bs, seed);
                let parent = chain.pop()?;
                match &found {
                    Some(f) if f.parent != parent => return None,
                    Some(_) => {}
                    None => {
                        found = Some(Anchor {
                            parent,
                            ancestors: chain,
                        })
                    }
                }
            }
            if compared > MAX_COMPARED_TOKENS {
                return None;
            }
            at += bs;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::token_block_hashes;

    const BS: usize = 4;

    fn sent(ids: &[u32], lora: Option<&str>) -> SentRequest {
        SentRequest {
            token_ids: Arc::from(ids),
            lora_name: lora.map(Arc::from),
        }
    }

    /// A request of `blocks` blocks: block i is [100 i + salt, ...].
    fn request(blocks: usize, salt: u32) -> Vec<u32> {
        (0..blocks as u32)
            .flat_map(|b| (0..BS as u32).map(move |t| 100 * b + t + salt))
            .collect()
    }

    #[test]
    fn a_run_found_at_a_block_offset_anchors_on_the_requests_prefix() {
        let r = request(6, 0);
        let hashes = token_block_hashes(&r, BS, token_chain_seed(None));
        // The engine hit blocks 0..3 and stored 3..5: the parent is block 2.
        let a = find_anchor(&[sent(&r, None)], &r[3 * BS..5 * BS], BS, None);
        assert_eq!(
            a,
            Some(Anchor {
                parent: hashes[2],
                ancestors: hashes[..2].to_vec()
            })
        );
        // Parent block 0: no ancestors.
        let a = find_anchor(&[sent(&r, None)], &r[BS..2 * BS], BS, None);
        assert_eq!(
            a.map(|a| (a.parent, a.ancestors.len())),
            Some((hashes[0], 0))
        );
    }

    #[test]
    fn the_whole_run_must_match_at_a_block_boundary_under_the_same_adapter() {
        let r = request(6, 0);
        let reqs = [sent(&r, None)];
        // Only the first block matches: the rest of the run is another prompt.
        let mut run = r[2 * BS..4 * BS].to_vec();
        run[BS + 1] = 9999;
        assert_eq!(find_anchor(&reqs, &run, BS, None), None);
        // Not at a block boundary.
        assert_eq!(find_anchor(&reqs, &r[BS + 1..2 * BS + 1], BS, None), None);
        // The run goes past the request's end (e.g. generated tokens): not found.
        let mut longer = r[4 * BS..].to_vec();
        longer.extend([1, 2, 3, 4]);
        assert_eq!(find_anchor(&reqs, &longer, BS, None), None);
        // The request's first block has no parent: a run at offset 0 is no match.
        assert_eq!(find_anchor(&reqs, &r[..BS], BS, None), None);
        // Another adapter's request, or the base model's for an adapter's run: no match.
        assert_eq!(
            find_anchor(&[sent(&r, Some("a"))], &r[BS..2 * BS], BS, None),
            None
        );
        assert_eq!(find_anchor(&reqs, &r[BS..2 * BS], BS, Some("a")), None);
        // The adapter's own request anchors under the adapter's seed.
        let a = find_anchor(&[sent(&r, Some("a"))], &r[BS..2 * BS], BS, Some("a"));
        let seeded = token_block_hashes(&r[..BS], BS, token_chain_seed(Some("a")));
        assert_eq!(a.map(|a| a.parent), Some(seeded[0]));
    }

    #[test]
    fn matches_that_agree_anchor_and_matches_that_disagree_do_not() {
        let r = request(4, 0);
        // The same chat sent twice (a retry, or the same prompt again): they agree.
        let a = find_anchor(&[sent(&r, None), sent(&r, None)], &r[2 * BS..], BS, None);
        assert!(a.is_some());
        // Another request with the same tail under another head: which one the engine
        // stored is unknown.
        let mut other = request(4, 50);
        other[2 * BS..].copy_from_slice(&r[2 * BS..]);
        let both = [sent(&r, None), sent(&other, None)];
        assert_eq!(find_anchor(&both, &r[2 * BS..], BS, None), None);
        // A longer run that only one of them holds is not ambiguous.
        assert!(find_anchor(&both, &r[BS..], BS, None).is_some());
        // A run repeated inside one request at two offsets: ambiguous as well.
        let mut twice = request(5, 0);
        let block = twice[BS..2 * BS].to_vec();
        twice[3 * BS..4 * BS].copy_from_slice(&block);
        assert_eq!(find_anchor(&[sent(&twice, None)], &block, BS, None), None);
    }

    #[test]
    fn a_search_that_compares_too_much_gives_up() {
        // Every offset matches all of the run's blocks but its last: the search would compare
        // ~(len/2)² / block size tokens.
        let zeros = vec![0u32; 64 * 1024];
        let mut run = vec![0u32; 32 * 1024];
        if let Some(last) = run.last_mut() {
            *last = 1;
        }
        let reqs = [sent(&zeros, None), sent(&zeros, None)];
        assert_eq!(find_anchor(&reqs, &run, 16, None), None);
        // Where the run is, it is found within the bound.
        let mut holder = vec![5u32; 16];
        holder.extend(&run);
        let reqs = [sent(&holder, None)];
        assert!(find_anchor(&reqs, &run, 16, None).is_some());
    }

    #[test]
    fn the_ring_notes_only_for_incomplete_views_and_stays_bounded() {
        let recent = RecentRequests::default();
        let ids: Arc<[u32]> = Arc::from(request(2, 0));
        recent.note(&ids, None);
        assert!(recent.is_empty(), "no incomplete view: nothing noted");
        recent.view_added();
        for _ in 0..RECENT_REQUESTS + 10 {
            recent.note(&ids, None);
        }
        assert_eq!(recent.len(), RECENT_REQUESTS);
        // The ids are shared, not copied.
        assert!(Arc::ptr_eq(&recent.snapshot()[0].token_ids, &ids));
        // Past the token budget the oldest go; one huge request alone is kept.
        let huge: Arc<[u32]> = Arc::from(vec![7u32; RECENT_TOKENS]);
        recent.note(&huge, None);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.snapshot()[0].token_ids.len(), RECENT_TOKENS);
        recent.note(&ids, Some("adapter"));
        let newest = &recent.snapshot()[0];
        assert_eq!(
            (newest.token_ids.len(), newest.lora_name.as_deref()),
            (2 * BS, Some("adapter"))
        );
        // The view completes: the ring empties, and stops noting.
        recent.view_changed(false, true);
        assert!(recent.is_empty());
        recent.note(&ids, None);
        assert!(recent.is_empty());
        // Incomplete again (dropped, say): noting again.
        recent.view_changed(true, false);
        recent.note(&ids, None);
        assert_eq!(recent.len(), 1);
    }
}
