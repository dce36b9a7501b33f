//! Prefill/decode disaggregation against hand-written engines that check every rule of vLLM's
//! NixlConnector protocol (vLLM's `toy_proxy_server.py`): what the prefill leg carries, that
//! the prefill answer's `kv_transfer_params` reach the decode engine verbatim, that the
//! client's answer never shows them and carries the prefill engine's `cached_tokens`, and what
//! happens when a prefill or decode engine fails.

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

/// What a stub engine does with the next completion request.
#[derive(Clone, Debug)]
enum Act {
    /// A prefill engine's answer with this hand-off and cached-token figure.
    Prefill { params: Value, cached: u64 },
    /// A decode engine's answer (SSE if the request streams).
    Decode,
    /// This status and body.
    Status(u16, &'static str),
    /// Never answers.
    Hang,
}

/// One request a stub engine received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    request_id: Option<String>,
    authorization: Option<String>,
    body: Value,
}

#[derive(Clone)]
struct Stub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Scripted acts, then `default` forever.
    script: Arc<Mutex<VecDeque<Act>>>,
    default: Act,
}

impl Stub {
    async fn start(default: Act) -> Stub {
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let stub = Stub {
            url: format!("http://{addr}"),
            seen: Arc::default(),
            script: Arc::default(),
            default,
        };
        let s = stub.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        stub
    }

    fn then(&self, act: Act) {
        self.script.lock().unwrap().push_back(act);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if req.method() == http::Method::GET {
            return Response::new(Full::new(Bytes::new()));
        }
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (request_id, authorization) = (header("x-request-id"), header("authorization"));
        let body: Value =
            serde_json::from_slice(&req.into_body().collect().await.expect("body").to_bytes())
                .expect("the router sends JSON");
        self.seen.lock().unwrap().push(Seen {
            path,
            request_id,
            authorization,
            body: body.clone(),
        });
        let act = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.default.clone());
        let json_response = |status: u16, text: String| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(text)))
                .expect("response")
        };
        match act {
            Act::Hang => std::future::pending().await,
            Act::Status(code, text) => json_response(code, text.to_owned()),
            Act::Prefill { params, cached } => json_response(
                200,
                json!({"id": "cmpl-p", "object": "text_completion", "model": MODEL,
                    "choices": [{"index": 0, "text": " a", "logprobs": null, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 600, "completion_tokens": 1, "total_tokens": 601,
                        "prompt_tokens_details": {"cached_tokens": cached}},
                    "kv_transfer_params": params})
                .to_string(),
            ),
            Act::Decode if body["stream"] == json!(true) => {
                let events = [
                    json!({"id": "cmpl-d", "choices": [{"index": 0, "text": " b", "finish_reason": null}]}),
                    json!({"id": "cmpl-d", "choices": [{"index": 0, "text": " c", "finish_reason": "length"}],
                        "kv_transfer_params": null}),
                    json!({"id": "cmpl-d", "choices": [], "usage": {"prompt_tokens": 600,
                        "completion_tokens": 2, "total_tokens": 602,
                        "prompt_tokens_details": {"cached_tokens": 598}}}),
                ];
                let mut sse: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
                sse.push_str("data: [DONE]\n\n");
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Full::new(Bytes::from(sse)))
                    .expect("response")
            }
            Act::Decode => json_response(
                200,
                json!({"id": "cmpl-d", "object": "text_completion", "model": MODEL,
                    "choices": [{"index": 0, "text": " b c", "logprobs": null, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 600, "completion_tokens": 2, "total_tokens": 602,
                        "prompt_tokens_details": {"cached_tokens": 598}},
                    "kv_transfer_params": null})
                .to_string(),
            ),
        }
    }
}

fn handoff(n: u64) -> Value {
    json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [[n, n + 1, n + 2]], "remote_engine_id": format!("engine-{n}"),
        "remote_request_id": format!("cmpl-{n}"), "remote_host": "10.0.0.1", "remote_port": 5600,
        "tp_size": 1, "remote_num_tokens": 600, "transfer_mode": "pull"})
}

/// A cluster of `p` prefill and `d` decode stubs behind the router, with the shipped
/// `disaggregated_prefill_orchestrated` policy (or `policy`).
struct Cluster {
    p: Vec<Stub>,
    d: Vec<Stub>,
    router: RunningRouter,
}

/// A policy that tries the first candidate of each pool while there are several (so that the
/// first engine is the one a test makes fail), else the least loaded.
const FIRST_FIRST: &str = r#"
handoff = "nixl"
[[decode.tier]]
script = "if engines.len() > 1 { engines[0] } else { () }"
[[decode.tier]]
builtin = "fallback"
[[prefill.tier]]
script = "if engines.len() > 1 { engines[0] } else { () }"
[[prefill.tier]]
builtin = "fallback"
"#;

/// A policies directory with the shipped policies and `first_first`.
fn policies_with_first_first() -> tempfile::TempDir {
    shipped_policies_with("first_first", FIRST_FIRST)
}

/// A URL where nothing listens.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind(loopback())
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    drop(l);
    url
}

async fn cluster(p: usize, d: usize, tweak: impl FnOnce(&mut RouterConfig)) -> Cluster {
    cluster_with(p, d, Vec::new(), tweak).await
}

async fn cluster_with(
    p: usize,
    d: usize,
    dead_prefill: Vec<String>,
    tweak: impl FnOnce(&mut RouterConfig),
) -> Cluster {
    let mut ps = Vec::new();
    for i in 0..p {
        ps.push(
            Stub::start(Act::Prefill {
                params: handoff(100 * (i as u64 + 1)),
                cached: 32,
            })
            .await,
        );
    }
    let mut ds = Vec::new();
    for _ in 0..d {
        ds.push(Stub::start(Act::Decode).await);
    }
    let prefill_urls: Vec<String> = dead_prefill
        .iter()
        .cloned()
        .chain(ps.iter().map(|s| s.url.clone()))
        .collect();
    let n_prefill = prefill_urls.len();
    let urls: Vec<String> = prefill_urls
        .into_iter()
        .chain(ds.iter().map(|s| s.url.clone()))
        .collect();
    let router = start_router(&urls, |c| {
        for (i, b) in c.backends.iter_mut().enumerate() {
            b.label = Some(
                if i < n_prefill {
                    "llama-prefill"
                } else {
                    "llama-decode"
                }
                .into(),
            );
        }
        c.prefill_labels = vec!["llama-prefill".into()];
        c.decode_labels = vec!["llama-decode".into()];
        c.policy.default_policy = "disaggregated_prefill_orchestrated".into();
        c.decision_headers = true;
        // Generous: a busy test machine must not make a script tier pass.
        c.policy.script_time_budget = Duration::from_secs(2);
        tweak(c);
    })
    .await;
    Cluster {
        p: ps,
        d: ds,
        router,
    }
}

/// A prompt long enough (about 600 stand-in tokens) that the shipped policy's decider wants
/// a prefill leg.
fn long_prompt(tag: &str) -> String {
    format!("{tag} {}", "lorem ipsum dolor sit amet ".repeat(90))
}

fn request(path: &str, body: Value) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .header("x-request-id", "req-42")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

fn total_seen(stubs: &[Stub]) -> usize {
    stubs.iter().map(|s| s.seen().len()).sum()
}

#[tokio::test]
async fn the_prefill_leg_and_the_decode_leg_follow_vllms_protocol() {
    let c = cluster(1, 1, |_| {}).await;
    let client = client();
    let url = c.router.url();
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": long_prompt("a"), "stream": true,
                "stream_options": {"include_usage": true}, "max_tokens": 50, "min_tokens": 5,
                "temperature": 0.3, "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "evil"}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt("b")}],
                "stream": false, "max_completion_tokens": 50, "min_completion_tokens": 2}),
        ),
    ] {
        let before = (c.p[0].seen().len(), c.d[0].seen().len());
        let mut req = request(path, body.clone());
        *req.uri_mut() = format!("{url}{path}").parse().expect("uri");
        let streamed = body["stream"] == json!(true);
        let (status, headers, text) = if streamed {
            let s = stream(&client, req).await;
            (s.status, s.headers.clone(), s.text())
        } else {
            let r = send(&client, req).await;
            (
                r.status,
                r.headers.clone(),
                String::from_utf8_lossy(&r.body).into_owned(),
            )
        };
        assert_eq!(status, StatusCode::OK, "{text}");
        let p_seen = c.p[0].seen()[before.0].clone();
        let d_seen = c.d[0].seen()[before.1].clone();
        // Rule 1: the prefill leg.
        assert_eq!(p_seen.path, path);
        let mut want_p = body.as_object().expect("object").clone();
        for k in ["stream_options", "min_tokens", "min_completion_tokens"] {
            want_p.remove(k);
        }
        want_p.insert("stream".into(), json!(false));
        want_p.insert("max_tokens".into(), json!(1));
        if body.get("max_completion_tokens").is_some() {
            want_p.insert("max_completion_tokens".into(), json!(1));
        }
        want_p.insert(
            "kv_transfer_params".into(),
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        );
        assert_eq!(
            p_seen.body,
            Value::Object(want_p),
            "{path}: the prefill leg"
        );
        // The same request id and Authorization on both legs.
        assert_eq!(p_seen.request_id.as_deref(), Some("req-42"));
        assert_eq!(d_seen.request_id.as_deref(), Some("req-42"));
        assert_eq!(p_seen.authorization.as_deref(), Some("Bearer sk-test"));
        assert_eq!(d_seen.authorization.as_deref(), Some("Bearer sk-test"));
        // Rules 2 and 3: the decode leg is the client's body with the prefill answer's
        // kv_transfer_params verbatim (the client's own never reaches an engine).
        assert_eq!(d_seen.path, path);
        let mut want_d = body.as_object().expect("object").clone();
        want_d.insert("kv_transfer_params".into(), handoff(100));
        assert_eq!(d_seen.body, Value::Object(want_d), "{path}: the decode leg");
        // Rule 4 and no leak: the client's answer has no kv_transfer_params and the prefill
        // engine's cached_tokens.
        assert!(!text.contains("kv_transfer_params"), "{text}");
        assert!(text.contains("\"cached_tokens\":32"), "{text}");
        assert!(!text.contains("598"), "{text}");
        assert!(text.contains(" b"), "{text}");
        if streamed {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(h("x-switchyard-stage").as_deref(), Some("disaggregated"));
        assert_eq!(
            h("x-switchyard-engine"),
            c.d[0].url.strip_prefix("http://").map(str::to_owned)
        );
        assert_eq!(
            h("x-switchyard-prefill-engine"),
            c.p[0].url.strip_prefix("http://").map(str::to_owned)
        );
        assert_eq!(
            h("x-switchyard-policy").as_deref(),
            Some("disaggregated_prefill_orchestrated")
        );
        assert_eq!(
            h("x-switchyard-prefill-tier").as_deref(),
            Some("least_loaded")
        );
        assert_eq!(h("content-length"), None);
    }
}

#[tokio::test]
async fn several_choices_and_other_endpoints_have_no_prefill_leg() {
    let c = cluster(1, 1, |_| {}).await;
    let client = client();
    let url = c.router.url();
    let body = json!({"model": MODEL, "prompt": long_prompt("n"), "n": 2, "max_tokens": 3});
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        c.p[0].seen().len(),
        0,
        "a hand-off can be consumed once: no prefill leg for n > 1"
    );
    assert_eq!(c.d[0].seen().len(), 1);
    assert!(c.d[0].seen()[0].body.get("kv_transfer_params").is_none());
    let r = send(
        &client,
        post(
            &url,
            "/v1/embeddings",
            json!({"model": MODEL, "input": "x"}).to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(c.p[0].seen().len(), 0);
}

#[tokio::test]
async fn a_failing_prefill_engine_is_replaced_then_the_decode_engine_computes_alone() {
    let dir = policies_with_first_first();
    let c = cluster(2, 1, |c| {
        c.policy.dir = dir.path().to_path_buf();
        c.policy.default_policy = "first_first".into();
        // One engine below hangs: this is how long it is waited for.
        c.prefill_timeout = Duration::from_millis(1500);
    })
    .await;
    let client = client();
    let url = c.router.url();
    // Both prefill engines fail, each in its own way: 503, then no answer within the timeout.
    c.p[0].then(Act::Status(503, r#"{"error":"overloaded"}"#));
    c.p[1].then(Act::Status(503, r#"{"error":"overloaded"}"#));
    let body = json!({"model": MODEL, "prompt": long_prompt("f"), "max_tokens": 2});
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(total_seen(&c.p), 2, "another prefill engine was tried");
    let d = c.d[0].seen();
    assert_eq!(d.len(), 1);
    assert!(
        d[0].body.get("kv_transfer_params").is_none(),
        "the decode engine computes the prompt"
    );
    assert_eq!(r.header("x-switchyard-stage"), Some("decode_only"));
    assert!(!String::from_utf8_lossy(&r.body).contains("kv_transfer_params"));

    // The first hangs past --prefill-timeout, the second answers: the hand-off is the second's.
    c.p[0].then(Act::Hang);
    c.p[1].then(Act::Prefill {
        params: handoff(7),
        cached: 5,
    });
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((c.p[0].seen().len(), c.p[1].seen().len()), (2, 2));
    assert_eq!(
        c.d[0].seen().last().expect("decode leg").body["kv_transfer_params"],
        handoff(7)
    );
    assert_eq!(r.header("x-switchyard-stage"), Some("disaggregated"));
    assert!(String::from_utf8_lossy(&r.body).contains("\"cached_tokens\":5"));
}

#[tokio::test]
async fn a_prefill_engines_client_error_is_the_clients() {
    let c = cluster(1, 1, |_| {}).await;
    c.p[0].then(Act::Status(
        400,
        r#"{"error":{"message":"bad temperature","type":"BadRequestError"}}"#,
    ));
    let body =
        json!({"model": MODEL, "prompt": long_prompt("e"), "max_tokens": 2, "temperature": -1});
    let r = send(
        &client(),
        post(&c.router.url(), "/v1/completions", body.to_string()),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["message"], "bad temperature");
    assert_eq!(c.d[0].seen().len(), 0, "the decode engine is not asked");
}

#[tokio::test]
async fn a_failing_decode_engine_is_replaced_with_a_fresh_prefill_leg() {
    let dir = policies_with_first_first();
    let c = cluster(1, 2, |c| {
        c.policy.dir = dir.path().to_path_buf();
        c.policy.default_policy = "first_first".into();
    })
    .await;
    c.d[0].then(Act::Status(503, r#"{"error":"down"}"#));
    c.p[0].then(Act::Prefill {
        params: handoff(1),
        cached: 0,
    });
    c.p[0].then(Act::Prefill {
        params: handoff(2),
        cached: 0,
    });
    let body = json!({"model": MODEL, "prompt": long_prompt("d"), "max_tokens": 2, "stream": true});
    let s = stream(
        &client(),
        post(&c.router.url(), "/v1/completions", body.to_string()),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.text().contains(" b") && !s.text().contains("kv_transfer_params"));
    assert_eq!(
        c.p[0].seen().len(),
        2,
        "a fresh prefill leg for the second decode engine"
    );
    assert_eq!(c.d[0].seen()[0].body["kv_transfer_params"], handoff(1));
    assert_eq!(
        c.d[1].seen()[0].body["kv_transfer_params"],
        handoff(2),
        "never a consumed hand-off"
    );

    // Both decode engines failing: the last one's error is the answer.
    c.d[0].then(Act::Status(503, r#"{"error":"down"}"#));
    c.d[1].then(Act::Status(503, r#"{"error":"still down"}"#));
    let r = send(
        &client(),
        post(&c.router.url(), "/v1/completions", body.to_string()),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "still down");
}

#[tokio::test]
async fn the_decider_skips_prefill_when_the_decode_engine_holds_the_prompt() {
    let c = cluster(1, 1, |_| {}).await;
    let client = client();
    let url = c.router.url();
    let body = json!({"model": MODEL, "prompt": long_prompt("s"), "max_tokens": 2});
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.header("x-switchyard-stage"), Some("disaggregated"));
    // The same prompt again: the decode engine now holds it (the router's index), fewer than
    // 256 tokens are uncached there, so no prefill leg.
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-switchyard-stage"), Some("decode_only"));
    assert_eq!(c.p[0].seen().len(), 1);
    assert_eq!(c.d[0].seen().len(), 2);
    // A short prompt never was worth a prefill leg.
    let short = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 2});
    let r = send(&client, post(&url, "/v1/completions", short.to_string())).await;
    assert_eq!(r.header("x-switchyard-stage"), Some("decode_only"));
    assert_eq!(c.p[0].seen().len(), 1);
}

#[tokio::test]
async fn an_unreachable_prefill_engine_leaves_the_decode_engine_to_compute_alone() {
    let c = cluster_with(0, 1, vec![dead_url().await], |c| c.max_attempts = 3).await;
    let client = client();
    let url = c.router.url();
    let body = json!({"model": MODEL, "prompt": long_prompt("u"), "max_tokens": 2});
    let r = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-switchyard-stage"), Some("decode_only"));
    assert!(c.d[0].seen()[0].body.get("kv_transfer_params").is_none());
    let m = send(
        &client,
        Request::get(format!("{url}/metrics"))
            .body(Full::new(Bytes::new()))
            .expect("get"),
    )
    .await;
    let metrics = String::from_utf8_lossy(&m.body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_pd_requests_total{")
                && l.contains("outcome=\"decode_only_prefill_failed\"")
                && l.rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_some_and(|n| n >= 1.0)),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_prefill_engine_that_computed_a_prompt_is_found_by_kv_lookup() {
    let dir = policies_with_first_first();
    std::fs::write(
        dir.path().join("pd_kv.toml"),
        "[[decode.tier]]\nbuiltin = \"fallback\"\n[[prefill.tier]]\nscript = \"kv_lookup() ?? least_loaded()\"\n",
    )
    .expect("write");
    let c = cluster(2, 1, |c| {
        c.policy.dir = dir.path().to_path_buf();
        c.policy.default_policy = "pd_kv".into();
    })
    .await;
    let client = client();
    let url = c.router.url();
    let body = json!({"model": MODEL, "prompt": long_prompt("k"), "max_tokens": 2});
    let first = send(&client, post(&url, "/v1/completions", body.to_string())).await;
    let p1 = first
        .header("x-switchyard-prefill-engine")
        .expect("prefill engine")
        .to_owned();
    assert_eq!(
        first.header("x-switchyard-prefill-tier"),
        Some("least_loaded")
    );
    for _ in 0..3 {
        let again = send(&client, post(&url, "/v1/completions", body.to_string())).await;
        assert_eq!(
            again.header("x-switchyard-prefill-engine"),
            Some(p1.as_str())
        );
        assert_eq!(again.header("x-switchyard-prefill-tier"), Some("kv_lookup"));
    }
}

#[tokio::test]
async fn a_disaggregated_policy_without_decode_engines_is_refused_at_start() {
    let stub = Stub::start(Act::Decode).await;
    let mut cfg = RouterConfig::for_backends(std::slice::from_ref(&stub.url), MODEL);
    cfg.policy.dir = shipped_policies();
    cfg.policy.default_policy = "disaggregated_prefill_orchestrated".into();
    let err = switchyard::proxy::start(cfg, None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.starts_with("model `switchyard-sim` is routed by `disaggregated_prefill_orchestrated`, a disaggregated policy, but no static backend"),
        "{err}"
    );
}
