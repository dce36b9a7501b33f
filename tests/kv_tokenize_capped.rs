//! A prompt longer than `--tokenize-max-tokens` is tokenized up to the cap and still goes
//! `exact` to the engine that holds its prefix: a real router (with `--tokenizer` and the
//! engines' KV events) in front of real simulated engines, the cap counted by
//! `switchyard_tokenize_capped_total`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use switchyard::engines::kv_events::KvEndpoints;
use switchyard::sim::SimConfig;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3")
}

fn chat(text: &str) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": text }],
        "max_tokens": 1,
    })
}

/// A counter without labels as `url`'s `/metrics` shows it.
async fn counter(c: &TestClient, url: &str, name: &str) -> f64 {
    let text = String::from_utf8(get(c, url, "/metrics").await.body.to_vec()).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_past_the_cap_is_tokenized_to_the_cap_and_matched_exactly() {
    let cfg = SimConfig {
        tokenizer: Some(fixture()),
        kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
        num_blocks: 20_000,
        ..instant_sim()
    };
    let sims = start_sims(2, cfg).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("kv.rhai"), "kv_lookup() ?? fallback()").expect("policy");
    let eps: Vec<Option<KvEndpoints>> = sims
        .iter()
        .map(|s| {
            Some(KvEndpoints {
                events: s.kv_events().expect("events").endpoint().to_owned(),
                replay: None,
            })
        })
        .collect();
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_owned();
        cfg.policy.default_policy = "kv".into();
        cfg.decision_headers = true;
        cfg.tokenizer = Some(fixture());
        cfg.kv_events.static_endpoints = eps;
        // 8 KiB of text at most (8 bytes per token).
        cfg.tokenize_max_tokens = 1024;
    })
    .await;
    let c = client();
    for (i, s) in sims.iter().enumerate() {
        let r = post_json(
            &c,
            &s.url(),
            "/v1/chat/completions",
            chat(&format!("warm {i}")),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let exact = std::sync::Arc::clone(&router.state.exact);
    let ids: Vec<u32> = router.state.registry.all().iter().map(|e| e.id).collect();
    eventually("the exact views are live", || {
        ids.iter().all(|&e| exact.is_live(e))
    })
    .await;

    // A 40 KB document the second engine has seen (sent to it directly).
    let words = [
        "prefix", "cache", "router", "東京", "42", "engine's", "block",
    ];
    let doc: Vec<&str> = (0..6000).map(|i| words[i * 7 % 5 + i % 3]).collect();
    let doc = doc.join(" ");
    let r = post_json(&c, &sims[1].url(), "/v1/chat/completions", chat(&doc)).await;
    assert_eq!(r.status, 200);
    // The same document with another question after it: its first 1024 tokens are held by
    // the second engine only (once its events about the document have arrived).
    let body = serde_json::to_vec(&chat(&format!("{doc} ?"))).expect("json");
    let tok = switchyard::tokens::Tokenizer::load(&fixture()).expect("tokenizer");
    let first = tok
        .prompt_token_ids("/v1/chat/completions", &body, 1024)
        .expect("tokenizes");
    assert!(!first.complete && first.ids.len() == 1024);
    let second = router
        .state
        .registry
        .all()
        .iter()
        .find(|e| *e.url == sims[1].url())
        .cloned()
        .expect("the second engine");
    eventually("the second engine's view holds the document", || {
        exact.match_tokens(&first.ids, None, &[second.id])[0] == Some(1024)
    })
    .await;
    let capped = counter(&c, &router.url(), "switchyard_tokenize_capped_total").await;
    let reply = post_json(
        &c,
        &router.url(),
        "/v1/chat/completions",
        chat(&format!("{doc} ?")),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-switchyard-kv"), Some("exact"));
    assert_eq!(reply.header("x-switchyard-engine"), Some(&*second.name));
    assert!(counter(&c, &router.url(), "switchyard_tokenize_capped_total").await > capped);

    router.shutdown(Duration::from_secs(1)).await;
    for s in sims {
        s.shutdown().await;
    }
}
