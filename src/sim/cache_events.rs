//! What the simulated engine's prefix cache reports as it changes, in vLLM's terms: blocks
//! stored (with their token ids and the engine's own block hashes), blocks removed (LRU
//! evictions), and everything cleared. A publisher turns these into vLLM's KV events.
//!
//! The engine's block hashes are the simulated engine's own (like vLLM's, they need not match
//! the router's): a router must key blocks by their token ids, never by these.

/// One run of full blocks stored after `parent` (vLLM's `BlockStored`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlocks {
    /// The engine's hash of the block before the first one; `None` at the start of a prompt.
    pub parent: Option<u64>,
    /// The engine's hash of each stored block, in prompt order.
    pub block_hashes: Vec<u64>,
    /// The token ids of all the stored blocks, concatenated (`block_hashes.len() * block_size`).
    pub token_ids: Vec<u32>,
    pub block_size: usize,
    /// The LoRA adapter the blocks were computed under, if any.
    pub lora_name: Option<String>,
}

/// Receives the prefix cache's changes. Implementations must not block: they are called
/// with the engine's cache lock held.
pub trait CacheEvents: Send + Sync + std::fmt::Debug {
    fn stored(&self, blocks: StoredBlocks);
    /// Blocks evicted (engine hashes).
    fn removed(&self, block_hashes: &[u64]);
    /// Every block dropped (e.g. a cache reset).
    fn cleared(&self);
}
