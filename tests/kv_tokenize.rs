//! A request is tokenized only when a tier needs prefix matches, once, and a tokenization
//! error never fails it: real routers (with `--tokenizer` and the engines' KV events) in front
//! of real simulated engines, counted by `switchyard_tokenize_total{result}` from `/metrics`.
//!
//! One test function: the counters are process-wide, so nothing else in this binary may
//! tokenize at the same time.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use switchyard::engines::kv_events::KvEndpoints;
use switchyard::proxy::RunningRouter;
use switchyard::sim::{SimConfig, SimHandle};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3")
}

fn engine_config() -> SimConfig {
    SimConfig {
        tokenizer: Some(fixture()),
        kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
        kv_events_replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        ..instant_sim()
    }
}

/// A router with `tokenizer`, following the engines' KV events, running `policy` (a Rhai
/// chain, written as `name.rhai` in `dir`) with decision headers.
async fn router(
    sims: &[SimHandle],
    dir: &Path,
    (name, policy): (&str, &str),
    tokenizer: PathBuf,
) -> RunningRouter {
    std::fs::write(dir.join(format!("{name}.rhai")), policy).expect("policy");
    let eps: Vec<Option<KvEndpoints>> = sims
        .iter()
        .map(|s| {
            let p = s.kv_events().expect("events");
            Some(KvEndpoints {
                events: p.endpoint().to_owned(),
                replay: p.replay_endpoint().map(str::to_owned),
            })
        })
        .collect();
    start_router(&urls(sims), |cfg| {
        cfg.policy.dir = dir.to_owned();
        cfg.policy.default_policy = name.to_owned();
        cfg.decision_headers = true;
        cfg.tokenizer = Some(tokenizer);
        cfg.kv_events.static_endpoints = eps;
    })
    .await
}

fn chat(text: &str) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": text }],
        "max_tokens": 1,
    })
}

/// `switchyard_tokenize_total{result}` as `router` exports it.
async fn tokenized(c: &TestClient, r: &RunningRouter, result: &str) -> f64 {
    let text = String::from_utf8(get(c, &r.url(), "/metrics").await.body.to_vec()).expect("utf-8");
    let needle = format!("switchyard_tokenize_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The decision headers' tier and kv source of a 200 answer.
async fn send_chat(c: &TestClient, r: &RunningRouter, text: &str) -> (String, Option<String>) {
    let reply = post_json(c, &r.url(), "/v1/chat/completions", chat(text)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    (
        reply.header("x-switchyard-tier").expect("tier").to_owned(),
        reply.header("x-switchyard-kv").map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenized_only_when_a_tier_needs_matches_and_errors_fall_back_to_approximate() {
    let sims = start_sims(2, engine_config()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // load_balance(0) always decides (any spread is at least 0): kv_lookup never runs.
    let balanced = router(
        &sims,
        dir.path(),
        ("balanced", "load_balance(0) ?? kv_lookup() ?? fallback()"),
        fixture(),
    )
    .await;
    let kv = router(
        &sims,
        dir.path(),
        ("kv", "kv_lookup() ?? fallback()"),
        fixture(),
    )
    .await;
    // The same tokenizer without its chat template: every chat request fails to tokenize.
    let no_template = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        fixture().join("tokenizer.json"),
        no_template.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer.json");
    let broken = router(
        &sims,
        dir.path(),
        ("kv", "kv_lookup() ?? fallback()"),
        no_template.path().to_owned(),
    )
    .await;
    let c = client();
    // Every router's views become live with the engines' first events.
    for (i, s) in sims.iter().enumerate() {
        let r = post_json(
            &c,
            &s.url(),
            "/v1/chat/completions",
            chat(&format!("warm up {i}")),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    for r in [&balanced, &kv, &broken] {
        let exact = std::sync::Arc::clone(&r.state.exact);
        let ids: Vec<u32> = r.state.registry.all().iter().map(|e| e.id).collect();
        eventually("the exact views are live", || {
            ids.iter().all(|&e| exact.is_live(e))
        })
        .await;
    }

    let before = tokenized(&c, &balanced, "ok").await;
    for i in 0..5 {
        let (tier, source) = send_chat(&c, &balanced, &format!("balanced request {i}")).await;
        assert_eq!((tier.as_str(), source), ("load_balance", None));
    }
    assert_eq!(
        tokenized(&c, &balanced, "ok").await,
        before,
        "no tier needed matches: nothing tokenized"
    );

    for i in 0..5 {
        let (_, source) = send_chat(&c, &kv, &format!("kv request {i}")).await;
        assert_eq!(source.as_deref(), Some("exact"));
    }
    assert_eq!(
        tokenized(&c, &kv, "ok").await,
        before + 5.0,
        "kv_lookup ran: each request tokenized once"
    );

    let errors = tokenized(&c, &broken, "error").await;
    for i in 0..3 {
        let (_, source) = send_chat(&c, &broken, &format!("untokenizable {i}")).await;
        assert_eq!(source.as_deref(), Some("approximate"));
    }
    assert_eq!(tokenized(&c, &broken, "error").await, errors + 3.0);
    assert_eq!(tokenized(&c, &kv, "ok").await, before + 5.0);

    // The decision counter carries the source.
    let text =
        String::from_utf8(get(&c, &kv.url(), "/metrics").await.body.to_vec()).expect("utf-8");
    let exact_decisions = text.lines().any(|l| {
        l.starts_with("switchyard_routing_decisions_total{")
            && l.contains("kv=\"exact\"")
            && l.contains("policy=\"kv\"")
            && !l.ends_with(" 0")
    });
    assert!(exact_decisions, "{text}");

    for r in [balanced, kv, broken] {
        r.shutdown(Duration::from_secs(1)).await;
    }
    for s in sims {
        s.shutdown().await;
    }
}
