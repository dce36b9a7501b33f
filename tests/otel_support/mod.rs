//! An OTLP/HTTP trace receiver for the tests (a hyper server on loopback decoding each
//! `ExportTraceServiceRequest` with `opentelemetry-proto`), and a stub engine that records the
//! `traceparent` it receives.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

const LOOPBACK: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);
/// Safety net of every wait: nothing should come near it.
const SAFETY: Duration = Duration::from_secs(20);

/// One exported span with its resource's service name.
#[derive(Clone, Debug)]
pub struct Got {
    pub service: String,
    pub span: Span,
}

/// The receiver: every span of every export it took, and the paths and content types it saw.
#[derive(Clone)]
pub struct Collector {
    pub url: String,
    got: Arc<Mutex<Vec<Got>>>,
    pub posts: Arc<Mutex<Vec<(String, String)>>>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind(LOOPBACK).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let c = Collector {
            url: format!("http://{addr}"),
            got: Arc::default(),
            posts: Arc::default(),
        };
        let s = c.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.take(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        c
    }

    async fn take(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let ctype = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.posts.lock().unwrap().push((path, ctype));
        let body = req.into_body().collect().await.expect("body").to_bytes();
        let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf");
        let mut got = self.got.lock().unwrap();
        for rs in export.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        let mut resp = Response::new(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )));
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        resp
    }

    pub fn spans(&self) -> Vec<Span> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.span.clone())
            .collect()
    }

    pub fn services(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.service.clone())
            .collect()
    }

    /// Polls until `cond` holds on the spans received (safety net: 20 s); returns them.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + SAFETY;
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

pub fn str_attr<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match attr(s, key) {
        Some(Value::StringValue(v)) => Some(v),
        _ => None,
    }
}

pub fn int_attr(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key) {
        Some(Value::IntValue(v)) => Some(*v),
        _ => None,
    }
}

pub fn bool_attr(s: &Span, key: &str) -> Option<bool> {
    match attr(s, key) {
        Some(Value::BoolValue(v)) => Some(*v),
        _ => None,
    }
}

pub fn strs_attr(s: &Span, key: &str) -> Option<Vec<String>> {
    match attr(s, key) {
        Some(Value::ArrayValue(a)) => Some(
            a.values
                .iter()
                .filter_map(|v| match &v.value {
                    Some(Value::StringValue(x)) => Some(x.clone()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

pub fn is_kind(s: &Span, kind: SpanKind) -> bool {
    s.kind == kind as i32
}

pub fn is_server(s: &Span) -> bool {
    is_kind(s, SpanKind::Server)
}

pub fn is_client(s: &Span) -> bool {
    is_kind(s, SpanKind::Client)
}

/// The spans of one trace (by hex trace id).
pub fn of_trace(spans: &[Span], trace: &str) -> Vec<Span> {
    spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace)
        .cloned()
        .collect()
}

/// The `traceparent` and `tracestate` of one request.
pub type Headers = (Option<String>, Option<String>);

/// A stub engine: answers completions with a small JSON body (or `fail_first` 500s, counted
/// across every stub sharing the counter), and records the `traceparent` and `tracestate`
/// of each request.
#[derive(Clone)]
pub struct StubEngine {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Headers>>>,
}

impl StubEngine {
    pub async fn start(failures_left: Arc<AtomicUsize>) -> StubEngine {
        let listener = tokio::net::TcpListener::bind(LOOPBACK).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let e = StubEngine {
            url: format!("http://{addr}"),
            seen: Arc::default(),
        };
        let s = e.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (s, failures_left) = (s.clone(), Arc::clone(&failures_left));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, failures_left) = (s.clone(), Arc::clone(&failures_left));
                        async move { Ok::<_, Infallible>(s.answer(req, &failures_left).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        e
    }

    async fn answer(
        &self,
        req: Request<Incoming>,
        failures_left: &AtomicUsize,
    ) -> Response<Full<Bytes>> {
        if req.method() == http::Method::GET {
            return Response::new(Full::new(Bytes::new()));
        }
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.seen
            .lock()
            .unwrap()
            .push((header("traceparent"), header("tracestate")));
        let _ = req.into_body().collect().await;
        let fail = failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let mut resp = Response::new(Full::new(Bytes::from_static(if fail {
            br#"{"error":{"message":"boom"}}"#
        } else {
            br#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"hi","finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#
        })));
        if fail {
            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    pub fn traceparents(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    pub fn seen(&self) -> Vec<Headers> {
        self.seen.lock().unwrap().clone()
    }
}

/// Splits a traceparent `00-TRACE-PARENT-FLAGS`.
pub fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00", "{tp}");
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

/// The client's trace and parent span in the tests' `traceparent`.
pub const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const CLIENT_PARENT: &str = "00f067aa0ba902b7";

/// A completion request with `request_id`, and the client's `traceparent` (and a
/// `tracestate`) if given.
pub fn completion(traceparent: Option<&str>, request_id: &str, url: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", request_id);
    if let Some(tp) = traceparent {
        b = b
            .header("traceparent", tp)
            .header("tracestate", "vendor=abc");
    }
    let body = serde_json::json!({"model": super::common::MODEL, "prompt": "Hello there", "max_tokens": 4});
    b.body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}
