//! The simulated engine under KV-memory pressure, over HTTP: a request waits while its blocks
//! do not fit, a decode short of blocks preempts the newest request (counted in
//! `vllm:num_preemptions_total`), and the preempted request, recomputed, still streams exactly
//! its `max_tokens` tokens.

mod common;

use std::time::Duration;

use http_body_util::BodyExt;
use switchyard::sim::SimConfig;

use common::{client, completion, completion_req, get, instant_sim, post_json, start_sims};

/// The sum of the samples of `name` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The token events of an SSE body (not the final `[DONE]`).
fn token_events(text: &str) -> usize {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_short_of_blocks_preempts_the_newest_request_which_still_gets_every_token() {
    // 8 blocks of 16 tokens. Two 48-token prompts (3 blocks each) asking for 40 tokens grow
    // to 6 blocks each: both cannot finish together.
    let cfg = SimConfig {
        num_blocks: 8,
        itl_ms: 10.0,
        batch_slowdown: 0.0,
        time_scale: 1.0,
        ..instant_sim()
    };
    let sims = start_sims(1, cfg).await;
    let url = sims[0].url();
    let c = client();

    // A request that could never fit is refused, as vLLM refuses one beyond its context.
    let r = post_json(
        &c,
        &url,
        "/v1/completions",
        completion(&"z".repeat(4 * 100), 40, false),
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    let first = common::open(&c, completion_req(&url, &"a".repeat(4 * 48), 40, true)).await;
    let mut first = first.into_body();
    // Its first token: it is running.
    let head = tokio::time::timeout(common::SAFETY, first.frame())
        .await
        .expect("first token within the safety net")
        .expect("a frame")
        .expect("no error")
        .into_data()
        .unwrap_or_default();
    let mut first_text = String::from_utf8_lossy(&head).into_owned();
    let second = {
        let c = c.clone();
        let url = url.clone();
        tokio::spawn(async move {
            common::stream(&c, completion_req(&url, &"b".repeat(4 * 48), 40, true)).await
        })
    };
    // The second request is admitted, then preempted when the first needs its fifth block,
    // and waits (its blocks freed) until the first finishes.
    let (mut waited, mut full) = (false, false);
    let deadline = std::time::Instant::now() + common::SAFETY;
    loop {
        let m = String::from_utf8_lossy(&get(&c, &url, "/metrics").await.body).into_owned();
        full |= metric(&m, "vllm:kv_cache_usage_perc") >= 0.875;
        if metric(&m, "vllm:num_preemptions_total") >= 1.0 {
            waited |= metric(&m, "vllm:num_requests_waiting") >= 1.0;
        }
        if waited {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no preemption seen:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while let Some(f) = tokio::time::timeout(common::SAFETY, first.frame())
        .await
        .expect("within the safety net")
    {
        if let Ok(d) = f.expect("frame").into_data() {
            first_text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    let second = second.await.expect("second stream");
    assert_eq!(second.status, 200);
    assert_eq!(token_events(&first_text), 40);
    assert_eq!(
        token_events(&second.text()),
        40,
        "recomputed, no token twice"
    );
    assert!(
        full,
        "7 or 8 of the 8 blocks were in use before the preemption"
    );

    let m = String::from_utf8_lossy(&get(&c, &url, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "vllm:num_preemptions_total"), 1.0);
    assert!(m.contains("# TYPE vllm:num_preemptions_total counter"));
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(
        metric(&m, "vllm:kv_cache_usage_perc"),
        0.0,
        "cached blocks are free"
    );
    assert_eq!(metric(&m, "vllm:generation_tokens_total"), 80.0);
    assert_eq!(
        metric(&m, "vllm:request_success_total"),
        2.0,
        "two completed, none aborted"
    );
    for s in sims {
        s.shutdown().await;
    }
}
