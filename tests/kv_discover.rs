//! `--kv-events-discover` end to end: the real router binary in front of real simulated
//! engines that publish vLLM-format KV events and serve vLLM 0.32's `GET /kv_event_sources`.
//! No KV-event endpoint is given to the router: it asks each engine, follows what it lists
//! (each data-parallel rank, its topic), and exact `kv_lookup` then sends a prompt to the
//! engine that holds it. An engine that answers 404 (vLLM before 0.32) is followed at its
//! `--static-kv-events` entry instead; one that is not up yet is asked again until it is.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use switchyard::sim::{self, SimConfig, SimHandle};

const CHAT: &str = "/v1/chat/completions";

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/llama3")
}

/// An engine that answers at once, caches by the test tokenizer's token ids and publishes
/// its KV events (topic `kv`, with a replay socket), on ports of its own.
fn engine_config() -> SimConfig {
    SimConfig {
        tokenizer: Some(tokenizer_dir()),
        kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
        kv_events_replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        kv_events_topic: "kv".into(),
        ..instant_sim()
    }
}

/// The router binary with `kv_lookup() ?? fallback()`, decision headers, the tokenizer and
/// discovery, in front of `urls`; `extra` flags after.
fn router(urls: &[String], policies: &tempfile::TempDir, extra: &[&str]) -> RouterProcess {
    let backends = urls.join(",");
    let tok = tokenizer_dir();
    let mut args = vec![
        "--static-backends",
        backends.as_str(),
        "--static-models",
        MODEL,
        "--policies-dir",
        policies.path().to_str().expect("utf-8 path"),
        "--routing-logic",
        "kv",
        "--decision-headers",
        "--tokenizer",
        tok.to_str().expect("utf-8 path"),
        "--kv-events-discover",
    ];
    args.extend_from_slice(extra);
    RouterProcess::spawn(&args)
}

fn policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("kv.rhai"), "kv_lookup() ?? fallback()\n").expect("policy");
    dir
}

/// The value of the `/metrics` sample `name{…label…}`.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// Polls the router's `/metrics` until `cond` holds (safety net: 20 s).
async fn until_metrics(c: &TestClient, r: &RouterProcess, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + SAFETY;
    loop {
        let m = String::from_utf8_lossy(&get(c, &r.url, "/metrics").await.body).into_owned();
        if cond(&m) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `engine="NAME"`, as the metrics label the stream of an engine (rank).
fn engine_label(name: &str) -> String {
    format!("engine=\"{name}\"")
}

fn name_of(s: &SimHandle) -> String {
    s.addr().to_string()
}

/// Waits until the router follows `stream` live and has applied `stored` `BlockStored`
/// events from it.
async fn until_stored(c: &TestClient, r: &RouterProcess, stream: &str, stored: f64) {
    let label = engine_label(stream);
    until_metrics(c, r, &format!("{stream} live with {stored} stores"), |m| {
        sample(m, "switchyard_kv_events_live", &label) == Some(1.0)
            && sample(
                m,
                "switchyard_kv_events_events_total",
                &format!("{label},type=\"BlockStored\""),
            )
            .or_else(|| {
                sample(
                    m,
                    "switchyard_kv_events_events_total",
                    &format!("type=\"BlockStored\",{label}"),
                )
            })
            .is_some_and(|n| n >= stored)
    })
    .await;
}

/// Sends directly to an engine (past the router), expecting 200.
async fn to_engine(c: &TestClient, url: &str, body: &serde_json::Value) {
    let r = post_json(c, url, CHAT, body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Sends through the router: (engine, tier, kv source).
async fn routed(
    c: &TestClient,
    r: &RouterProcess,
    body: &serde_json::Value,
) -> (String, String, String) {
    let reply = post_json(c, &r.url, CHAT, body.clone()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let h = |n: &str| reply.header(n).unwrap_or_default().to_owned();
    (
        h("x-switchyard-engine"),
        h("x-switchyard-tier"),
        h("x-switchyard-kv"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_engines_route_exact_to_the_engine_holding_the_prefix() {
    let sims = start_sims(2, engine_config()).await;
    let dir = policies();
    let r = router(&urls(&sims), &dir, &[]);
    let c = client();
    // Each engine holds one prompt, sent past the router: only the engines' events say where.
    for (i, s) in sims.iter().enumerate() {
        let prompt = common::unique_chat(&format!("discovered{i}x"), 60);
        to_engine(&c, &s.url(), &prompt).await;
        until_stored(&c, &r, &name_of(s), 1.0).await;
    }
    for (i, s) in sims.iter().enumerate() {
        let prompt = common::unique_chat(&format!("discovered{i}x"), 60);
        assert_eq!(
            routed(&c, &r, &prompt).await,
            (name_of(s), "kv_lookup".into(), "exact".into()),
            "prompt {i}"
        );
    }
    drop(r);
    for s in sims {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_without_kv_event_sources_falls_back_to_its_static_endpoint() {
    let new = sim::start(engine_config(), loopback()).await.expect("sim");
    let old = sim::start(
        SimConfig {
            serve_kv_event_sources: false,
            kv_events_topic: String::new(),
            ..engine_config()
        },
        loopback(),
    )
    .await
    .expect("sim");
    let c = client();
    let r404 = get(&c, &old.url(), "/kv_event_sources").await;
    assert_eq!(r404.status, 404);
    let old_events = old.kv_events().expect("publishes").endpoint().to_owned();
    // The static entry of the engine that serves /kv_event_sources is a wrong port: its own
    // answer wins over it.
    let statics = format!("tcp://127.0.0.1:9,{old_events}");
    let dir = policies();
    let r = router(
        &[new.url(), old.url()],
        &dir,
        &["--static-kv-events", &statics],
    );
    for (i, s) in [&new, &old].into_iter().enumerate() {
        let prompt = common::unique_chat(&format!("fallback{i}x"), 60);
        to_engine(&c, &s.url(), &prompt).await;
        until_stored(&c, &r, &name_of(s), 1.0).await;
    }
    for (i, s) in [&new, &old].into_iter().enumerate() {
        let prompt = common::unique_chat(&format!("fallback{i}x"), 60);
        assert_eq!(
            routed(&c, &r, &prompt).await,
            (name_of(s), "kv_lookup".into(), "exact".into()),
            "prompt {i}"
        );
    }
    drop(r);
    new.shutdown().await;
    old.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_data_parallel_rank_is_followed_and_an_engine_not_up_yet_is_asked_again() {
    // A free port for an engine that starts after the router.
    let late_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let single = sim::start(engine_config(), loopback()).await.expect("sim");
    let dir = policies();
    let late_url = format!("http://{late_addr}");
    let r = router(&[single.url(), late_url.clone()], &dir, &[]);
    let c = client();
    // The router is up and routes; the late engine is not there yet.
    until_metrics(&c, &r, "the single engine followed", |m| {
        sample(
            m,
            "switchyard_kv_events_live",
            &engine_label(&name_of(&single)),
        ) == Some(1.0)
    })
    .await;
    let ranked = sim::start(
        SimConfig {
            data_parallel_size: 2,
            ..engine_config()
        },
        late_addr,
    )
    .await
    .expect("the late engine starts on its port");
    let sources: serde_json::Value =
        serde_json::from_slice(&get(&c, &late_url, "/kv_event_sources").await.body).expect("json");
    assert_eq!(sources.as_object().map(|o| o.len()), Some(2), "{sources}");
    // Prompts sent to the data-parallel engine are spread over its ranks (each prompt's first
    // block picks its rank, deterministically): eight prompts reach both.
    let name = name_of(&ranked);
    let mut prompts = Vec::new();
    for i in 0..8 {
        let prompt = common::unique_chat(&format!("ranked{i}x"), 60);
        to_engine(&c, &late_url, &prompt).await;
        prompts.push(prompt);
    }
    until_stored(&c, &r, &name, 1.0).await;
    until_stored(&c, &r, &format!("{name}/dp1"), 1.0).await;
    // Give the views every store (each prompt stored once on its rank).
    let want = prompts.len() as f64;
    until_metrics(&c, &r, "every prompt's store applied", |m| {
        let stored = |stream: &str| {
            let l = engine_label(stream);
            sample(
                m,
                "switchyard_kv_events_events_total",
                &format!("{l},type=\"BlockStored\""),
            )
            .or_else(|| {
                sample(
                    m,
                    "switchyard_kv_events_events_total",
                    &format!("type=\"BlockStored\",{l}"),
                )
            })
            .unwrap_or(0.0)
        };
        stored(&name) + stored(&format!("{name}/dp1")) >= want
    })
    .await;
    // The ranks of one engine are one engine for routing: every prompt, whichever rank holds
    // it, goes exact to it.
    // The router ejected the engine while it was down: wait for its probe to see it back.
    until_metrics(&c, &r, "the late engine healthy", |m| {
        sample(m, "switchyard_engine_healthy", &engine_label(&name)) == Some(1.0)
    })
    .await;
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(
            routed(&c, &r, prompt).await,
            (name.clone(), "kv_lookup".into(), "exact".into()),
            "prompt {i}"
        );
    }
    drop(r);
    ranked.shutdown().await;
    single.shutdown().await;
}
