//! HTTP routes of the simulated engine: dispatch, request validation, failure injection, the
//! model list and OpenAI-shaped errors. The answers themselves (OpenAI bodies and SSE shaped
//! like vLLM's) are in [`output`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::Stream;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Engine;
use super::faults::Fault;
use super::metrics::{self, inc};
use super::nixl::{Leg, TransferParams};
use super::prompt::{EnginePrompt, engine_prompt};
use super::scheduler::Job;
use crate::request;

mod handoff;
mod output;

use output::{Output, complete, stream_response};

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 64 << 20;
/// Context length of the simulated model (Llama-3.1's 128K): prompt + max_tokens must fit.
pub(crate) const MAX_MODEL_LEN: usize = 131_072;
/// Most tokens written in one SSE frame when several are due at once.
const FRAME_TOKENS: usize = 256;

/// Why a connection is closed without a response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("connection dropped by failure injection (drop_rate)")]
    Dropped,
    #[error("reading the request body: {0}")]
    Body(String),
}

/// A response body: either complete, or a stream of SSE frames.
pub(crate) struct SimBody(Inner);

enum Inner {
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl SimBody {
    fn full(b: impl Into<Bytes>) -> SimBody {
        let b = b.into();
        SimBody(Inner::Full((!b.is_empty()).then_some(b)))
    }

    fn empty() -> SimBody {
        SimBody(Inner::Full(None))
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for SimBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Full(b) => f.debug_tuple("SimBody::Full").field(b).finish(),
            Inner::Stream(_) => f.write_str("SimBody::Stream"),
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: SimBody) -> Response<SimBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<SimBody> {
    response(status, "application/json", SimBody::full(body))
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<()>,
    code: u16,
}

/// An OpenAI-shaped error, as vLLM returns them.
fn error(status: StatusCode, message: &str) -> Response<SimBody> {
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            param: None,
            code: status.as_u16(),
        },
    };
    json_response(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// The service function of every connection.
pub(crate) async fn handle(
    engine: Arc<Engine>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, ConnError> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/v1/completions" | "/v1/chat/completions" if method == Method::POST => {
            let kind = if path == "/v1/completions" {
                Kind::Completion
            } else {
                Kind::Chat
            };
            inference(engine, kind, req).await
        }
        "/v1/models" if method == Method::GET => Ok(models(&engine)),
        // vLLM 0.32: each data-parallel rank's KV-event publisher (`{}` without KV events).
        "/kv_event_sources" if method == Method::GET => Ok(match &engine.kv_event_sources {
            Some(body) => json_response(StatusCode::OK, body.clone()),
            None => error(StatusCode::NOT_FOUND, "Not Found"),
        }),
        // vLLM serves it in dev mode (VLLM_SERVER_DEV_MODE=1); reported as AllBlocksCleared.
        "/reset_prefix_cache" if method == Method::POST => {
            engine.sched.reset_prefix_cache();
            Ok(response(
                StatusCode::OK,
                "application/json",
                SimBody::empty(),
            ))
        }
        super::nixl::READ_PATH if method == Method::POST && engine.kv.role.is_some() => {
            Ok(handoff::read(&engine, req).await)
        }
        "/health" if method == Method::GET => Ok(response(
            StatusCode::OK,
            "application/json",
            SimBody::empty(),
        )),
        "/metrics" if method == Method::GET => {
            let s = &engine.sched;
            let text = metrics::render(&engine.model, &s.stats, s.gauges(), s.cache_info());
            Ok(response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                SimBody::full(text),
            ))
        }
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/models"
        | "/health"
        | "/metrics"
        | "/kv_event_sources"
        | "/reset_prefix_cache" => Ok(error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")),
        _ => Ok(error(StatusCode::NOT_FOUND, "Not Found")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

#[derive(Deserialize, Default)]
struct Params {
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    messages: Option<IgnoredAny>,
    #[serde(default)]
    prompt: Option<IgnoredAny>,
    /// vLLM's field is any dict: parameters the connector cannot read are no hand-off.
    #[serde(default)]
    kv_transfer_params: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

async fn inference(
    engine: Arc<Engine>,
    kind: Kind,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, ConnError> {
    inc(&engine.sched.stats.received, 1);
    // vLLM names the request after the client's X-Request-Id when there is one.
    let x_request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is too large",
            ));
        }
        Err(e) => return Err(ConnError::Body(e.to_string())),
    };
    match engine.faults.draw() {
        Fault::None => {}
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Drop => {
            inc(&engine.sched.stats.dropped_injected, 1);
            return Err(ConnError::Dropped);
        }
        Fault::Fail => {
            inc(&engine.sched.stats.failed_injected, 1);
            return Ok(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulated engine failure (fail_rate)",
            ));
        }
    }
    let req = match validate(&engine, kind, &body) {
        Ok(r) => r,
        Err(invalid) => return Ok(invalid.response()),
    };
    let mut job = Job::new(
        Arc::clone(&engine.sched),
        req.prompt.token_ids,
        req.prompt.block_hashes,
        req.max_tokens,
    );
    let n = engine.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let id = match &x_request_id {
        Some(x) => format!("{prefix}-{x}"),
        None => format!("{prefix}-{:016x}{n:016x}", engine.seed),
    };
    // vLLM's internal request id, which a hand-off names: `cmpl-<id>-0-<8 hex>` (one per
    // prompt), `chatcmpl-<id>-<8 hex>`.
    let suffix = fastrand::u32(..);
    let internal_id = match kind {
        Kind::Completion => format!("{id}-0-{suffix:08x}"),
        Kind::Chat => format!("{id}-{suffix:08x}"),
    };
    // Without a role the engine has no KV connector: the parameters are ignored.
    if engine.kv.role.is_some() {
        inc(
            &engine.sched.stats.external_queries,
            job.prompt_tokens() as u64,
        );
    }
    let remote = match (engine.kv.role, req.leg) {
        (None, _) | (_, Leg::None) => None,
        (Some(_), Leg::Prefill) => {
            job.hand_off_as(&internal_id);
            None
        }
        (Some(_), Leg::Decode(remote)) => Some(remote),
    };
    let out = Output {
        kind,
        id,
        internal_id,
        reported_cached: None,
        created: unix_now(),
        include_usage: req.include_usage,
        engine,
        job,
        remote,
        started: false,
        finished: false,
    };
    if req.stream {
        Ok(stream_response(out))
    } else {
        Ok(complete(out).await)
    }
}

struct Validated {
    prompt: EnginePrompt,
    leg: Leg,
    stream: bool,
    max_tokens: usize,
    include_usage: bool,
}

/// Why an inference request is rejected.
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist.")]
    UnknownModel(String),
}

impl Invalid {
    fn response(&self) -> Response<SimBody> {
        let status = match self {
            Invalid::BadRequest(_) => StatusCode::BAD_REQUEST,
            Invalid::UnknownModel(_) => StatusCode::NOT_FOUND,
        };
        error(status, &self.to_string())
    }
}

fn validate(engine: &Engine, kind: Kind, body: &[u8]) -> Result<Validated, Invalid> {
    let bad = |m: &str| Invalid::BadRequest(m.to_owned());
    let (parsed, canonical_text) = request::parse_body_with_text(body, None, engine.block_size)
        .map_err(|e| bad(&e.to_string()))?;
    if parsed.model != engine.model {
        return Err(Invalid::UnknownModel(parsed.model));
    }
    let params: Params = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    match kind {
        Kind::Chat if params.messages.is_none() => {
            return Err(bad("\"messages\" is required"));
        }
        Kind::Completion if params.prompt.is_none() => {
            return Err(bad("\"prompt\" is required"));
        }
        _ => {}
    }
    let requested = match kind {
        Kind::Chat => params.max_completion_tokens.or(params.max_tokens),
        Kind::Completion => params.max_tokens,
    };
    let max_tokens = match requested {
        None => engine.default_max_tokens,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => return Err(bad(&format!("max_tokens must be at least 1, got {n}."))),
    };
    if params.stream_options.is_some() && !parsed.stream {
        return Err(bad(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let path = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let prompt = engine_prompt(
        engine.tokenizer.as_deref(),
        path,
        body,
        &canonical_text,
        engine.block_size,
    )
    .map_err(|e| bad(&e.to_string()))?;
    let prompt_tokens = prompt.token_ids.len();
    if prompt_tokens.saturating_add(max_tokens) > MAX_MODEL_LEN {
        return Err(bad(&format!(
            "This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you \
             requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the \
             completion). Please reduce the length of the messages or completion.",
            prompt_tokens.saturating_add(max_tokens)
        )));
    }
    let info = engine.sched.cache_info();
    if !engine.sched.fits(prompt_tokens.saturating_add(max_tokens)) {
        return Err(bad(&format!(
            "The request needs {} tokens ({prompt_tokens} in the prompt, {max_tokens} in the \
             completion), more than the engine's KV cache holds ({} blocks of {} tokens).",
            prompt_tokens.saturating_add(max_tokens),
            info.num_blocks,
            info.block_size
        )));
    }
    let leg = params
        .kv_transfer_params
        .and_then(|v| serde_json::from_value::<TransferParams>(v).ok())
        .map_or(Leg::None, |p| p.leg());
    Ok(Validated {
        prompt,
        leg,
        stream: parsed.stream,
        max_tokens,
        include_usage: params
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Option<()>,
    max_model_len: usize,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelCard<'a>; 1],
}

fn models(engine: &Engine) -> Response<SimBody> {
    let list = ModelList {
        object: "list",
        data: [ModelCard {
            id: &engine.model,
            object: "model",
            created: engine.created,
            owned_by: "vllm",
            root: &engine.model,
            parent: None,
            max_model_len: MAX_MODEL_LEN,
        }],
    };
    match serde_json::to_vec(&list) {
        Ok(b) => json_response(StatusCode::OK, b),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
