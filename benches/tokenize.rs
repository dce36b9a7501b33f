//! The cost of tokenizing a 2,000-token chat request as the engine does (`--tokenizer`): the
//! chat template rendered, then the text encoded, against the stand-in digest of the same body;
//! and of an 8 MiB chat prompt as the router tokenizes it (capped: `tokens::bound`).
//!
//! Run: `cargo bench --bench tokenize -- --warm-up-time 1 --measurement-time 3`
//!
//! The committed test tokenizer has a 1,500-token vocabulary. For a realistic vocabulary, train
//! one offline (`python3 tests/fixtures/tokenizer/gen_tokenizer.py --vocab 128000 --out DIR`)
//! and set `SWITCHYARD_BENCH_TOKENIZER=DIR`: it is measured too.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::request::parse_body;
use switchyard::tokens::Tokenizer;

mod support;

// The `switchyard` binary uses the system allocator (issue 12: mimalloc's RSS missed the memory
// targets), and so does this bench. Tokenizing allocates much: with glibc's malloc it spends a
// third of its time there, and mimalloc measured about 2.5× faster on the 111k-token vocabulary.

const WORDS: &[&str] = &[
    "the",
    "router",
    "engine",
    "cache",
    "prefix",
    "block",
    "token",
    "request",
    "prompt",
    "model",
    "answer",
    "question",
    "because",
    "several",
    "replicas",
    "share",
    "load",
    "latency",
    "while",
    "queue",
    "evicted",
    "hash",
    "template",
    "système",
    "café",
    "東京",
    "2024",
    "42",
    "it's",
    "they're",
    "route()",
    "{json}",
    "p90",
    "throughput",
];

fn bench_one(c: &mut Criterion, name: &str, dir: &Path) {
    let tok = Tokenizer::load(dir).expect("tokenizer loads");
    let (body, n) = support::chat_body(&tok, 2000, WORDS);
    eprintln!("{name}: {tok:?}: chat of {n} tokens, {} bytes", body.len());
    let mut g = c.benchmark_group(format!("tokenize_chat_2000/{name}"));
    g.bench_function("template_and_encode", |b| {
        b.iter(|| {
            tok.request_token_ids("/v1/chat/completions", black_box(&body))
                .expect("tokenizes")
        })
    });
    g.bench_function("template_only", |b| {
        b.iter(|| tok.render_chat(black_box(&body)).expect("renders"))
    });
    let text = tok.render_chat(&body).expect("renders");
    g.bench_function("encode_only", |b| {
        b.iter(|| tok.encode(black_box(&text), false).expect("encodes"))
    });
    g.bench_function("stand_in_digest", |b| {
        b.iter(|| parse_body(black_box(&body), None, 16).expect("parses"))
    });
    g.finish();

    // A hostile prompt: one 8 MiB user message, tokenized as the router does (its first
    // 131,072 tokens at most, from the first 1 MiB of text, in 32 KiB chunks).
    let (one, _) = support::chat_body(&tok, 50, WORDS);
    let mut huge: serde_json::Value = serde_json::from_slice(&one).expect("json");
    let text = std::iter::repeat_n(WORDS, 1 << 20)
        .flatten()
        .take(1_400_000)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let text = &text[..text.floor_char_boundary(8 << 20)];
    huge["messages"] = serde_json::json!([{"role": "user", "content": text}]);
    let huge = serde_json::to_vec(&huge).expect("json");
    let mut g = c.benchmark_group(format!("tokenize_chat_8mib/{name}"));
    g.sample_size(10);
    g.bench_function("capped_131072", |b| {
        b.iter(|| {
            tok.prompt_token_ids(
                "/v1/chat/completions",
                black_box(&huge),
                switchyard::tokens::bound::DEFAULT_MAX_TOKENS,
            )
            .expect("tokenizes")
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3");
    bench_one(c, "test_vocab_1500", &fixture);
    if let Some(dir) = std::env::var_os("SWITCHYARD_BENCH_TOKENIZER") {
        bench_one(c, "env_tokenizer", Path::new(&dir));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
