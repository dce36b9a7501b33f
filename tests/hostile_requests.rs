//! Hostile requests: bodies shaped to amplify memory, forged headers, dot-segment paths, names
//! long enough to flood logs, and unauthenticated admin calls. Each runs against the real router
//! in front of engines on loopback.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use switchyard::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An engine that reads each request body frame by frame (holding none of it), and answers with
/// the request headers it got as JSON plus a forged `x-switchyard-engine` header.
async fn echo_engine() -> String {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let (parts, mut body) = req.into_parts();
                    let mut len = 0usize;
                    while let Some(Ok(f)) = body.frame().await {
                        len += f.data_ref().map_or(0, Bytes::len);
                    }
                    let mut h: serde_json::Map<String, serde_json::Value> = parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                        .collect();
                    h.insert("body-bytes".into(), json!(len));
                    h.insert("path".into(), json!(parts.uri.path()));
                    let mut r = Response::new(Full::new(Bytes::from(
                        serde_json::Value::Object(h).to_string(),
                    )));
                    r.headers_mut()
                        .insert("x-switchyard-engine", "forged".parse().unwrap());
                    r.headers_mut()
                        .insert("x-switchyard-tier", "forged".parse().unwrap());
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Sends raw bytes and returns the raw answer (the connection is closed by the request).
async fn raw(url: &str, request: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(SAFETY, s.read_to_end(&mut out))
        .await
        .expect("answer within the safety net")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// `{"model":M,"messages":[{},{},…]}` of about `bytes` bytes: the cheapest JSON per element.
fn tiny_element_body(bytes: usize) -> Bytes {
    let head = format!(r#"{{"model":"{MODEL}","messages":["#);
    let n = (bytes - head.len() - 2) / 3;
    let mut b = Vec::with_capacity(bytes);
    b.extend_from_slice(head.as_bytes());
    for i in 0..n {
        b.extend_from_slice(if i == 0 { b"{}" } else { b",{}" });
    }
    b.extend_from_slice(b"]}");
    Bytes::from(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_tiny_elements_costs_at_most_three_times_its_size() {
    const BODY: usize = 32 * 1024 * 1024 - 1024;
    let engine = echo_engine().await;
    let router = RouterProcess::spawn(&["--static-backends", &engine, "--static-models", MODEL]);
    let c = client();
    // Warm up: the first request sets up pools and lazy statics.
    let r = post_json(
        &c,
        &router.url,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": []}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let before = router.status_kib("VmHWM");
    let body = tiny_element_body(BODY);
    let r = send(&c, post(&router.url, "/v1/chat/completions", body.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.json()["body-bytes"],
        body.len(),
        "the whole body was forwarded"
    );
    let grown_kib = router.status_kib("VmHWM").saturating_sub(before);
    println!(
        "32 MiB body of {{}} elements: router peak RSS grew by {:.1} MiB (from {:.1} MiB)",
        grown_kib as f64 / 1024.0,
        before as f64 / 1024.0
    );
    assert!(
        grown_kib * 1024 <= 3 * body.len() as u64,
        "peak RSS grew by {grown_kib} KiB for a {} byte body",
        body.len()
    );

    // Four at once, while /health is polled: the parse runs off the runtime's workers. (8 MiB
    // each keeps a debug build on a busy 2-core machine quick; any body over 256 KiB is parsed
    // off the workers. The release figures for 32 MiB are in the README.)
    let body = tiny_element_body(8 * 1024 * 1024);
    let sent = Instant::now();
    let mut big = Vec::new();
    for _ in 0..4 {
        let (c, url, body) = (c.clone(), router.url.clone(), body.clone());
        big.push(tokio::spawn(async move {
            send(&c, post(&url, "/v1/chat/completions", body))
                .await
                .status
        }));
    }
    let mut worst = Duration::ZERO;
    let mut polls = 0;
    while big.iter().any(|h| !h.is_finished()) {
        let t = Instant::now();
        let h = get(&c, &router.url, "/health").await;
        assert_eq!(h.status, StatusCode::OK);
        worst = worst.max(t.elapsed());
        polls += 1;
    }
    for h in big {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    println!(
        "four 8 MiB bodies in {:?}: /health answered {polls} times, slowest {:?}; router peak RSS {:.1} MiB",
        sent.elapsed(),
        worst,
        router.status_kib("VmHWM") as f64 / 1024.0
    );
    // A safety net far above the target (50 ms), far below the 1.6 s stall this test guards against.
    assert!(
        worst < Duration::from_millis(1000),
        "/health stalled {worst:?}"
    );
}

#[tokio::test]
async fn forwarded_headers_are_appended_and_engine_router_headers_stripped() {
    let engine = echo_engine().await;
    let router = start_router(std::slice::from_ref(&engine), |c| c.decision_headers = true).await;
    let c = client();
    let req = Request::post(format!("{}/v1/completions", router.url()))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .body(Full::new(Bytes::from(
            completion("hi", 1, false).to_string(),
        )))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = r.json();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    // The engine's forged decision headers are gone; the router's own are there.
    let engine_name = engine.trim_start_matches("http://");
    assert_eq!(r.header("x-switchyard-engine"), Some(engine_name));
    assert_ne!(r.header("x-switchyard-tier"), Some("forged"));
    router.shutdown(Duration::from_secs(1)).await;

    // Without decision headers, none at all reach the client.
    let router = start_router(std::slice::from_ref(&engine), |_| {}).await;
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        completion("hi", 1, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["x-forwarded-for"], "127.0.0.1");
    assert!(
        r.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-switchyard-")),
        "{:?}",
        r.headers
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn dot_segment_paths_are_refused_not_forwarded() {
    let engine = echo_engine().await;
    let router = start_router(std::slice::from_ref(&engine), |_| {}).await;
    let body = completion("hi", 1, false).to_string();
    for path in [
        "/v1/../admin/policies",
        "/v1/%2e%2e/metrics",
        "/v1/%2E%2e/%2e%2e/health",
        "/v1/./completions",
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = raw(&router.url(), &req).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains(r#""code":"invalid_request""#),
            "{path}: {answer}"
        );
        assert!(
            !answer.contains("body-bytes"),
            "{path} reached the engine: {answer}"
        );
    }
    // A normal path still goes through.
    let answer = raw(
        &router.url(),
        &format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_huge_model_name_is_cut_in_the_error() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    let name = "m".repeat(100_000);
    let r = post_json(
        &c,
        &router.url(),
        "/v1/completions",
        json!({"model": name, "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let v = r.json();
    assert_eq!(v["error"]["code"], "model_not_found");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.len() < 400, "{} bytes echoed", msg.len());
    assert!(msg.contains(&"m".repeat(256)));
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn admin_needs_the_bearer_token_when_one_is_set() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| c.admin_token = Some("s3cret".into())).await;
    let c = client();
    let url = router.url();
    let admin = |auth: Option<&str>| {
        let mut b = Request::get(format!("{url}/admin/policies"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    let r = send(&c, admin(None)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = send(&c, admin(Some("Bearer wrong"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&c, admin(Some("Bearer s3cret"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["policies"].is_array() || r.json().is_object());
    // Everything else is unaffected.
    assert_eq!(get(&c, &url, "/health").await.status, StatusCode::OK);
    let r = post_json(&c, &url, "/v1/completions", completion("hi", 1, false)).await;
    assert_eq!(r.status, StatusCode::OK);
    router.shutdown(Duration::from_secs(1)).await;

    // Without a token, /admin is open (loopback).
    let router = start_router(&urls(&sims), |_| {}).await;
    assert_eq!(
        get(&c, &router.url(), "/admin/policies").await.status,
        StatusCode::OK
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn models_carry_the_engines_cards_and_retrieve_by_id() {
    let sim = switchyard::sim::start(
        SimConfig {
            model: "org/model-a".into(),
            ..instant_sim()
        },
        loopback(),
    )
    .await
    .unwrap();
    let mut cfg = switchyard::config::RouterConfig::for_backends(&[sim.url()], "org/model-a");
    cfg.policy.dir = shipped_policies();
    let router = switchyard::proxy::start(cfg, None).await.unwrap();
    let c = client();
    let url = router.url();
    let list = get(&c, &url, "/v1/models").await.json();
    assert_eq!(list["data"][0]["id"], "org/model-a");
    assert_eq!(
        list["data"][0]["owned_by"], "vllm",
        "the engine's value: {list}"
    );
    // models.retrieve(): the id as is, or with its slash percent-encoded.
    for path in ["/v1/models/org/model-a", "/v1/models/org%2Fmodel-a"] {
        let r = get(&c, &url, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        let v = r.json();
        assert_eq!(v["id"], "org/model-a");
        assert_eq!(v["object"], "model");
        assert_eq!(v["owned_by"], "vllm");
    }
    let r = get(&c, &url, "/v1/models/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    router.shutdown(Duration::from_secs(1)).await;
}
