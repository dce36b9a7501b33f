//! A router started next to warm engines: the real `switchyard` binary in front of simulated
//! engines that publish vLLM-format KV events over ZMQ without a replay socket (vLLM's
//! default), and stored blocks before the router started. Its views join mid-stream: they
//! are partial, used at once for what the engines store after the join (`x-switchyard-kv:
//! partial`), and complete once an engine has stored its whole cache capacity (its
//! `vllm:cache_config_info{num_gpu_blocks}`, scraped from `/metrics`) since the join. A chat,
//! stored under the template's opening block cached before the join, is learned when the
//! router sent it: its view anchors it on the request's token ids.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use switchyard::sim::cache_events::CacheEvents;
use switchyard::sim::{SimConfig, SimHandle};

/// The engines' prefix cache: 64 blocks of 16 tokens (their `num_gpu_blocks`).
const NUM_BLOCKS: usize = 64;

/// The endpoint of a request body: chat completions if it has messages, else completions.
fn path_of(body: &serde_json::Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3")
}

/// An engine that answers at once, caches by the test tokenizer's token ids, and publishes
/// its KV events with no replay socket.
fn engine_config() -> SimConfig {
    SimConfig {
        num_blocks: NUM_BLOCKS,
        tokenizer: Some(tokenizer_dir()),
        kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
        kv_events_replay_endpoint: None,
        ..instant_sim()
    }
}

/// A completion request whose prompt is `words` words unique to `tag` from its first token.
/// (Not a chat: every chat prompt begins with the template's first block, which the engine
/// cached before the router joined, so each chat's blocks are stored under a parent the view
/// does not know: see [`a_chat_hanging_off_a_block_cached_before_the_join_is_learned_when_the_router_sent_it`].)
fn prompt(tag: &str, words: usize) -> serde_json::Value {
    let text: Vec<String> = (0..words)
        .map(|i| format!("{tag}{}", i * 7919 % 1000))
        .collect();
    completion(&text.join(" "), 1, false)
}

/// Sends directly to an engine (no router sees it), expecting 200.
async fn to_engine(c: &TestClient, s: &SimHandle, body: &serde_json::Value) {
    let r = post_json(c, &s.url(), path_of(body), body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Sends through the router, expecting 200: (engine, tier, kv source) of its decision headers.
async fn routed(c: &TestClient, url: &str, body: &serde_json::Value) -> (String, String, String) {
    let reply = post_json(c, url, path_of(body), body.clone()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let h = |name: &str| reply.header(name).unwrap_or("(none)").to_owned();
    (
        h("x-switchyard-engine"),
        h("x-switchyard-tier"),
        h("x-switchyard-kv"),
    )
}

/// The router's `/metrics` sample `name{engine="ENGINE",...}` (the first whose labels include
/// every one of `labels`).
async fn sample(c: &TestClient, url: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let page = get(c, url, "/metrics").await;
    String::from_utf8_lossy(&page.body)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls until the router has applied more `BlockStored` events than `before` (safety net:
/// [`SAFETY`]).
async fn until_stored_past<F, Fut>(stored_events: &F, before: f64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<f64>>,
{
    let deadline = tokio::time::Instant::now() + SAFETY;
    while stored_events().await.unwrap_or(0.0) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the engine's BlockStored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real router binary in front of `sims` (their KV events, no replay socket) running
/// `kv_lookup() ?? fallback()` with decision headers, once it follows every engine's stream.
/// The policies directory lives as long as the router.
async fn router_after(sims: &[SimHandle]) -> (RouterProcess, tempfile::TempDir) {
    let policies = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        policies.path().join("kv.rhai"),
        "kv_lookup() ?? fallback()\n",
    )
    .expect("policy");
    let events: Vec<String> = sims
        .iter()
        .map(|s| {
            s.kv_events()
                .expect("the engine publishes KV events")
                .endpoint()
                .to_owned()
        })
        .collect();
    let router = RouterProcess::spawn(&[
        "--static-backends",
        &urls(sims).join(","),
        "--static-models",
        MODEL,
        "--static-kv-events",
        &events.join(","),
        "--tokenizer",
        tokenizer_dir().to_str().expect("path"),
        "--policies-dir",
        policies.path().to_str().expect("path"),
        "--routing-logic",
        "kv",
        "--decision-headers",
        "--engine-stats-interval",
        "0.1",
    ]);
    // The subscription reaches an engine some time after the router starts: harmless batches
    // (a removal of a block nobody holds) until the router follows its stream.
    let c = client();
    let deadline = tokio::time::Instant::now() + SAFETY;
    for s in sims {
        let engine = format!("engine=\"{}\"", s.addr());
        let publisher = s.kv_events().expect("publisher");
        while sample(&c, &router.url, "switchyard_kv_events_live", &[&engine]).await != Some(1.0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the view never became live"
            );
            publisher.removed(&[u64::MAX]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (router, policies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_after_its_engines_goes_exact_on_what_they_store_next() {
    let sims = start_sims(2, engine_config()).await;
    let c = client();
    // The engine stores P before any router runs (its batches from sequence 0 go unheard).
    let p = prompt("before", 50);
    to_engine(&c, &sims[0], &p).await;

    let (router, _policies) = router_after(&sims).await;
    let url = router.url.clone();
    let engine = format!("engine=\"{}\"", sims[0].addr());
    let labels = [engine.as_str()];
    assert_eq!(
        sample(&c, &url, "switchyard_kv_events_complete", &labels).await,
        Some(0.0),
        "joined mid-stream: partial"
    );

    // The engine stores Q after the join, past the router: its view knows Q for certain.
    let stored = [engine.as_str(), "type=\"BlockStored\""];
    let stored_events = || sample(&c, &url, "switchyard_kv_events_events_total", &stored);
    let before = stored_events().await.unwrap_or(0.0);
    let q = prompt("after", 50);
    to_engine(&c, &sims[0], &q).await;
    until_stored_past(&stored_events, before).await;
    let (chosen, tier, kv) = routed(&c, &url, &q).await;
    let holder = sims[0].addr().to_string();
    assert_eq!(
        (chosen.as_str(), tier.as_str(), kv.as_str()),
        (holder.as_str(), "kv_lookup", "partial"),
        "Q goes to the engine that holds it on the first request"
    );
    // P was stored before the join, from its root: no view knows it, nor the router's own
    // index, so kv_lookup passes.
    let (_, tier, _) = routed(&c, &url, &p).await;
    assert_eq!(tier, "fallback");

    // The engine stores its whole capacity (64 blocks) after the join: the view is complete.
    let mut fillers = 0;
    while sample(&c, &url, "switchyard_kv_events_complete", &labels).await != Some(1.0) {
        assert!(fillers < 20, "still partial after {fillers} prompts stored");
        let before = stored_events().await.unwrap_or(0.0);
        to_engine(&c, &sims[0], &prompt(&format!("filler{fillers}x"), 50)).await;
        until_stored_past(&stored_events, before).await;
        fillers += 1;
    }
    assert!(fillers >= 2, "64 blocks take more than one 50-word prompt");
    // What the engine stores now goes exact.
    let before = stored_events().await.unwrap_or(0.0);
    let r = prompt("complete", 50);
    to_engine(&c, &sims[0], &r).await;
    until_stored_past(&stored_events, before).await;
    let (chosen, tier, kv) = routed(&c, &url, &r).await;
    assert_eq!(
        (chosen.as_str(), tier.as_str(), kv.as_str()),
        (holder.as_str(), "kv_lookup", "exact")
    );
    drop(router);
    for s in sims {
        s.shutdown().await;
    }
}

/// The text of `words` words unique to `tag`.
fn words(tag: &str, words: usize) -> String {
    let text: Vec<String> = (0..words)
        .map(|i| format!("{tag}{}", i * 7919 % 1000))
        .collect();
    text.join(" ")
}

/// A chat request whose prompt is `words` words unique to `tag`, after the template's
/// opening (the same first block for every chat).
fn chat(tag: &str, n: usize) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": words(tag, n) }],
        "max_tokens": 1,
    })
}

/// The next turn of `chat`: its messages, the assistant's `answer`, and a new `question`.
fn next_turn(chat: &serde_json::Value, answer: &str, question: &str) -> serde_json::Value {
    let mut next = chat.clone();
    if let Some(messages) = next["messages"].as_array_mut() {
        messages.push(serde_json::json!({ "role": "assistant", "content": answer }));
        messages.push(serde_json::json!({ "role": "user", "content": question }));
    }
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_hanging_off_a_block_cached_before_the_join_is_learned_when_the_router_sent_it() {
    let sims = start_sims(2, engine_config()).await;
    let c = client();
    // A chat on each engine before the router runs: each caches the template's first block.
    for s in &sims {
        to_engine(&c, s, &chat("before", 50)).await;
    }
    let (router, _policies) = router_after(&sims).await;
    let url = router.url.clone();
    let label = |s: &SimHandle| format!("engine=\"{}\"", s.addr());
    let engine = label(&sims[0]);
    let stored = [engine.as_str(), "type=\"BlockStored\""];
    let stored_events = || sample(&c, &url, "switchyard_kv_events_events_total", &stored);
    // Chats after the join sent past the router, more blocks than the engine's capacity:
    // each hangs off the template's first block, which stays cached (every chat hits it) and
    // unknown, and the router has no request of its own to find them in.
    for i in 0..8 {
        let before = stored_events().await.unwrap_or(0.0);
        to_engine(&c, &sims[0], &chat(&format!("after{i}x"), 50)).await;
        until_stored_past(&stored_events, before).await;
    }
    let labels = [engine.as_str()];
    let engine_sample = |name: &'static str| sample(&c, &url, name, &labels);
    assert!(
        engine_sample("switchyard_kv_events_unkeyed_blocks")
            .await
            .is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        engine_sample("switchyard_kv_events_anchored_blocks_total").await,
        Some(0.0)
    );
    assert_eq!(
        engine_sample("switchyard_kv_events_complete").await,
        Some(0.0),
        "the view knows it misses a block the engine holds: still partial"
    );
    // The last chat is not known to the view (nor to the router's own index): kv_lookup
    // passes, and the partial view is weighed against the approximate index.
    let (_, tier, kv) = routed(&c, &url, &chat("after7x", 50)).await;
    assert_eq!(tier, "fallback");
    assert!(kv == "partial" || kv == "approximate", "{kv}");

    // A new chat sent through the router: it goes to one engine (both hold the template's
    // opening, stored before the join), which stores it under that unknown block. The router
    // noted the chat's token ids on that engine: its view finds the run in them, keys the
    // opening block from them and stores the run.
    let first = chat("through", 50);
    let (holder, tier, _) = routed(&c, &url, &first).await;
    assert_eq!(tier, "fallback", "nothing knows this chat yet");
    let sim = sims
        .iter()
        .find(|s| s.addr().to_string() == holder)
        .expect("one of the engines");
    let holder_label = label(sim);
    let anchored = [holder_label.as_str()];
    let deadline = tokio::time::Instant::now() + SAFETY;
    while sample(
        &c,
        &url,
        "switchyard_kv_events_anchored_blocks_total",
        &anchored,
    )
    .await
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chat's blocks were never anchored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next turn of that chat (its history is the first turn's prompt) goes kv_lookup to
    // that engine, on its partial view. (The router's own index knows the first turn too; the
    // view's figure is larger: 352 real tokens, every full block of the first turn's 356,
    // against 8 stand-in blocks scaled to 315.)
    let second = next_turn(
        &first,
        "It is.",
        "and then what follows from that for the rest of the question we asked before",
    );
    let (chosen, tier, kv) = routed(&c, &url, &second).await;
    assert_eq!(
        (chosen.as_str(), tier.as_str(), kv.as_str()),
        (holder.as_str(), "kv_lookup", "partial")
    );
    drop(router);
    for s in sims {
        s.shutdown().await;
    }
}
