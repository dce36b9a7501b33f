//! Routing and forwarding of one model request: read the body (bounded), parse what routing
//! needs, find the candidates, ask the policy, forward, retry on another engine while nothing
//! has reached the client, and stream the engine's answer back.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::AppState;
use super::body::{
    ERROR_BODY_MAX_BYTES, ERROR_BODY_TIME_LIMIT, RouterBody, UpstreamBody, read_error_body,
    read_request_body,
};
use super::errors::{ApiError, clip};
use super::telemetry::{RequestRecord, count_request};
use crate::engines::{Candidate, Engine};
use crate::policy::Decision;
use crate::request::{ParseError, Parsed, RequestInfo, parse_body};

/// Routes and forwards a POST to a model endpoint; errors become OpenAI-shaped responses.
pub async fn route_and_forward(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &HeaderValue,
) -> Response<RouterBody> {
    let mut model = None;
    let http1 = req.version() < http::Version::HTTP_2;
    match forward(state, req, request_id, &mut model).await {
        Ok(r) => r,
        Err(e) => {
            let status = e.status().as_u16();
            tracing::debug!(error = %e, status, "request answered by the router");
            let model = model.unwrap_or_else(|| Arc::from("unknown"));
            count_request(&model, &Arc::from("none"), status);
            let close = http1 && e.closes_connection();
            let mut resp = e.into_response();
            if close {
                // hyper closes the connection after this response (h2: the stream just ends).
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    }
}

/// The work of [`route_and_forward`]; `model_out` is set as soon as the model is known.
async fn forward(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    model_out: &mut Option<Arc<str>>,
) -> Result<Response<RouterBody>, ApiError> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let limit = state.cfg.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    // Bounded in size, and in time: a body that stalls is answered 408 (`--body-read-timeout`).
    let expected = declared.map_or(0, |n| n as usize);
    let body = read_request_body(body, limit, state.cfg.body_read_timeout, expected).await?;
    let parsed = parse_routing_view(state, &body).await?;
    let session_key = state
        .session_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(parsed.session_value);
    let info = RequestInfo {
        path: parts.uri.path().to_owned(),
        model: parsed.model,
        stream: parsed.stream,
        prompt: parsed.prompt,
        session_key,
        headers: parts.headers,
        body,
    };
    let model: Arc<str> = Arc::from(info.model.as_str());

    let cands = candidates(state, &info);
    // Only served models become label values: clients cannot mint metric series.
    if !matches!(cands, Err(ApiError::ModelNotFound(_))) {
        *model_out = Some(Arc::clone(&model));
    }
    let mut cands = cands?;
    let client_ip = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
    let upstream_headers = upstream_headers(&info.headers, request_id, client_ip);
    let attempts = state.cfg.max_attempts;
    let mut last_error = String::new();
    let mut last_timed_out = false;
    let mut last_5xx: Option<(Response<Incoming>, Arc<str>)> = None;
    for attempt in 0..attempts {
        if cands.is_empty() {
            break;
        }
        let decision = state.policies.decide(&info, &cands);
        let Decision {
            engine: idx,
            policy,
            tier,
        } = decision;
        let idx = idx.min(cands.len() - 1);
        let engine = Arc::clone(&cands[idx].engine);
        tracing::debug!(model = %model, %policy, %tier, engine = %engine.name, attempt, "routed");
        let guard = engine.begin_request();
        let mut up = Request::post(engine_uri(&engine, &parts.uri));
        if let Some(h) = up.headers_mut() {
            *h = upstream_headers.clone();
        }
        let up = match up.body(Full::new(info.body.clone())) {
            Ok(r) => r,
            Err(e) => {
                return Err(ApiError::BadGateway(format!(
                    "cannot build the engine request: {e}"
                )));
            }
        };
        let outcome =
            tokio::time::timeout(state.cfg.first_byte_timeout, state.client.request(up)).await;
        last_timed_out = outcome.is_err();
        let failure = match outcome {
            Ok(Ok(resp))
                if resp.status().is_server_error() && attempt + 1 < attempts && cands.len() > 1 =>
            {
                state.monitor.report_failure(&engine, "engine answered 5xx");
                format!("engine {} answered {}", engine.name, resp.status())
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status.is_server_error() {
                    state.monitor.report_failure(&engine, "engine answered 5xx");
                    last_5xx = Some((resp, Arc::clone(&engine.name)));
                    break;
                }
                state.monitor.report_success(&engine);
                if status.is_success() {
                    state.prefix.insert(engine.id, info.block_hashes());
                }
                let sse = info.stream
                    || resp
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                let record = RequestRecord::new(
                    start,
                    Arc::clone(&model),
                    Arc::clone(&engine),
                    status.as_u16(),
                );
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                strip_router_headers(&mut rparts.headers);
                if state.cfg.decision_headers {
                    add_decision_headers(&mut rparts.headers, &policy, &tier, &engine.name);
                }
                let body = RouterBody::upstream(UpstreamBody::new(rbody, guard, record, sse));
                return Ok(Response::from_parts(rparts, body));
            }
            Ok(Err(e)) if e.is_connect() => {
                state
                    .monitor
                    .report_unreachable(&engine, "connection to the engine failed");
                format!("cannot connect to engine {}: {e}", engine.name)
            }
            Ok(Err(e)) => {
                state
                    .monitor
                    .report_failure(&engine, "engine request failed");
                format!("engine {} failed before answering: {e}", engine.name)
            }
            Err(_) => {
                state
                    .monitor
                    .report_unreachable(&engine, "first-byte timeout");
                format!(
                    "engine {} did not answer within {:?}",
                    engine.name, state.cfg.first_byte_timeout
                )
            }
        };
        drop(guard);
        tracing::warn!(model = %model, engine = %engine.name, attempt, error = %failure, "attempt failed; trying another engine");
        last_error = failure;
        cands.remove(idx);
        if attempt + 1 < attempts && !cands.is_empty() {
            metrics::counter!("switchyard_retries_total", "model" => Arc::clone(&model))
                .increment(1);
        }
    }
    if let Some((resp, engine_name)) = last_5xx {
        // Every attempt failed and the last one with an engine's own error: pass it on as-is if
        // it is small and comes in time; otherwise the router's own 502 (memory stays bounded).
        let status = resp.status();
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        strip_router_headers(&mut rparts.headers);
        let within = state.cfg.first_byte_timeout.min(ERROR_BODY_TIME_LIMIT);
        let body = read_error_body(rbody, ERROR_BODY_MAX_BYTES, within)
            .await
            .map_err(|e| {
                tracing::warn!(model = %model, engine = %engine_name, %status, error = %e, "engine error body not relayed");
                ApiError::BadGateway(format!("engine {engine_name} answered {status}, but {e}"))
            })?;
        count_request(&model, &Arc::from("none"), status.as_u16());
        return Ok(Response::from_parts(rparts, RouterBody::full(body)));
    }
    if last_timed_out {
        // The last engine tried never answered: a gateway timeout, not a bad gateway.
        return Err(ApiError::GatewayTimeout(state.cfg.first_byte_timeout));
    }
    if last_error.is_empty() {
        last_error = "no engine left to try".into();
    }
    Err(ApiError::BadGateway(last_error))
}

/// Bodies at least this large are parsed on the blocking pool: a 32 MiB body takes tens of
/// milliseconds to scan, which must not stall the runtime's workers (and `/health` with them).
const PARSE_INLINE_MAX_BYTES: usize = 256 * 1024;

fn large_parse_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
    })
}

/// Parses what routing needs of `body`, off the runtime's workers when the body is large.
async fn parse_routing_view(state: &AppState, body: &Bytes) -> Result<Parsed, ApiError> {
    let session_field = state.cfg.session_key.clone();
    let block_size = state.cfg.block_size;
    let parsed = if body.len() < PARSE_INLINE_MAX_BYTES {
        parse_body(body, session_field.as_deref(), block_size)
    } else {
        // Large parses run at most one per core but one: a core stays free for the workers.
        let _permit = large_parse_permits()
            .acquire()
            .await
            .map_err(|e| ApiError::BadRequest(format!("could not parse the request body: {e}")))?;
        let body = body.clone();
        tokio::task::spawn_blocking(move || parse_body(&body, session_field.as_deref(), block_size))
            .await
            .map_err(|e| ApiError::BadRequest(format!("could not parse the request body: {e}")))?
    };
    parsed.map_err(|e| match e {
        ParseError::MissingModel => {
            ApiError::BadRequest("you must provide a model parameter".into())
        }
        other => ApiError::BadRequest(other.to_string()),
    })
}

/// The engine's URI for the client's path and query, built from parsed parts.
fn engine_uri(engine: &Engine, client_uri: &http::Uri) -> http::Uri {
    let pq = client_uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Some((scheme, authority)) = &engine.origin {
        let mut p = http::uri::Parts::default();
        p.scheme = Some(scheme.clone());
        p.authority = Some(authority.clone());
        p.path_and_query = Some(pq.clone());
        if let Ok(u) = http::Uri::from_parts(p) {
            return u;
        }
    }
    format!("{}{}", engine.url, pq).parse().unwrap_or_default()
}

/// The healthy engines serving the request's model, with their load and prefix match.
fn candidates(state: &AppState, info: &RequestInfo) -> Result<Vec<Candidate>, ApiError> {
    let all = state.registry.all();
    let mut serving = 0usize;
    let mut cands: Vec<Candidate> = Vec::with_capacity(all.len());
    for e in all.iter() {
        if !e.serves(&info.model) {
            continue;
        }
        serving += 1;
        if e.is_healthy() {
            cands.push(Candidate {
                engine: Arc::clone(e),
                load: e.snapshot(),
                prefix_match_tokens: 0,
            });
        }
    }
    if serving == 0 {
        return Err(ApiError::ModelNotFound(clip(&info.model)));
    }
    if cands.is_empty() {
        return Err(ApiError::NoHealthyEngine(
            clip(&info.model),
            state.cfg.health_probe_interval,
        ));
    }
    if !info.block_hashes().is_empty() {
        let ids: Vec<u32> = cands.iter().map(|c| c.engine.id).collect();
        let blocks = state.prefix.match_blocks(info.block_hashes(), &ids);
        for (c, b) in cands.iter_mut().zip(blocks) {
            c.prefix_match_tokens = b * state.cfg.block_size;
        }
    }
    Ok(cands)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// The client's address, put in each request's extensions by the connection that read it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers sent to the engine: the client's, less hop-by-hop ones, `Host` (set from the
/// engine's URL) and `Content-Length` (set from the body); `Authorization` is kept. As reverse
/// proxies do, the client's address is appended to `X-Forwarded-For` and `X-Forwarded-Proto`
/// says the scheme the client used (`http`: the router does not terminate TLS).
fn upstream_headers(
    client: &HeaderMap,
    request_id: &HeaderValue,
    client_ip: Option<std::net::IpAddr>,
) -> HeaderMap {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::HOST);
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::EXPECT);
    h.insert(super::X_REQUEST_ID.clone(), request_id.clone());
    if let Some(ip) = client_ip {
        let prior: Vec<&str> = h
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let value = if prior.is_empty() {
            ip.to_string()
        } else {
            format!("{}, {ip}", prior.join(", "))
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    h
}

/// Removes `x-switchyard-*` headers from an engine's response: only the router sets those.
fn strip_router_headers(h: &mut HeaderMap) {
    let theirs: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with("x-switchyard-"))
        .cloned()
        .collect();
    for n in theirs {
        h.remove(n);
    }
}

fn add_decision_headers(h: &mut HeaderMap, policy: &str, tier: &str, engine: &str) {
    for (name, v) in [
        ("x-switchyard-policy", policy),
        ("x-switchyard-tier", tier),
        ("x-switchyard-engine", engine),
    ] {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

/// A body for the router's own answers.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<RouterBody> {
    let mut r = Response::new(RouterBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(header::HOST, HeaderValue::from_static("router"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let out = upstream_headers(
            &h,
            &HeaderValue::from_static("rid"),
            Some([127, 0, 0, 9].into()),
        );
        assert_eq!(out["x-forwarded-for"], "203.0.113.7, 127.0.0.9");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert!(out.get("x-secret").is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::TRANSFER_ENCODING).is_none());
        assert!(out.get(header::HOST).is_none());
        assert_eq!(out[header::AUTHORIZATION], "Bearer k");
        assert_eq!(out["x-request-id"], "rid");
        let out = upstream_headers(
            &HeaderMap::new(),
            &HeaderValue::from_static("r"),
            Some([127, 0, 0, 1].into()),
        );
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn engine_set_router_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("x-switchyard-engine", HeaderValue::from_static("forged"));
        h.insert("x-switchyard-kv", HeaderValue::from_static("exact"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        strip_router_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-other"], "kept");
    }
}
