//! Policy drills of issue 8 against the real router in front of simulated engines.

mod common;
mod policy_support;

use std::time::Duration;

use common::*;
use http::StatusCode;
use policy_support::TempDir;

async fn metrics_text(c: &TestClient, url: &str) -> String {
    String::from_utf8_lossy(&get(c, url, "/metrics").await.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_registers_no_metrics() {
    let dir = TempDir::new();
    // Scripts that run at validation: a .rhai policy, an inline tier, a file tier.
    dir.write(
        "walk.rhai",
        "let b = (); for e in engines { if b == () || e.queue < b.queue { b = e; } } b",
    );
    dir.write("lib.rhai", "fallback()");
    dir.write(
        "mixed.toml",
        "[[tier]]\nscript = \"engines[0]\"\n\n[[tier]]\nfile = \"lib.rhai\"\n",
    );
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "walk".into();
    })
    .await;
    let (c, url) = (client(), router.url());
    dir.write("walk.rhai", "engines[0]");
    assert!(router.state.policies.reload_now().is_ok());
    assert!(switchyard::policy::PolicyStore::check_dir(&shipped_policies()).is_empty());
    assert_eq!(
        send(&c, completion_req(&url, "hello", 1, false))
            .await
            .status,
        StatusCode::OK
    );
    let text = metrics_text(&c, &url).await;
    assert!(text.contains("switchyard_engine_healthy{"), "{text}");
    assert!(!text.contains("dry-run"), "{text}");
    router.shutdown(Duration::from_secs(2)).await;
}
