//! Prefix-index insert and lookup with 100k stored 2 KB prompts (32 blocks of 16 tokens each).
//!
//! Run: `cargo bench --bench prefix -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::prefix::PrefixIndex;
use switchyard::tokens::block_hashes;

const PROMPTS: usize = 100_000;
const ENGINES: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// A 2 KB prompt: one of 50 shared system prompts (512 bytes), then unique text.
fn prompt(i: usize) -> Vec<u64> {
    let mut text = format!("system prompt {:04} ", i % 50).repeat(27);
    text.truncate(512);
    while text.len() < 2048 {
        text.push_str(&format!("user {i} says something; "));
    }
    text.truncate(2048);
    block_hashes(text.as_bytes(), 16)
}

fn bench(c: &mut Criterion) {
    // Room for all 100k prompts (~2.4M distinct blocks).
    let idx = PrefixIndex::new(256 << 20);
    let prompts: Vec<Vec<u64>> = (0..PROMPTS).map(prompt).collect();
    for (i, p) in prompts.iter().enumerate() {
        idx.insert(ENGINES[i % ENGINES.len()], p);
    }
    eprintln!(
        "prefix index: {} blocks, {} MiB accounted",
        idx.len(),
        idx.accounted_bytes() >> 20
    );
    let mut g = c.benchmark_group("prefix_index_100k");
    let mut k = 0usize;
    g.bench_function("lookup_hit_8_engines", |b| {
        b.iter(|| {
            k = (k + 7919) % PROMPTS;
            black_box(idx.match_blocks(black_box(&prompts[k]), &ENGINES))
        })
    });
    let miss = prompt(PROMPTS + 1);
    g.bench_function("lookup_shared_prefix_only_8_engines", |b| {
        b.iter(|| black_box(idx.match_blocks(black_box(&miss), &ENGINES)))
    });
    let fresh: Vec<Vec<u64>> = (PROMPTS..PROMPTS + 20_000).map(prompt).collect();
    let mut j = 0usize;
    g.bench_function("insert_2kb_prompt", |b| {
        b.iter(|| {
            j = (j + 1) % fresh.len();
            idx.insert(ENGINES[j % 8], black_box(&fresh[j]));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
