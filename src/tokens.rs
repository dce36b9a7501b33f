//! The stand-in tokenizer and prefix-block hashing shared by the router's prefix index
//! (`kv_lookup`) and the simulated engine's prefix cache.
//!
//! Real tokenizers are model-specific; routing only needs a deterministic, cheap estimate
//! that both sides agree on. The rule: **one token per 4 bytes of UTF-8 prompt text**
//! (rounded up), which is close to the ~4 characters per token of English text with
//! Llama-family tokenizers. A prompt is cut into blocks of `block_size` tokens
//! (`4 * block_size` bytes); only full blocks are hashed, as vLLM only caches full blocks.
//! Block hashes are chained: hash(i) = xxh3(hash(i-1) ‖ bytes of block i), so equal hashes at
//! block i mean the whole prefix up to and including block i is equal.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of prompt text that count as one token.
pub const BYTES_PER_TOKEN: usize = 4;

/// The default number of tokens per cache block (vLLM's default `--block-size`).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Estimated number of tokens in `bytes` bytes of prompt text.
pub fn estimate_tokens(bytes: usize) -> usize {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Appends the chained hashes of every full block of `text` to `out`.
pub fn block_hashes_into(text: &[u8], block_size_tokens: usize, out: &mut Vec<u64>) {
    let block_bytes = block_size_tokens.max(1) * BYTES_PER_TOKEN;
    let mut prev: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"
    for block in text.chunks_exact(block_bytes) {
        prev = xxh3_64_with_seed(block, prev);
        out.push(prev);
    }
}

/// The chained hashes of every full block of `text`.
pub fn block_hashes(text: &[u8], block_size_tokens: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / (block_size_tokens.max(1) * BYTES_PER_TOKEN));
    block_hashes_into(text, block_size_tokens, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_rounds_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }

    #[test]
    fn only_full_blocks_are_hashed_and_hashes_chain() {
        let a = "x".repeat(64 * 3 + 10);
        let h = block_hashes(a.as_bytes(), 16);
        assert_eq!(h.len(), 3);
        // Same first block, different second block: first hash equal, later ones differ.
        let mut b = a.clone();
        b.replace_range(70..71, "y");
        let hb = block_hashes(b.as_bytes(), 16);
        assert_eq!(h[0], hb[0]);
        assert_ne!(h[1], hb[1]);
        assert_ne!(
            h[2], hb[2],
            "a change in block 1 must change every later hash"
        );
        // Identical blocks at different positions hash differently (chaining).
        assert_ne!(h[0], h[1]);
    }
}
