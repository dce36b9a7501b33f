//! One attempt on one engine: the request sent, the wait for its response headers (bounded),
//! the outcome reported to the health monitor; an engine's own error relayed when it is the
//! last word; where a request's prefix matches come from. Used by the aggregated path
//! (`forward`) and the disaggregated one (`disagg`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use super::AppState;
use super::body::{
    ERROR_BODY_MAX_BYTES, ERROR_BODY_TIME_LIMIT, RouterBody, UpstreamBody, read_error_body,
};
use super::errors::ApiError;
use super::handoff::AnswerRewrite;
use super::headers::{
    add_decision_headers, add_stage_headers, strip_hop_by_hop, strip_router_headers,
};
use super::kv::Sources;
use super::telemetry::{RequestRecord, count_request};
use crate::engines::{Engine, InFlightGuard};
use crate::otel::{AttemptOutcome, AttemptSpan, AttemptTarget, Decided, ResponseSpans, RouteSpan};
use crate::policy::{Decision, KvSource};
use crate::request::RequestInfo;

/// One attempt's outcome.
pub(super) enum Tried {
    Answered(Response<Incoming>),
    EngineError(Response<Incoming>),
    Failed { error: String, timed_out: bool },
}

/// Sends the request to one engine and waits for its response headers, reporting the outcome
/// to the health monitor. A 5xx is an engine error (the caller relays it on its last chance).
pub(super) async fn try_engine(
    state: &AppState,
    engine: &Arc<Engine>,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Tried {
    try_engine_within(
        state,
        engine,
        uri,
        headers,
        body,
        state.cfg.first_byte_timeout,
    )
    .await
}

/// [`try_engine`] with its own limit on the wait for the response headers.
pub(super) async fn try_engine_within(
    state: &AppState,
    engine: &Arc<Engine>,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
    first_byte_timeout: std::time::Duration,
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
    match tokio::time::timeout(first_byte_timeout, state.client.request(up)).await {
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
                    "engine {} did not answer within {first_byte_timeout:?}",
                    engine.name
                ),
                true,
            )
        }
    }
}

/// Every attempt failed and the last one with an engine's own error: it is passed on as-is if
/// it is small and comes in time; otherwise the router's own 502 (memory stays bounded).
pub(super) async fn engine_error_response(
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
pub(super) fn kv_sources<'a>(state: &'a AppState, info: &'a RequestInfo) -> Sources<'a> {
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

/// An engine's answer that goes to the client, with what it was chosen by.
pub(super) struct Answer {
    pub resp: Response<Incoming>,
    pub engine: Arc<Engine>,
    pub guard: InFlightGuard,
    pub decision: Decision,
    /// The attempt's CLIENT span, ended with the answer's last byte.
    pub span: AttemptSpan,
}

impl Tried {
    /// The attempt's outcome, for its span.
    pub(super) fn outcome(&self) -> AttemptOutcome<'_> {
        match self {
            Tried::Answered(r) => AttemptOutcome::Answered(r.status().as_u16()),
            Tried::EngineError(r) => AttemptOutcome::EngineError(r.status().as_u16()),
            Tried::Failed { error, timed_out } => AttemptOutcome::Failed {
                error,
                timed_out: *timed_out,
            },
        }
    }
}

/// Ends the decision's span with what was decided (unless it has ended: a disaggregated
/// request's decode decision ends before its prefill stage).
pub(super) fn traced_decision(
    state: &AppState,
    route: &RouteSpan,
    info: &RequestInfo,
    decision: &Decision,
    engine: &Engine,
    prefill: bool,
    kv_match: impl FnOnce() -> Option<usize>,
) {
    if !route.is_recording() {
        route.end();
        return;
    }
    route.decided(&Decided {
        policy: &decision.policy,
        tier: &decision.tier,
        engine: &engine.name,
        kv_source: KvSource::label(decision.kv),
        kv_match_tokens: decision.kv.and_then(|_| kv_match()),
        tiers_passed: state
            .policies
            .tiers_passed(&info.model, prefill, &decision.tier),
    });
}

/// Ends the decision's span and starts the CLIENT span of the attempt on `engine` (`leg`,
/// retry number `attempt`, and the engine's prefix match if one was computed), with the
/// headers that carry its `traceparent` (the request's own when tracing is off).
pub(super) fn traced_attempt<'h>(
    state: &AppState,
    route: &RouteSpan,
    info: &RequestInfo,
    decision: &Decision,
    engine: &Engine,
    (leg, attempt, kv_match): (&'static str, usize, impl FnOnce() -> Option<usize>),
    headers: &'h HeaderMap,
) -> (AttemptSpan, Cow<'h, HeaderMap>) {
    if !state.otel.is_on() {
        return (AttemptSpan::default(), Cow::Borrowed(headers));
    }
    traced_decision(
        state,
        route,
        info,
        decision,
        engine,
        leg == "prefill",
        kv_match,
    );
    let target = AttemptTarget {
        name: &engine.name,
        url: &engine.url,
        path: &info.path,
        leg,
        attempt,
    };
    route.attempt(&state.otel, &target, headers)
}

/// What a disaggregated request's decode answer needs on its way: the prefill engine's
/// `cached_tokens` for the rewrite, and the prefill leg (if any) for the stage headers.
pub(super) struct Disaggregated {
    pub cached_tokens: Option<u64>,
    pub prefill: Option<(Arc<Engine>, Decision)>,
}

/// Streams the engine's answer to the client (recording the prefix it now caches); a
/// disaggregated request's decode answer is rewritten on its way.
pub(super) fn relay(
    state: &AppState,
    info: &RequestInfo,
    a: Answer,
    model: &Arc<str>,
    start: Instant,
    disaggregated: Option<Disaggregated>,
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
    )
    .with_spans(ResponseSpans::take(&state.otel, a.span));
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
    let mut body = UpstreamBody::new(rbody, a.guard, record, sse);
    if let Some(d) = disaggregated {
        // The rewritten answer's length is not the engine's.
        rparts.headers.remove(header::CONTENT_LENGTH);
        if state.cfg.decision_headers {
            add_stage_headers(
                &mut rparts.headers,
                d.prefill.as_ref().map(|(e, dec)| (&*e.name, &*dec.tier)),
            );
        }
        body = body.with_rewrite(AnswerRewrite::new(sse, d.cached_tokens));
    }
    Response::from_parts(rparts, RouterBody::upstream(body))
}
