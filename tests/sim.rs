//! The simulated vLLM engine over loopback: shapes, streaming, timing, cache, queueing,
//! cancellation, failure injection, shutdown and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use switchyard::sim::{self, KvCounters, SimConfig, SimCounters, SimHandle};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Safety net for anything that waits; never the expected duration of a step.
const SAFETY: Duration = Duration::from_secs(10);
const MODEL: &str = "switchyard-sim";

async fn engine(cfg: SimConfig) -> SimHandle {
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// One HTTP/1.1 client connection whose responses can be read frame by frame.
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { send, task }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.send.send_request(req(method, path, body)).await
    }

    /// Closes the TCP connection, as a client that goes away does.
    fn close(self) {
        self.task.abort();
    }
}

fn req(method: Method, path: &str, body: Option<Value>) -> Request<Full<Bytes>> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sim")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(SAFETY, f)
        .await
        .expect("timed out (safety net)")
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Bytes) {
    within(async {
        let mut c = Conn::open(addr).await;
        let resp = c.send(method, path, body).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    })
    .await
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, bytes) = call(addr, Method::POST, path, Some(body)).await;
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn metrics_text(addr: SocketAddr) -> String {
    let (status, headers, bytes) = call(addr, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The value of the sample `name{model_name=...}` (first label set).
fn sample(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn gauge(addr: SocketAddr, name: &str) -> f64 {
    sample(&metrics_text(addr).await, name)
}

/// Polls `cond` until it holds (bounded by the safety net).
async fn eventually<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Splits SSE text into the payloads of its `data:` events.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .expect("every event is a data line")
                .to_owned()
        })
        .collect()
}

/// Reads a streamed body frame by frame: (arrival time, bytes) per frame.
async fn frames(body: &mut Incoming) -> Vec<(Instant, Bytes)> {
    let mut out = Vec::new();
    while let Some(f) = within(body.frame()).await {
        if let Ok(data) = f.unwrap().into_data() {
            out.push((Instant::now(), data));
        }
    }
    out
}

fn prompt_of_tokens(n: usize) -> String {
    // 4 bytes per token, varied so blocks differ.
    (0..n).map(|i| format!("{:04}", i % 10_000)).collect()
}

#[tokio::test]
async fn completion_shape_and_usage() {
    let e = engine(SimConfig::instant()).await;
    let (status, v) = post(
        e.addr(),
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x".repeat(40), "max_tokens": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], MODEL);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["text"].as_str().unwrap().len(), 5 * 4);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    );
    // Without max_tokens: the configured default.
    let (_, v) = post(
        e.addr(),
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi"}),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 128);
    assert_eq!(
        e.counters(),
        SimCounters {
            received: 2,
            completed: 2,
            // Both prompts prefilled: 10 tokens, then "hi" (1).
            kv: KvCounters {
                prefill_computed_tokens: 11,
                ..KvCounters::default()
            },
            ..SimCounters::default()
        }
    );
    e.shutdown().await;
}

#[tokio::test]
async fn chat_shape_usage_and_max_completion_tokens() {
    let e = engine(SimConfig::instant()).await;
    let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]);
    let (status, v) = post(
        e.addr(),
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": messages, "max_tokens": 50, "max_completion_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"].as_str().unwrap().len(), 12);
    assert_eq!(choice["finish_reason"], "length");
    // Canonical prompt "system\nbe brief\nuser\nhello there\n" is 33 bytes = 9 tokens.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    );
    e.shutdown().await;
}

#[tokio::test]
async fn chat_stream_has_role_then_one_event_per_token_usage_and_done() {
    let e = engine(SimConfig::instant()).await;
    let mut c = Conn::open(e.addr()).await;
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 6,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "abcdefgh"}]});
    let resp = within(c.send(Method::POST, "/v1/chat/completions", Some(body)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let bytes = within(resp.into_body().collect()).await.unwrap().to_bytes();
    let ev = events(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(ev.len(), 1 + 6 + 1 + 1, "{ev:?}");
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk")
    );
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let mut content = String::new();
    for (i, c) in chunks[1..7].iter().enumerate() {
        let delta = &c["choices"][0]["delta"];
        assert!(delta.get("role").is_none());
        assert_eq!(delta["content"].as_str().unwrap().len(), 4);
        content.push_str(delta["content"].as_str().unwrap());
        let fr = &c["choices"][0]["finish_reason"];
        if i == 5 {
            assert_eq!(fr, "length");
        } else {
            assert!(fr.is_null());
        }
    }
    assert_eq!(content.len(), 24);
    // "user\nabcdefgh\n" = 14 bytes = 4 tokens.
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(
        chunks[7]["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10})
    );
    // The streamed text equals the non-streamed one.
    let (_, v) = post(
        e.addr(),
        "/v1/chat/completions",
        json!({"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], content.as_str());
    e.shutdown().await;
}

#[tokio::test]
async fn completion_stream_arrives_incrementally() {
    let itl = Duration::from_millis(50);
    let e = engine(SimConfig {
        itl_ms: itl.as_secs_f64() * 1000.0,
        batch_slowdown: 0.0,
        ..SimConfig::instant()
    })
    .await;
    let mut c = Conn::open(e.addr()).await;
    let body = json!({"model": MODEL, "prompt": "hello", "stream": true, "max_tokens": 8});
    let t0 = Instant::now();
    let resp = within(c.send(Method::POST, "/v1/completions", Some(body)))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let frames = frames(&mut body).await;
    let text: String = frames
        .iter()
        .map(|(_, b)| std::str::from_utf8(b).unwrap())
        .collect();
    let ev = events(&text);
    assert_eq!(ev.len(), 8 + 1, "one event per token, then [DONE]: {ev:?}");
    assert_eq!(ev[8], "[DONE]");
    for (i, e) in ev[..8].iter().enumerate() {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 4);
        assert_eq!(v["choices"][0]["finish_reason"] == "length", i == 7);
        assert!(v.get("usage").is_none());
    }
    let (first, last) = (frames[0].0, frames.last().unwrap().0);
    assert!(
        !std::str::from_utf8(&frames[0].1)
            .unwrap()
            .contains("[DONE]")
    );
    assert!(
        last - first >= itl * 2,
        "first event {:?} before the last",
        last - first
    );
    assert!(last - t0 >= itl * 7, "7 inter-token intervals at least");
    e.shutdown().await;
}

#[tokio::test]
async fn repeated_prompt_has_shorter_ttft_and_counts_prefix_hits() {
    // 2048 uncached tokens × 1 simulated ms × time scale 0.1 = 205 ms of wall time; a repeat
    // hits 127 of its 128 blocks (as vLLM, the engine recomputes at least the last token, so
    // a fully cached prompt's last block is not counted a hit) and prefills 16 tokens.
    let e = engine(SimConfig {
        prefill_ms_per_token: 1.0,
        time_scale: 0.1,
        ..SimConfig::instant()
    })
    .await;
    let prompt = prompt_of_tokens(2048);
    let ttft = || async {
        let mut c = Conn::open(e.addr()).await;
        let body = json!({"model": MODEL, "prompt": prompt, "stream": true, "max_tokens": 2});
        let t0 = Instant::now();
        let resp = within(c.send(Method::POST, "/v1/completions", Some(body)))
            .await
            .unwrap();
        let mut body = resp.into_body();
        let frames = frames(&mut body).await;
        frames[0].0 - t0
    };
    let first = ttft().await;
    let second = ttft().await;
    assert!(first >= Duration::from_millis(200), "first TTFT {first:?}");
    assert!(second < first, "repeat TTFT {second:?} vs first {first:?}");

    let m = metrics_text(e.addr()).await;
    assert_eq!(sample(&m, "vllm:prefix_cache_queries_total"), 4096.0);
    assert_eq!(sample(&m, "vllm:prefix_cache_hits_total"), 2032.0);
    assert_eq!(sample(&m, "vllm:time_to_first_token_seconds_count"), 2.0);
    // The histogram is in simulated seconds: the first TTFT alone is ≥ 2.048 s of them.
    assert!(sample(&m, "vllm:time_to_first_token_seconds_sum") >= 2.0);
    e.shutdown().await;
}

#[tokio::test]
async fn one_slot_queues_the_second_request() {
    let e = engine(SimConfig {
        max_num_seqs: 1,
        itl_ms: 20.0,
        batch_slowdown: 0.0,
        ..SimConfig::instant()
    })
    .await;
    let addr = e.addr();
    // A holds the only slot: it is running once its first token arrived.
    let mut a = Conn::open(addr).await;
    let body = json!({"model": MODEL, "prompt": "a", "stream": true, "max_tokens": 6});
    let mut a_body = within(a.send(Method::POST, "/v1/completions", Some(body)))
        .await
        .unwrap()
        .into_body();
    within(a_body.frame()).await.unwrap().unwrap();
    assert_eq!(gauge(addr, "vllm:num_requests_running").await, 1.0);

    let b = tokio::spawn(async move {
        let (status, v) = post(
            addr,
            "/v1/completions",
            json!({"model": MODEL, "prompt": "b", "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        Instant::now()
    });
    eventually(|| async { gauge(addr, "vllm:num_requests_waiting").await == 1.0 }).await;
    // A still runs: B cannot have started.
    assert_eq!(gauge(addr, "vllm:num_requests_running").await, 1.0);
    while within(a_body.frame()).await.is_some() {}
    let a_done = Instant::now();
    let b_done = within(b).await.unwrap();
    assert!(b_done > a_done, "B finished after A released the slot");
    let m = metrics_text(addr).await;
    assert_eq!(sample(&m, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(sample(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(e.counters().completed, 2);
    e.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_request() {
    let e = engine(SimConfig {
        itl_ms: 20.0,
        ..SimConfig::instant()
    })
    .await;
    let mut c = Conn::open(e.addr()).await;
    let body =
        json!({"model": MODEL, "prompt": "p".repeat(400), "stream": true, "max_tokens": 10_000});
    let mut resp = within(c.send(Method::POST, "/v1/completions", Some(body)))
        .await
        .unwrap()
        .into_body();
    within(resp.frame()).await.unwrap().unwrap();
    assert_eq!(gauge(e.addr(), "vllm:num_requests_running").await, 1.0);
    assert!(gauge(e.addr(), "vllm:kv_cache_usage_perc").await > 0.0);
    drop(resp);
    c.close();
    eventually(|| async { e.counters().cancelled == 1 }).await;
    let m = metrics_text(e.addr()).await;
    assert_eq!(sample(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(e.counters().completed, 0);
    e.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_while_waiting_for_a_full_response_cancels_it() {
    let e = engine(SimConfig {
        itl_ms: 20.0,
        ..SimConfig::instant()
    })
    .await;
    let mut c = Conn::open(e.addr()).await;
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 10_000});
    let pending = c.send(Method::POST, "/v1/completions", Some(body));
    // The request is admitted (running) while its response is pending.
    let addr = e.addr();
    let wait = async {
        eventually(|| async { gauge(addr, "vllm:num_requests_running").await == 1.0 }).await;
    };
    tokio::select! {
        r = pending => panic!("unexpected response {r:?}"),
        _ = wait => {}
    }
    c.close();
    eventually(|| async { e.counters().cancelled == 1 }).await;
    assert_eq!(gauge(addr, "vllm:num_requests_running").await, 0.0);
    e.shutdown().await;
}

#[tokio::test]
async fn fail_rate_one_answers_500_json_until_reset() {
    let e = engine(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::instant()
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
    let (status, v) = post(e.addr(), "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(v["error"]["code"], 500);
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
    assert_eq!(e.counters().failed_injected, 1);
    // Health and metrics are not affected by failure injection.
    assert_eq!(
        call(e.addr(), Method::GET, "/health", None).await.0,
        StatusCode::OK
    );
    e.faults().set_fail_rate(0.0);
    assert_eq!(
        post(e.addr(), "/v1/completions", body).await.0,
        StatusCode::OK
    );
    e.shutdown().await;
}

#[tokio::test]
async fn drop_rate_one_closes_the_connection_without_a_response() {
    let e = engine(SimConfig {
        drop_rate: 1.0,
        ..SimConfig::instant()
    })
    .await;
    let mut c = Conn::open(e.addr()).await;
    let r = within(c.send(
        Method::POST,
        "/v1/completions",
        Some(json!({"model": MODEL, "prompt": "x"})),
    ))
    .await;
    let err = r.expect_err("no response expected");
    assert!(err.is_incomplete_message() || err.is_closed(), "{err}");
    assert_eq!(e.counters().dropped_injected, 1);
    assert_eq!(e.counters().received, 1);
    e.shutdown().await;
}

#[tokio::test]
async fn hang_never_answers_and_shutdown_still_completes() {
    let e = engine(SimConfig {
        hang: true,
        ..SimConfig::instant()
    })
    .await;
    let mut c = Conn::open(e.addr()).await;
    let fut = c.send(
        Method::POST,
        "/v1/completions",
        Some(json!({"model": MODEL, "prompt": "x"})),
    );
    let r = tokio::time::timeout(Duration::from_millis(300), fut).await;
    assert!(r.is_err(), "no response within the client timeout");
    assert_eq!(e.counters().received, 1);
    assert_eq!(
        call(e.addr(), Method::GET, "/health", None).await.0,
        StatusCode::OK
    );
    e.faults().set_hang(false);
    let (status, _) = post(
        e.addr(),
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The hung request (still held by `c`) does not block shutdown.
    within(e.shutdown()).await;
    drop(c);
}

#[tokio::test]
async fn shutdown_aborts_streams_and_the_port_can_be_reused() {
    let e = engine(SimConfig {
        itl_ms: 20.0,
        ..SimConfig::instant()
    })
    .await;
    let addr = e.addr();
    let mut c = Conn::open(addr).await;
    let body = json!({"model": MODEL, "prompt": "x", "stream": true, "max_tokens": 10_000});
    let mut resp = within(c.send(Method::POST, "/v1/completions", Some(body)))
        .await
        .unwrap()
        .into_body();
    within(resp.frame()).await.unwrap().unwrap();
    within(e.shutdown()).await;
    // The open stream was cut short: it ends with an error, not [DONE].
    let mut rest = Vec::new();
    let ended_badly = loop {
        match within(resp.frame()).await {
            None => break false,
            Some(Err(_)) => break true,
            Some(Ok(f)) => rest.extend_from_slice(&f.into_data().unwrap_or_default()),
        }
    };
    assert!(ended_badly, "stream must not end cleanly");
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );

    let again = sim::start(SimConfig::instant(), addr).await.unwrap();
    assert_eq!(again.addr(), addr);
    assert_eq!(
        call(addr, Method::GET, "/health", None).await.0,
        StatusCode::OK
    );
    again.shutdown().await;
}

#[tokio::test]
async fn routes_and_errors() {
    let e = engine(SimConfig::instant()).await;
    let addr = e.addr();
    let (status, _, body) = call(addr, Method::GET, "/health", None).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));

    let (status, _, body) = call(addr, Method::GET, "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");

    let check_error = |status: StatusCode, body: &[u8], expect: StatusCode| {
        assert_eq!(status, expect);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["code"], expect.as_u16(), "{v}");
        assert!(
            v["error"]["message"].is_string() && v["error"]["type"].is_string(),
            "{v}"
        );
    };
    let (status, _, body) = call(addr, Method::GET, "/nope", None).await;
    check_error(status, &body, StatusCode::NOT_FOUND);
    let (status, _, body) = call(addr, Method::GET, "/v1/completions", None).await;
    check_error(status, &body, StatusCode::METHOD_NOT_ALLOWED);

    let bad = |raw: &'static str| async move {
        within(async {
            let mut c = Conn::open(addr).await;
            let r = Request::builder()
                .method(Method::POST)
                .uri("/v1/completions")
                .header("host", "sim")
                .body(Full::new(Bytes::from_static(raw.as_bytes())))
                .unwrap();
            let resp = c.send.send_request(r).await.unwrap();
            let status = resp.status();
            (status, resp.into_body().collect().await.unwrap().to_bytes())
        })
        .await
    };
    let (status, body) = bad("{not json").await;
    check_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, body) = bad(r#"{"prompt":"x"}"#).await;
    check_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, body) = bad(r#"{"model":"other","prompt":"x"}"#).await;
    check_error(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = bad(r#"{"model":"switchyard-sim","prompt":"x","max_tokens":0}"#).await;
    check_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, body) = bad(r#"{"model":"switchyard-sim"}"#).await;
    check_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, v) = post(
        addr,
        "/v1/chat/completions",
        json!({"model": MODEL, "prompt": "x"}),
    )
    .await;
    check_error(status, v.to_string().as_bytes(), StatusCode::BAD_REQUEST);
    let (status, v) = post(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "max_tokens": 200_000}),
    )
    .await;
    check_error(status, v.to_string().as_bytes(), StatusCode::BAD_REQUEST);
    // Rejected requests were received but neither completed nor cancelled.
    let c = e.counters();
    assert_eq!((c.received, c.completed, c.cancelled), (7, 0, 0));
    e.shutdown().await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_streams() {
    let e = engine(SimConfig::instant()).await;
    let stream = TcpStream::connect(e.addr()).await.unwrap();
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = json!({"model": MODEL, "prompt": "x", "stream": true, "max_tokens": 3});
    let mut r = req(Method::POST, "http://sim/v1/completions", Some(body));
    *r.version_mut() = http::Version::HTTP_2;
    r.headers_mut().remove("host");
    let resp = within(send.send_request(r)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = within(resp.into_body().collect()).await.unwrap().to_bytes();
    let ev = events(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(ev.len(), 4);
    assert_eq!(ev[3], "[DONE]");
    e.shutdown().await;
}

#[tokio::test]
async fn metrics_have_vllm_names_with_model_label_and_parse() {
    let e = engine(SimConfig {
        model: "org/Model-8B".into(),
        ..SimConfig::instant()
    })
    .await;
    let (status, _) = post(
        e.addr(),
        "/v1/completions",
        json!({"model": "org/Model-8B", "prompt": "y".repeat(200), "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics_text(e.addr()).await;

    // Every sample line is `name{labels} value`, and every family has HELP and TYPE.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, rest) = line.split_once('{').unwrap_or_else(|| panic!("{line}"));
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let (labels, value) = rest.rsplit_once("} ").unwrap_or_else(|| panic!("{line}"));
        assert!(labels.contains("model_name=\"org/Model-8B\""), "{line}");
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
    }
    let required = [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:gpu_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:cache_config_info", "gauge"),
    ];
    for (name, kind) in required {
        assert!(text.contains(&format!("# HELP {name} ")), "HELP of {name}");
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "TYPE of {name}"
        );
    }
    assert_eq!(sample(&text, "vllm:prefix_cache_queries_total"), 50.0);
    assert_eq!(
        sample(&text, "vllm:request_success_total"),
        0.0,
        "finished_reason=stop first"
    );
    assert!(text.contains("finished_reason=\"length\"} 1.0"));
    assert!(text.contains("num_gpu_blocks=\"9216\""));

    // prometheus-parse 0.2 only accepts `\w+` metric names, so it silently skips vLLM's
    // `vllm:` names; check the structure with the colon mapped to an underscore.
    let mapped = text.replace("vllm:", "vllm_");
    let scrape = prometheus_parse::Scrape::parse(mapped.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for (name, _) in required {
        let name = name.replace("vllm:", "vllm_");
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} not parsed"));
        assert_eq!(s.labels.get("model_name"), Some("org/Model-8B"), "{name}");
        if name == "vllm_time_to_first_token_seconds" {
            match &s.value {
                prometheus_parse::Value::Histogram(b) => {
                    assert_eq!(b.len(), 23, "22 vLLM buckets and +Inf");
                    assert_eq!(b.last().unwrap().count, 1.0);
                }
                v => panic!("TTFT is not a histogram: {v:?}"),
            }
        }
    }
    e.shutdown().await;
}
