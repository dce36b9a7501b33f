//! An engine stand-in for the router's queue: it holds every completion until the test lets
//! it answer, and its `/metrics` report the queue the test set (vLLM's gauges).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{MODEL, loopback};

/// An engine that holds every completion until the test releases it, and whose `/metrics`
/// report `running` and `waiting` as set at start.
#[derive(Clone)]
pub struct GateEngine {
    pub url: String,
    /// The prompts received, in arrival order.
    arrived: Arc<Mutex<Vec<String>>>,
    /// The held requests, oldest first: sending on one answers it.
    held: Arc<Mutex<VecDeque<oneshot::Sender<()>>>>,
}

impl GateEngine {
    pub async fn start(running: u32, waiting: u32) -> GateEngine {
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

    pub fn arrived(&self) -> Vec<String> {
        self.arrived.lock().unwrap().clone()
    }

    /// Answers the oldest held request; whether there was one.
    pub fn release_one(&self) -> bool {
        match self.held.lock().unwrap().pop_front() {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }
}
