//! The router-side KV-prefix index behind `kv_lookup` (stub; see the policy issue).

/// Records which engine each prompt's blocks were routed to.
#[derive(Debug, Default)]
pub struct PrefixIndex {}

impl PrefixIndex {
    /// An index bounded to `budget_bytes` of memory.
    pub fn new(_budget_bytes: usize) -> PrefixIndex {
        PrefixIndex {}
    }

    /// For each engine id in `engines`, the number of leading blocks of `hashes` it holds.
    pub fn match_blocks(&self, _hashes: &[u64], engines: &[u32]) -> Vec<usize> {
        vec![0; engines.len()]
    }

    /// Records that the prompt with these block hashes was routed to `engine`.
    pub fn insert(&self, _engine: u32, _hashes: &[u64]) {}

    /// Drops every entry of `engine`.
    pub fn remove_engine(&self, _engine: u32) {}
}
