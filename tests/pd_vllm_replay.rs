//! The router's prefill/decode path against the bytes real vLLM 0.32.0 sent with NixlConnector
//! (`tests/fixtures/vllm-0.32.0/pd/`, see its README.md). Stub engines answer with the recorded
//! responses exactly (status, content type, body bytes; SSE one event per chunk, as vLLM sends
//! it); the client sends the recorded decode leg's body without its `kv_transfer_params`. The
//! router must then send the recorded prefill leg and the recorded decode leg (P's hand-off
//! verbatim), and the client must get the recorded decode answer without `kv_transfer_params`
//! and with P's `cached_tokens`.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use switchyard::proxy::RunningRouter;

/// The recordings' served model name.
const RECORDED_MODEL: &str = "tiny";

/// One recorded HTTP exchange.
#[derive(Clone, Debug)]
struct Recorded {
    engine: String,
    path: String,
    request_id: Option<String>,
    request: Value,
    response: Canned,
}

impl Recorded {
    fn is_p_leg(&self) -> bool {
        self.request["kv_transfer_params"]["do_remote_decode"] == Value::Bool(true)
    }
    fn is_d_leg(&self) -> bool {
        self.request["kv_transfer_params"]["do_remote_prefill"] == Value::Bool(true)
    }
    /// The client's body: the request without `kv_transfer_params`.
    fn client_body(&self) -> Value {
        let mut b = self.request.clone();
        if let Some(o) = b.as_object_mut() {
            o.remove("kv_transfer_params");
        }
        b
    }
}

/// A recorded response, as a stub engine sends it again.
#[derive(Clone, Debug)]
struct Canned {
    status: u16,
    content_type: String,
    body: String,
}

impl Canned {
    fn is_sse(&self) -> bool {
        self.content_type.starts_with("text/event-stream")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a recorded JSON answer")
    }
}

fn scenario(name: &str) -> Vec<Recorded> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vllm-0.32.0/pd")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(doc["vllm_version"], "0.32.0", "{name}");
    let s = |v: &Value| v.as_str().expect("a string").to_owned();
    doc["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .map(|x| {
            let (req, resp) = (&x["request"], &x["response"]);
            let body = req["body"].as_str().expect("request body");
            Recorded {
                engine: s(&x["engine"]),
                path: s(&req["path"]),
                request_id: req["headers"]["X-Request-Id"].as_str().map(str::to_owned),
                request: if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(body).expect("a JSON request")
                },
                response: Canned {
                    status: resp["status"].as_u64().expect("status") as u16,
                    content_type: resp["headers"]["content-type"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    body: s(&resp["body"]),
                },
            }
        })
        .collect()
}

/// The recorded P leg and D leg of a paired scenario.
fn legs(name: &str) -> (Recorded, Recorded) {
    let x = scenario(name);
    let p = x.iter().find(|e| e.engine == "P" && e.is_p_leg());
    let d = x.iter().find(|e| e.engine == "D" && e.is_d_leg());
    (
        p.unwrap_or_else(|| panic!("{name}: no P leg")).clone(),
        d.unwrap_or_else(|| panic!("{name}: no D leg")).clone(),
    )
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn sse_events(body: &str) -> Vec<String> {
    body.split_terminator("\n\n")
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// What the client must get for a decode answer: `kv_transfer_params` gone,
/// `usage.prompt_tokens_details.cached_tokens` set to `cached` where there is usage.
fn expected_client_json(mut v: Value, cached: Option<u64>) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("kv_transfer_params");
    }
    if let (Some(c), Some(d)) = (
        cached,
        v.pointer_mut("/usage/prompt_tokens_details")
            .and_then(Value::as_object_mut),
    ) {
        d.insert("cached_tokens".into(), c.into());
    }
    v
}

/// One request a stub engine received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    request_id: Option<String>,
    body: Value,
}

/// What a stub engine does with its next completion request.
enum Step {
    /// Answer with these recorded bytes.
    Answer(Canned),
    /// Stop `engine` (it answers nothing more, as a stopped process), then answer.
    StopThenAnswer(Stub, Canned),
}

type StubBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// An engine that replays recorded answers and records what it was sent. Unscripted requests
/// get a 599 that no recording has.
#[derive(Clone)]
struct Stub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Step>>>,
    gone: Arc<AtomicBool>,
}

impl Stub {
    async fn start() -> Stub {
        let listener = tokio::net::TcpListener::bind(loopback())
            .await
            .expect("bind");
        let stub = Stub {
            url: format!("http://{}", listener.local_addr().expect("addr")),
            seen: Arc::default(),
            script: Arc::default(),
            gone: Arc::default(),
        };
        let s = stub.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if s.gone.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { s.answer(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        stub
    }

    fn then(&self, step: Step) {
        self.script.lock().unwrap().push_back(step);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// From now on every request, on a new or an open connection, is dropped unanswered.
    fn stop(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    async fn answer(&self, req: Request<Incoming>) -> Result<Response<StubBody>, std::io::Error> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the engine is gone"));
        }
        if req.method() == http::Method::GET {
            return Ok(reply(&Canned {
                status: 200,
                content_type: "text/plain".into(),
                body: String::new(),
            }));
        }
        let path = req.uri().path().to_owned();
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = req.into_body().collect().await.expect("body").to_bytes();
        let body: Value = serde_json::from_slice(&bytes).expect("the router sends JSON");
        self.seen.lock().unwrap().push(Seen {
            path,
            request_id,
            body,
        });
        let step = self.script.lock().unwrap().pop_front();
        Ok(match step {
            Some(Step::Answer(c)) => reply(&c),
            Some(Step::StopThenAnswer(other, c)) => {
                other.stop();
                reply(&c)
            }
            None => reply(&Canned {
                status: 599,
                content_type: "application/json".into(),
                body: r#"{"error":"unscripted request"}"#.into(),
            }),
        })
    }
}

/// A recorded answer: its status, content type and body bytes (SSE one event per chunk).
fn reply(c: &Canned) -> Response<StubBody> {
    let frames: Vec<Bytes> = if c.is_sse() {
        c.body
            .split_inclusive("\n\n")
            .map(|e| Bytes::from(e.to_owned()))
            .collect()
    } else {
        vec![Bytes::from(c.body.clone())]
    };
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        frames.into_iter().map(|b| Ok(Frame::data(b))).collect();
    Response::builder()
        .status(c.status)
        .header("content-type", &c.content_type)
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("response")
}

/// Always a prefill leg (the shipped policy's `skip_prefill(256)` would skip these prompts of
/// 123 to 177 tokens); the first decode engine while there are several.
const ALWAYS_PREFILL: &str = r#"
handoff = "nixl"
[[decode.tier]]
script = "if engines.len() > 1 { engines[0] } else { () }"
[[decode.tier]]
builtin = "fallback"
[[prefill.tier]]
builtin = "least_loaded"
"#;

/// A policies directory with the shipped policies and `always_prefill`.
fn policies() -> tempfile::TempDir {
    shipped_policies_with("always_prefill", ALWAYS_PREFILL)
}

/// The router in front of `p` prefill and `d` decode stubs, serving the recordings' model.
async fn router(p: &[&Stub], d: &[&Stub], dir: &tempfile::TempDir) -> RunningRouter {
    let urls: Vec<String> = p.iter().chain(d).map(|s| s.url.clone()).collect();
    let n_prefill = p.len();
    start_router(&urls, |c| {
        for (i, b) in c.backends.iter_mut().enumerate() {
            b.models = vec![RECORDED_MODEL.into()];
            b.label = Some(
                if i < n_prefill {
                    "tiny-prefill"
                } else {
                    "tiny-decode"
                }
                .into(),
            );
        }
        c.prefill_labels = vec!["tiny-prefill".into()];
        c.decode_labels = vec!["tiny-decode".into()];
        c.policy.dir = dir.path().to_path_buf();
        c.policy.default_policy = "always_prefill".into();
        c.decision_headers = true;
    })
    .await
}

/// The client's answer: status, content type, stage header and body text.
struct Answer {
    status: StatusCode,
    content_type: String,
    stage: Option<String>,
    text: String,
}

/// Sends `body` to the router as the client did (same path, same `X-Request-Id`).
async fn ask(router: &RunningRouter, path: &str, request_id: &str, body: &Value) -> Answer {
    let req = Request::post(format!("{}{path}", router.url()))
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let streamed = body["stream"] == Value::Bool(true);
    let (status, headers, text) = if streamed {
        let s = stream(&client(), req).await;
        (s.status, s.headers.clone(), s.text())
    } else {
        let r = send(&client(), req).await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        (r.status, r.headers, text)
    };
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status,
        content_type: h("content-type").unwrap_or_default(),
        stage: h("x-switchyard-stage"),
        text,
    }
}

/// Checks that the client got `d_answer` as the router must pass it on: same status and
/// content type, no `kv_transfer_params`, `cached_tokens` = `cached` (SSE: event by event,
/// `[DONE]` last).
fn assert_client_got(what: &str, got: &Answer, d_answer: &Canned, cached: Option<u64>) {
    assert_eq!(got.status.as_u16(), d_answer.status, "{what}: {}", got.text);
    assert_eq!(got.content_type, d_answer.content_type, "{what}");
    assert!(
        !got.text.contains("kv_transfer_params"),
        "{what}: {}",
        got.text
    );
    if d_answer.is_sse() {
        let (events, want) = (sse_events(&got.text), sse_events(&d_answer.body));
        assert_eq!(events.len(), want.len(), "{what}: {}", got.text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{what}");
        for (i, (g, w)) in events.iter().zip(&want).enumerate() {
            if w == "[DONE]" {
                assert_eq!(g, w, "{what}: event {i}");
                continue;
            }
            let g: Value = serde_json::from_str(g).expect("a JSON event");
            let w = expected_client_json(serde_json::from_str(w).expect("JSON"), cached);
            assert_eq!(g, w, "{what}: event {i}");
        }
    } else {
        let g: Value = serde_json::from_str(&got.text).expect("a JSON answer");
        assert_eq!(g, expected_client_json(d_answer.json(), cached), "{what}");
    }
}

/// P's `usage.prompt_tokens_details.cached_tokens`.
fn p_cached_tokens(p_answer: &Canned) -> Option<u64> {
    p_answer
        .json()
        .pointer("/usage/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
}

/// A paired scenario through the router: the legs it sends are the recorded legs, and the
/// client gets the recorded decode answer as the router must pass it on.
async fn replay(name: &str) {
    let (p_rec, d_rec) = legs(name);
    let (p, d) = (Stub::start().await, Stub::start().await);
    p.then(Step::Answer(p_rec.response.clone()));
    d.then(Step::Answer(d_rec.response.clone()));
    let dir = policies();
    let router = router(&[&p], &[&d], &dir).await;
    let request_id = d_rec.request_id.clone().expect("a recorded X-Request-Id");
    assert_eq!(p_rec.request_id.as_deref(), Some(request_id.as_str()));

    let got = ask(&router, &d_rec.path, &request_id, &d_rec.client_body()).await;

    let (p_seen, d_seen) = (p.seen(), d.seen());
    assert_eq!(p_seen.len(), 1, "{name}: one prefill leg");
    assert_eq!(d_seen.len(), 1, "{name}: one decode leg");
    assert_eq!(p_seen[0].path, p_rec.path, "{name}");
    assert_eq!(p_seen[0].body, p_rec.request, "{name}: the prefill leg");
    assert_eq!(d_seen[0].path, d_rec.path, "{name}");
    assert_eq!(d_seen[0].body, d_rec.request, "{name}: the decode leg");
    assert_eq!(
        d_seen[0].body["kv_transfer_params"],
        p_rec.response.json()["kv_transfer_params"],
        "{name}: P's hand-off, verbatim"
    );
    for s in [&p_seen[0], &d_seen[0]] {
        assert_eq!(s.request_id.as_deref(), Some(request_id.as_str()), "{name}");
    }
    assert_eq!(got.stage.as_deref(), Some("disaggregated"), "{name}");
    let cached = p_cached_tokens(&p_rec.response);
    assert!(cached.is_some(), "{name}: P reports cached_tokens");
    assert_client_got(name, &got, &d_rec.response, cached);
}

#[tokio::test]
async fn a_completion_answered_as_json_goes_through_as_vllm_recorded_it() {
    replay("completions_json").await;
}

#[tokio::test]
async fn a_streamed_completion_with_min_tokens_goes_through_as_vllm_recorded_it() {
    replay("completions_sse").await;
}

#[tokio::test]
async fn a_chat_answered_as_json_goes_through_as_vllm_recorded_it() {
    replay("chat_json").await;
}

#[tokio::test]
async fn a_streamed_chat_with_max_completion_tokens_goes_through_as_vllm_recorded_it() {
    replay("chat_sse").await;
}

/// P answering `"kv_transfer_params": null` (a request it did not take as a hand-off): the
/// decode leg carries none, and the decode engine's own `cached_tokens` stand.
#[tokio::test]
async fn a_prefill_answer_without_a_hand_off_leaves_the_decode_engine_to_compute() {
    for rec in scenario("p_without_params") {
        let name = format!("p_without_params {}", rec.path);
        assert_eq!(
            rec.response.json()["kv_transfer_params"],
            Value::Null,
            "{name}"
        );
        let (p, d) = (Stub::start().await, Stub::start().await);
        // What P answered to this body; D, computing the prompt alone, answers the same.
        p.then(Step::Answer(rec.response.clone()));
        d.then(Step::Answer(rec.response.clone()));
        let dir = policies();
        let router = router(&[&p], &[&d], &dir).await;
        let request_id = rec.request_id.clone().expect("a recorded X-Request-Id");
        let got = ask(&router, &rec.path, &request_id, &rec.request).await;

        let (p_seen, d_seen) = (p.seen(), d.seen());
        assert_eq!((p_seen.len(), d_seen.len()), (1, 1), "{name}");
        assert_eq!(
            p_seen[0].body["kv_transfer_params"]["do_remote_decode"],
            Value::Bool(true),
            "{name}: a prefill leg was sent"
        );
        assert_eq!(
            d_seen[0].body, rec.request,
            "{name}: the client's body alone"
        );
        assert!(d_seen[0].body.get("kv_transfer_params").is_none(), "{name}");
        assert_eq!(d_seen[0].request_id.as_deref(), Some(request_id.as_str()));
        assert_client_got(&name, &got, &rec.response, None);
        assert_eq!(
            got.stage.as_deref(),
            Some("decode_only"),
            "{name}: no hand-off"
        );
    }
}

/// P answers, then is gone; D, given the hand-off, answers vLLM's 500 (it cannot read P's
/// blocks): the router tries the other decode engine with a fresh prefill leg, which finds P
/// gone, so D2 computes the prompt alone, and its answer is the client's. D's 500 never
/// reaches the client.
#[tokio::test]
async fn a_decode_engine_failing_on_a_gone_prefill_engine_is_replaced() {
    let x = scenario("p_gone");
    let p_rec = x.iter().find(|e| e.engine == "P").expect("P leg").clone();
    let d_rec = x
        .iter()
        .find(|e| e.engine == "D" && e.is_d_leg())
        .expect("D leg")
        .clone();
    let d2_rec = x.iter().find(|e| e.engine == "D2").expect("D2").clone();
    assert_eq!(d_rec.response.status, 500);
    let (p, d, d2) = (
        Stub::start().await,
        Stub::start().await,
        Stub::start().await,
    );
    p.then(Step::Answer(p_rec.response.clone()));
    d.then(Step::StopThenAnswer(p.clone(), d_rec.response.clone()));
    d2.then(Step::Answer(d2_rec.response.clone()));
    let dir = policies();
    let router = router(&[&p], &[&d, &d2], &dir).await;
    let request_id = d_rec.request_id.clone().expect("a recorded X-Request-Id");

    let got = ask(&router, &d_rec.path, &request_id, &d_rec.client_body()).await;

    assert_eq!(p.seen().len(), 1, "P answered once, then was gone");
    let d_seen = d.seen();
    assert_eq!(d_seen.len(), 1);
    assert_eq!(d_seen[0].body, d_rec.request, "the recorded decode leg");
    let d2_seen = d2.seen();
    assert_eq!(d2_seen.len(), 1, "the other decode engine");
    assert_eq!(
        d2_seen[0].body,
        d_rec.client_body(),
        "no hand-off: the client's body alone"
    );
    assert_eq!(d2_seen[0].request_id.as_deref(), Some(request_id.as_str()));
    assert_eq!(got.stage.as_deref(), Some("decode_only"));
    assert!(!got.text.contains("Internal server error"), "{}", got.text);
    assert_client_got("p_gone", &got, &d2_rec.response, None);
}
