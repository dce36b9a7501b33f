//! Applying a decoded batch to an engine's view in the exact index: the events in order, with
//! engine hashes turned into 64-bit keys ([`BlockHash::key`]), only KV-cache group 0 indexed,
//! and a LoRA adapter known only by its id (releases before `lora_name`) keyed as
//! `lora-id:ID` so that it never mixes with the base model.

use super::wire::{BlockHash, EventBatch, KvEvent};
use crate::prefix::exact::{ExactIndex, Medium, StoreOutcome, StoredRun};

/// What applying one batch did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub stored: u64,
    pub removed: u64,
    pub cleared: u64,
    pub unknown: u64,
    /// Blocks of group 0 stored on the GPU (anchored in the view or not): new blocks in the
    /// engine's GPU cache, what a partial view's completeness counts.
    pub stored_gpu_blocks: u64,
    /// Stored blocks skipped: their parent is unknown to the view, and in no recent request
    /// of the router's to the engine.
    pub unanchored_blocks: u64,
    /// Stored blocks whose parent was unknown to the view but found in a recent request of
    /// the router's to the engine ([`crate::prefix::exact::anchor`]): in the view.
    pub anchored_blocks: u64,
    /// Removed blocks the view did not hold.
    pub unknown_removals: u64,
    /// After the batch: blocks the engine holds that the view cannot key
    /// ([`crate::prefix::exact::EngineView::unkeyed`]).
    pub unkeyed_blocks: u64,
    /// Events of KV-cache groups other than 0, not indexed.
    pub other_groups: u64,
    /// `BlockStored` events whose token ids do not fill their blocks.
    pub bad_events: u64,
}

/// Applies `batch` to `engine`'s view (one lock for the whole batch). `None` when the engine
/// has no view. `keys` is scratch space.
pub fn apply_batch(
    index: &ExactIndex,
    engine: u32,
    batch: &EventBatch,
    keys: &mut Vec<u64>,
) -> Option<Applied> {
    apply_batch_to_rank(index, engine, 0, batch, keys)
}

/// [`apply_batch`] to the view of `engine`'s data-parallel rank `rank`.
pub fn apply_batch_to_rank(
    index: &ExactIndex,
    engine: u32,
    rank: u32,
    batch: &EventBatch,
    keys: &mut Vec<u64>,
) -> Option<Applied> {
    index.update_rank(engine, rank, |v| {
        v.set_data_parallel_rank(batch.data_parallel_rank);
        let mut a = Applied::default();
        for event in &batch.events {
            match event {
                KvEvent::Stored(s) => {
                    a.stored += 1;
                    if s.group_idx.unwrap_or(0) != 0 {
                        a.other_groups += 1;
                        continue;
                    }
                    keys.clear();
                    keys.extend(s.block_hashes.iter().map(BlockHash::key));
                    let synthetic;
                    let lora_name = match (&s.lora_name, s.lora_id) {
                        (Some(n), _) => Some(n.as_str()),
                        (None, Some(id)) => {
                            synthetic = format!("lora-id:{id}");
                            Some(synthetic.as_str())
                        }
                        (None, None) => None,
                    };
                    let medium = Medium::from_wire(s.medium.as_deref());
                    if medium == Medium::Gpu {
                        a.stored_gpu_blocks += keys.len() as u64;
                    }
                    let run = StoredRun {
                        parent: s.parent_block_hash.as_ref().map(BlockHash::key),
                        block_hashes: keys,
                        token_ids: &s.token_ids,
                        block_size: s.block_size,
                        lora_name,
                        medium,
                    };
                    match v.store(&run) {
                        StoreOutcome::Stored(_) => {}
                        StoreOutcome::Anchored(n) => a.anchored_blocks += n as u64,
                        StoreOutcome::Unanchored => a.unanchored_blocks += keys.len() as u64,
                        StoreOutcome::BadLength => a.bad_events += 1,
                    }
                }
                KvEvent::Removed(r) => {
                    a.removed += 1;
                    if r.group_idx.unwrap_or(0) != 0 {
                        a.other_groups += 1;
                        continue;
                    }
                    keys.clear();
                    keys.extend(r.block_hashes.iter().map(BlockHash::key));
                    let medium = Medium::from_wire(r.medium.as_deref());
                    a.unknown_removals += v.remove(keys, medium) as u64;
                }
                KvEvent::Cleared => {
                    a.cleared += 1;
                    v.clear();
                }
                KvEvent::Unknown(_) => a.unknown += 1,
            }
        }
        a.unkeyed_blocks = v.unkeyed() as u64;
        a
    })
}
