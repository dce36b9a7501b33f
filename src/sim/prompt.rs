//! What the simulated engine makes of a request's prompt, as vLLM does: its token ids and the
//! engine's own chained hashes of their full blocks.
//!
//! With a model tokenizer (`switchyard sim --tokenizer`), the ids are the model's
//! ([`Tokenizer::request_token_ids`]: the chat template, vLLM's special-token defaults).
//! Without one, they are the stand-in tokenizer's ids of the canonical prompt text
//! ([`tokens::stand_in_token_ids`]: each 4 bytes as a little-endian `u32`), so token counts,
//! block boundaries and hit rates are the stand-in's, as before.
//!
//! The engine's block hashes chain [`tokens::token_block_hash`] from the engine's own seed
//! ([`ENGINE_SEED`]): like vLLM's, they differ from the router's hashes of the same ids.

use std::sync::Arc;

use super::cache_events::CacheEvents;
use crate::tokens::{self, TokenizeError, Tokenizer};

/// The seed of the engine's block-hash chain ("VLLM-SIM"), unlike the router's.
pub const ENGINE_SEED: u64 = 0x564c_4c4d_2d53_494d;

/// Optional parts of a simulated engine that cannot live in [`super::SimConfig`]: a shared
/// tokenizer (else [`super::SimConfig::tokenizer`] is loaded) and a receiver of the prefix
/// cache's changes (e.g. a KV-event publisher).
#[derive(Debug, Clone, Default)]
pub struct SimHooks {
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub cache_events: Option<Arc<dyn CacheEvents>>,
}

/// A request's prompt as the engine sees it.
#[derive(Debug)]
pub(crate) struct EnginePrompt {
    pub token_ids: Vec<u32>,
    /// The engine's chained hashes of every full block of `token_ids`.
    pub block_hashes: Vec<u64>,
}

/// The engine's hashes of every full block of `ids`.
pub fn engine_block_hashes(ids: &[u32], block_size: usize) -> Vec<u64> {
    tokens::token_block_hashes(ids, block_size, ENGINE_SEED)
}

/// The prompt of `body`, whose canonical prompt text (the stand-in's, see
/// [`crate::request::PromptDigest`]) is `canonical_text`.
pub(crate) fn engine_prompt(
    tokenizer: Option<&Tokenizer>,
    path: &str,
    body: &[u8],
    canonical_text: &str,
    block_size: usize,
) -> Result<EnginePrompt, TokenizeError> {
    let token_ids = match tokenizer {
        Some(t) => t.request_token_ids(path, body)?,
        None => tokens::stand_in_token_ids(canonical_text.as_bytes()),
    };
    let block_hashes = engine_block_hashes(&token_ids, block_size);
    Ok(EnginePrompt {
        token_ids,
        block_hashes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_prompts_keep_their_blocks_and_engine_hashes_differ_from_the_router() {
        let text = "w".repeat(4 * 16 * 3 + 5);
        let p = engine_prompt(None, "/v1/completions", b"{}", &text, 16).unwrap();
        assert_eq!(p.token_ids.len(), tokens::estimate_tokens(text.len()));
        assert_eq!(p.block_hashes.len(), 3);
        let router = tokens::token_block_hashes(&p.token_ids, 16, tokens::token_chain_seed(None));
        assert!(p.block_hashes.iter().zip(&router).all(|(a, b)| a != b));
    }
}
