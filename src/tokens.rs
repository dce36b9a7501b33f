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

/// The seed of the first block's hash ("SWITCHYD").
const CHAIN_SEED: u64 = 0x5357_4954_4348_5944;

/// Appends the chained hashes of every full block of `text` to `out`.
pub fn block_hashes_into(text: &[u8], block_size_tokens: usize, out: &mut Vec<u64>) {
    let block_bytes = block_size_tokens.max(1) * BYTES_PER_TOKEN;
    chain_into(CHAIN_SEED, text, block_bytes, out);
}

/// Hashes every full block of `text` chained from `prev`; returns the last hash.
fn chain_into(mut prev: u64, text: &[u8], block_bytes: usize, out: &mut Vec<u64>) -> u64 {
    for block in text.chunks_exact(block_bytes) {
        prev = xxh3_64_with_seed(block, prev);
        out.push(prev);
    }
    prev
}

/// Block hashing of a text that arrives in pieces: the same hashes as [`block_hashes`] of the
/// concatenation, holding at most one partial block, never the text.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    block_bytes: usize,
    /// The bytes of the current, incomplete block.
    partial: Vec<u8>,
    prev: u64,
    hashes: Vec<u64>,
    bytes: usize,
}

impl BlockHasher {
    pub fn new(block_size_tokens: usize) -> BlockHasher {
        let block_bytes = block_size_tokens.max(1) * BYTES_PER_TOKEN;
        BlockHasher {
            block_bytes,
            partial: Vec::with_capacity(block_bytes),
            prev: CHAIN_SEED,
            hashes: Vec::new(),
            bytes: 0,
        }
    }

    /// Appends `piece` to the text.
    pub fn push(&mut self, mut piece: &[u8]) {
        self.bytes += piece.len();
        if !self.partial.is_empty() {
            let take = (self.block_bytes - self.partial.len()).min(piece.len());
            self.partial.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.partial.len() < self.block_bytes {
                return;
            }
            self.prev = xxh3_64_with_seed(&self.partial, self.prev);
            self.hashes.push(self.prev);
            self.partial.clear();
        }
        let full = piece.len() / self.block_bytes * self.block_bytes;
        self.prev = chain_into(
            self.prev,
            &piece[..full],
            self.block_bytes,
            &mut self.hashes,
        );
        self.partial.extend_from_slice(&piece[full..]);
    }

    /// Bytes pushed so far.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The hashes of every full block pushed.
    pub fn finish(self) -> Vec<u64> {
        self.hashes
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

    #[test]
    fn hashing_in_pieces_equals_hashing_the_whole() {
        let text: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = block_hashes(&text, 16);
        for cuts in [
            vec![1, 2, 3],
            vec![63, 64, 65, 200],
            vec![500],
            vec![0, 0, 999],
        ] {
            let mut h = BlockHasher::new(16);
            let mut at = 0;
            for c in cuts {
                let c = c.max(at);
                h.push(&text[at..c]);
                at = c;
            }
            h.push(&text[at..]);
            assert_eq!(h.len(), text.len());
            assert_eq!(h.finish(), whole);
        }
    }
}
