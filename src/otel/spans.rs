//! The spans of one request, as the proxy opens and closes them:
//!
//! ```text
//! POST /v1/chat/completions   SERVER    the request, until its answer's last byte
//! ├─ queue                    INTERNAL  the wait in the router's queue (when it holds requests)
//! ├─ route                    INTERNAL  a policy decision: policy, tier, engine, kv source, attempt
//! │  └─ POST /v1/chat/completions  CLIENT  the attempt on that engine (its traceparent's parent)
//! └─ route (attempt 1)        INTERNAL  a retry's decision, and its CLIENT attempt
//! ```
//!
//! A disaggregated request has a `route` per stage (`switchyard.stage` = `decode`, then
//! `prefill`), and one CLIENT span per leg (`switchyard.leg` = `prefill`, `decode`).
//!
//! The SERVER span's context is the current OpenTelemetry context while the request is routed
//! (the proxy runs its work `with_context`), so the helpers here find their parent without it
//! being passed along. Every helper is a no-op, with no span built, when tracing is off. An
//! unsampled request has only its (non-recording) SERVER span: no attributes, no `route` or
//! CLIENT span; the engine still receives a `traceparent` (flag `00`) naming that span.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};

use super::Otel;

/// The request's SERVER span, in the context its children are built from.
pub struct ServerSpan {
    cx: Context,
}

/// Set on the SERVER span's context when the answer's body takes over the span (it then ends
/// it with the last byte).
#[derive(Default)]
struct HandedToBody(AtomicBool);

/// The HTTP route of a forwarded path: the OpenAI endpoints by name, anything else under
/// `/v1/` as `/v1/*` (a span name must not carry what a client invents).
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/responses" => "/v1/responses",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        _ => "/v1/*",
    }
}

fn span_name(route: &'static str) -> &'static str {
    match route {
        "/v1/completions" => "POST /v1/completions",
        "/v1/chat/completions" => "POST /v1/chat/completions",
        "/v1/embeddings" => "POST /v1/embeddings",
        "/v1/responses" => "POST /v1/responses",
        "/tokenize" => "POST /tokenize",
        "/detokenize" => "POST /detokenize",
        _ => "POST /v1/*",
    }
}

impl Otel {
    /// The SERVER span of a routed request, continuing the client's `traceparent` /
    /// `tracestate` if it sent a valid one (else a new trace); `None` when tracing is off.
    pub fn server_span(
        &self,
        path: &str,
        headers: &HeaderMap,
        request_id: &http::HeaderValue,
    ) -> Option<ServerSpan> {
        let t = self.0.as_deref()?;
        let parent = t.propagator.extract(&HeaderExtractor(headers));
        let route = route_of(path);
        let span = t.tracer.build_with_context(
            t.tracer
                .span_builder(span_name(route))
                .with_kind(SpanKind::Server),
            &parent,
        );
        // Attributes only on a sampled span: an unsampled one costs no allocation for them.
        if span.is_recording() {
            let mut span = span;
            span.set_attribute(KeyValue::new("http.request.method", "POST"));
            span.set_attribute(KeyValue::new("http.route", route));
            span.set_attribute(KeyValue::new("url.path", path.to_owned()));
            if let Ok(id) = request_id.to_str() {
                span.set_attribute(KeyValue::new("switchyard.request_id", id.to_owned()));
            }
            return Some(ServerSpan {
                cx: parent.with_span(span).with_value(HandedToBody::default()),
            });
        }
        Some(ServerSpan {
            cx: parent.with_span(span).with_value(HandedToBody::default()),
        })
    }
}

impl ServerSpan {
    /// The context to run the request's work in.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Ends the span with the router's answer, unless the answer's body took it over.
    pub fn answered(self, status: u16) {
        if self
            .cx
            .get::<HandedToBody>()
            .is_some_and(|h| h.0.load(Ordering::Acquire))
        {
            return;
        }
        end_with_status(&self.cx.span(), status);
    }
}

fn end_with_status(span: &opentelemetry::trace::SpanRef<'_>, status: u16) {
    span.set_attribute(KeyValue::new("http.response.status_code", status as i64));
    if status >= 500 {
        span.set_attribute(KeyValue::new("error.type", status.to_string()));
        span.set_status(Status::error(""));
    }
    span.end();
}

/// Notes what the parse learnt (model, stream) on the current SERVER span.
pub fn on_parsed(otel: &Otel, model: &str, path: &str, stream: bool) {
    if !otel.is_on() {
        return;
    }
    let cx = Context::current();
    let span = cx.span();
    span.set_attribute(KeyValue::new("gen_ai.request.model", model.to_owned()));
    span.set_attribute(KeyValue::new("switchyard.stream", stream));
    let operation = match path {
        "/v1/chat/completions" => Some("chat"),
        "/v1/completions" => Some("text_completion"),
        "/v1/embeddings" => Some("embeddings"),
        _ => None,
    };
    if let Some(op) = operation {
        span.set_attribute(KeyValue::new("gen_ai.operation.name", op));
    }
}

/// The wait in the router's queue (`--engine-queue-limit`).
pub struct QueueSpan {
    cx: Option<Context>,
}

impl QueueSpan {
    /// Starts the wait of `tenant`'s request of `priority`.
    pub fn start(otel: &Otel, tenant: &str, priority: &'static str) -> QueueSpan {
        let Some(t) = otel.0.as_deref() else {
            return QueueSpan { cx: None };
        };
        let parent = Context::current();
        if !parent.span().span_context().is_sampled() {
            return QueueSpan { cx: None };
        }
        let mut span = t
            .tracer
            .build_with_context(t.tracer.span_builder("queue"), &parent);
        span.set_attribute(KeyValue::new("switchyard.tenant", tenant.to_owned()));
        span.set_attribute(KeyValue::new("switchyard.priority", priority));
        QueueSpan {
            cx: Some(parent.with_span(span)),
        }
    }

    /// The wait's end: `admitted`, or why the request was refused (the error code).
    pub fn end(self, outcome: &'static str) {
        let Some(cx) = &self.cx else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("switchyard.queue.outcome", outcome));
        if outcome != "admitted" {
            span.set_status(Status::error(outcome));
        }
        span.end();
    }
}

/// A policy decision's span (`route`), the parent of the attempt made on its choice.
pub struct RouteSpan {
    cx: Option<Context>,
}

impl RouteSpan {
    /// Starts a decision of `stage` (`aggregated`, `decode`, `prefill`) for attempt `attempt`
    /// (0 the first).
    pub fn start(otel: &Otel, stage: &'static str, attempt: usize) -> RouteSpan {
        let Some(t) = otel.0.as_deref() else {
            return RouteSpan { cx: None };
        };
        let parent = Context::current();
        if !parent.span().span_context().is_sampled() {
            // Unsampled: no span; the attempt's traceparent names the request's span.
            return RouteSpan { cx: Some(parent) };
        }
        let mut span = t
            .tracer
            .build_with_context(t.tracer.span_builder("route"), &parent);
        span.set_attribute(KeyValue::new("switchyard.stage", stage));
        span.set_attribute(KeyValue::new("switchyard.attempt", attempt as i64));
        RouteSpan {
            cx: Some(parent.with_span(span)),
        }
    }

    /// Whether the span is sampled (its attributes are worth computing).
    pub fn is_recording(&self) -> bool {
        self.cx.as_ref().is_some_and(|cx| cx.span().is_recording())
    }

    /// Ends the span as it is.
    pub fn end(&self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }

    /// The decision taken: ends the span.
    pub fn decided(&self, d: &Decided<'_>) {
        let Some(cx) = &self.cx else { return };
        let span = cx.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("switchyard.policy", d.policy.to_owned()));
            span.set_attribute(KeyValue::new("switchyard.tier", d.tier.to_owned()));
            span.set_attribute(KeyValue::new("switchyard.engine", d.engine.to_owned()));
            span.set_attribute(KeyValue::new("switchyard.kv.source", d.kv_source));
            if let Some(tokens) = d.kv_match_tokens {
                span.set_attribute(KeyValue::new("switchyard.kv.match_tokens", tokens as i64));
            }
            if let Some(passed) = &d.tiers_passed {
                let names: Vec<opentelemetry::StringValue> =
                    passed.iter().map(|t| t.clone().into()).collect();
                span.set_attribute(KeyValue::new(
                    "switchyard.tiers_passed",
                    opentelemetry::Value::Array(names.into()),
                ));
            }
        }
        span.end();
    }

    /// No engine was chosen (a prefill stage skipped): ends the span with the tier that said so.
    pub fn skipped(&self, policy: &str, tier: &str) {
        let Some(cx) = &self.cx else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("switchyard.policy", policy.to_owned()));
        span.set_attribute(KeyValue::new("switchyard.tier", tier.to_owned()));
        span.set_attribute(KeyValue::new("switchyard.engine", "none"));
        span.end();
    }

    /// The CLIENT span of the attempt on `engine` (leg `leg`), and the request headers with its
    /// `traceparent` (borrowed unchanged when tracing is off).
    pub fn attempt<'h>(
        &self,
        otel: &Otel,
        engine: &AttemptTarget<'_>,
        headers: &'h HeaderMap,
    ) -> (AttemptSpan, Cow<'h, HeaderMap>) {
        let (Some(t), Some(parent)) = (otel.0.as_deref(), &self.cx) else {
            return (AttemptSpan { cx: None }, Cow::Borrowed(headers));
        };
        // An unsampled request makes no CLIENT span: the engine's parent is the (unsampled)
        // span above, and nothing is exported either way.
        let cx = if parent.span().span_context().is_sampled() {
            let mut span = t.tracer.build_with_context(
                t.tracer
                    .span_builder(span_name(route_of(engine.path)))
                    .with_kind(SpanKind::Client),
                parent,
            );
            span.set_attribute(KeyValue::new("http.request.method", "POST"));
            let full = format!("{}{}", engine.url, engine.path);
            span.set_attribute(KeyValue::new("url.full", full));
            span.set_attribute(KeyValue::new("switchyard.engine", engine.name.to_owned()));
            span.set_attribute(KeyValue::new("switchyard.leg", engine.leg));
            span.set_attribute(KeyValue::new("switchyard.attempt", engine.attempt as i64));
            if engine.attempt > 0 {
                let n = engine.attempt as i64;
                span.set_attribute(KeyValue::new("http.request.resend_count", n));
            }
            Some(parent.with_span(span))
        } else {
            None
        };
        let mut traced = headers.clone();
        t.propagator.inject_context(
            cx.as_ref().unwrap_or(parent),
            &mut HeaderInjector(&mut traced),
        );
        // No tracestate from the client: none is invented (the propagator writes an empty one).
        if traced
            .get("tracestate")
            .is_some_and(|v| v.as_bytes().is_empty())
        {
            traced.remove("tracestate");
        }
        (AttemptSpan { cx }, Cow::Owned(traced))
    }
}

/// What a decision chose, for its span.
pub struct Decided<'a> {
    pub policy: &'a str,
    pub tier: &'a str,
    pub engine: &'a str,
    /// `approximate`, `exact`, `partial`, or `none` when no tier needed prefix matches.
    pub kv_source: &'static str,
    pub kv_match_tokens: Option<usize>,
    /// The tiers of the pipeline that passed before the deciding one, when known.
    pub tiers_passed: Option<Vec<String>>,
}

/// The engine an attempt goes to.
pub struct AttemptTarget<'a> {
    pub name: &'a str,
    pub url: &'a str,
    pub path: &'a str,
    /// `aggregated`, `prefill` or `decode`.
    pub leg: &'static str,
    pub attempt: usize,
}

/// How an attempt ended.
pub enum AttemptOutcome<'a> {
    /// The engine's response headers, not a 5xx.
    Answered(u16),
    /// A 5xx from the engine.
    EngineError(u16),
    /// No answer: the error, and whether it was the first-byte (or prefill) timeout.
    Failed { error: &'a str, timed_out: bool },
}

/// One attempt's CLIENT span. An answered attempt's span goes with the answer and ends with
/// its last byte; the others end when the attempt does.
#[derive(Default)]
pub struct AttemptSpan {
    cx: Option<Context>,
}

impl AttemptSpan {
    /// Records how the attempt went; a failed one's span ends here.
    pub fn outcome(&self, o: AttemptOutcome<'_>) {
        let Some(cx) = &self.cx else { return };
        let span = cx.span();
        match o {
            AttemptOutcome::Answered(status) => {
                span.set_attribute(KeyValue::new("http.response.status_code", status as i64));
                span.set_attribute(KeyValue::new("switchyard.outcome", "answered"));
                if status >= 400 {
                    span.set_attribute(KeyValue::new("error.type", status.to_string()));
                    span.set_status(Status::error(""));
                }
            }
            AttemptOutcome::EngineError(status) => {
                span.set_attribute(KeyValue::new("switchyard.outcome", "engine_error"));
                end_with_status(&span, status);
            }
            AttemptOutcome::Failed { error, timed_out } => {
                let kind = if timed_out { "timeout" } else { "failed" };
                span.set_attribute(KeyValue::new("switchyard.outcome", kind));
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(error.to_owned()));
                span.end();
            }
        }
    }

    /// Ends the span (an answered attempt whose answer was read by the router, e.g. a prefill
    /// leg's).
    pub fn end(&self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

/// The spans an answer's body ends: the SERVER span and the answered attempt's CLIENT span.
#[derive(Default)]
pub struct ResponseSpans {
    server: Option<Context>,
    attempt: AttemptSpan,
}

impl ResponseSpans {
    /// Takes over the current SERVER span (and `attempt`) for the answer's body.
    pub fn take(otel: &Otel, attempt: AttemptSpan) -> ResponseSpans {
        if !otel.is_on() {
            return ResponseSpans::default();
        }
        let cx = Context::current();
        if let Some(h) = cx.get::<HandedToBody>() {
            h.0.store(true, Ordering::Release);
        }
        ResponseSpans {
            server: Some(cx),
            attempt,
        }
    }

    /// Whether the SERVER span records (then the answer's usage is read for it).
    pub fn is_recording(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|cx| cx.span().is_recording())
    }

    /// The tokens the answer reported: `gen_ai.usage.input_tokens` and
    /// `gen_ai.usage.output_tokens` on the SERVER span.
    pub fn usage(&self, prompt: Option<u64>, completion: Option<u64>) {
        let Some(cx) = &self.server else { return };
        let span = cx.span();
        for (name, value) in [
            ("gen_ai.usage.input_tokens", prompt),
            ("gen_ai.usage.output_tokens", completion),
        ] {
            if let Some(v) = value.and_then(|v| i64::try_from(v).ok()) {
                span.set_attribute(KeyValue::new(name, v));
            }
        }
    }

    /// The first byte of the answer's body (for a stream, its first token).
    pub fn first_byte(&self, after: std::time::Duration) {
        if let Some(cx) = &self.server {
            cx.span().add_event(
                "first_token",
                vec![KeyValue::new(
                    "gen_ai.server.time_to_first_token",
                    after.as_secs_f64(),
                )],
            );
        }
    }

    /// The answer's end: `status` the engine's, `outcome` how the body ended (`completed`,
    /// `client_disconnected`, `engine_error`).
    pub fn finish(&self, status: u16, outcome: &'static str) {
        if let Some(cx) = &self.attempt.cx {
            let span = cx.span();
            if outcome != "completed" {
                span.set_attribute(KeyValue::new("switchyard.body", outcome));
            }
            span.end();
        }
        if let Some(cx) = &self.server {
            let span = cx.span();
            span.set_attribute(KeyValue::new("switchyard.body", outcome));
            if outcome == "engine_error" {
                span.set_status(Status::error("the engine's answer broke off"));
            }
            end_with_status(&span, status);
        }
    }
}
