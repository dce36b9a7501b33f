//! End to end over loopback: real simulated engines behind the real router, routed by the
//! shipped policies; a policy edited while the router runs takes effect.

mod common;
mod policy_support;

use std::time::{Duration, Instant};

use common::*;
use policy_support::WriteAtomic;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_follows_the_prefix_cache() {
    let sims = start_sims(3, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| cfg.decision_headers = true).await;
    let c = client();
    let url = router.url();
    // ~600 tokens: well over one cache block, identical each time.
    let prompt = "Route me to wherever my prefix is cached, please. ".repeat(48);
    let first = post_json(&c, &url, "/v1/completions", completion(&prompt, 1, false)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(
        first.header("x-switchyard-policy"),
        Some("load_balanced_kvaware")
    );
    assert_eq!(first.header("x-switchyard-tier"), Some("fallback"));
    let engine = first.header("x-switchyard-engine").map(str::to_owned);
    for _ in 0..3 {
        let r = post_json(&c, &url, "/v1/completions", completion(&prompt, 1, false)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-switchyard-tier"), Some("kv_lookup"));
        assert_eq!(r.header("x-switchyard-engine").map(str::to_owned), engine);
    }
    // A different prompt has nothing cached: least loaded.
    let other = post_json(
        &c,
        &url,
        "/v1/completions",
        completion("short and new", 1, false),
    )
    .await;
    assert_eq!(other.header("x-switchyard-tier"), Some("fallback"));

    let status = get(&c, &url, "/admin/policies").await.json();
    assert_eq!(status["default_policy"], "load_balanced_kvaware");
    assert!(
        status["errors"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
    router.shutdown(Duration::from_secs(2)).await;
    for s in sims {
        s.shutdown().await;
    }
}

async fn tier_of(c: &TestClient, url: &str) -> String {
    let r = post_json(c, url, "/v1/completions", completion("hello", 1, false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.header("x-switchyard-tier").unwrap_or_default().to_owned()
}

/// Sends requests until one is decided by `tier` (bounded by the safety net).
async fn until_tier(c: &TestClient, url: &str, tier: &str) {
    let deadline = Instant::now() + SAFETY;
    while tier_of(c, url).await != tier {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for tier {tier}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_policy_while_routing() {
    let dir = policy_support::temp_dir();
    dir.write("live.toml", "[[tier]]\nbuiltin = \"round_robin\"\n");
    let sims = start_sims(2, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "live.toml".into();
        cfg.decision_headers = true;
    })
    .await;
    let c = client();
    let url = router.url();
    assert_eq!(tier_of(&c, &url).await, "round_robin");

    dir.write("live.rhai", "least_loaded()");
    dir.write("live.toml", "[[tier]]\nfile = \"live.rhai\"\n");
    until_tier(&c, &url, "least_loaded").await;

    // Broken: the last good version keeps routing, the status shows where the problem is.
    dir.write(
        "live.toml",
        "[[tier]]\nbuiltin = \"least_loaded\"\nextra = 1\n",
    );
    let deadline = Instant::now() + SAFETY;
    loop {
        let status = get(&c, &url, "/admin/policies").await.json();
        let err = status["policies"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["kind"] == "toml"))
            .and_then(|p| p["last_error"].as_str().map(str::to_owned));
        if err.is_some_and(|e| e.contains("live.toml:3:1:")) {
            break;
        }
        assert!(Instant::now() < deadline, "error never shown: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tier_of(&c, &url).await, "least_loaded");

    dir.write("live.toml", "[[tier]]\nbuiltin = \"random\"\n");
    until_tier(&c, &url, "random").await;
    router.shutdown(Duration::from_secs(2)).await;
    for s in sims {
        s.shutdown().await;
    }
}
