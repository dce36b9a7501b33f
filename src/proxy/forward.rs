//! Routing and forwarding of one model request: read the body (bounded), parse what routing
//! needs, find the candidates, ask the policy, forward, retry on another engine while nothing
//! has reached the client, and stream the engine's answer back.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::AppState;
use super::body::{
    ERROR_BODY_MAX_BYTES, ERROR_BODY_TIME_LIMIT, RouterBody, UpstreamBody, read_error_body,
    read_request_body,
};
use super::errors::{ApiError, clip};
use super::headers::{
    ClientAddr, add_decision_headers, strip_hop_by_hop, strip_router_headers, upstream_headers,
};
use super::kv::{RequestKv, Sources};
use super::telemetry::{RequestRecord, count_request};
use crate::engines::{Candidate, Engine, InFlightGuard};
use crate::policy::{Decision, KvSource};
use crate::request::{ParseError, Parsed, RequestInfo, parse_body};

/// Routes and forwards a POST to a model endpoint; errors become OpenAI-shaped responses.
pub async fn route_and_forward(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    client: &ClientAddr,
) -> Response<RouterBody> {
    let mut model = None;
    let http1 = req.version() < http::Version::HTTP_2;
    match forward(state, req, request_id, client, &mut model).await {
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

/// The work of [`route_and_forward`], as its steps: read and parse the request, find the
/// candidates, attempt engines (choosing one per attempt, retrying on another while nothing
/// has reached the client), and relay the answer. `model_out` is set once the model is known
/// to be served.
async fn forward(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    client: &ClientAddr,
    model_out: &mut Option<Arc<str>>,
) -> Result<Response<RouterBody>, ApiError> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let uri = parts.uri.clone();
    let info = read_request(state, parts, body).await?;
    let model: Arc<str> = Arc::from(info.model.as_str());
    let cands = candidates(state, &info);
    // Only served models become label values: clients cannot mint metric series.
    if !matches!(cands, Err(ApiError::ModelNotFound(_))) {
        *model_out = Some(Arc::clone(&model));
    }
    let headers = upstream_headers(&info.headers, request_id, Some(client));
    match attempt_engines(state, &info, &uri, &headers, cands?, &model).await {
        Attempts::Answered(a) => Ok(relay(state, &info, a, &model, start)),
        Attempts::EngineError(resp, engine) => {
            relay_engine_error(state, resp, &engine, &model).await
        }
        Attempts::TimedOut => Err(ApiError::GatewayTimeout(state.cfg.first_byte_timeout)),
        Attempts::Failed(error) => Err(ApiError::BadGateway(error)),
    }
}

/// Step 1: reads the body (bounded in size, and in time: a body that stalls is answered 408,
/// `--body-read-timeout`) and parses what routing needs of it.
async fn read_request(
    state: &AppState,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<RequestInfo, ApiError> {
    let limit = state.cfg.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
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
    Ok(RequestInfo {
        path: parts.uri.path().to_owned(),
        model: parsed.model,
        stream: parsed.stream,
        prompt: parsed.prompt,
        session_key,
        headers: parts.headers,
        body,
    })
}

/// An engine's answer that goes to the client, with what it was chosen by.
struct Answer {
    resp: Response<Incoming>,
    engine: Arc<Engine>,
    guard: InFlightGuard,
    decision: Decision,
}

/// How the attempts ended.
enum Attempts {
    Answered(Answer),
    /// The last attempt's engine answered 5xx: its own error is passed on.
    EngineError(Response<Incoming>, Arc<str>),
    /// The last engine tried did not answer within `--first-byte-timeout`.
    TimedOut,
    /// No engine answered; the last failure.
    Failed(String),
}

/// Step 2: up to `--max-attempts` engines, each chosen by the policy among the candidates left.
async fn attempt_engines(
    state: &AppState,
    info: &RequestInfo,
    uri: &http::Uri,
    headers: &HeaderMap,
    mut cands: Vec<Candidate>,
    model: &Arc<str>,
) -> Attempts {
    let attempts = state.cfg.max_attempts;
    let mut last = Attempts::Failed("no engine left to try".into());
    let kv = RequestKv::new(kv_sources(state, info));
    for attempt in 0..attempts {
        if cands.is_empty() {
            break;
        }
        let decision = state.policies.decide_with(info, &cands, &kv);
        let idx = decision.engine.min(cands.len() - 1);
        let engine = Arc::clone(&cands[idx].engine);
        tracing::debug!(model = %model, policy = %decision.policy, tier = %decision.tier, engine = %engine.name, attempt, "routed");
        let guard = engine.begin_request_of(info.prompt_tokens() as u64);
        kv.note_sent(engine.id);
        let last_chance = attempt + 1 >= attempts || cands.len() == 1;
        let failure = match try_engine(state, &engine, uri, headers, &info.body).await {
            Tried::Answered(resp) => {
                return Attempts::Answered(Answer {
                    resp,
                    engine,
                    guard,
                    decision,
                });
            }
            Tried::EngineError(resp) if last_chance => {
                return Attempts::EngineError(resp, Arc::clone(&engine.name));
            }
            Tried::EngineError(resp) => {
                Attempts::Failed(format!("engine {} answered {}", engine.name, resp.status()))
            }
            Tried::Failed { error, timed_out } => {
                if timed_out {
                    Attempts::TimedOut
                } else {
                    Attempts::Failed(error)
                }
            }
        };
        drop(guard);
        let message = match &failure {
            Attempts::Failed(e) => e.clone(),
            _ => format!(
                "engine {} did not answer within {:?}",
                engine.name, state.cfg.first_byte_timeout
            ),
        };
        tracing::warn!(model = %model, engine = %engine.name, attempt, error = %message, "attempt failed; trying another engine");
        last = failure;
        cands.remove(idx);
        if attempt + 1 < attempts && !cands.is_empty() {
            metrics::counter!("switchyard_retries_total", "model" => Arc::clone(model))
                .increment(1);
        }
    }
    last
}

/// One attempt's outcome.
enum Tried {
    Answered(Response<Incoming>),
    EngineError(Response<Incoming>),
    Failed { error: String, timed_out: bool },
}

/// Sends the request to one engine and waits for its response headers, reporting the outcome
/// to the health monitor. A 5xx is an engine error (the caller relays it on its last chance).
async fn try_engine(
    state: &AppState,
    engine: &Arc<Engine>,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Tried {
    let mut up = Request::post(engine_uri(engine, uri));
    if let Some(h) = up.headers_mut() {
        *h = headers.clone();
        if let Some(host) = &engine.host_header {
            h.insert(header::HOST, host.clone()); // else the client formats it per request
        }
    }
    let up = match up.body(Full::new(body.clone())) {
        Ok(r) => r,
        Err(e) => {
            return Tried::Failed {
                error: format!("cannot build the engine request: {e}"),
                timed_out: false,
            };
        }
    };
    let failed = |error: String, timed_out: bool| Tried::Failed { error, timed_out };
    match tokio::time::timeout(state.cfg.first_byte_timeout, state.client.request(up)).await {
        Ok(Ok(resp)) if resp.status().is_server_error() => {
            state.monitor.report_failure(engine, "engine answered 5xx");
            Tried::EngineError(resp)
        }
        Ok(Ok(resp)) => {
            state.monitor.report_success(engine);
            Tried::Answered(resp)
        }
        Ok(Err(e)) if e.is_connect() => {
            state
                .monitor
                .report_unreachable(engine, "connection to the engine failed");
            failed(
                format!("cannot connect to engine {}: {e}", engine.name),
                false,
            )
        }
        Ok(Err(e)) => {
            state
                .monitor
                .report_failure(engine, "engine request failed");
            failed(
                format!("engine {} failed before answering: {e}", engine.name),
                false,
            )
        }
        Err(_) => {
            state
                .monitor
                .report_unreachable(engine, "first-byte timeout");
            failed(
                format!(
                    "engine {} did not answer within {:?}",
                    engine.name, state.cfg.first_byte_timeout
                ),
                true,
            )
        }
    }
}

/// Step 3: streams the engine's answer to the client (recording the prefix it now caches).
fn relay(
    state: &AppState,
    info: &RequestInfo,
    a: Answer,
    model: &Arc<str>,
    start: Instant,
) -> Response<RouterBody> {
    let status = a.resp.status();
    if status.is_success() {
        state.prefix.insert(a.engine.id, info.block_hashes());
    }
    let sse = info.stream
        || a.resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let record = RequestRecord::new(
        start,
        Arc::clone(model),
        Arc::clone(&a.engine),
        status.as_u16(),
    );
    let (mut rparts, rbody) = a.resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    strip_router_headers(&mut rparts.headers);
    if state.cfg.decision_headers {
        add_decision_headers(
            &mut rparts.headers,
            &a.decision.policy,
            &a.decision.tier,
            &a.engine.name,
            a.decision.kv.map(KvSource::as_str),
        );
    }
    let body = RouterBody::upstream(UpstreamBody::new(rbody, a.guard, record, sse));
    Response::from_parts(rparts, body)
}

/// Every attempt failed and the last one with an engine's own error: it is passed on as-is if
/// it is small and comes in time; otherwise the router's own 502 (memory stays bounded).
async fn relay_engine_error(
    state: &AppState,
    resp: Response<Incoming>,
    engine_name: &str,
    model: &Arc<str>,
) -> Result<Response<RouterBody>, ApiError> {
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
    count_request(model, &Arc::from("none"), status.as_u16());
    Ok(Response::from_parts(rparts, RouterBody::full(body)))
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
    let block_size = state.cfg.block_size;
    let parsed = if body.len() < PARSE_INLINE_MAX_BYTES {
        parse_body(body, state.cfg.session_key.as_deref(), block_size)
    } else {
        // Large parses run at most one per core but one: a core stays free for the workers.
        let _permit = large_parse_permits()
            .acquire()
            .await
            .map_err(|e| ApiError::BadRequest(format!("could not parse the request body: {e}")))?;
        let (body, session_field) = (body.clone(), state.cfg.session_key.clone());
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

/// Where the request's prefix matches come from, when a tier needs them.
fn kv_sources<'a>(state: &'a AppState, info: &'a RequestInfo) -> Sources<'a> {
    // Exact matching needs both the engines' views and the request's token ids.
    let exact = state.tokenizer.as_deref().map(|t| {
        (
            &*state.exact as &dyn super::kv::ExactLookup,
            t as &dyn super::kv::RequestTokenizer,
        )
    });
    Sources {
        approximate: &state.prefix,
        block_size: state.cfg.block_size,
        exact,
        // An adapter's blocks are keyed under its name (known from the engines' model cards).
        lora_name: (exact.is_some() && state.cards.is_adapter(&info.model))
            .then_some(info.model.as_str()),
        // No engine caches past the model's context (vLLM refuses a longer prompt).
        max_prompt_tokens: state
            .cards
            .max_model_len(&info.model)
            .map_or(state.cfg.tokenize_max_tokens, |n| {
                n.min(state.cfg.tokenize_max_tokens)
            }),
    }
}

/// The healthy engines serving the request's model, with their load. Their prefix matches are
/// computed later, only if the policy needs them ([`RequestKv`]).
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
    Ok(cands)
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
