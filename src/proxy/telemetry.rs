//! The router's own Prometheus metrics (`GET /metrics`) and per-request recording.
//!
//! Metrics: `switchyard_requests_total{model,engine,status}`,
//! `switchyard_request_duration_seconds{model}` and `switchyard_time_to_first_byte_seconds{model}`
//! (histograms), `switchyard_engine_in_flight{engine}`, `switchyard_engine_healthy{engine}`,
//! `switchyard_retries_total{model}`, `switchyard_tokenize_total{result}` (requests tokenized
//! for exact prefix matching), plus the policy metrics
//! (`switchyard_routing_decisions_total{policy,tier,engine,kv,stage}`,
//! `switchyard_policy_reloads_total`, `switchyard_policy_script_errors_total`).
//!
//! [`register_families`] registers every family at zero when the router starts, so that
//! dashboards and alerts read 0, not "no data", before the first retry, ejection or reload.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engines::{Engine, ModelMetrics, Registry, Role};
use crate::policy::{DEFAULT_TIER, KvSource, PolicyStore};

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
    crate::admit::queue::describe_metrics();
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
    metrics::describe_counter!(
        "switchyard_tokenize_total",
        "Requests tokenized for exact prefix matching (--tokenizer), by result"
    );
}

/// What one proxied request records when it ends.
pub struct RequestRecord {
    start: Instant,
    model: Arc<str>,
    engine: Arc<Engine>,
    status: u16,
    /// The request's trace spans the answer ends (none when tracing is off).
    spans: crate::otel::ResponseSpans,
}

impl RequestRecord {
    pub fn new(start: Instant, model: Arc<str>, engine: Arc<Engine>, status: u16) -> RequestRecord {
        RequestRecord {
            start,
            model,
            engine,
            status,
            spans: crate::otel::ResponseSpans::default(),
        }
    }

    /// The trace spans to end with the answer.
    pub fn with_spans(mut self, spans: crate::otel::ResponseSpans) -> RequestRecord {
        self.spans = spans;
        self
    }

    /// Whether the answer's usage is wanted (its trace span records).
    pub fn wants_usage(&self) -> bool {
        self.spans.is_recording()
    }

    /// The tokens the answer reported (`usage`), for its trace span.
    pub fn usage(&self, prompt: Option<u64>, completion: Option<u64>) {
        self.spans.usage(prompt, completion);
    }

    pub fn engine_name(&self) -> &str {
        &self.engine.name
    }

    fn handles(&self) -> Option<&ModelMetrics> {
        self.engine.metrics.model(&self.model)
    }

    pub fn first_byte(&self, at: Instant) {
        let since = at.duration_since(self.start);
        self.spans.first_byte(since);
        let secs = since.as_secs_f64();
        match self.handles() {
            Some(h) => h.ttfb.record(secs),
            None => metrics::histogram!("switchyard_time_to_first_byte_seconds", "model" => Arc::clone(&self.model)).record(secs),
        }
    }

    pub fn finish(&self, outcome: &'static str) {
        self.spans.finish(self.status, outcome);
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

/// The reasons `proxy::conn::ConnActivity::check` gives for closing a client connection
/// (`switchyard_client_connections_closed_total{reason}`).
const CONNECTION_CLOSE_REASONS: &[&str] = &["idle", "request headers not received in time"];

/// The outcomes other than `completed` that [`RequestRecord::finish`] is given by the response
/// body (`switchyard_responses_interrupted_total{engine,reason}`).
const INTERRUPT_REASONS: &[&str] = &["client_disconnected", "engine_error"];

/// Registers every metric family the router exports, at zero, with the label sets known at
/// start: per engine, per model, per tier of each policy in use, and the fixed label values
/// (reload results, connection-close and interruption reasons). Prometheus then has a series to
/// show as 0 before the first retry, ejection, reload, script error or closed connection, and
/// `rate()`/`increase()` see the first event as a change from 0. Counters are only touched
/// (never reset), so calling this again, or with another router in the same process, is harmless.
pub fn register_families(registry: &Registry, policies: &PolicyStore) {
    let tiers = policy_tiers(policies);
    for e in registry.all().iter() {
        register_engine_series(e, &tiers);
    }
    for model in registry.models() {
        for outcome in PD_OUTCOMES {
            metrics::counter!("switchyard_pd_requests_total", "model" => model.clone(), "outcome" => *outcome)
                .increment(0);
        }
        metrics::counter!("switchyard_retries_total", "model" => model).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!("switchyard_policy_reloads_total", "result" => result).increment(0);
    }
    for (policy, main, prefill) in &tiers {
        for tier in main.iter().chain(prefill.iter().flatten()) {
            metrics::counter!(
                "switchyard_policy_script_errors_total",
                "policy" => policy.clone(),
                "tier" => tier.clone()
            )
            .increment(0);
        }
    }
    for result in ["ok", "error"] {
        metrics::counter!("switchyard_tokenize_total", "result" => result).increment(0);
    }
    for limit in ["requests", "tokens"] {
        metrics::counter!("switchyard_rate_limited_total", "limit" => limit).increment(0);
    }
    crate::admit::queue::register_metrics();
    for reason in CONNECTION_CLOSE_REASONS {
        metrics::counter!("switchyard_client_connections_closed_total", "reason" => *reason)
            .increment(0);
    }
}

/// Every `outcome` of `switchyard_pd_requests_total` (what happened to a request of a
/// disaggregated policy; see `disagg`).
pub const PD_OUTCOMES: &[&str] = &[
    "disaggregated",
    "decode_only_skipped",
    "decode_only_no_prefill_engine",
    "decode_only_prefill_failed",
    "decode_only_no_handoff",
    "prefill_client_error",
    "aggregated_n",
    "aggregated_path",
    "aggregated_no_decode_engine",
    "aggregated_body",
];

/// Registers the per-engine series of an engine added after start (e.g. by discovery), at
/// zero, as [`register_families`] does for the engines known at start. The engine's own
/// gauges and per-model request series are registered when the engine is built.
pub fn register_engine(engine: &Engine, policies: &PolicyStore) {
    register_engine_series(engine, &policy_tiers(policies));
}

fn register_engine_series(engine: &Engine, tiers: &[PolicyTiers]) {
    let name = engine.name.to_string();
    metrics::counter!("switchyard_engine_ejections_total", "engine" => name.clone()).increment(0);
    metrics::counter!("switchyard_engine_scrape_failures_total", "engine" => name.clone())
        .increment(0);
    for reason in INTERRUPT_REASONS {
        metrics::counter!(
            "switchyard_responses_interrupted_total",
            "engine" => name.clone(),
            "reason" => *reason
        )
        .increment(0);
    }
    // The stage an engine is chosen for follows its role (a disaggregated policy's prefill
    // pipeline chooses among the prefill engines).
    let stage = engine.role.as_str();
    for (policy, main, prefill) in tiers {
        let tier_names = match (engine.role, prefill) {
            (Role::Prefill, Some(p)) => p,
            _ => main,
        };
        for tier in tier_names.iter().map(String::as_str).chain([DEFAULT_TIER]) {
            for kv in KvSource::LABELS {
                metrics::counter!(
                    "switchyard_routing_decisions_total",
                    "policy" => policy.clone(),
                    "tier" => tier.to_string(),
                    "engine" => name.clone(),
                    "kv" => kv,
                    "stage" => stage
                )
                .increment(0);
            }
        }
    }
}

/// A policy's name, its (decode) tiers, and a disaggregated policy's prefill tiers.
type PolicyTiers = (String, Vec<String>, Option<Vec<String>>);

/// The policies in use (the default and the per-model ones) with their tiers, in the order
/// `GET /admin/policies` lists them.
fn policy_tiers(policies: &PolicyStore) -> Vec<PolicyTiers> {
    let status = policies.status_json();
    let mut out: Vec<PolicyTiers> = Vec::new();
    for p in status["policies"].as_array().into_iter().flatten() {
        let (Some(true), Some(name)) = (p["active"].as_bool(), p["name"].as_str()) else {
            continue;
        };
        let names = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        };
        let prefill = p["prefill_tiers"]
            .is_array()
            .then(|| names(&p["prefill_tiers"]));
        if !out.iter().any(|(n, _, _)| n == name) {
            out.push((name.to_owned(), names(&p["tiers"]), prefill));
        }
    }
    out
}
