//! When an engine's view is complete: the rules the subscriber applies batch by batch.
//!
//! A view is **complete** when it has followed the engine since a point where the engine's
//! cache state was known: its first batch (sequence 0, live or replayed), an
//! `AllBlocksCleared`, or a replay that reaches back to the engine's first batch.
//!
//! A view that starts anywhere else (the router started after the engine, or its view was
//! dropped at an unrecoverable gap) is **partial**: it knows for certain the blocks stored
//! since it started, but not those stored before. It becomes complete once both:
//!
//! - the engine has stored, since then, at least its whole KV-cache capacity in blocks (vLLM's
//!   `vllm:cache_config_info{num_gpu_blocks}`, scraped from its `/metrics`): by then the cache
//!   has been filled over with blocks the view saw stored. Only GPU stores of KV-cache group 0
//!   count (the indexed group; CPU-offload copies are no new GPU blocks). While the capacity
//!   is unknown (no `/metrics` scrape yet, an engine that does not publish it), the fallback
//!   is a count of batches: [`super::SubscriberOptions::rebuild_after_batches`] batches
//!   followed in sequence;
//! - and the view knows of no block the engine holds that it cannot key
//!   ([`crate::prefix::exact::EngineView::unkeyed`]): a block stored before the join and kept
//!   hot by prefix hits is never stored again, so filling the capacity does not flush it; but
//!   once the engine stores a prompt hanging off it (every chat off the template's first
//!   block) that the router did not send it (another client, another router replica), the
//!   view knows it is missing it, and stays partial (weighed against the approximate index)
//!   until the engine removes it. A prompt the router sent is anchored instead
//!   ([`crate::prefix::exact::anchor`]): its parent keyed, its ancestors implied.
//!
//! A block kept hot since before the join of which no later prompt hangs off stays unknown to
//! a view made complete: it under-reports that prefix (it never over-reports).

/// How far a view is from complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Followed since the engine's cache state was known.
    Complete,
    /// Started mid-stream; what the engine did since.
    Partial {
        /// Batches followed in sequence.
        batches: u64,
        /// GPU blocks of group 0 stored (anchored in the view or not).
        stored_blocks: u64,
    },
}

/// What one batch followed in sequence did, as far as completeness goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchEffect {
    /// GPU blocks of group 0 stored.
    pub stored_blocks: u64,
    /// The batch cleared the engine's cache (`AllBlocksCleared`).
    pub cleared: bool,
    /// After the batch: blocks the engine holds that the view cannot key.
    pub unkeyed: u64,
}

impl Completeness {
    /// A view starting mid-stream.
    pub fn partial() -> Completeness {
        Completeness::Partial {
            batches: 0,
            stored_blocks: 0,
        }
    }

    /// A view starting at `first_seq`: complete at the engine's first batch, else partial.
    pub fn starting_at(first_seq: u64) -> Completeness {
        if first_seq == 0 {
            Completeness::Complete
        } else {
            Completeness::partial()
        }
    }

    pub fn is_complete(&self) -> bool {
        *self == Completeness::Complete
    }

    /// Counts one batch followed in sequence. `capacity` is the engine's KV-cache capacity in
    /// blocks if known; without it, `fallback_batches` batches complete the view.
    pub fn after_batch(
        &mut self,
        batch: BatchEffect,
        capacity: Option<u64>,
        fallback_batches: u64,
    ) {
        let Completeness::Partial {
            batches,
            stored_blocks,
        } = self
        else {
            return;
        };
        *batches += 1;
        *stored_blocks = stored_blocks.saturating_add(batch.stored_blocks);
        let filled = match capacity {
            Some(c) => *stored_blocks >= c,
            None => *batches >= fallback_batches,
        };
        let complete = batch.cleared || (filled && batch.unkeyed == 0);
        if complete {
            *self = Completeness::Complete;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: u64) -> BatchEffect {
        BatchEffect {
            stored_blocks: n,
            ..BatchEffect::default()
        }
    }

    #[test]
    fn complete_from_the_engines_first_batch_and_partial_from_anywhere_else() {
        assert!(Completeness::starting_at(0).is_complete());
        assert_eq!(Completeness::starting_at(17), Completeness::partial());
        // A complete view stays complete whatever follows.
        let mut c = Completeness::starting_at(0);
        c.after_batch(stored(5), Some(1), 1);
        assert!(c.is_complete());
    }

    #[test]
    fn a_partial_view_is_complete_once_the_engine_stored_its_capacity() {
        let mut c = Completeness::partial();
        for _ in 0..3 {
            c.after_batch(stored(30), Some(100), 2);
            assert!(
                !c.is_complete(),
                "the batch count is no rule with a capacity"
            );
        }
        c.after_batch(stored(9), Some(100), 2);
        assert_eq!(
            c,
            Completeness::Partial {
                batches: 4,
                stored_blocks: 99
            }
        );
        c.after_batch(stored(1), Some(100), 2);
        assert!(c.is_complete(), "100 blocks stored: the whole cache");
    }

    #[test]
    fn a_clear_completes_at_once_and_without_capacity_batches_count() {
        let mut c = Completeness::partial();
        c.after_batch(
            BatchEffect {
                cleared: true,
                unkeyed: 0,
                ..stored(0)
            },
            Some(1_000_000),
            1000,
        );
        assert!(c.is_complete());
        // Capacity unknown: the fallback counts batches, whatever they stored.
        let mut c = Completeness::partial();
        c.after_batch(stored(1_000), None, 3);
        c.after_batch(stored(0), None, 3);
        assert!(!c.is_complete());
        c.after_batch(stored(0), None, 3);
        assert!(c.is_complete());
    }

    #[test]
    fn blocks_the_engine_holds_but_the_view_cannot_key_keep_it_partial() {
        let unkeyed = |n: u64, k: u64| BatchEffect {
            stored_blocks: n,
            cleared: false,
            unkeyed: k,
        };
        let mut c = Completeness::partial();
        c.after_batch(unkeyed(150, 3), Some(100), 2);
        assert!(
            !c.is_complete(),
            "capacity stored, but 3 blocks known to be missing"
        );
        c.after_batch(unkeyed(0, 1), None, 2);
        assert!(!c.is_complete());
        c.after_batch(unkeyed(0, 0), Some(100), 2);
        assert!(c.is_complete(), "the engine removed them");
        // A clear empties the cache: complete whatever came before.
        let mut c = Completeness::partial();
        c.after_batch(
            BatchEffect {
                cleared: true,
                ..unkeyed(0, 0)
            },
            Some(100),
            2,
        );
        assert!(c.is_complete());
    }
}
