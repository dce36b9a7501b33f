//! The ideal cache-hit rate of a trace: every replayed prompt, in arrival order, into one
//! unbounded prefix cache.
//!
//! - [`IdealCache`]: at the engines' block size (16 tokens), over the generated token ids, as
//!   the engines measure it (`vllm:prefix_cache_hits_total / _queries_total`: a prompt's hits
//!   are its leading full blocks already cached, in tokens, over its tokens). It never
//!   materialises tokens: a block's tokens depend only on its hash id, so the longest prefix a
//!   prompt shares with any earlier one follows from the chain of its blocks and the most tokens
//!   any earlier prompt had in each (a cut block's tokens are the first ones of the full block).
//! - [`BlockHits`]: at the trace's own blocks, over its hash ids (a request's leading ids seen
//!   before, over all ids): the figure the Mooncake paper gives (36.6 % for its conversation
//!   trace).

use std::collections::{HashMap, HashSet};

use super::trace_prompt::TracePrompt;
use crate::bench::text::mix;

/// The root of every prompt's chain of blocks.
const CHAIN_ROOT: u64 = 0x6964_6561_6c5f_6b76; // "ideal_kv"

/// One unbounded cache at `block_size` tokens per block.
#[derive(Debug, Clone)]
pub struct IdealCache {
    block_size: usize,
    /// The most tokens any prompt so far had in each block, keyed by the block's chain (its
    /// seed and every block before it).
    seen: HashMap<u64, usize>,
    hits: u64,
    queries: u64,
    distinct_tokens: u64,
}

impl IdealCache {
    pub fn new(block_size: usize) -> IdealCache {
        IdealCache {
            block_size: block_size.max(1),
            seen: HashMap::new(),
            hits: 0,
            queries: 0,
            distinct_tokens: 0,
        }
    }

    /// Looks `prompt` up (counting its hits and queries), then caches it.
    pub fn add(&mut self, prompt: &TracePrompt) {
        let mut key = CHAIN_ROOT;
        let mut common = 0usize;
        let mut matching = true;
        for b in &prompt.blocks {
            key = mix(key, b.seed);
            let seen = self.seen.entry(key).or_insert(0);
            if matching {
                common += (*seen).min(b.len);
                matching = *seen >= b.len;
            }
            if b.len > *seen {
                self.distinct_tokens += (b.len - *seen) as u64;
                *seen = b.len;
            }
        }
        self.hits += (common / self.block_size * self.block_size) as u64;
        self.queries += prompt.len as u64;
    }

    /// Hit tokens over queried tokens; `None` before any token.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.queries > 0).then(|| self.hits as f64 / self.queries as f64)
    }

    /// Tokens of the distinct prefixes cached: the trace's working set.
    pub fn distinct_tokens(&self) -> u64 {
        self.distinct_tokens
    }
}

/// Hits at the trace's own granularity: a request's leading hash ids seen in an earlier request.
#[derive(Debug, Clone, Default)]
pub struct BlockHits {
    seen: HashSet<u64>,
    hits: u64,
    blocks: u64,
}

impl BlockHits {
    pub fn add(&mut self, hash_ids: &[u64]) {
        let lead = hash_ids
            .iter()
            .take_while(|h| self.seen.contains(h))
            .count();
        self.hits += lead as u64;
        self.blocks += hash_ids.len() as u64;
        self.seen.extend(hash_ids.iter().copied());
    }

    pub fn hit_rate(&self) -> Option<f64> {
        (self.blocks > 0).then(|| self.hits as f64 / self.blocks as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::trace::TraceReader;
    use std::path::Path;

    /// The definition, by brute force: every full block of the generated tokens, chained.
    fn brute_force(prompts: &[TracePrompt], block_size: usize) -> f64 {
        let mut cache = HashSet::new();
        let (mut hits, mut queries) = (0usize, 0usize);
        for p in prompts {
            let tokens = p.tokens();
            let mut h = 0u64;
            let hashes: Vec<u64> = tokens
                .chunks_exact(block_size)
                .map(|c| {
                    let bytes: Vec<u8> = c.iter().flat_map(|t| t.to_le_bytes()).collect();
                    h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, h);
                    h
                })
                .collect();
            hits += hashes.iter().take_while(|k| cache.contains(*k)).count() * block_size;
            queries += tokens.len();
            cache.extend(hashes);
        }
        hits as f64 / queries as f64
    }

    fn ideal(prompts: &[TracePrompt], block_size: usize) -> f64 {
        let mut c = IdealCache::new(block_size);
        prompts.iter().for_each(|p| c.add(p));
        c.hit_rate().unwrap()
    }

    #[test]
    fn ideal_at_16_tokens_on_a_hand_made_trace() {
        let p = |i: usize, len: usize, ids: &[u64]| TracePrompt::new(9, i, len, ids, 16);
        let prompts = [
            p(0, 40, &[1, 2, 3]),    // 16 + 16 + 8: nothing cached yet
            p(1, 40, &[1, 2, 3]),    // the same prompt: its 2 full blocks hit (32 of 40)
            p(2, 48, &[1, 2, 3]),    // block 3 longer than before: 32 + 8 common → 32 hit
            p(3, 48, &[1, 2, 3]),    // now all 3 full blocks: 48
            p(4, 20, &[1, 9]),       // block 1 only: 16
            p(5, 30, &[4, 2, 3]),    // another first block: its 2 and 3 are not a prefix: 0
            p(6, 50, &[1, 2, 3, 5]), // 48 common (id 5's 2 tokens are new): 48
            p(7, 10, &[1]),          // 10 common, no full block: 0
            p(8, 35, &[1, 2]),       // 32 from ids + 3 padded, the record's own: 32
        ];
        // queries 40+40+48+48+20+30+50+10+35 = 321; hits 0+32+32+48+16+0+48+0+32 = 208.
        assert!((ideal(&prompts, 16) - 208.0 / 321.0).abs() < 1e-12);
        assert!((brute_force(&prompts, 16) - 208.0 / 321.0).abs() < 1e-12);
        let mut c = IdealCache::new(16);
        prompts.iter().for_each(|p| c.add(p));
        // Distinct tokens: chain 1-2-3 (48) + 1-9 (4) + 4-2 (30) + 1-2-3-5 (2) + record 8's pad (3).
        assert_eq!(c.distinct_tokens(), 48 + 4 + 30 + 2 + 3);
    }

    fn committed_trace() -> TraceReader {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/data/traces/mooncake_conversation_trace.jsonl");
        TraceReader::open(&path).unwrap()
    }

    #[test]
    fn the_committed_mooncake_trace_is_36_6_percent_at_its_512_token_blocks() {
        let mut b = BlockHits::default();
        let mut n = 0;
        for r in committed_trace() {
            b.add(&r.unwrap().hash_ids);
            n += 1;
        }
        assert_eq!(n, 12_031);
        let rate = b.hit_rate().unwrap();
        assert_eq!(format!("{:.1}", rate * 100.0), "36.6", "{rate}");
    }

    #[test]
    fn the_fast_ideal_matches_brute_force_on_the_trace_s_start() {
        let prompts: Vec<TracePrompt> = committed_trace()
            .take(150)
            .map(|r| {
                let r = r.unwrap();
                TracePrompt::new(42, r.index, r.input_length, &r.hash_ids, 512)
            })
            .collect();
        let fast = ideal(&prompts, 16);
        assert!((fast - brute_force(&prompts, 16)).abs() < 1e-12, "{fast}");
        assert!(
            fast > 0.03,
            "the trace's start shares its system block: {fast}"
        );
    }
}
