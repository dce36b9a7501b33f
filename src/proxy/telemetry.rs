//! The router's own Prometheus metrics (`GET /metrics`) and per-request recording.
//!
//! Metrics: `switchyard_requests_total{model,engine,status}`,
//! `switchyard_request_duration_seconds{model}` and `switchyard_time_to_first_byte_seconds{model}`
//! (histograms), `switchyard_engine_in_flight{engine}`, `switchyard_engine_healthy{engine}`,
//! `switchyard_retries_total{model}`, plus the policy metrics (`switchyard_routing_decisions_total`,
//! `switchyard_policy_reloads_total`, `switchyard_policy_script_errors_total`).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engines::{Engine, ModelMetrics};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle. `None` if another
/// recorder was installed first (an embedding application's); metrics then go there.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(
        "switchyard_requests_total",
        "Requests answered, by model, engine and status"
    );
    metrics::describe_histogram!(
        "switchyard_request_duration_seconds",
        "Time from request to the end of the response"
    );
    metrics::describe_histogram!(
        "switchyard_time_to_first_byte_seconds",
        "Time from request to the first body byte from the engine"
    );
    metrics::describe_gauge!(
        "switchyard_engine_in_flight",
        "Requests the router has in flight on each engine"
    );
    metrics::describe_gauge!(
        "switchyard_engine_healthy",
        "1 if the engine takes traffic, 0 if ejected"
    );
    metrics::describe_counter!(
        "switchyard_retries_total",
        "Requests retried on another engine"
    );
}

/// What one proxied request records when it ends.
pub struct RequestRecord {
    start: Instant,
    model: Arc<str>,
    engine: Arc<Engine>,
    status: u16,
}

impl RequestRecord {
    pub fn new(start: Instant, model: Arc<str>, engine: Arc<Engine>, status: u16) -> RequestRecord {
        RequestRecord {
            start,
            model,
            engine,
            status,
        }
    }

    pub fn engine_name(&self) -> &str {
        &self.engine.name
    }

    fn handles(&self) -> Option<&ModelMetrics> {
        self.engine.metrics.model(&self.model)
    }

    pub fn first_byte(&self, at: Instant) {
        let secs = at.duration_since(self.start).as_secs_f64();
        match self.handles() {
            Some(h) => h.ttfb.record(secs),
            None => metrics::histogram!("switchyard_time_to_first_byte_seconds", "model" => Arc::clone(&self.model)).record(secs),
        }
    }

    pub fn finish(&self, outcome: &'static str) {
        let secs = self.start.elapsed().as_secs_f64();
        match self.handles() {
            Some(h) => {
                h.duration.record(secs);
                if self.status == 200 {
                    h.ok.increment(1);
                } else {
                    count_request(&self.model, &self.engine.name, self.status);
                }
            }
            None => {
                metrics::histogram!("switchyard_request_duration_seconds", "model" => Arc::clone(&self.model)).record(secs);
                count_request(&self.model, &self.engine.name, self.status);
            }
        }
        if outcome != "completed" {
            metrics::counter!("switchyard_responses_interrupted_total", "engine" => Arc::clone(&self.engine.name), "reason" => outcome)
                .increment(1);
        }
    }
}

/// Counts one answered request.
pub fn count_request(model: &Arc<str>, engine: &Arc<str>, status: u16) {
    metrics::counter!(
        "switchyard_requests_total",
        "model" => Arc::clone(model),
        "engine" => Arc::clone(engine),
        "status" => status_label(status)
    )
    .increment(1);
}

fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        400 => "400".into(),
        404 => "404".into(),
        413 => "413".into(),
        500 => "500".into(),
        502 => "502".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}
