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
//!
//! Real token ids (from a model's tokenizer, or an engine's KV events) are keyed the same way,
//! by [`token_block_hashes`]: the router's own chained hash of each full block of ids.
//!
//! A model's real tokenizer and chat template (`--tokenizer`) are [`Tokenizer`] ([`hf`], with
//! the chat template in `chat` and transformers' Jinja helpers in `jinja`): the token ids an
//! engine sees for a request body; [`bound`] keeps the router to a prompt's first tokens at a
//! cost that follows their number, not the body's size. Where real ids are wanted without one,
//! [`stand_in_token_ids`] gives the stand-in's: each 4 bytes of the prompt text as one id.

pub mod bound;
mod chat;
pub mod hf;
mod jinja;

pub use bound::PromptIds;
pub use hf::Tokenizer;

use std::path::PathBuf;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Why a tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a directory holding tokenizer.json, nor a tokenizer.json file")]
    NotFound { path: PathBuf },
    #[error("{path}: not a valid Hugging Face tokenizer.json: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: the chat template does not compile: {message}")]
    Template { path: PathBuf, message: String },
}

/// Why a request body could not be tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("request body has no prompt (\"prompt\" or \"input\")")]
    NoPrompt,
    #[error("the tokenizer has no chat template (tokenizer_config.json's chat_template)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizing: {0}")]
    Encode(String),
}

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
    out.reserve(text.len() / block_bytes);
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

/// The seed of a token-id chain: [`CHAIN_SEED`] for the base model, mixed with the adapter's
/// name for blocks computed under a LoRA adapter (vLLM keys those blocks apart too).
pub fn token_chain_seed(lora_name: Option<&str>) -> u64 {
    match lora_name {
        None => CHAIN_SEED,
        Some(name) => xxh3_64_with_seed(name.as_bytes(), CHAIN_SEED),
    }
}

/// The router's own chained hash of one full block of token ids after the block hashed to
/// `prev`: xxh3 of the ids as little-endian `u32`s, seeded with `prev`. This is how the router
/// keys blocks it learns from an engine's KV events and the blocks of a tokenized prompt, so
/// the engine's own hash function and seed never matter.
pub fn token_block_hash(prev: u64, ids: &[u32]) -> u64 {
    let mut bytes = [0u8; 4 * 64];
    if ids.len() <= 64 {
        for (chunk, id) in bytes.chunks_exact_mut(4).zip(ids) {
            chunk.copy_from_slice(&id.to_le_bytes());
        }
        return xxh3_64_with_seed(&bytes[..4 * ids.len()], prev);
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(prev);
    for id in ids {
        hasher.update(&id.to_le_bytes());
    }
    hasher.digest()
}

/// The chained hashes of every full block of `block_size` token ids, from `seed`
/// ([`token_chain_seed`]). A trailing partial block is not hashed, as vLLM caches only full
/// blocks.
pub fn token_block_hashes(ids: &[u32], block_size: usize, seed: u64) -> Vec<u64> {
    let block_size = block_size.max(1);
    let mut out = Vec::with_capacity(ids.len() / block_size);
    let mut prev = seed;
    for block in ids.chunks_exact(block_size) {
        prev = token_block_hash(prev, block);
        out.push(prev);
    }
    out
}

/// The stand-in tokenizer's token ids of `text`: each [`BYTES_PER_TOKEN`]-byte chunk read as a
/// little-endian `u32` (a trailing partial chunk padded with zero bytes). Equal ids mean equal
/// bytes, so blocks of these ids are equal exactly when the stand-in's text blocks are; there
/// are [`estimate_tokens`]`(text.len())` of them.
pub fn stand_in_token_ids(text: &[u8]) -> Vec<u32> {
    text.chunks(BYTES_PER_TOKEN)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b)
        })
        .collect()
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
    fn token_blocks_chain_and_depend_on_the_adapter() {
        let ids: Vec<u32> = (0..100).collect();
        let base = token_block_hashes(&ids, 16, token_chain_seed(None));
        assert_eq!(base.len(), 6, "only full blocks");
        assert_eq!(
            base[0],
            token_block_hash(token_chain_seed(None), &ids[..16])
        );
        assert_eq!(base[1], token_block_hash(base[0], &ids[16..32]));
        let mut other = ids.clone();
        other[20] = 7;
        let changed = token_block_hashes(&other, 16, token_chain_seed(None));
        assert_eq!(base[0], changed[0]);
        assert!(base[1..].iter().zip(&changed[1..]).all(|(a, b)| a != b));
        let lora = token_block_hashes(&ids, 16, token_chain_seed(Some("sql-adapter")));
        assert_ne!(base[0], lora[0]);
        // Blocks longer than the fast path hash the same bytes the same way.
        let long: Vec<u32> = (0..200).collect();
        let mut bytes = Vec::new();
        for id in &long {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(token_block_hash(1, &long), xxh3_64_with_seed(&bytes, 1));
    }

    #[test]
    fn stand_in_ids_are_four_byte_chunks() {
        assert_eq!(stand_in_token_ids(b""), Vec::<u32>::new());
        assert_eq!(
            stand_in_token_ids(b"abcdef"),
            vec![
                u32::from_le_bytes(*b"abcd"),
                u32::from_le_bytes([b'e', b'f', 0, 0])
            ]
        );
        let text = "x".repeat(4 * 33 + 1);
        assert_eq!(
            stand_in_token_ids(text.as_bytes()).len(),
            estimate_tokens(text.len())
        );
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
