//! The way out for finished spans: the SDK's batch processor (its own thread; the request path
//! only hands a span over, never waits), behind a gate that bounds the spans held and counts
//! those dropped (`switchyard_trace_spans_dropped_total{reason}`: `queue_full`, or
//! `export_failed` for the spans of a batch the collector did not take), and the OTLP/HTTP
//! protobuf exporter sending with hyper (plain or rustls) on a small runtime of its own, run on
//! the batch thread, so that an export never takes a worker of the router's runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};

use super::setup::{OtelError, Plan};
use crate::config::OtlpSettings;

/// The metric counting spans that were not exported.
pub const DROPPED_METRIC: &str = "switchyard_trace_spans_dropped_total";

/// The tracer provider for `plan`: OTLP/HTTP export behind the counting gate.
pub fn provider(plan: &Plan, settings: &OtlpSettings) -> Result<SdkTracerProvider, OtelError> {
    let client = OwnRuntimeClient::new(&plan.endpoint, plan.export_timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(plan.endpoint.clone())
        .with_timeout(plan.export_timeout)
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    // The SDK's own reading of OTEL_BSP_*, then the settings' overrides.
    let mut batch = BatchConfigBuilder::default();
    if let Some(d) = settings.schedule_delay {
        batch = batch.with_scheduled_delay(d);
    }
    let capacity = queue_size(settings);
    // The batch processor's channel holds as many: it never drops a span the gate lets by.
    let batch = batch.with_max_queue_size(capacity).build();
    let gate = Arc::new(Gate {
        held: AtomicUsize::new(0),
        capacity,
    });
    let processor = GatedProcessor {
        inner: BatchSpanProcessor::new(
            CountingExporter {
                inner: exporter,
                gate: Arc::clone(&gate),
            },
            batch,
        ),
        gate,
    };
    let mut resource = Resource::builder();
    if let Some(name) = plan.service_name {
        resource = resource.with_service_name(name);
    }
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build());
    if let Some(s) = plan.sampler.build() {
        builder = builder.with_sampler(s);
    }
    Ok(builder.build())
}

/// Spans held for export at most: the settings', else `OTEL_BSP_MAX_QUEUE_SIZE`, else the
/// SDK's default (2048).
fn queue_size(settings: &OtlpSettings) -> usize {
    settings
        .max_queue
        .or_else(|| {
            std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
                .ok()
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(2048)
        .max(1)
}

/// Spans handed to the batch processor and not yet given to the exporter.
#[derive(Debug)]
struct Gate {
    held: AtomicUsize,
    capacity: usize,
}

/// The batch processor behind the gate: a span past its capacity is dropped and counted here
/// (the SDK counts its drops but does not tell).
#[derive(Debug)]
struct GatedProcessor {
    inner: BatchSpanProcessor,
    gate: Arc<Gate>,
}

impl SpanProcessor for GatedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.gate.held.fetch_add(1, Ordering::AcqRel) >= self.gate.capacity {
            self.gate.held.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(DROPPED_METRIC, "reason" => "queue_full").increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, releasing the gate for each batch it is given and counting the spans of
/// the batches that fail.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    gate: Arc<Gate>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.gate.held.fetch_sub(n, Ordering::AcqRel);
        let sent = self.inner.export(batch);
        async move {
            let r = sent.await;
            if let Err(e) = &r {
                metrics::counter!(DROPPED_METRIC, "reason" => "export_failed").increment(n as u64);
                tracing::debug!(error = %e, spans = n, "trace export failed");
            }
            r
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// opentelemetry-http's hyper client on a current-thread runtime of its own, created on first
/// use on the batch processor's thread (which calls the exporter from outside any runtime).
#[derive(Debug)]
struct OwnRuntimeClient {
    client: Transport,
    runtime: OnceLock<Option<tokio::runtime::Runtime>>,
}

#[derive(Debug)]
enum Transport {
    Plain(HyperClient),
    Tls(HyperClient<Https>),
}

impl OwnRuntimeClient {
    fn new(endpoint: &str, timeout: Duration) -> Result<OwnRuntimeClient, OtelError> {
        let client = if endpoint.starts_with("https:") {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .map_err(OtelError::Roots)?
                .https_only()
                .enable_http1()
                .build();
            Transport::Tls(HyperClient::new(https, timeout, None))
        } else {
            Transport::Plain(HyperClient::with_default_connector(timeout, None))
        };
        Ok(OwnRuntimeClient {
            client,
            runtime: OnceLock::new(),
        })
    }
}

impl HttpClient for OwnRuntimeClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let runtime = self
                .runtime
                .get_or_init(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| tracing::error!(error = %e, "no runtime for trace export"))
                        .ok()
                })
                .as_ref()
                .ok_or("no runtime for trace export")?;
            match &self.client {
                Transport::Plain(c) => runtime.block_on(c.send_bytes(request)),
                Transport::Tls(c) => runtime.block_on(c.send_bytes(request)),
            }
        })
    }
}
