//! Exact `kv_lookup` against the router's approximate index, end to end: real routers in front
//! of real simulated engines over HTTP, the engines caching by the token ids of a real
//! (test) tokenizer's chat template and publishing vLLM-format KV events over ZMQ, the routers
//! following them. Where the approximate index and the engines disagree, exact `kv_lookup`
//! picks the engine that really holds the blocks, as the decision headers show:
//!
//! - (a) the engine the router sent a prompt to evicted it (a small cache), and the prompt is
//!   cached on another engine the router never sent it to;
//! - (b) another router replica served the prompt: this router's approximate index has never
//!   seen it.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use switchyard::engines::kv_events::KvEndpoints;
use switchyard::proxy::RunningRouter;
use switchyard::sim::{SimConfig, SimHandle};

/// The engines' prefix cache: 64 blocks of 16 tokens.
const NUM_BLOCKS: usize = 64;

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3")
}

/// An engine that answers at once, caches by the test tokenizer's token ids in a small cache,
/// and publishes its KV events (with a replay socket: a subscriber that joins after the first
/// batch recovers it).
fn engine_config() -> SimConfig {
    SimConfig {
        num_blocks: NUM_BLOCKS,
        tokenizer: Some(tokenizer_dir()),
        kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
        kv_events_replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        ..instant_sim()
    }
}

fn endpoints(s: &SimHandle) -> KvEndpoints {
    let p = s.kv_events().expect("the engine publishes KV events");
    KvEndpoints {
        events: p.endpoint().to_owned(),
        replay: p.replay_endpoint().map(str::to_owned),
    }
}

/// A router running `kv_lookup() ?? fallback()` with decision headers; with the tokenizer and
/// the engines' KV events if `exact`.
async fn router(sims: &[SimHandle], policies: &TempDir, exact: bool) -> RunningRouter {
    let eps: Vec<Option<KvEndpoints>> = sims.iter().map(|s| Some(endpoints(s))).collect();
    start_router(&urls(sims), |cfg| {
        cfg.policy.dir = policies.path().to_owned();
        cfg.policy.default_policy = "kv".into();
        cfg.decision_headers = true;
        if exact {
            cfg.tokenizer = Some(tokenizer_dir());
            cfg.kv_events.static_endpoints = eps;
        }
    })
    .await
}

use tempfile::TempDir;

fn policies() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("kv.rhai"), "kv_lookup() ?? fallback()\n").expect("policy");
    dir
}

const CHAT: &str = "/v1/chat/completions";

/// The engine id and name the router gives the engine at `url`.
fn engine_of(r: &RunningRouter, s: &SimHandle) -> (u32, String) {
    let url = s.url();
    let all = r.state.registry.all();
    let e = all
        .iter()
        .find(|e| *e.url == *url)
        .expect("a registered engine");
    (e.id, e.name.to_string())
}

/// The request's token ids, as the router's tokenizer computes them.
fn token_ids(r: &RunningRouter, body: &serde_json::Value) -> Vec<u32> {
    let t = r.state.tokenizer.as_ref().expect("a tokenizer");
    t.request_token_ids(CHAT, body.to_string().as_bytes())
        .expect("tokenizes")
}

/// What the router's approximate index says each engine holds of the request (blocks).
fn approximate_blocks(r: &RunningRouter, body: &serde_json::Value, engines: &[u32]) -> Vec<usize> {
    let bytes = body.to_string();
    let parsed = switchyard::request::parse_body(bytes.as_bytes(), None, r.state.cfg.block_size)
        .expect("parses");
    r.state
        .prefix
        .match_blocks(&parsed.prompt.block_hashes, engines)
}

/// Sends directly to an engine (bypassing every router), expecting 200.
async fn to_engine(c: &TestClient, s: &SimHandle, body: &serde_json::Value) {
    let r = post_json(c, &s.url(), CHAT, body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Sends through a router, expecting 200; the decision headers.
async fn routed(
    c: &TestClient,
    r: &RunningRouter,
    body: &serde_json::Value,
) -> (String, String, Option<String>) {
    let reply = post_json(c, &r.url(), CHAT, body.clone()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    (
        reply
            .header("x-switchyard-engine")
            .expect("engine header")
            .to_owned(),
        reply
            .header("x-switchyard-tier")
            .expect("tier header")
            .to_owned(),
        reply.header("x-switchyard-kv").map(str::to_owned),
    )
}

/// Waits until the router's exact view of every engine is live (a first batch of events
/// from each).
async fn until_live(c: &TestClient, r: &RunningRouter, sims: &[SimHandle]) {
    for (i, s) in sims.iter().enumerate() {
        to_engine(c, s, &common::unique_chat(&format!("warmup{i}x"), 40)).await;
    }
    let ids: Vec<u32> = sims.iter().map(|s| engine_of(r, s).0).collect();
    let exact = Arc::clone(&r.state.exact);
    eventually("every engine's exact view is live", || {
        ids.iter().all(|&e| exact.is_live(e))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_kv_lookup_follows_evictions_the_router_never_saw() {
    let sims = start_sims(2, engine_config()).await;
    let dir = policies();
    let r = router(&sims, &dir, true).await;
    let c = client();
    until_live(&c, &r, &sims).await;
    let prompt = common::unique_chat("alpha", 50);
    let ids = token_ids(&r, &prompt);
    let blocks = ids.len() / 16;
    assert!(
        (12..NUM_BLOCKS / 2).contains(&blocks),
        "the prompt fills {blocks} of the engines' {NUM_BLOCKS} blocks"
    );

    // The router sends the prompt to some engine: its approximate index now says it is there.
    let (first, _, _) = routed(&c, &r, &prompt).await;
    let (held, other) = if engine_of(&r, &sims[0]).1 == first {
        (&sims[0], &sims[1])
    } else {
        (&sims[1], &sims[0])
    };
    let (held_id, _) = engine_of(&r, held);
    let (other_id, other_name) = engine_of(&r, other);
    // That engine evicts it (other prompts, sent past the router, fill its small cache) and
    // the other engine caches it (sent to it past the router).
    for i in 0..5 {
        to_engine(&c, held, &common::unique_chat(&format!("filler{i}x"), 50)).await;
    }
    to_engine(&c, other, &prompt).await;

    // The approximate index still believes the first engine holds it all, the other nothing;
    // the engines' own events say the opposite.
    let approx = approximate_blocks(&r, &prompt, &[held_id, other_id]);
    assert!(approx[0] > 0 && approx[1] == 0, "approximate: {approx:?}");
    let exact = Arc::clone(&r.state.exact);
    let full = blocks * 16;
    eventually(
        "the exact views show the eviction and the other engine's copy",
        || {
            let m = exact.match_tokens(&ids, None, &[held_id, other_id]);
            m[1] == Some(full) && m[0].is_some_and(|t| t < full / 2)
        },
    )
    .await;

    // Exact kv_lookup goes where the blocks really are.
    let (engine, tier, kv) = routed(&c, &r, &prompt).await;
    assert_eq!(
        (engine.as_str(), tier.as_str(), kv.as_deref()),
        (other_name.as_str(), "kv_lookup", Some("exact"))
    );
    r.shutdown(std::time::Duration::from_secs(1)).await;
    for s in sims {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_kv_lookup_sees_what_another_replica_served() {
    let sims = start_sims(2, engine_config()).await;
    let dir = policies();
    let r = router(&sims, &dir, true).await;
    let replica = router(&sims, &dir, true).await;
    let approximate_only = router(&sims, &dir, false).await;
    let c = client();
    until_live(&c, &r, &sims).await;
    let ids_of = |s: &SimHandle| engine_of(&r, s).0;
    let all = [ids_of(&sims[0]), ids_of(&sims[1])];
    for (i, tag) in ["beta", "gamma", "delta"].iter().enumerate() {
        let prompt = common::unique_chat(tag, 120 + 10 * i);
        // Another replica serves the prompt: this router never saw it.
        let (served, _, _) = routed(&c, &replica, &prompt).await;
        assert_eq!(approximate_blocks(&r, &prompt, &all), vec![0, 0]);
        let ids = token_ids(&r, &prompt);
        let full = ids.len() / 16 * 16;
        let served_id = if engine_of(&r, &sims[0]).1 == served {
            all[0]
        } else {
            all[1]
        };
        let exact = Arc::clone(&r.state.exact);
        eventually("this router's exact view has the replica's prompt", || {
            exact.match_tokens(&ids, None, &[served_id]) == vec![Some(full)]
        })
        .await;
        let (engine, tier, kv) = routed(&c, &r, &prompt).await;
        assert_eq!(
            (engine.as_str(), tier.as_str(), kv.as_deref()),
            (served.as_str(), "kv_lookup", Some("exact")),
            "prompt {tag}"
        );
        // A router without the engines' events knows nothing of it: kv_lookup passes.
        let (_, tier, kv) = routed(
            &c,
            &approximate_only,
            &common::unique_chat(tag, 120 + 10 * i),
        )
        .await;
        assert_eq!(
            (tier.as_str(), kv.as_deref()),
            ("fallback", Some("approximate"))
        );
    }
    for router in [r, replica, approximate_only] {
        router.shutdown(std::time::Duration::from_secs(1)).await;
    }
    for s in sims {
        s.shutdown().await;
    }
}
