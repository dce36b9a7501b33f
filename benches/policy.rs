//! Decision time of `load_balanced_kvaware` as `.rhai`, as `.toml` and as hand-written Rust, at
//! 8 and 64 engines with a 2 KB prompt.
//!
//! `rhai` is the shipped script, a bare `??` chain of built-ins, which runs as the equivalent
//! built-in pipeline; `rhai_interpreted` is the same chain written so that Rhai interprets it.
//!
//! The engine states make every tier run (queues balanced within the threshold, cache matches
//! below half the prompt), so `fallback` decides: the longest path through the pipeline.
//!
//! Run: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard::engines::{Candidate, Engine, EngineSnapshot};
use switchyard::policy::{Decision, PolicySettings, PolicyStore};
use switchyard::request::{PromptDigest, RequestInfo};

fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            engine: Arc::new(Engine::new(
                i as u32,
                &format!("http://10.0.0.{i}:8000"),
                vec!["m".into()],
            )),
            load: EngineSnapshot {
                running: 2.0,
                waiting: (i % 3) as f64,
                queue: 2.0 + (i % 3) as f64,
                in_flight: (i % 4) as u64,
                kv_usage: 0.3,
                stats_age_secs: Some(0.2),
                stale: false,
                in_flight_tokens: 0,
            },
            // Some cached prefix, below half of the 512-token prompt.
            prefix_match_tokens: (i % 5) * 32,
        })
        .collect()
}

fn request() -> RequestInfo {
    let prompt: String = "The quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(2048)
        .collect();
    let body = serde_json::json!({ "model": "m", "prompt": prompt }).to_string();
    RequestInfo {
        path: "/v1/completions".into(),
        model: "m".into(),
        prompt: PromptDigest::of_text(&prompt, 16),
        body: body.into(),
        admission: Default::default(),
        ..Default::default()
    }
}

/// The hand-written baseline: the same three tiers, in plain Rust.
struct Native {
    policy: Arc<str>,
    tiers: [Arc<str>; 3],
    rotation: AtomicUsize,
}

impl Native {
    fn least_by(&self, cands: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> usize {
        let key = |c: &Candidate| (c.load.queue, c.load.in_flight);
        let mut best: Option<usize> = None;
        let mut ties = 0;
        for (i, c) in cands.iter().enumerate().filter(|(_, c)| keep(c)) {
            match best {
                Some(b) if key(c) > key(&cands[b]) => {}
                Some(b) if key(c) == key(&cands[b]) => ties += 1,
                _ => {
                    best = Some(i);
                    ties = 1;
                }
            }
        }
        let b = best.unwrap_or(0);
        if ties > 1 {
            let k = self.rotation.fetch_add(1, Ordering::Relaxed) % ties;
            if let Some((i, _)) = cands
                .iter()
                .enumerate()
                .filter(|(_, c)| keep(c) && key(c) == key(&cands[b]))
                .nth(k)
            {
                return i;
            }
        }
        b
    }

    fn decide(&self, req: &RequestInfo, cands: &[Candidate]) -> Decision {
        let (min, max) = cands.iter().fold((f64::MAX, f64::MIN), |(lo, hi), c| {
            (lo.min(c.load.queue), hi.max(c.load.queue))
        });
        let (engine, tier) = if max - min >= 8.0 {
            (self.least_by(cands, |_| true), 0)
        } else {
            let best = cands
                .iter()
                .map(|c| c.prefix_match_tokens)
                .max()
                .unwrap_or(0);
            if best > 0 && best as f64 >= 0.5 * req.prompt_tokens() as f64 {
                (self.least_by(cands, |c| c.prefix_match_tokens == best), 1)
            } else {
                (self.least_by(cands, |_| true), 2)
            }
        };
        Decision {
            engine,
            policy: Arc::clone(&self.policy),
            tier: Arc::clone(&self.tiers[tier]),
            kv: None,
        }
    }
}

fn store(policy: &str) -> Arc<PolicyStore> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    PolicyStore::new(
        PolicySettings {
            dir,
            default_policy: policy.into(),
            per_model: BTreeMap::new(),
            ..PolicySettings::default()
        },
        16,
    )
    .expect("shipped policies load")
}

/// The same chain written so that the interpreter evaluates it (a bare chain of built-ins runs
/// natively).
fn interpreted_store() -> (tempfile::TempDir, Arc<PolicyStore>) {
    let dir = tempfile::Builder::new()
        .prefix("switchyard-bench-")
        .tempdir()
        .expect("temp dir");
    std::fs::write(
        dir.path().join("interpreted.rhai"),
        "let pick = load_balance(8) ?? kv_lookup() ?? fallback();\npick\n",
    )
    .expect("write policy");
    let s = PolicyStore::new(
        PolicySettings {
            dir: dir.path().to_path_buf(),
            default_policy: "interpreted".into(),
            per_model: BTreeMap::new(),
            ..PolicySettings::default()
        },
        16,
    )
    .expect("policy loads");
    (dir, s)
}

fn bench(c: &mut Criterion) {
    let req = request();
    let rhai = store("load_balanced_kvaware.rhai");
    let (tmp, interpreted) = interpreted_store();
    let toml = store("load_balanced_kvaware.toml");
    let native = Native {
        policy: Arc::from("load_balanced_kvaware"),
        tiers: [
            Arc::from("load_balance"),
            Arc::from("kv_lookup"),
            Arc::from("fallback"),
        ],
        rotation: AtomicUsize::new(0),
    };
    let mut g = c.benchmark_group("load_balanced_kvaware");
    for n in [8usize, 64] {
        let cands = candidates(n);
        assert_eq!(&*rhai.decide(&req, &cands).tier, "fallback");
        assert_eq!(&*toml.decide(&req, &cands).tier, "fallback");
        assert_eq!(&*native.decide(&req, &cands).tier, "fallback");
        assert_eq!(&*interpreted.decide(&req, &cands).tier, "fallback");
        g.bench_with_input(BenchmarkId::new("rhai", n), &cands, |b, cands| {
            b.iter(|| black_box(rhai.decide(black_box(&req), black_box(cands))))
        });
        g.bench_with_input(
            BenchmarkId::new("rhai_interpreted", n),
            &cands,
            |b, cands| b.iter(|| black_box(interpreted.decide(black_box(&req), black_box(cands)))),
        );
        g.bench_with_input(BenchmarkId::new("toml", n), &cands, |b, cands| {
            b.iter(|| black_box(toml.decide(black_box(&req), black_box(cands))))
        });
        g.bench_with_input(BenchmarkId::new("native", n), &cands, |b, cands| {
            b.iter(|| black_box(native.decide(black_box(&req), black_box(cands))))
        });
    }
    g.finish();
    drop(tmp);

    // A script that walks the engines: the shipped composed example.
    let lowest = store("lowest_kv_usage");
    let mut g = c.benchmark_group("lowest_kv_usage");
    for n in [8usize, 64] {
        let cands = candidates(n);
        g.bench_with_input(
            BenchmarkId::new("rhai_interpreted", n),
            &cands,
            |b, cands| b.iter(|| black_box(lowest.decide(black_box(&req), black_box(cands)))),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
