//! A trace record's prompt as token ids: each hash id becomes a deterministic block of tokens
//! (equal ids give equal tokens, so the trace's sharing is the prompt's sharing), and the
//! request body that carries them (`/v1/completions` with a token-id `prompt`), written
//! straight into one pre-sized buffer when the request is sent.
//!
//! - A block's tokens come from a PRNG seeded by (workload seed, hash id); ids are drawn from
//!   [`TOKEN_IDS`], ordinary tokens of real vocabularies (past the first 1,000 ids, where
//!   tokenizers keep their special tokens; below 100,000, inside Llama-3's, Mistral's tekken
//!   and Qwen's vocabularies), so the same prompts work with `--tokenizer`.
//! - The prompt is the blocks' tokens in order, the last block cut so that the prompt is
//!   exactly `input_length` tokens; hash ids past that are ignored. A cut block's tokens are the
//!   first ones of the full block.
//! - When `input_length` exceeds the hash ids' tokens, the rest is padded with blocks of the
//!   record's own (seeded by workload seed, record number, pad block): tokens the trace does
//!   not say are shared are never shared.

use std::ops::Range;

use crate::bench::text::mix;

/// The token ids a prompt is made of.
pub const TOKEN_IDS: Range<u32> = 1_000..100_000;

/// PRNG streams (mixed with the workload seed).
const HASH_STREAM: u64 = 0x7472_6163_655f_6964; // "trace_id"
const PAD_STREAM: u64 = 0x7472_6163_655f_7064; // "trace_pd"

/// One block of a prompt: the seed of its tokens and how many of them it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptBlock {
    pub seed: u64,
    pub len: usize,
}

impl PromptBlock {
    /// Appends the block's tokens to `out`.
    pub fn tokens_into(self, out: &mut Vec<u32>) {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        out.extend((0..self.len).map(|_| rng.u32(TOKEN_IDS)));
    }
}

/// A request's prompt: its blocks, generated into tokens only when needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePrompt {
    pub blocks: Vec<PromptBlock>,
    /// Total tokens (the record's `input_length`).
    pub len: usize,
    /// Pad blocks at the end (tokens beyond the hash ids').
    pub padded_blocks: usize,
}

impl TracePrompt {
    /// The prompt of a record with `input_length` tokens and `hash_ids` over `block_tokens`
    /// tokens each; `index` is the record's number (seeds its pad blocks).
    pub fn new(
        seed: u64,
        index: usize,
        input_length: usize,
        hash_ids: &[u64],
        block_tokens: usize,
    ) -> TracePrompt {
        let b = block_tokens.max(1);
        let mut blocks = Vec::with_capacity(input_length.div_ceil(b));
        let mut left = input_length;
        let ids = mix(seed, HASH_STREAM);
        for &id in hash_ids {
            if left == 0 {
                break;
            }
            let len = left.min(b);
            blocks.push(PromptBlock {
                seed: mix(ids, id),
                len,
            });
            left -= len;
        }
        let own = mix(mix(seed, PAD_STREAM), index as u64);
        let mut padded_blocks = 0;
        while left > 0 {
            let len = left.min(b);
            blocks.push(PromptBlock {
                seed: mix(own, padded_blocks as u64),
                len,
            });
            padded_blocks += 1;
            left -= len;
        }
        TracePrompt {
            blocks,
            len: input_length,
            padded_blocks,
        }
    }

    /// Every token of the prompt.
    pub fn tokens(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len);
        for b in &self.blocks {
            b.tokens_into(&mut out);
        }
        out
    }

    /// Writes the tokens as a JSON array (`[1,2,3]`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut num = itoa::Buffer::new();
        out.push(b'[');
        let mut first = true;
        for b in &self.blocks {
            let mut rng = fastrand::Rng::with_seed(b.seed);
            for _ in 0..b.len {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(num.format(rng.u32(TOKEN_IDS)).as_bytes());
            }
        }
        out.push(b']');
    }

    /// The streamed completion request for this prompt: `{"model":…,"prompt":[ids],
    /// "max_tokens":N,"stream":true,"ignore_eos":true}`. `model_json` is the model name as a
    /// JSON string (quoted and escaped).
    pub fn completion_body(&self, model_json: &str, max_tokens: usize) -> Vec<u8> {
        // At most 5 digits and a comma per token.
        let mut out = Vec::with_capacity(self.len * 6 + model_json.len() + 96);
        out.extend_from_slice(b"{\"model\":");
        out.extend_from_slice(model_json.as_bytes());
        out.extend_from_slice(b",\"prompt\":");
        self.write_json(&mut out);
        out.extend_from_slice(b",\"max_tokens\":");
        out.extend_from_slice(itoa::Buffer::new().format(max_tokens).as_bytes());
        out.extend_from_slice(b",\"stream\":true,\"ignore_eos\":true}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hash_ids_give_equal_tokens_and_lengths_are_exact() {
        let a = TracePrompt::new(42, 0, 1100, &[0, 1, 2], 512);
        let b = TracePrompt::new(42, 1, 700, &[0, 1, 9], 512);
        let c = TracePrompt::new(42, 2, 1024, &[0, 5], 512);
        let (ta, tb, tc) = (a.tokens(), b.tokens(), c.tokens());
        assert_eq!((ta.len(), tb.len(), tc.len()), (1100, 700, 1024));
        assert_eq!(
            a.blocks.iter().map(|b| b.len).collect::<Vec<_>>(),
            [512, 512, 76]
        );
        // Shared ids 0, 1: the same first 700 tokens (b's second block is a's, cut).
        assert_eq!(ta[..700], tb[..]);
        assert_eq!(ta[..512], tc[..512]);
        assert_ne!(
            ta[512..1024],
            tc[512..1024],
            "different ids, different tokens"
        );
        // Deterministic across calls; another seed gives other tokens.
        assert_eq!(TracePrompt::new(42, 0, 1100, &[0, 1, 2], 512).tokens(), ta);
        assert_ne!(TracePrompt::new(7, 0, 1100, &[0, 1, 2], 512).tokens(), ta);
        assert!(ta.iter().all(|t| TOKEN_IDS.contains(t)));
        // Extra hash ids past input_length are ignored.
        let d = TracePrompt::new(42, 3, 600, &[0, 1, 2, 3], 512);
        assert_eq!(d.blocks.len(), 2);
        assert_eq!(d.tokens(), ta[..600]);
    }

    #[test]
    fn tokens_beyond_the_hash_ids_are_the_records_own() {
        let a = TracePrompt::new(42, 0, 40, &[3], 16);
        let b = TracePrompt::new(42, 1, 40, &[3], 16);
        assert_eq!((a.padded_blocks, a.blocks.len()), (2, 3));
        let (ta, tb) = (a.tokens(), b.tokens());
        assert_eq!(ta.len(), 40);
        assert_eq!(ta[..16], tb[..16]);
        assert_ne!(ta[16..], tb[16..]);
        assert_eq!(TracePrompt::new(42, 0, 40, &[3], 16).tokens(), ta);
        let empty = TracePrompt::new(42, 5, 0, &[1, 2], 16);
        assert!(empty.blocks.is_empty() && empty.tokens().is_empty());
    }

    #[test]
    fn the_body_is_json_with_the_prompt_tokens() {
        let p = TracePrompt::new(1, 0, 37, &[10, 11, 12], 16);
        let body = p.completion_body("\"m\\\"x\"", 9);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["model"], "m\"x");
        assert_eq!(v["max_tokens"], 9);
        assert_eq!(v["stream"], true);
        assert_eq!(v["ignore_eos"], true);
        let ids: Vec<u32> = serde_json::from_value(v["prompt"].clone()).unwrap();
        assert_eq!(ids, p.tokens());
        assert!(
            body.len() <= p.len * 6 + 7 + 96,
            "the buffer was large enough"
        );
        let empty = TracePrompt::new(1, 0, 0, &[], 16).completion_body("\"m\"", 1);
        let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
        assert_eq!(v["prompt"], serde_json::json!([]));
    }
}
