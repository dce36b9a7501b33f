//! The proxy end to end: the real router in front of real simulated engines over loopback.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A canned engine: answers POSTs with fixed bytes, as one body or as timed chunks, and
/// echoes the request headers it got as JSON on `/echo-headers`.
async fn canned_engine(chunks: Vec<&'static [u8]>, gap: Duration) -> String {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let chunks = chunks.clone();
                    async move {
                        if req.uri().path().ends_with("/echo-headers") {
                            let h: serde_json::Map<String, serde_json::Value> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                                .collect();
                            let body = http_body_util::Either::Left(Full::new(Bytes::from(
                                serde_json::Value::Object(h).to_string(),
                            )));
                            return Ok::<_, Infallible>(Response::new(body));
                        }
                        let (tx, rx) =
                            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                        tokio::spawn(async move {
                            for (i, c) in chunks.into_iter().enumerate() {
                                if i > 0 {
                                    tokio::time::sleep(gap).await;
                                }
                                if tx
                                    .send(Ok(Frame::data(Bytes::from_static(c))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        });
                        let body =
                            http_body_util::Either::Right(StreamBody::new(tokio_stream_from(rx)));
                        let mut r = Response::new(body);
                        r.headers_mut()
                            .insert("content-type", "text/event-stream".parse().unwrap());
                        r.headers_mut()
                            .insert("x-engine-header", "kept".parse().unwrap());
                        Ok(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn passes_bytes_through_exactly_and_streams_incrementally() {
    const CHUNKS: [&[u8]; 4] = [
        b"data: {\"a\":1}\n\n",
        b"data: {\"b\":\"\xc3\xa9\"}\n\n",
        b"data: x\n\n",
        b"data: [DONE]\n\n",
    ];
    let engine = canned_engine(CHUNKS.to_vec(), Duration::from_millis(150)).await;
    let router = start_router(std::slice::from_ref(&engine), |_| {}).await;
    let c = client();
    let s = stream(&c, completion_req(&router.url(), "hi", 4, true)).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.headers.get("x-engine-header").unwrap(), "kept");
    assert!(s.headers.get("x-request-id").is_some());
    let all: Vec<u8> = s.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    assert_eq!(all, CHUNKS.concat(), "bytes pass through unchanged");
    // The first chunk reached the client long before the last was produced (3 gaps of 150 ms).
    let first = s.frames.first().unwrap().0;
    let last = s.frames.last().unwrap().0;
    assert!(
        last.duration_since(first) >= Duration::from_millis(300),
        "chunks arrived together: {:?}",
        last.duration_since(first)
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn forwards_authorization_and_request_id_and_strips_hop_by_hop() {
    let engine = canned_engine(vec![b"x"], Duration::ZERO).await;
    let router = start_router(std::slice::from_ref(&engine), |_| {}).await;
    let c = client();
    let req = Request::post(format!("{}/v1/echo-headers", router.url()))
        .header("authorization", "Bearer secret")
        .header("x-request-id", "req-123")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .body(Full::new(Bytes::from(
            completion("hi", 1, false).to_string(),
        )))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = r.json();
    assert_eq!(seen["authorization"], "Bearer secret");
    assert_eq!(seen["x-request-id"], "req-123");
    assert!(seen.get("x-drop-me").is_none(), "{seen}");
    assert_eq!(r.header("x-request-id"), Some("req-123"));
    // Without one, an id is generated and sent both ways.
    let r = post_json(
        &c,
        &router.url(),
        "/v1/echo-headers",
        completion("hi", 1, false),
    )
    .await;
    let rid = r.header("x-request-id").unwrap().to_owned();
    assert!(rid.len() >= 16);
    assert_eq!(r.json()["x-request-id"], rid.as_str());
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn every_model_endpoint_is_forwarded_to_an_engine() {
    let engine = canned_engine(vec![b"engine-bytes"], Duration::ZERO).await;
    let router = start_router(std::slice::from_ref(&engine), |c| c.decision_headers = true).await;
    let c = client();
    for path in [
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/v1/score",
        "/tokenize",
        "/detokenize",
    ] {
        let r = post_json(&c, &router.url(), path, completion("hi", 1, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(&r.body[..], b"engine-bytes", "{path}");
        assert!(r.header("x-switchyard-engine").is_some(), "{path}");
    }
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn completions_and_chat_through_the_router() {
    let sims = start_sims(2, fast_sim()).await;
    let router = start_router(&urls(&sims), |c| c.decision_headers = true).await;
    let c = client();
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("Hello there", 5, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(r.header("x-switchyard-engine").is_some());
    assert!(r.header("x-switchyard-tier").is_some());
    assert!(r.header("x-switchyard-policy").is_some());
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true});
    let s = stream(
        &c,
        post(&router.url(), "/v1/chat/completions", chat.to_string()),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    let ev = s.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let chunk: serde_json::Value = serde_json::from_str(&ev[0]).unwrap();
    assert_eq!(chunk["object"], "chat.completion.chunk");
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn sim_tokens_arrive_incrementally_through_the_router() {
    // 20 tokens at 40 ms each (real time): the stream spans >= 0.5 s.
    let sims = start_sims(
        1,
        SimConfig {
            itl_ms: 40.0,
            time_scale: 1.0,
            prefill_overhead_ms: 1.0,
            prefill_ms_per_token: 0.0,
            ..instant_sim()
        },
    )
    .await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let s = stream(&client(), completion_req(&router.url(), "count", 20, true)).await;
    let data_frames: Vec<_> = s
        .frames
        .iter()
        .filter(|(_, b)| b.starts_with(b"data: {"))
        .collect();
    assert!(
        data_frames.len() >= 10,
        "expected many frames, got {}",
        data_frames.len()
    );
    let spread = data_frames
        .last()
        .unwrap()
        .0
        .duration_since(data_frames[0].0);
    assert!(
        spread >= Duration::from_millis(400),
        "tokens were buffered: spread {spread:?}"
    );
    router.shutdown(Duration::from_secs(1)).await;
}

use switchyard::sim::SimConfig;

#[tokio::test]
async fn models_is_the_deduplicated_union() {
    let serving = |model: &str| {
        switchyard::sim::start(
            SimConfig {
                model: model.into(),
                ..instant_sim()
            },
            loopback(),
        )
    };
    let a = serving("m-a").await.unwrap();
    let b = serving("m-b").await.unwrap();
    let c2 = serving("m-a").await.unwrap();
    let mut cfg =
        switchyard::config::RouterConfig::for_backends(&[a.url(), b.url(), c2.url()], "unused");
    cfg.backends[0].models = vec!["m-a".into()];
    cfg.backends[1].models = vec!["m-b".into()];
    cfg.backends[2].models = vec!["m-a".into()];
    cfg.policy.dir = shipped_policies();
    let router = switchyard::proxy::start(cfg, None).await.unwrap();
    let c = client();
    let v = get(&c, &router.url(), "/v1/models").await.json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["m-a", "m-b"]);
    assert_eq!(v["object"], "list");
    // Requests go to an engine serving their model.
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        json!({"model": "m-b", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(b.counters().completed, 1);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn client_errors_are_openai_shaped() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| c.max_body_bytes = 1000).await;
    let c = client();
    let url = router.url();
    let check = |r: &Reply, status: StatusCode, code: &str| {
        assert_eq!(r.status, status, "{:?}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
    };
    check(
        &send(&c, post(&url, "/v1/completions", "{not json")).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    check(
        &post_json(&c, &url, "/v1/completions", json!({"prompt": "x"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    check(
        &post_json(
            &c,
            &url,
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "model_not_found",
    );
    check(
        &post_json(
            &c,
            &url,
            "/v1/completions",
            completion(&"x".repeat(2000), 1, false),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    check(
        &get(&c, &url, "/nowhere").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    check(
        &get(&c, &url, "/v1/completions").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // A body over the limit without Content-Length (chunked) is cut off too.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for _ in 0..4 {
            let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b' '; 400])))).await;
        }
    });
    let chunked = Request::post(format!("{url}/v1/completions"))
        .body(StreamBody::new(tokio_stream_from(rx)))
        .unwrap();
    let raw = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let resp = tokio::time::timeout(SAFETY, raw.request(chunked))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("payload_too_large"));
    // Nothing reached the engine.
    assert_eq!(sims[0].counters().received, 0);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn malformed_http_gets_an_answer_not_a_hang() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    s.write_all(b"GARBAGE / HTTP/9.9\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(SAFETY, s.read_to_end(&mut buf))
        .await
        .expect("the router closes or answers");
    assert!(n.is_ok());
    if !buf.is_empty() {
        assert!(
            buf.starts_with(b"HTTP/1.1 4"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn no_healthy_engine_is_503_with_retry_after_and_health_follows() {
    let sims = start_sims(1, instant_sim()).await;
    // No scrape after the first: the request itself is what finds the engine dead.
    let router = start_router(&urls(&sims), |c| {
        c.health_probe_interval = Duration::from_millis(50);
        c.engine_stats_interval = Duration::from_secs(3600);
    })
    .await;
    let c = client();
    assert_eq!(
        get(&c, &router.url(), "/health").await.status,
        StatusCode::OK
    );
    let st = router.state.clone();
    eventually("first scrape done", || {
        st.registry.all()[0].stats().scraped_at.is_some()
    })
    .await;
    let addr = sims[0].addr();
    for s in sims {
        s.shutdown().await;
    }
    // The first request finds the engine dead (connection refused): 502, and the engine is ejected.
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("x", 1, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_eq!(r.json()["error"]["code"], "bad_gateway");
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("x", 1, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["error"]["code"], "no_healthy_engine");
    assert_eq!(
        get(&c, &router.url(), "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Back on the same port: readmitted by the background probe.
    let back = switchyard::sim::start(instant_sim(), addr).await.unwrap();
    let st = router.state.clone();
    eventually("engine readmitted", || st.registry.any_healthy()).await;
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("x", 1, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(back.counters().completed, 1);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unreachable_engine_is_retried_elsewhere_and_killed_engine_costs_nothing() {
    let sims = start_sims(3, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    for i in 0..9 {
        let r = post_json(
            &c,
            &router.url(),
            "/v1/completions",
            completion(&format!("warm {i}"), 2, false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let mut sims = sims;
    let dead = sims.remove(0);
    dead.shutdown().await;
    let mut ok = 0;
    for i in 0..30 {
        let r = post_json(
            &c,
            &router.url(),
            "/v1/completions",
            completion(&format!("after {i}"), 2, false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "request {i} failed: {:?}", r.body);
        ok += 1;
    }
    assert_eq!(ok, 30);
    let served: u64 = sims.iter().map(|s| s.counters().completed).sum();
    assert!(served >= 30);
    let st = router.state.clone();
    assert_eq!(
        st.registry.all().iter().filter(|e| e.is_healthy()).count(),
        2,
        "the dead engine is ejected"
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_engine_request() {
    let sims = start_sims(
        1,
        SimConfig {
            itl_ms: 20.0,
            time_scale: 1.0,
            ..instant_sim()
        },
    )
    .await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    let resp = open(&c, completion_req(&router.url(), "long answer", 1000, true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(SAFETY, body.frame()).await.unwrap();
    assert!(first.is_some());
    drop(body);
    let sim = &sims[0];
    eventually("sim sees the request cancelled", || {
        sim.counters().cancelled == 1
    })
    .await;
    assert_eq!(sim.counters().completed, 0);
    let st = router.state.clone();
    eventually("router in-flight back to 0", || {
        st.registry.all()[0].in_flight() == 0
    })
    .await;
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn repeated_prompt_has_shorter_time_to_first_token() {
    // 2 ms per uncached token, 0.2 of real time: a 2,000-token prompt costs 0.8 s cold.
    let cfg = SimConfig {
        prefill_ms_per_token: 2.0,
        prefill_overhead_ms: 0.0,
        itl_ms: 1.0,
        time_scale: 0.2,
        ..SimConfig::default()
    };
    let sims = start_sims(1, cfg).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(180);
    let ttft = |s: &Streamed| s.frames[0].0.duration_since(s.sent_at);
    let cold = stream(&c, completion_req(&router.url(), &prompt, 2, true)).await;
    let warm = stream(&c, completion_req(&router.url(), &prompt, 2, true)).await;
    assert!(
        ttft(&warm) * 2 < ttft(&cold),
        "cold {:?} warm {:?}",
        ttft(&cold),
        ttft(&warm)
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn metrics_expose_requests_latency_in_flight_and_health() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("x", 1, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(get(&c, &router.url(), "/metrics").await.body.to_vec()).unwrap();
    let engine = sims[0].addr().to_string();
    for needle in [
        format!(
            "switchyard_requests_total{{model=\"{MODEL}\",engine=\"{engine}\",status=\"200\"}}"
        ),
        "switchyard_request_duration_seconds_bucket".to_string(),
        "switchyard_time_to_first_byte_seconds_bucket".to_string(),
        format!("switchyard_engine_in_flight{{engine=\"{engine}\"}}"),
        format!("switchyard_engine_healthy{{engine=\"{engine}\"}} 1"),
    ] {
        assert!(text.contains(&needle), "missing {needle} in\n{text}");
    }
    // A model nobody serves is not a label value (clients cannot mint series); a served one is.
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        serde_json::json!({"model": "no-such-model-4711", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        serde_json::json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let text = String::from_utf8(get(&c, &router.url(), "/metrics").await.body.to_vec()).unwrap();
    assert!(!text.contains("no-such-model-4711"), "{text}");
    assert!(
        text.contains("model=\"unknown\",engine=\"none\",status=\"404\""),
        "{text}"
    );
    assert!(
        text.contains("model=\"unknown\",engine=\"none\",status=\"400\""),
        "{text}"
    );
    router.shutdown(Duration::from_secs(1)).await;
}
