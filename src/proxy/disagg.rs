//! A disaggregated request: the decode engine chosen by the policy's decode pipeline, then its
//! prefill engine (or none) by the prefill pipeline; the prefill leg, then the decode leg,
//! whose answer goes to the client (see [`super::handoff`] for the bodies).
//!
//! Failures, so that no request is lost that an engine could serve:
//! - the prefill engine unreachable, answering 5xx, or not answering within
//!   `--prefill-timeout`: another prefill engine (up to `--max-attempts` in all), else the
//!   decode engine computes the prompt itself;
//! - the prefill engine answering 4xx: the client's error, relayed as it came;
//! - the decode engine failing before any byte reached the client: another decode engine,
//!   with a fresh prefill leg (a hand-off is consumed once); mid-stream: the stream ends
//!   with an error event, as for any request.
//!
//! `switchyard_pd_requests_total{model,outcome}` counts the outcomes: `disaggregated`,
//! `decode_only_skipped` (the prefill pipeline chose none), `decode_only_no_prefill_engine`,
//! `decode_only_prefill_failed`, `decode_only_no_handoff` (the prefill engine answered
//! without `kv_transfer_params`), `prefill_client_error`, and `aggregated_*` when a request for a disaggregated
//! policy is served whole (`aggregated_n` for `n` > 1, `aggregated_path` for an endpoint
//! other than completions, `aggregated_no_decode_engine`, `aggregated_body`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap};
use hyper::body::Incoming;

use super::AppState;
use super::attempt::{
    Answer, Disaggregated, Tried, engine_error_response, kv_sources, relay, traced_attempt,
    traced_decision, try_engine_within,
};
use super::body::{RouterBody, read_error_body};
use super::errors::ApiError;
use super::handoff::{Fields, PrefillAnswer, decode_body, prefill_body};
use super::headers::{strip_hop_by_hop, strip_router_headers};
use super::kv::RequestKv;
use crate::engines::{Candidate, Engine};
use crate::otel::RouteSpan;
use crate::policy::{Decision, DecodeChoice, Handoff, PrefillChoice};
use crate::request::RequestInfo;

/// Most bytes of a prefill answer read (one token, its usage and the hand-off).
const MAX_PREFILL_ANSWER_BYTES: usize = 4 << 20;

/// The engines of a request, by role.
pub(super) struct Pools {
    pub aggregated: Vec<Candidate>,
    pub prefill: Vec<Candidate>,
    pub decode: Vec<Candidate>,
}

impl Pools {
    /// The candidates of a request served whole: the aggregated engines; without any, the
    /// decode engines, then the prefill engines (each computes a whole request alone).
    pub fn whole(self) -> Vec<Candidate> {
        if !self.aggregated.is_empty() {
            self.aggregated
        } else if !self.decode.is_empty() {
            self.decode
        } else {
            self.prefill
        }
    }
}

/// Why a request for a disaggregated policy is served whole, if it is.
pub(super) fn whole_reason(info: &RequestInfo, pools: &Pools) -> Option<&'static str> {
    if !matches!(
        info.path.as_str(),
        "/v1/completions" | "/v1/chat/completions"
    ) {
        return Some("aggregated_path");
    }
    if pools.decode.is_empty() {
        return Some("aggregated_no_decode_engine");
    }
    None
}

pub(super) fn count(model: &Arc<str>, outcome: &'static str) {
    debug_assert!(
        super::telemetry::PD_OUTCOMES.contains(&outcome),
        "{outcome}"
    );
    metrics::counter!("switchyard_pd_requests_total", "model" => Arc::clone(model), "outcome" => outcome)
        .increment(1);
}

/// What the prefill stage gave the decode leg.
enum Prefilled {
    /// A prefill engine answered: its hand-off (if any) and cached-token figure.
    Handoff {
        engine: Arc<Engine>,
        decision: Decision,
        answer: PrefillAnswer,
    },
    /// No prefill leg; the outcome label says why.
    DecodeOnly(&'static str),
    /// The prefill engine refused the request (4xx): the client's error.
    ClientError(Response<Incoming>),
}

/// Serves a disaggregated request (the caller has checked that it can be: a completions
/// endpoint, one choice, decode engines).
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    state: &AppState,
    info: &RequestInfo,
    fields: &Fields,
    uri: &http::Uri,
    headers: &HeaderMap,
    pools: Pools,
    handoff: Handoff,
    model: &Arc<str>,
    start: Instant,
    admitted: &mut Option<crate::admit::queue::Admitted>,
) -> Result<Response<RouterBody>, ApiError> {
    let Pools {
        prefill: mut prefill_cands,
        decode: mut decode_cands,
        ..
    } = pools;
    let kv = RequestKvCell(std::sync::Mutex::new(RequestKv::new(kv_sources(
        state, info,
    ))));
    let attempts = state.cfg.max_attempts;
    let tokens = info.prompt_tokens() as u64;
    let p_body = prefill_body(fields, handoff);
    let mut last = ApiError::BadGateway("no decode engine left to try".into());
    for attempt in 0..attempts {
        if decode_cands.is_empty() {
            break;
        }
        let route = RouteSpan::start(&state.otel, "decode", attempt);
        let dd = kv.with(|kv| state.policies.decide_decode(info, &decode_cands, kv));
        let d_idx = dd.engine.min(decode_cands.len() - 1);
        let d_engine = Arc::clone(&decode_cands[d_idx].engine);
        let d_match = || kv.with(|kv| kv.matched(d_engine.id));
        traced_decision(state, &route, info, &dd, &d_engine, false, d_match);
        let prefilled = prefill(
            state,
            info,
            uri,
            headers,
            &p_body,
            &kv,
            &decode_cands[d_idx],
            &mut prefill_cands,
            model,
        )
        .await;
        let (p, d_body, cached) = match prefilled {
            Prefilled::ClientError(resp) => {
                count(model, "prefill_client_error");
                return relay_prefill_error(resp).await;
            }
            Prefilled::DecodeOnly(outcome) => {
                count(model, outcome);
                (None, decode_body(fields, None), None)
            }
            Prefilled::Handoff {
                engine,
                decision,
                answer,
            } => {
                let (body, cached) = answer.decode_leg(fields, handoff);
                if handoff == Handoff::Nixl && answer.kv_transfer_params.is_none() {
                    // The prefill engine gave no hand-off (e.g. its first token was EOS): the
                    // decode engine computes the prompt.
                    count(model, "decode_only_no_handoff");
                    (None, body, cached)
                } else {
                    count(model, "disaggregated");
                    (Some((engine, decision)), body, cached)
                }
            }
        };
        tracing::debug!(model = %model, decode = %d_engine.name, prefill = p.as_ref().map(|(e, _)| &*e.name), attempt, "disaggregated");
        let guard = d_engine.begin_request_of(tokens);
        // The decode engine counts it now: its place in the router's queue goes back.
        drop(admitted.take());
        kv.with(|kv| kv.note_sent(d_engine.id));
        let last_chance = attempt + 1 >= attempts || decode_cands.len() == 1;
        let (span, d_headers) = traced_attempt(
            state,
            &route,
            info,
            &dd,
            &d_engine,
            ("decode", attempt, || kv.with(|kv| kv.matched(d_engine.id))),
            headers,
        );
        let tried = try_engine_within(
            state,
            &d_engine,
            uri,
            &d_headers,
            &d_body,
            state.cfg.first_byte_timeout,
        )
        .await;
        span.outcome(tried.outcome());
        match tried {
            Tried::Answered(resp) => {
                let answer = Answer {
                    resp,
                    engine: d_engine,
                    guard,
                    decision: dd,
                    span,
                };
                let pd = Disaggregated {
                    cached_tokens: cached,
                    prefill: p,
                };
                return Ok(relay(state, info, answer, model, start, Some(pd)));
            }
            Tried::EngineError(resp) if last_chance => {
                return engine_error_response(state, resp, &d_engine.name, model).await;
            }
            Tried::EngineError(resp) => {
                last = ApiError::BadGateway(format!(
                    "decode engine {} answered {}",
                    d_engine.name,
                    resp.status()
                ));
            }
            Tried::Failed { error, timed_out } => {
                last = if timed_out {
                    ApiError::GatewayTimeout(state.cfg.first_byte_timeout)
                } else {
                    ApiError::BadGateway(error)
                };
            }
        }
        drop(guard);
        tracing::warn!(model = %model, engine = %d_engine.name, attempt, error = %last, "decode attempt failed; trying another decode engine with a fresh prefill leg");
        decode_cands.remove(d_idx);
        if attempt + 1 < attempts && !decode_cands.is_empty() {
            metrics::counter!("switchyard_retries_total", "model" => Arc::clone(model))
                .increment(1);
        }
    }
    Err(last)
}

/// The prefill stage: the prefill pipeline's choice, then the prefill leg on it, on another
/// prefill engine if it fails (up to `--max-attempts` engines), else none. (`kv` is only used
/// between awaits: it is not `Sync`.)
#[allow(clippy::too_many_arguments)]
async fn prefill(
    state: &AppState,
    info: &RequestInfo,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
    kv: &RequestKvCell<'_>,
    decode: &Candidate,
    cands: &mut Vec<Candidate>,
    model: &Arc<str>,
) -> Prefilled {
    let tokens = info.prompt_tokens() as u64;
    for attempt in 0..state.cfg.max_attempts {
        let route = RouteSpan::start(&state.otel, "prefill", attempt);
        let choice = kv.with(|kv| {
            let d = DecodeChoice::new(Some(kv), info, decode);
            state.policies.decide_prefill(info, cands, kv, &d)
        });
        if let PrefillChoice::Skip { policy, tier } = &choice {
            route.skipped(policy, tier);
        }
        let decision = match choice {
            PrefillChoice::Skip { tier, .. } if cands.is_empty() && attempt == 0 => {
                tracing::debug!(model = %model, %tier, "no prefill engine: the decode engine computes the prompt");
                return Prefilled::DecodeOnly("decode_only_no_prefill_engine");
            }
            PrefillChoice::Skip { .. } if cands.is_empty() => {
                return Prefilled::DecodeOnly("decode_only_prefill_failed");
            }
            PrefillChoice::Skip { .. } => return Prefilled::DecodeOnly("decode_only_skipped"),
            PrefillChoice::Engine(d) => d,
        };
        let idx = decision.engine.min(cands.len() - 1);
        let engine = Arc::clone(&cands[idx].engine);
        let started = Instant::now();
        let guard = engine.begin_request_of(tokens);
        kv.with(|kv| kv.note_sent(engine.id));
        let timeout = state.cfg.prefill_timeout;
        let (span, p_headers) = traced_attempt(
            state,
            &route,
            info,
            &decision,
            &engine,
            ("prefill", attempt, || kv.with(|kv| kv.matched(engine.id))),
            headers,
        );
        let tried = try_engine_within(state, &engine, uri, &p_headers, body, timeout).await;
        span.outcome(tried.outcome());
        let error = match tried {
            Tried::Answered(resp) if resp.status().is_success() => {
                let within = timeout.saturating_sub(started.elapsed());
                let read =
                    read_error_body(resp.into_body(), MAX_PREFILL_ANSWER_BYTES, within).await;
                span.end();
                match read {
                    Ok(bytes) => {
                        drop(guard);
                        // The prefill engine now caches the prompt too.
                        state.prefix.insert(engine.id, info.block_hashes());
                        metrics::histogram!("switchyard_prefill_duration_seconds", "model" => Arc::clone(model))
                            .record(started.elapsed().as_secs_f64());
                        return Prefilled::Handoff {
                            engine,
                            decision,
                            answer: PrefillAnswer::parse(&bytes),
                        };
                    }
                    Err(e) => {
                        state
                            .monitor
                            .report_failure(&engine, "prefill answer unreadable");
                        format!("prefill engine {}'s answer: {e}", engine.name)
                    }
                }
            }
            Tried::Answered(resp) => {
                span.end();
                return Prefilled::ClientError(resp);
            }
            Tried::EngineError(resp) => {
                format!("prefill engine {} answered {}", engine.name, resp.status())
            }
            Tried::Failed { error, .. } => error,
        };
        drop(guard);
        tracing::warn!(model = %model, engine = %engine.name, attempt, %error, "prefill leg failed");
        metrics::counter!("switchyard_prefill_failures_total", "engine" => engine.name.to_string())
            .increment(1);
        cands.remove(idx);
    }
    Prefilled::DecodeOnly("decode_only_prefill_failed")
}

/// The request's prefix matches, shared by the decode and prefill decisions of its attempts
/// across awaits: [`RequestKv`] is not `Sync`, so it is reached through a mutex held only for
/// synchronous calls.
struct RequestKvCell<'a>(std::sync::Mutex<RequestKv<'a>>);

impl<'a> RequestKvCell<'a> {
    fn with<R>(&self, f: impl FnOnce(&RequestKv<'a>) -> R) -> R {
        let kv = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&kv)
    }
}

/// A prefill engine's 4xx, relayed as it came (bounded), as an aggregated request's would be.
async fn relay_prefill_error(resp: Response<Incoming>) -> Result<Response<RouterBody>, ApiError> {
    let status = resp.status();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_router_headers(&mut parts.headers);
    let body = read_error_body(
        body,
        super::body::ERROR_BODY_MAX_BYTES,
        super::body::ERROR_BODY_TIME_LIMIT,
    )
    .await
    .map_err(|e| ApiError::BadGateway(format!("prefill engine answered {status}, but {e}")))?;
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, RouterBody::full(body)))
}
