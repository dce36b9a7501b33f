//! Request dispatch: model endpoints are routed to engines; `/health`, `/v1/models`, `/metrics`
//! and `/admin/policies` are answered by the router itself.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::RouterBody;
use percent_encoding::percent_decode_str;

use super::errors::{ApiError, clip};
use super::forward::{json_response, route_and_forward};
use super::headers::ClientAddr;
use super::{AppState, X_REQUEST_ID};

/// Handles one client request; never fails (errors become OpenAI-shaped JSON).
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    client: &ClientAddr,
) -> Response<RouterBody> {
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .cloned()
        .unwrap_or_else(new_request_id);
    let path = req.uri().path();
    let method = req.method().clone();
    let mut resp = if has_dot_segment(path) {
        ApiError::BadRequest(format!(
            "path {} has a `.` or `..` segment (plain or percent-encoded)",
            clip(path)
        ))
        .into_response()
    } else if let Some(id) = path.strip_prefix("/v1/models/") {
        if method == Method::GET {
            model(&state, id).await
        } else {
            ApiError::MethodNotAllowed(method.to_string(), clip(path)).into_response()
        }
    } else if is_routed(path) {
        if method == Method::POST {
            route_and_forward(&state, req, &request_id, client).await
        } else {
            ApiError::MethodNotAllowed(method.to_string(), clip(path)).into_response()
        }
    } else if path.starts_with("/admin/")
        && let Err(e) = admin_authorized(&state, req.headers())
    {
        e.into_response()
    } else {
        match (method, path) {
            (Method::GET, "/health") => health(&state),
            (Method::GET, "/v1/models") => models(&state).await,
            (Method::GET, "/metrics") => prometheus(),
            (Method::GET, "/admin/policies") => json_response(
                StatusCode::OK,
                Bytes::from(state.policies.status_json().to_string()),
            ),
            (m, p @ ("/health" | "/v1/models" | "/metrics" | "/admin/policies")) => {
                ApiError::MethodNotAllowed(m.to_string(), p.to_owned()).into_response()
            }
            (_, p) => ApiError::RouteNotFound(clip(p)).into_response(),
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

/// Whether a segment of `path` is `.` or `..`, plain or percent-encoded (`%2e`): engines or
/// proxies behind them may normalise such paths into other endpoints, so they are refused.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg.starts_with(['.', '%'])
            && matches!(&*percent_decode_str(seg).decode_utf8_lossy(), "." | "..")
    })
}

/// `/admin/*` needs `Authorization: Bearer <admin token>` when a token is configured.
fn admin_authorized(state: &AppState, headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.cfg.admin_token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(g) if constant_time_eq::constant_time_eq(g, token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("invalid admin token")),
        None => Err(ApiError::Unauthorized(
            "/admin/* requires an Authorization: Bearer <admin token> header",
        )),
    }
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
    // Shutting down: not ready, whatever the engines, so load balancers stop sending requests.
    let draining = state.draining.load(std::sync::atomic::Ordering::SeqCst);
    let (status, text) = if draining {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if healthy > 0 {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy engine")
    };
    let body = serde_json::json!({
        "status": text,
        "shutting_down": draining,
        "healthy_engines": healthy,
        "engines": engines.iter().map(|e| {
            let s = e.stats();
            serde_json::json!({
                "name": &*e.name, "url": &*e.url, "models": &e.models, "role": e.role.as_str(),
                "healthy": e.is_healthy(),
                "in_flight": e.in_flight(),
                "stats_age_seconds": s.scraped_at.map(|t| t.elapsed().as_secs_f64()),
                "stats_stale": s.stale, "stats_error": s.last_error,
                "estimated_waiting": e.estimated_waiting(),
            })
        }).collect::<Vec<_>>(),
        "queue": state.holds.as_ref().map(|h| {
            let limits = h.limits();
            serde_json::json!({
                "engine_queue_limit": h.limit(),
                "max_queued": limits.max_queued,
                "queue_timeout_seconds": limits.queue_timeout.as_secs_f64(),
                "queued": h.queued(),
                "models": h.snapshot().into_iter().map(|(m, q)| (m, serde_json::json!(q))).collect::<serde_json::Map<String, serde_json::Value>>(),
            })
        }),
    });
    json_response(status, Bytes::from(body.to_string()))
}

/// The OpenAI model object of `id`: the card of an engine serving it, or a minimal one until an
/// engine has described it.
fn model_card(state: &AppState, id: &str) -> serde_json::Value {
    state.cards.get(id).unwrap_or_else(|| {
        serde_json::json!({ "id": id, "object": "model", "created": state.started_unix, "owned_by": "unknown" })
    })
}

async fn models(state: &AppState) -> Response<RouterBody> {
    state
        .cards
        .refresh_if_stale(&state.registry, &state.client)
        .await;
    let data: Vec<serde_json::Value> = state
        .registry
        .models()
        .iter()
        .map(|m| model_card(state, m))
        .collect();
    json_response(
        StatusCode::OK,
        Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string()),
    )
}

/// `GET /v1/models/{id}`: the model object, or 404 `model_not_found`. The id may contain `/`
/// (`meta-llama/Llama-3.1-8B-Instruct`), plain or percent-encoded.
async fn model(state: &AppState, raw_id: &str) -> Response<RouterBody> {
    let id = percent_decode_str(raw_id).decode_utf8_lossy();
    if !state.registry.models().iter().any(|m| *m == id) {
        return ApiError::ModelNotFound(clip(&id)).into_response();
    }
    state
        .cards
        .refresh_if_stale(&state.registry, &state.client)
        .await;
    json_response(
        StatusCode::OK,
        Bytes::from(model_card(state, &id).to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_plain_or_encoded_are_found() {
        for bad in [
            "/v1/../admin/policies",
            "/v1/./completions",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/v1/.%2e",
            "/v1/completions/..",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/v1/completions",
            "/v1/models/a..b",
            "/v1/.well",
            "/v1/%2e%2e%2e",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }
}
