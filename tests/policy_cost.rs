//! `min_cost` through the real router in front of simulated engines: the load it weighs is
//! the prompt tokens of the router's own requests in flight, counted from the moment a request
//! is sent until its answer ends, and the prefix it weighs is the router's own index.

mod common;

use common::*;
use switchyard::sim::SimConfig;

/// `n` stand-in tokens (4 bytes each), numbered from `from`: distinct numbers, distinct tokens.
fn tokens(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("{i:04x}")).collect()
}

#[tokio::test]
async fn in_flight_prompt_tokens_weigh_against_cached_prefix() {
    // Real-time engines: a long answer stays in flight for the whole test.
    let sims = start_sims(2, SimConfig::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The prefill weight comes from a header so that one router (one in-flight count) runs
    // both weightings.
    std::fs::write(
        dir.path().join("cost.rhai"),
        r#"min_cost(if request.header("x-prefill-weight") == "8" { 8 } else { 1 }, 1)"#,
    )
    .expect("write policy");
    let router = start_router(&urls(&sims), |c| {
        c.policy.dir = dir.path().to_path_buf();
        c.policy.default_policy = "cost".into();
        c.decision_headers = true;
    })
    .await;
    let url = router.url();
    let c = client();

    // R1: a 2,000-token prompt whose 20,000-token answer keeps it in flight on engine A.
    let p1 = tokens(0, 2000);
    let r1 = open(&c, completion_req(&url, &p1, 20_000, true)).await;
    assert!(r1.status().is_success());
    let engine = |h: &http::HeaderMap| {
        h.get("x-switchyard-engine")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("engine header")
    };
    let a = engine(r1.headers());

    // R2: P1's first 1,600 tokens and 1,000 new ones. On A: 1,000 left to prefill + 2,000 in
    // flight = 3,000; on B: 2,600 + 0. B is cheaper although A holds most of the prompt.
    let r2 = format!("{}{}", &p1[..1600 * 4], tokens(0x8000, 1000));
    let reply = send(&c, completion_req(&url, &r2, 1, false)).await;
    assert!(reply.status.is_success());
    let b = reply
        .header("x-switchyard-engine")
        .expect("engine")
        .to_owned();
    assert_ne!(b, a, "the engine holding 2,000 in-flight tokens costs more");
    assert_eq!(reply.header("x-switchyard-tier"), Some("min_cost"));

    // R3: P1's first 1,900 tokens and 700 new ones (2,600). A matches 118 blocks (1,888
    // tokens), B the 100 blocks (1,600) it got from R2, which has ended (nothing in flight).
    // Weight 8: A 8 × 712 + 2,000 = 7,696, B 8 × 1,000 = 8,000 → A.
    let r3 = format!("{}{}", &p1[..1900 * 4], tokens(0xa000, 700));
    let mut req = completion_req(&url, &r3, 1, false);
    req.headers_mut()
        .insert("x-prefill-weight", http::HeaderValue::from_static("8"));
    let reply = send(&c, req).await;
    assert_eq!(reply.header("x-switchyard-engine"), Some(a.as_str()));
    // Weight 1, the same prompt, now all cached on A (162 blocks, 2,592 tokens): A 8 + 2,000
    // = 2,008, B 1,000 → B: the in-flight load outweighs the whole prefix.
    let reply = send(&c, completion_req(&url, &r3, 1, false)).await;
    assert_eq!(reply.header("x-switchyard-engine"), Some(b.as_str()));

    drop(r1);
    router.shutdown(std::time::Duration::from_secs(1)).await;
}
