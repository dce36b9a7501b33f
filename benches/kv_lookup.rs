//! The cost of an exact `kv_lookup` of a 2,000-token chat request over 8 engines: tokenizing
//! the request as the engines do (chat template, then the test tokenizer), looking its blocks
//! up in the 8 engines' exact views, and the whole of what a decision pays the first time a
//! tier needs prefix matches (`proxy::kv::RequestKv`: tokenize + exact lookup; no engine needs
//! the approximate index here).
//!
//! Each engine's view holds a different leading share of the prompt (engine k: k/8 of its
//! blocks) among 20,000 blocks of other prompts.
//!
//! Run: `cargo bench --bench kv_lookup -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::engines::{Candidate, Engine};
use switchyard::policy::PrefixMatcher;
use switchyard::prefix::PrefixIndex;
use switchyard::prefix::exact::{ExactIndex, Medium, StoredRun};
use switchyard::proxy::kv::{RequestKv, Sources};
use switchyard::request::{RequestInfo, parse_body};
use switchyard::tokens::Tokenizer;

mod support;

const ENGINES: u32 = 8;
const BS: usize = 16;
const CHAT: &str = "/v1/chat/completions";
/// The words of the benchmarked chat.
const WORDS: &[&str] = &[
    "the", "router", "engine", "cache", "prefix", "block", "token", "request", "prompt", "model",
    "answer", "question", "replicas", "latency", "queue", "evicted", "template",
];

/// Stores the first `blocks` blocks of `ids` in `engine`'s view (engine hashes: `salt` + i).
fn store(index: &ExactIndex, engine: u32, ids: &[u32], blocks: usize, salt: u64) {
    let hashes: Vec<u64> = (0..blocks as u64).map(|i| salt.wrapping_add(i)).collect();
    index.update(engine, |v| {
        v.set_live(true);
        v.store(&StoredRun {
            parent: None,
            block_hashes: &hashes,
            token_ids: &ids[..blocks * BS],
            block_size: BS,
            lora_name: None,
            medium: Medium::Gpu,
        })
    });
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3");
    let tok = Tokenizer::load(&dir).expect("the test tokenizer loads");
    let (body, _) = support::chat_body(&tok, 2000, WORDS);
    let ids = tok.request_token_ids(CHAT, &body).expect("tokenizes");
    let blocks = ids.len() / BS;
    let index = ExactIndex::new(256 << 20);
    let mut rng = fastrand::Rng::with_seed(11);
    for e in 0..ENGINES {
        index.add_engine(e);
        // Other prompts first (2,500 blocks per engine), then its share of this one.
        for p in 0..25u64 {
            let other: Vec<u32> = (0..100 * BS).map(|_| rng.u32(..1500)).collect();
            store(&index, e, &other, 100, (u64::from(e) << 40) | (p << 20));
        }
        let held = blocks * e as usize / ENGINES as usize;
        store(&index, e, &ids, held, (u64::from(e) << 40) | (99 << 20));
    }
    let engines: Vec<u32> = (0..ENGINES).collect();
    let expect: Vec<Option<usize>> = engines
        .iter()
        .map(|&e| Some(blocks * e as usize / ENGINES as usize * BS))
        .collect();
    assert_eq!(index.match_tokens(&ids, None, &engines), expect);
    eprintln!(
        "kv_lookup: a {}-token chat prompt ({blocks} blocks, {} bytes of JSON); {} blocks in 8 views",
        ids.len(),
        body.len(),
        index.blocks()
    );

    let parsed = parse_body(&body, None, BS).expect("parses");
    let req = RequestInfo {
        path: CHAT.into(),
        model: parsed.model,
        prompt: parsed.prompt,
        body: body.clone().into(),
        admission: Default::default(),
        ..RequestInfo::default()
    };
    let cands: Vec<Candidate> = engines
        .iter()
        .map(|&e| Candidate {
            engine: Arc::new(Engine::new(
                e,
                &format!("http://10.0.0.{e}:8000"),
                vec!["m".into()],
            )),
            load: Default::default(),
            prefix_match_tokens: 0,
        })
        .collect();
    let approximate = PrefixIndex::new(1 << 20);

    let mut g = c.benchmark_group("kv_lookup_2k_chat");
    g.bench_function("tokenize", |b| {
        b.iter(|| black_box(tok.request_token_ids(CHAT, black_box(&body))))
    });
    g.bench_function("exact_lookup_8_engines", |b| {
        b.iter(|| black_box(index.match_tokens(black_box(&ids), None, &engines)))
    });
    g.bench_function("tokenize_and_lookup_8_engines", |b| {
        b.iter(|| {
            let kv = RequestKv::new(Sources {
                approximate: &approximate,
                block_size: BS,
                exact: Some((&index, &tok)),
                lora_name: None,
                max_prompt_tokens: switchyard::tokens::bound::DEFAULT_MAX_TOKENS,
            });
            black_box(kv.matches(black_box(&req), &cands))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
