//! OpenTelemetry tracing: each routed request's path through the router as spans, exported
//! over OTLP/HTTP to the operator's collector (Jaeger, Tempo, an OpenTelemetry Collector), and
//! W3C trace context continued from the client and passed on to the engine.
//!
//! - [`setup`]: whether tracing is on and how, from `--otlp-endpoint`, `--otlp-sample-ratio`
//!   and the standard `OTEL_*` variables.
//! - [`export`]: the batch processor and the OTLP/HTTP exporter; drops are counted.
//! - [`spans`]: the spans of a request and the `traceparent` the engine receives.
//!
//! Off unless configured; then [`Otel`] is `None` inside and every helper returns at once:
//! no span, no allocation, no read of the current context.

pub mod export;
pub mod setup;
pub mod spans;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::OtlpSettings;
pub use export::DROPPED_METRIC;
pub use setup::OtelError;
pub use spans::{
    AttemptOutcome, AttemptSpan, AttemptTarget, Decided, QueueSpan, ResponseSpans, RouteSpan,
    ServerSpan, on_parsed,
};

/// How long shutdown waits for the spans still held to be exported.
pub const FLUSH_BOUND: Duration = Duration::from_secs(3);

/// The router's tracing: off, or a tracer whose spans are exported.
#[derive(Clone, Default)]
pub struct Otel(Option<Arc<Tracing>>);

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_on() {
            "Otel(on)"
        } else {
            "Otel(off)"
        })
    }
}

impl Otel {
    /// Tracing as `settings` and the process environment say: off when neither names an
    /// endpoint.
    pub fn start(settings: &OtlpSettings) -> Result<Otel, OtelError> {
        let Some(plan) = setup::plan(settings, |name| std::env::var(name).ok())? else {
            return Ok(Otel(None));
        };
        let provider = export::provider(&plan, settings)?;
        let tracer = provider.tracer("switchyard");
        metrics::describe_counter!(
            DROPPED_METRIC,
            "Finished trace spans not exported: queue_full (the export queue was full), export_failed (the collector did not take their batch)"
        );
        for reason in ["queue_full", "export_failed"] {
            metrics::counter!(DROPPED_METRIC, "reason" => reason).increment(0);
        }
        tracing::info!(endpoint = %plan.endpoint, sampler = ?plan.sampler, "exporting traces over OTLP/HTTP");
        Ok(Otel(Some(Arc::new(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        }))))
    }

    /// Whether spans are made.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Exports the spans still held, waiting at most [`FLUSH_BOUND`]; later spans are not
    /// exported. Runs on the blocking pool (the SDK's shutdown blocks its caller).
    pub async fn shutdown(&self) {
        let bound = FLUSH_BOUND;
        let Some(t) = self.0.clone() else { return };
        let done = tokio::task::spawn_blocking(move || t.provider.shutdown_with_timeout(bound));
        match tokio::time::timeout(bound + Duration::from_millis(500), done).await {
            Ok(Ok(Ok(()))) => tracing::debug!("trace export flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export not flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export not flushed"),
            Err(_) => tracing::warn!(?bound, "trace export not flushed in time"),
        }
    }
}
