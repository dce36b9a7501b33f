//! Request dispatch: model endpoints are routed to engines; `/health`, `/v1/models`, `/metrics`
//! and `/admin/policies` are answered by the router itself.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::RouterBody;
use super::errors::ApiError;
use super::forward::{json_response, route_and_forward};
use super::{AppState, X_REQUEST_ID};

/// Handles one client request; never fails (errors become OpenAI-shaped JSON).
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<RouterBody> {
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .cloned()
        .unwrap_or_else(new_request_id);
    let path = req.uri().path();
    let method = req.method().clone();
    let mut resp = if is_routed(path) {
        if method == Method::POST {
            route_and_forward(&state, req, &request_id).await
        } else {
            ApiError::MethodNotAllowed(method.to_string(), path.to_owned()).into_response()
        }
    } else {
        match (method, path) {
            (Method::GET, "/health") => health(&state),
            (Method::GET, "/v1/models") => models(&state),
            (Method::GET, "/metrics") => prometheus(),
            (Method::GET, "/admin/policies") => json_response(
                StatusCode::OK,
                Bytes::from(state.policies.status_json().to_string()),
            ),
            (m, p @ ("/health" | "/v1/models" | "/metrics" | "/admin/policies")) => {
                ApiError::MethodNotAllowed(m.to_string(), p.to_owned()).into_response()
            }
            (_, p) => ApiError::RouteNotFound(p.to_owned()).into_response(),
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    resp
}

/// Paths forwarded to engines.
fn is_routed(path: &str) -> bool {
    (path.starts_with("/v1/") && path != "/v1/models")
        || path == "/tokenize"
        || path == "/detokenize"
}

/// 32 random hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let mut r = fastrand::u128(..);
    for b in buf.iter_mut() {
        *b = HEX[(r & 0xf) as usize];
        r >>= 4;
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn health(state: &AppState) -> Response<RouterBody> {
    let engines = state.registry.all();
    let healthy = engines.iter().filter(|e| e.is_healthy()).count();
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if healthy > 0 { "ok" } else { "no healthy engine" },
        "healthy_engines": healthy,
        "engines": engines.iter().map(|e| {
            let s = e.stats();
            serde_json::json!({
                "name": &*e.name, "url": &*e.url, "models": &e.models, "healthy": e.is_healthy(),
                "in_flight": e.in_flight(),
                "stats_age_seconds": s.scraped_at.map(|t| t.elapsed().as_secs_f64()),
                "stats_stale": s.stale, "stats_error": s.last_error,
            })
        }).collect::<Vec<_>>(),
    });
    json_response(status, Bytes::from(body.to_string()))
}

fn models(state: &AppState) -> Response<RouterBody> {
    let created = state.started_unix;
    let data: Vec<serde_json::Value> = state
        .registry
        .models()
        .into_iter()
        .map(|m| serde_json::json!({ "id": m, "object": "model", "created": created, "owned_by": "switchyard" }))
        .collect();
    json_response(
        StatusCode::OK,
        Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string()),
    )
}

fn prometheus() -> Response<RouterBody> {
    let text = match super::telemetry::prometheus() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::from("# metrics are exported by the embedding application's recorder\n"),
    };
    let mut r = Response::new(RouterBody::full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
