//! The router's queue (`--engine-queue-limit`) through the real router, in front of engines
//! that answer only when the test lets them and report the queue the test sets on their
//! `/metrics` (vLLM's gauges): requests held while every engine is at the limit, released one
//! per freed place in priority order and fair across tenants, sheddable requests refused,
//! the bounds (429 when full, 503 past the timeout, `Retry-After`), a client that disconnects
//! while queued leaving at once, engines at the limit passed over, and `admission.rhai`
//! setting tenants and priorities that the queue and routing scripts then see.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::gate::GateEngine;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use switchyard::config::RouterConfig;
use switchyard::proxy::RunningRouter;

/// A request of `tenant` at `priority`, 300 tokens at most (so that each costs more than the
/// queue's quantum: one per turn).
fn req(url: &str, prompt: &str, tenant: &str, priority: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 300});
    Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-tenant", tenant)
        .header("x-priority", priority)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// A router with the queue on (`limit` per engine), scraping once at start only: the engines'
/// figures stay what they were set to, and the router's own in-flight count moves the estimate.
async fn router(
    engines: &[&GateEngine],
    limit: u32,
    tweak: impl FnOnce(&mut RouterConfig),
) -> RunningRouter {
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let router = start_router(&urls, |c| {
        c.engine_stats_interval = Duration::from_secs(3600);
        c.tenant_header = Some("x-tenant".into());
        c.decision_headers = true;
        c.queue.engine_queue_limit = limit;
        tweak(c);
    })
    .await;
    let c = client();
    let url = router.url();
    for i in 0..engines.len() {
        let scraped = |h: &Value| !h["engines"][i]["stats_age_seconds"].is_null();
        let deadline = std::time::Instant::now() + SAFETY;
        loop {
            let h = get(&c, &url, "/health").await.json();
            if scraped(&h) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "engine {i} never scraped"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    router
}

/// The value of one series in `/metrics` (0 if absent).
async fn metric(c: &TestClient, url: &str, series: &str) -> f64 {
    let text = String::from_utf8_lossy(&get(c, url, "/metrics").await.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn queued(c: &TestClient, url: &str) -> u64 {
    get(c, url, "/health").await.json()["queue"]["queued"]
        .as_u64()
        .expect("queue in /health")
}

/// Sends a request on its own client, in the background.
fn spawn_send(request: Request<Full<Bytes>>) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { send(&client(), request).await })
}

/// Sends a request in the background and returns once the router's queue holds one more.
async fn send_queued(
    c: &TestClient,
    url: &str,
    request: Request<Full<Bytes>>,
) -> tokio::task::JoinHandle<Reply> {
    let before = queued(c, url).await;
    let task = spawn_send(request);
    let deadline = std::time::Instant::now() + SAFETY;
    while queued(c, url).await != before + 1 {
        assert!(std::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_go_one_per_freed_place_critical_first_and_fair_across_tenants() {
    // One running, one waiting at the scrape: with a limit of 3, exactly one request of the
    // router's may be on the engine at a time (the engine's queue, counting it, is 2).
    let engine = GateEngine::start(1, 1).await;
    let router = router(&[&engine], 3, |_| {}).await;
    let (c, url) = (client(), router.url());
    let first = spawn_send(req(&url, "first", "noisy", "standard"));
    eventually("first reaches the engine", || engine.arrived().len() == 1).await;
    let mut waiting = Vec::new();
    for i in 1..=4 {
        let r = req(&url, &format!("noisy-{i}"), "noisy", "standard");
        waiting.push(send_queued(&c, &url, r).await);
    }
    for i in 1..=2 {
        let r = req(&url, &format!("quiet-{i}"), "quiet", "standard");
        waiting.push(send_queued(&c, &url, r).await);
    }
    waiting.push(send_queued(&c, &url, req(&url, "urgent", "oncall", "critical")).await);

    let h = get(&c, &url, "/health").await.json();
    let m = &h["queue"]["models"][MODEL];
    assert_eq!(h["queue"]["queued"], 7, "{h}");
    assert_eq!(h["queue"]["engine_queue_limit"], 3);
    assert_eq!(m["bands"][0]["priority"], "critical");
    assert_eq!(m["bands"][0]["queued"], 1);
    assert_eq!(m["bands"][1]["queued"], 6);
    assert_eq!(m["bands"][1]["tenants"][0]["tenant"], "noisy");
    assert_eq!(m["bands"][1]["tenants"][0]["queued"], 4);

    // At saturation a sheddable request is refused at once.
    let shed_before = metric(
        &c,
        &url,
        r#"switchyard_queue_rejections_total{reason="shed"}"#,
    )
    .await;
    let shed = send(&c, req(&url, "shed", "quiet", "sheddable")).await;
    assert_eq!(shed.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(shed.json()["error"]["code"], "request_shed");
    assert_eq!(shed.header("retry-after"), Some("1"));

    // Each answer frees the place for exactly one more.
    for n in 2..=8 {
        assert!(engine.release_one(), "a request is held");
        eventually("the next request reaches the engine", || {
            engine.arrived().len() == n
        })
        .await;
        assert_eq!(engine.arrived().len(), n, "one at a time");
    }
    assert!(engine.release_one());
    let order = engine.arrived();
    assert_eq!(order[0], "first");
    assert_eq!(order[1], "urgent", "critical first: {order:?}");
    let pos = |p: &str| order.iter().position(|o| o == p).expect(p);
    for (a, b) in [
        ("noisy-1", "noisy-2"),
        ("noisy-2", "noisy-3"),
        ("noisy-3", "noisy-4"),
        ("quiet-1", "quiet-2"),
    ] {
        assert!(pos(a) < pos(b), "FIFO within a tenant: {order:?}");
    }
    assert!(
        pos("quiet-2") < pos("noisy-4"),
        "the quiet tenant is not stuck behind the noisy one: {order:?}"
    );
    assert!(pos("quiet-1") < pos("noisy-3"), "{order:?}");

    let first = first.await.expect("task");
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-switchyard-queue-ms"), Some("0"));
    for w in waiting {
        let r = w.await.expect("task");
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
        assert!(r.header("x-switchyard-queue-ms").is_some());
    }
    let metrics = get(&c, &url, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let shed_after = metric(
        &c,
        &url,
        r#"switchyard_queue_rejections_total{reason="shed"}"#,
    )
    .await;
    assert_eq!(shed_after - shed_before, 1.0);
    for line in [
        r#"switchyard_queue_length{priority="standard",tenant="noisy"} 0"#,
        r#"switchyard_queue_wait_seconds_count{priority="critical",tenant="oncall"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_in_length_and_time_and_a_client_that_leaves_leaves_it() {
    let engine = GateEngine::start(1, 1).await;
    let router = router(&[&engine], 3, |c| {
        c.queue.max_queued = 2;
        c.queue.queue_timeout = Duration::from_millis(700);
    })
    .await;
    let (c, url) = (client(), router.url());
    let mut before = std::collections::HashMap::new();
    for reason in ["full", "timed_out"] {
        let series = format!("switchyard_queue_rejections_total{{reason=\"{reason}\"}}");
        before.insert(reason, metric(&c, &url, &series).await);
    }
    let first = spawn_send(req(&url, "first", "a", "standard"));
    eventually("first reaches the engine", || engine.arrived().len() == 1).await;

    // A raw client queues, then hangs up: its place is free at once.
    let body = json!({"model": MODEL, "prompt": "leaver", "max_tokens": 300}).to_string();
    let mut raw = tokio::net::TcpStream::connect(router.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-tenant: b\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, head.as_bytes())
        .await
        .expect("write");
    eventually_async(&c, &url, 1).await;
    drop(raw);
    eventually_async(&c, &url, 0).await;

    let a = send_queued(&c, &url, req(&url, "a-1", "a", "standard")).await;
    let b = send_queued(&c, &url, req(&url, "b-1", "b", "standard")).await;
    let full = send(&c, req(&url, "c-1", "c", "standard")).await;
    assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(full.json()["error"]["code"], "queue_full");
    assert_eq!(full.json()["error"]["type"], "overloaded");
    assert_eq!(full.header("retry-after"), Some("1"));

    // Nobody is released: both wait out the queue timeout.
    for w in [a, b] {
        let r = w.await.expect("task");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.json()["error"]["code"], "queue_timeout");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(queued(&c, &url).await, 0);
    assert_eq!(
        engine.arrived(),
        vec!["first"],
        "no refused request reached it"
    );
    assert!(engine.release_one());
    assert_eq!(first.await.expect("task").status, StatusCode::OK);
    for (reason, n) in [("full", 1.0), ("timed_out", 2.0)] {
        let series = format!("switchyard_queue_rejections_total{{reason=\"{reason}\"}}");
        assert_eq!(
            metric(&c, &url, &series).await - before[reason],
            n,
            "{reason}"
        );
    }
}

async fn eventually_async(c: &TestClient, url: &str, want: u64) {
    let deadline = std::time::Instant::now() + SAFETY;
    while queued(c, url).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "queue never held {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_at_the_limit_are_passed_over_and_unknown_models_are_not_queued() {
    // `busy` has 5 waiting, past the limit of 3; `free` has room (never seen full).
    let busy = GateEngine::start(4, 5).await;
    let free = GateEngine::start(0, 0).await;
    let router = router(&[&busy, &free], 3, |c| {
        c.policy.default_policy = "roundrobin".into()
    })
    .await;
    let (c, url) = (client(), router.url());
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(spawn_send(req(&url, &format!("r{i}"), "t", "standard")));
    }
    eventually("all four reach an engine", || free.arrived().len() == 4).await;
    assert!(
        busy.arrived().is_empty(),
        "round robin passed over the busy engine"
    );
    while free.release_one() {}
    for a in answers {
        let r = a.await.expect("task");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("x-switchyard-engine"),
            Some(&free.url["http://".len()..])
        );
    }
    let unknown = post_json(
        &c,
        &url,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(queued(&c, &url).await, 0);
}

/// The admission policy: the team header names the tenant; batch requests are sheddable;
/// the `ops` team's are critical.
const ADMISSION: &str = r#"
let team = request.header("x-team");
if team != () { request.tenant = team; }
if request.field("user") == "batch" { request.priority = "sheddable"; }
if request.tenant == "ops" { request.priority = "critical"; }
"#;

/// A routing policy that reads them: it decides only ops' critical requests (the others go
/// to the default tier).
const BY_PRIORITY: &str = r#"
if request.priority == "critical" && request.tenant == "ops" { engines[engines.len() - 1] }
"#;

fn team_req(url: &str, prompt: &str, team: &str, user: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 300, "user": user});
    Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-team", team)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_rhai_sets_tenants_and_priorities_that_the_queue_and_routing_scripts_see() {
    let dir = shipped_policies_with("unused", "[[tier]]\nbuiltin = \"fallback\"\n");
    std::fs::write(dir.path().join("admission.rhai"), ADMISSION).expect("write");
    std::fs::write(dir.path().join("by_priority.rhai"), BY_PRIORITY).expect("write");
    // Each engine takes one request of the router's (one running, one waiting, limit 3).
    let first = GateEngine::start(1, 1).await;
    let second = GateEngine::start(1, 1).await;
    let policies = dir.path().to_path_buf();
    let router = router(&[&first, &second], 3, move |c| {
        c.policy.dir = policies;
        c.policy.default_policy = "by_priority".into();
        c.policy.script_time_budget = Duration::from_secs(5);
    })
    .await;
    let (c, url) = (client(), router.url());
    let a = spawn_send(team_req(&url, "a", "alpha", "u1"));
    eventually("a reaches engine 0", || first.arrived().len() == 1).await;
    // Engine 0 is full, engine 1 has room: routing among the engines with room takes engine 1.
    let b = spawn_send(team_req(&url, "b", "alpha", "u1"));
    eventually("b reaches engine 1", || second.arrived().len() == 1).await;
    // Now both are full: a batch request is sheddable by the admission policy.
    let shed = send(&c, team_req(&url, "batch", "alpha", "batch")).await;
    assert_eq!(
        shed.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        shed.json()
    );
    assert_eq!(shed.json()["error"]["code"], "request_shed");
    // Queued: alpha's, then ops' (critical by the admission policy): ops' goes first.
    let alpha = send_queued(&c, &url, team_req(&url, "alpha-2", "alpha", "u1")).await;
    let ops = send_queued(&c, &url, team_req(&url, "ops-1", "ops", "u2")).await;
    let h = get(&c, &url, "/health").await.json();
    let bands = &h["queue"]["models"][MODEL]["bands"];
    assert_eq!(bands[0]["tenants"][0]["tenant"], "ops", "{h}");
    assert_eq!(bands[1]["tenants"][0]["tenant"], "alpha", "{h}");
    assert!(second.release_one(), "b answered: room on engine 1");
    // ops' request is admitted first, and the routing script sends it to engine 1.
    eventually("ops-1 reaches engine 1", || second.arrived().len() == 2).await;
    assert_eq!(second.arrived()[1], "ops-1");
    assert!(second.release_one());
    let ops = ops.await.expect("task");
    assert_eq!(ops.status, StatusCode::OK);
    assert_eq!(ops.header("x-switchyard-tier"), Some("by_priority"));
    // ops' answer freed engine 1: alpha's request goes there.
    eventually("alpha-2 reaches engine 1", || second.arrived().len() == 3).await;
    assert_eq!(second.arrived()[2], "alpha-2");
    assert!(second.release_one());
    assert!(first.release_one());
    let alpha = alpha.await.expect("task");
    assert_eq!(alpha.status, StatusCode::OK);
    assert_eq!(alpha.header("x-switchyard-tier"), Some("default"));
    for t in [a, b] {
        assert_eq!(t.await.expect("task").status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_admission_script_costs_no_request_and_routing_scripts_cannot_set_the_tenant() {
    let dir = shipped_policies_with("unused", "[[tier]]\nbuiltin = \"fallback\"\n");
    std::fs::write(
        dir.path().join("admission.rhai"),
        "request.priority = \"urgent\";\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("sets_tenant.rhai"),
        "request.tenant = \"x\"; engines[0]\n",
    )
    .expect("write");
    let sims = start_sims(1, instant_sim()).await;
    let policies = dir.path().to_path_buf();
    let router = start_router(&urls(&sims), move |c| {
        c.policy.dir = policies;
        c.policy.default_policy = "sets_tenant".into();
        c.policy.script_time_budget = Duration::from_secs(5);
        c.decision_headers = true;
    })
    .await;
    let (c, url) = (client(), router.url());
    let r = post_json(
        &c,
        &url,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-switchyard-tier"),
        Some("default"),
        "the script tier failed and passed"
    );
    let text = String::from_utf8_lossy(&get(&c, &url, "/metrics").await.body).into_owned();
    for policy in ["admission", "sets_tenant"] {
        let counted = text.lines().any(|l| {
            l.starts_with("switchyard_policy_script_errors_total")
                && l.contains(&format!("policy=\"{policy}\""))
                && l.contains("reason=\"runtime_error\"")
                && l.ends_with(" 1")
        });
        assert!(counted, "{policy}'s error counted:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_weights_come_from_the_config_file_and_reload_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("switchyard.toml");
    std::fs::write(&conf, "[tenant_weights]\n\"gold\" = 2\n").expect("write config");
    let engine = GateEngine::start(1, 1).await;
    let file = switchyard::config::load_file(&conf).expect("config");
    let weights = switchyard::config::tenant_weights(&file).expect("weights");
    let loader: switchyard::policy::SettingsLoader = {
        let conf = conf.clone();
        std::sync::Arc::new(move || {
            let file = switchyard::config::load_file(&conf).map_err(|e| e.to_string())?;
            let mut s = switchyard::config::policy_settings(&Default::default(), &file)
                .map_err(|e| e.to_string())?;
            s.dir = shipped_policies();
            Ok(s)
        })
    };
    let mut cfg = RouterConfig::for_backends(std::slice::from_ref(&engine.url), MODEL);
    cfg.policy.dir = shipped_policies();
    cfg.engine_stats_interval = Duration::from_secs(3600);
    cfg.tenant_header = Some("x-tenant".into());
    cfg.queue.engine_queue_limit = 3;
    cfg.queue.tenant_weights = weights;
    cfg.config_file = Some(conf.clone());
    let router = switchyard::proxy::start(cfg, Some(loader))
        .await
        .expect("router starts");
    let (c, url) = (client(), router.url());
    eventually_scraped(&c, &url).await;
    let first = spawn_send(req(&url, "first", "gold", "standard"));
    eventually("first reaches the engine", || engine.arrived().len() == 1).await;
    let gold = send_queued(&c, &url, req(&url, "gold-1", "gold", "standard")).await;
    let weight =
        |h: &Value| h["queue"]["models"][MODEL]["bands"][1]["tenants"][0]["weight"].clone();
    assert_eq!(weight(&get(&c, &url, "/health").await.json()), 2);
    std::fs::write(&conf, "[tenant_weights]\n\"gold\" = 5\n").expect("write config");
    let deadline = std::time::Instant::now() + SAFETY;
    while weight(&get(&c, &url, "/health").await.json()) != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new weight never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while engine.release_one() || engine.arrived().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while engine.release_one() {}
    for t in [first, gold] {
        assert_eq!(t.await.expect("task").status, StatusCode::OK);
    }
}

async fn eventually_scraped(c: &TestClient, url: &str) {
    let deadline = std::time::Instant::now() + SAFETY;
    while get(c, url, "/health").await.json()["engines"][0]["stats_age_seconds"].is_null() {
        assert!(std::time::Instant::now() < deadline, "never scraped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
