//! The router's queue (`--engine-queue-limit`) through the real router, in front of engines
//! that answer only when the test lets them and report the queue the test sets on their
//! `/metrics` (vLLM's gauges): requests held while every engine is at the limit, released one
//! per freed place in priority order and fair across tenants, sheddable requests refused,
//! the bounds (429 when full, 503 past the timeout, `Retry-After`), a client that disconnects
//! while queued leaving at once, and engines at the limit passed over.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use switchyard::config::RouterConfig;
use switchyard::proxy::RunningRouter;
use tokio::sync::oneshot;

/// An engine that holds every completion until the test releases it, and whose `/metrics`
/// report `running` and `waiting` as set at start.
#[derive(Clone)]
struct GateEngine {
    url: String,
    /// The prompts received, in arrival order.
    arrived: Arc<Mutex<Vec<String>>>,
    /// The held requests, oldest first: sending on one answers it.
    held: Arc<Mutex<VecDeque<oneshot::Sender<()>>>>,
}

impl GateEngine {
    async fn start(running: u32, waiting: u32) -> GateEngine {
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let engine = GateEngine {
            url: format!("http://{addr}"),
            arrived: Arc::default(),
            held: Arc::default(),
        };
        let metrics = format!(
            "vllm:num_requests_running{{model_name=\"{MODEL}\"}} {running}\n\
             vllm:num_requests_waiting{{model_name=\"{MODEL}\"}} {waiting}\n"
        );
        let e = engine.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (e, metrics) = (e.clone(), metrics.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (e, metrics) = (e.clone(), metrics.clone());
                        async move { Ok::<_, Infallible>(e.answer(req, &metrics).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        engine
    }

    async fn answer(&self, req: Request<Incoming>, metrics: &str) -> Response<Full<Bytes>> {
        if req.uri().path() == "/metrics" {
            return Response::new(Full::new(Bytes::from(metrics.to_owned())));
        }
        if req.method() == http::Method::GET {
            return Response::new(Full::new(Bytes::new()));
        }
        let body: Value =
            serde_json::from_slice(&req.into_body().collect().await.expect("body").to_bytes())
                .expect("JSON");
        let (tx, rx) = oneshot::channel();
        {
            // Arrival and hold in one step: the test sees them together.
            let mut held = self.held.lock().unwrap();
            self.arrived
                .lock()
                .unwrap()
                .push(body["prompt"].as_str().unwrap_or("").to_owned());
            held.push_back(tx);
        }
        let _ = rx.await;
        let answer = json!({
            "id": "cmpl-1", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
        });
        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("value"));
        r
    }

    fn arrived(&self) -> Vec<String> {
        self.arrived.lock().unwrap().clone()
    }

    /// Answers the oldest held request; whether there was one.
    fn release_one(&self) -> bool {
        match self.held.lock().unwrap().pop_front() {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }
}

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
    // One running, one waiting at the scrape: with a limit of 2, exactly one request of the
    // router's may be on the engine at a time.
    let engine = GateEngine::start(1, 1).await;
    let router = router(&[&engine], 2, |_| {}).await;
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
    waiting.push(send_queued(&c, &url, req(&url, "urgent", "ops", "critical")).await);

    let h = get(&c, &url, "/health").await.json();
    let m = &h["queue"]["models"][MODEL];
    assert_eq!(h["queue"]["queued"], 7, "{h}");
    assert_eq!(h["queue"]["engine_queue_limit"], 2);
    assert_eq!(m["bands"][0]["priority"], "critical");
    assert_eq!(m["bands"][0]["queued"], 1);
    assert_eq!(m["bands"][1]["queued"], 6);
    assert_eq!(m["bands"][1]["tenants"][0]["tenant"], "noisy");
    assert_eq!(m["bands"][1]["tenants"][0]["queued"], 4);

    // At saturation a sheddable request is refused at once.
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
    for line in [
        r#"switchyard_queue_rejections_total{reason="shed"} 1"#,
        r#"switchyard_queue_length{priority="standard",tenant="noisy"} 0"#,
        r#"switchyard_queue_wait_seconds_count{priority="critical",tenant="ops"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_in_length_and_time_and_a_client_that_leaves_leaves_it() {
    let engine = GateEngine::start(1, 1).await;
    let router = router(&[&engine], 2, |c| {
        c.queue.max_queued = 2;
        c.queue.queue_timeout = Duration::from_millis(700);
    })
    .await;
    let (c, url) = (client(), router.url());
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
    let text = String::from_utf8_lossy(&get(&c, &url, "/metrics").await.body).into_owned();
    for line in [
        r#"switchyard_queue_rejections_total{reason="full"} 1"#,
        r#"switchyard_queue_rejections_total{reason="timed_out"} 2"#,
    ] {
        assert!(text.contains(line), "{line} missing from /metrics");
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
    // `busy` has 5 waiting, past the limit of 3; `free` has room.
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
