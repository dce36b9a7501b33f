//! Routing and forwarding of one model request: read the body (bounded), parse what routing
//! needs, find the candidates, ask the policy, forward, retry on another engine while nothing
//! has reached the client, and stream the engine's answer back.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use opentelemetry::context::FutureExt as _;

use super::AppState;
use super::attempt::{
    Answer, Tried, engine_error_response, kv_sources, relay, traced_attempt, try_engine,
};
use super::body::{RouterBody, read_request_body};
use super::disagg::{self, Pools, whole_reason};
use super::errors::{ApiError, clip};
use super::handoff::Fields;
use super::headers::add_queue_header;
use super::headers::{ClientAddr, upstream_headers};
use super::kv::RequestKv;
use super::telemetry::count_request;
use crate::admit::hold::Holds;
use crate::admit::queue::Admitted;
use crate::admit::rate_limit::{Decision, RateLimitHeaders, RateLimitRules};
use crate::admit::{Admission, Priority, Tenant};
use crate::engines::{Candidate, Role};
use crate::otel::{QueueSpan, RouteSpan};
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
    let span = state
        .otel
        .server_span(req.uri().path(), req.headers(), request_id);
    let result = match &span {
        None => forward(state, req, request_id, client, &mut model).await,
        Some(s) => {
            forward(state, req, request_id, client, &mut model)
                .with_context(s.context())
                .await
        }
    };
    if let Some(s) = span {
        s.answered(match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().as_u16(),
        });
    }
    match result {
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
    let mut info = read_request(state, parts, body).await?;
    crate::otel::on_parsed(&state.otel, &info.model, &info.path, info.stream);
    if let Some(admission) = state.policies.admit(&info) {
        info.admission = admission;
    }
    let rules = state.limiter.rules();
    // Only when something counts them.
    let who = (!rules.is_empty() || state.holds.is_some()).then(|| Who {
        tenant: info.admission.tenant.clone(),
        priority: info.admission.priority,
        // The prompt estimate plus what the request may generate.
        tokens: info.prompt_tokens() as u64 + max_tokens_of(&info.body),
    });
    let limits = match &who {
        Some(who) => rate_limit(state, &rules, who)?,
        None => None,
    };
    let admitted = match who {
        Some(who) => hold(state, &info, who, model_out).await?,
        None => None,
    };
    let waited = admitted.as_ref().map(Admitted::waited);
    let resp = dispatch(
        state, &info, &uri, request_id, client, model_out, start, admitted,
    )
    .await;
    resp.map(|mut r| {
        if let Some(h) = limits {
            h.write_to(r.headers_mut());
        }
        if let Some(waited) = waited
            && state.cfg.decision_headers
        {
            add_queue_header(r.headers_mut(), waited);
        }
        r
    })
}

/// A request's tenant, priority and estimated tokens (what rate limits and the queue count).
struct Who {
    tenant: Tenant,
    priority: Priority,
    tokens: u64,
}

/// Step 2: the request's tenant within its rate limits (the `x-ratelimit-*` headers its
/// answer gets, if a rule applies), or 429.
fn rate_limit(
    state: &AppState,
    rules: &RateLimitRules,
    who: &Who,
) -> Result<Option<RateLimitHeaders>, ApiError> {
    let Some(limits) = rules.for_tenant(&who.tenant) else {
        return Ok(None);
    };
    let tokens = match limits.tokens_per_minute {
        Some(_) => who.tokens,
        None => 0,
    };
    let tenant = &who.tenant;
    match state.limiter.check(tenant, tokens, Instant::now()) {
        Decision::Allowed { headers } => Ok(Some(headers)),
        Decision::Limited(l) => {
            metrics::counter!("switchyard_rate_limited_total", "limit" => l.which.as_str())
                .increment(1);
            tracing::debug!(tenant = %tenant.0, limit = l.which.as_str(), "rate limited");
            Err(ApiError::RateLimited(Box::new(l)))
        }
    }
}

/// Step 3: with `--engine-queue-limit`, the wait in the router's queue until an engine of
/// the model has room (an unknown model, or one without a healthy engine, is answered at
/// once instead), or its refusal. `None`: the router does not hold requests.
async fn hold(
    state: &AppState,
    info: &RequestInfo,
    who: Who,
    model_out: &mut Option<Arc<str>>,
) -> Result<Option<Admitted>, ApiError> {
    let Some(holds) = &state.holds else {
        return Ok(None);
    };
    if let Err(e) = candidates(state, info) {
        if !matches!(e, ApiError::ModelNotFound(_)) {
            *model_out = Some(Arc::from(info.model.as_str()));
        }
        return Err(e);
    }
    let span = QueueSpan::start(&state.otel, &who.tenant.0, who.priority.as_str());
    let admitted = holds
        .wait(&info.model, who.tenant, who.priority, who.tokens)
        .await;
    span.end(admitted.as_ref().map_or_else(|r| r.code(), |_| "admitted"));
    admitted.map(Some).map_err(ApiError::Queue)
}

/// The most tokens the request may generate: `max_completion_tokens`, else `max_tokens`, else 0
/// (the engine's default is not known here).
fn max_tokens_of(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Max {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
    }
    serde_json::from_slice::<Max>(body)
        .ok()
        .and_then(|m| m.max_completion_tokens.or(m.max_tokens))
        .unwrap_or(0)
}

/// Steps 4 to 6: candidates, the policy's decision(s), the attempts, the answer. A request
/// the queue admitted is routed among the engines with room, and gives its place back once an
/// engine counts it.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    state: &AppState,
    info: &RequestInfo,
    uri: &http::Uri,
    request_id: &HeaderValue,
    client: &ClientAddr,
    model_out: &mut Option<Arc<str>>,
    start: Instant,
    mut admitted: Option<Admitted>,
) -> Result<Response<RouterBody>, ApiError> {
    let model: Arc<str> = Arc::from(info.model.as_str());
    let pools = candidates(state, info);
    // Only served models become label values: clients cannot mint metric series.
    if !matches!(pools, Err(ApiError::ModelNotFound(_))) {
        *model_out = Some(Arc::clone(&model));
    }
    let mut pools = pools?;
    if let (Some(holds), Some(_)) = (&state.holds, &admitted) {
        keep_engines_with_room(&mut pools.aggregated, holds);
        keep_engines_with_room(&mut pools.decode, holds);
    }
    let headers = upstream_headers(&info.headers, request_id, Some(client));
    let cands = match state.policies.handoff_for(&info.model) {
        None => pools.whole(),
        Some(handoff) => {
            let split = match whole_reason(info, &pools) {
                Some(reason) => Err(reason),
                None => match Fields::parse(&info.body) {
                    Ok(f) if f.choices() > 1 => Err("aggregated_n"),
                    Ok(f) => Ok(f),
                    Err(_) => Err("aggregated_body"),
                },
            };
            match split {
                Ok(fields) => {
                    return disagg::forward(
                        state,
                        info,
                        &fields,
                        uri,
                        &headers,
                        pools,
                        handoff,
                        &model,
                        start,
                        &mut admitted,
                    )
                    .await;
                }
                Err(reason) => {
                    disagg::count(&model, reason);
                    pools.whole()
                }
            }
        }
    };
    if cands.is_empty() {
        return Err(ApiError::NoHealthyEngine(
            clip(&info.model),
            state.cfg.health_probe_interval,
        ));
    }
    match attempt_engines(state, info, uri, &headers, cands, &model, &mut admitted).await {
        Attempts::Answered(a) => Ok(relay(state, info, a, &model, start, None)),
        Attempts::EngineError(resp, engine) => {
            engine_error_response(state, resp, &engine, &model).await
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
    let admission = Admission {
        tenant: state.identify.tenant(&parts.headers),
        priority: state.identify.priority(&parts.headers),
    };
    Ok(RequestInfo {
        admission,
        path: parts.uri.path().to_owned(),
        model: parsed.model,
        stream: parsed.stream,
        prompt: parsed.prompt,
        session_key,
        headers: parts.headers,
        body,
    })
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

/// Keeps the engines below the queue limit, unless none is (another request took the room
/// this one was admitted for: it goes to the engines anyway rather than waiting again).
fn keep_engines_with_room(cands: &mut Vec<Candidate>, holds: &Holds) {
    if cands.iter().any(|c| holds.has_room(&c.engine)) {
        cands.retain(|c| holds.has_room(&c.engine));
    }
}

/// Step 5: up to `--max-attempts` engines, each chosen by the policy among the candidates left.
async fn attempt_engines(
    state: &AppState,
    info: &RequestInfo,
    uri: &http::Uri,
    headers: &HeaderMap,
    mut cands: Vec<Candidate>,
    model: &Arc<str>,
    admitted: &mut Option<Admitted>,
) -> Attempts {
    let attempts = state.cfg.max_attempts;
    let mut last = Attempts::Failed("no engine left to try".into());
    let kv = RequestKv::new(kv_sources(state, info));
    for attempt in 0..attempts {
        if cands.is_empty() {
            break;
        }
        let route = RouteSpan::start(&state.otel, "aggregated", attempt);
        let decision = state.policies.decide_with(info, &cands, &kv);
        let idx = decision.engine.min(cands.len() - 1);
        let engine = Arc::clone(&cands[idx].engine);
        tracing::debug!(model = %model, policy = %decision.policy, tier = %decision.tier, engine = %engine.name, attempt, "routed");
        let (span, headers) = traced_attempt(
            state,
            &route,
            info,
            &decision,
            &engine,
            ("aggregated", attempt, || kv.matched(engine.id)),
            headers,
        );
        let guard = engine.begin_request_of(info.prompt_tokens() as u64);
        // The engine counts it now: its place in the queue goes back.
        drop(admitted.take());
        kv.note_sent(engine.id);
        let last_chance = attempt + 1 >= attempts || cands.len() == 1;
        let tried = try_engine(state, &engine, uri, &headers, &info.body).await;
        span.outcome(tried.outcome());
        let failure = match tried {
            Tried::Answered(resp) => {
                return Attempts::Answered(Answer {
                    resp,
                    engine,
                    guard,
                    decision,
                    span,
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

/// The healthy engines serving the request's model, with their load, by role. Their prefix
/// matches are computed later, only if the policy needs them ([`RequestKv`]).
fn candidates(state: &AppState, info: &RequestInfo) -> Result<Pools, ApiError> {
    let all = state.registry.all();
    let mut serving = 0usize;
    let mut pools = Pools {
        aggregated: Vec::with_capacity(all.len()),
        prefill: Vec::new(),
        decode: Vec::new(),
    };
    for e in all.iter() {
        if !e.serves(&info.model) {
            continue;
        }
        serving += 1;
        if e.is_healthy() {
            let pool = match e.role {
                Role::Aggregated => &mut pools.aggregated,
                Role::Prefill => &mut pools.prefill,
                Role::Decode => &mut pools.decode,
            };
            pool.push(Candidate {
                engine: Arc::clone(e),
                load: e.snapshot(),
                prefix_match_tokens: 0,
            });
        }
    }
    if serving == 0 {
        return Err(ApiError::ModelNotFound(clip(&info.model)));
    }
    if pools.aggregated.is_empty() && pools.prefill.is_empty() && pools.decode.is_empty() {
        return Err(ApiError::NoHealthyEngine(
            clip(&info.model),
            state.cfg.health_probe_interval,
        ));
    }
    Ok(pools)
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
