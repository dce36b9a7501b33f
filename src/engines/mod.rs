//! The engine registry: every backend engine with its live state.
//!
//! Per engine the router keeps its URL and models, its health, its own in-flight count (an
//! atomic decremented when a response ends, whether it completed, failed or the client went
//! away), and the figures last scraped from the engine's `/metrics` (see [`stats`]).

pub mod discovery;
pub mod fleet;
pub mod health;
pub mod k8s;
pub mod kv_events;
pub mod models;
pub mod role;
pub mod room;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;

pub use role::{Role, RoleLabels};
pub use room::Changes;
pub use stats::ScrapedStats;

/// One backend engine.
#[derive(Debug)]
pub struct Engine {
    /// Stable id, unique within the registry's lifetime.
    pub id: u32,
    /// Display name used in metrics, headers and scripts (`host:port` of the URL).
    pub name: Arc<str>,
    /// Base URL without trailing slash, e.g. `http://127.0.0.1:8000`.
    pub url: Arc<str>,
    /// Models served by this engine.
    pub models: Vec<String>,
    /// Whether it serves whole requests or one stage (prefill, decode) of disaggregated ones.
    pub role: Role,
    /// The URL's scheme and authority, parsed once, to build request URIs without parsing.
    pub origin: Option<(http::uri::Scheme, http::uri::Authority)>,
    /// The `Host` header of requests to [`Self::origin`], made once: the value the HTTP
    /// client would otherwise format per request (host, and the port unless the scheme's
    /// default).
    pub host_header: Option<http::HeaderValue>,
    in_flight: AtomicU64,
    /// Prompt tokens of the router's own requests in flight here.
    in_flight_tokens: AtomicU64,
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Removed from the registry: requests still in flight on it finish, but its health no
    /// longer reaches the per-engine gauges (an engine re-added at the same URL owns them).
    retired: AtomicBool,
    stats: ArcSwap<ScrapedStats>,
    /// Woken when this engine's room may have changed (shared with its registry).
    changes: Changes,
    /// Pre-registered metric handles: the hot path records with atomics, without label lookups.
    pub metrics: EngineMetrics,
}

/// Metric handles of one engine.
#[derive(Debug)]
pub struct EngineMetrics {
    in_flight: metrics::Gauge,
    healthy: metrics::Gauge,
    /// Per served model: successful requests, duration and time to first byte.
    pub per_model: Vec<ModelMetrics>,
}

/// Metric handles of one (engine, model) pair.
#[derive(Debug)]
pub struct ModelMetrics {
    pub model: String,
    pub ok: metrics::Counter,
    pub duration: metrics::Histogram,
    pub ttfb: metrics::Histogram,
}

impl EngineMetrics {
    fn new(name: &str, models: &[String]) -> EngineMetrics {
        let engine = name.to_owned();
        EngineMetrics {
            in_flight: metrics::gauge!("switchyard_engine_in_flight", "engine" => engine.clone()),
            healthy: metrics::gauge!("switchyard_engine_healthy", "engine" => engine.clone()),
            per_model: models
                .iter()
                .map(|m| ModelMetrics {
                    model: m.clone(),
                    ok: metrics::counter!("switchyard_requests_total", "model" => m.clone(), "engine" => engine.clone(), "status" => "200"),
                    duration: metrics::histogram!("switchyard_request_duration_seconds", "model" => m.clone()),
                    ttfb: metrics::histogram!("switchyard_time_to_first_byte_seconds", "model" => m.clone()),
                })
                .collect(),
        }
    }

    /// Handles that record nothing and register no series (for throwaway engines).
    fn unregistered(models: &[String]) -> EngineMetrics {
        EngineMetrics {
            in_flight: metrics::Gauge::noop(),
            healthy: metrics::Gauge::noop(),
            per_model: models
                .iter()
                .map(|m| ModelMetrics {
                    model: m.clone(),
                    ok: metrics::Counter::noop(),
                    duration: metrics::Histogram::noop(),
                    ttfb: metrics::Histogram::noop(),
                })
                .collect(),
        }
    }

    /// The handles for `model`, if this engine serves it.
    pub fn model(&self, model: &str) -> Option<&ModelMetrics> {
        self.per_model.iter().find(|m| m.model == model)
    }
}

/// What hyper-util's client sets as `Host` for a request to `scheme://authority/...`: the
/// host, with `:port` unless the port is the scheme's default (80 for http, 443 for https/wss).
fn host_header(
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
) -> Option<http::HeaderValue> {
    let secure = matches!(scheme.as_str(), "https" | "wss");
    let value = match (authority.port_u16(), secure) {
        (Some(443), true) | (Some(80), false) | (None, _) => authority.host().to_owned(),
        (Some(port), _) => format!("{}:{port}", authority.host()),
    };
    http::HeaderValue::from_str(&value).ok()
}

impl Engine {
    /// An engine whose metric series (`switchyard_engine_*{engine=...}` and per model) are
    /// registered with the metrics recorder.
    pub fn new(id: u32, url: &str, models: Vec<String>) -> Engine {
        let metrics = EngineMetrics::new(Self::name_of(url), &models);
        Self::with_metrics(id, url, models, metrics)
    }

    /// An engine that registers no metric series, for engines that never take traffic (e.g.
    /// the synthetic candidates policy validation runs scripts against): nothing of it shows
    /// in `/metrics`.
    pub fn unregistered(id: u32, url: &str, models: Vec<String>) -> Engine {
        let metrics = EngineMetrics::unregistered(&models);
        Self::with_metrics(id, url, models, metrics)
    }

    /// The display name of the engine at `url`: its `host:port`.
    fn name_of(url: &str) -> &str {
        let url = url.trim_end_matches('/');
        url.split_once("://").map(|(_, rest)| rest).unwrap_or(url)
    }

    fn with_metrics(id: u32, url: &str, models: Vec<String>, metrics: EngineMetrics) -> Engine {
        let url = url.trim_end_matches('/');
        let name = Self::name_of(url);
        let origin = url.parse::<http::Uri>().ok().and_then(|u| {
            let p = u.into_parts();
            Some((p.scheme?, p.authority?))
        });
        Engine {
            id,
            name: Arc::from(name),
            url: Arc::from(url),
            host_header: origin.as_ref().and_then(|(s, a)| host_header(s, a)),
            origin,
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            stats: ArcSwap::from_pointee(ScrapedStats::default()),
            changes: Changes::default(),
            metrics,
            models,
            role: Role::Aggregated,
        }
    }

    /// This engine, in `role`.
    pub fn with_role(mut self, role: Role) -> Engine {
        self.role = role;
        self
    }

    /// This engine, signalling its changes to `changes`.
    pub fn with_changes(mut self, changes: Changes) -> Engine {
        self.changes = changes;
        self
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Prompt tokens of the router's own requests in flight on this engine.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.begin_request_of(0)
    }

    /// Counts one request of `prompt_tokens` tokens in flight (in [`Engine::in_flight`] and
    /// [`Engine::in_flight_tokens`]) until the returned guard is dropped.
    pub fn begin_request_of(self: &Arc<Self>, prompt_tokens: u64) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.metrics.in_flight.increment(1.0);
        InFlightGuard {
            engine: Arc::clone(self),
            prompt_tokens,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets health; returns the previous value.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy && !self.is_retired() {
            self.metrics.healthy.set(if healthy { 1.0 } else { 0.0 });
        }
        if was != healthy {
            self.changes.notify();
        }
        if healthy {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        was
    }

    /// Whether the engine was removed from the registry (see [`Registry::remove`]).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Records a failed response (5xx or transport error); returns the consecutive count.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records a successful response.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> Arc<ScrapedStats> {
        self.stats.load_full()
    }

    /// New scraped figures (the running slots learned so far are carried over, see
    /// [`room`]).
    pub fn set_stats(&self, mut s: ScrapedStats) {
        let before = self.stats.load();
        s.running_slots = room::learn_slots(before.running_slots, before.running_max, &s);
        s.running_max = before.running_max.max(s.running);
        s.slots_confirmed = room::confirms_slots(&before, &s);
        self.stats.store(Arc::new(s));
        self.changes.notify();
    }

    /// Marks the last scraped figures stale (a scrape failed) without forgetting them.
    pub fn mark_stats_stale(&self, error: String) {
        let mut s = ScrapedStats::clone(&self.stats.load());
        s.stale = true;
        s.last_error = Some(error);
        self.stats.store(Arc::new(s));
    }

    /// The freshest estimate of this engine's queue (running + waiting): the last scraped
    /// figures corrected by the change in the router's own in-flight count since that scrape,
    /// never below zero. Without any scrape it is the router's in-flight count.
    pub fn snapshot(&self) -> EngineSnapshot {
        let s = self.stats.load();
        let in_flight = self.in_flight();
        let (running, waiting, queue, age) = match s.scraped_at {
            Some(at) => {
                let delta = in_flight as f64 - s.in_flight_at_scrape as f64;
                let queue = (s.running + s.waiting + delta).max(0.0);
                (
                    s.running,
                    s.waiting,
                    queue,
                    Some(at.elapsed().as_secs_f64()),
                )
            }
            None => (0.0, 0.0, in_flight as f64, None),
        };
        EngineSnapshot {
            running,
            waiting,
            queue,
            in_flight,
            in_flight_tokens: self.in_flight_tokens(),
            kv_usage: s.kv_usage,
            stats_age_secs: age,
            stale: s.stale || age.is_none(),
        }
    }
}

/// Keeps a request counted in its engine's in-flight figure while alive.
#[derive(Debug)]
pub struct InFlightGuard {
    engine: Arc<Engine>,
    prompt_tokens: u64,
}

impl InFlightGuard {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.engine.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.engine
            .in_flight_tokens
            .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
        self.engine.metrics.in_flight.decrement(1.0);
        self.engine.changes.notify();
    }
}

/// A point-in-time view of an engine's load, as policies see it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Last scraped `vllm:num_requests_running`.
    pub running: f64,
    /// Last scraped `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// Freshest queue estimate (see [`Engine::snapshot`]).
    pub queue: f64,
    /// The router's own in-flight requests on this engine.
    pub in_flight: u64,
    /// Prompt tokens of the router's own in-flight requests on this engine (the stand-in
    /// tokenizer's estimate, exact for token-id prompts).
    pub in_flight_tokens: u64,
    /// Last scraped KV-cache usage, 0..1.
    pub kv_usage: f64,
    /// Seconds since the figures were scraped; `None` if never.
    pub stats_age_secs: Option<f64>,
    /// Whether the scraped figures are missing or from a failed scrape.
    pub stale: bool,
}

/// A candidate engine for one request: the engine and its state at decision time.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub engine: Arc<Engine>,
    pub load: EngineSnapshot,
    /// Tokens of the prompt found cached on this engine, as given by the caller of
    /// `PolicyStore::decide` (tests, benchmarks). The proxy leaves it 0 and passes
    /// `PolicyStore::decide_with` a matcher that computes matches only when a tier needs them.
    pub prefix_match_tokens: usize,
}

/// All engines known to the router.
#[derive(Debug, Default)]
pub struct Registry {
    engines: ArcSwap<Vec<Arc<Engine>>>,
    next_id: AtomicU32,
    changes: Changes,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The signal its engines give when their room may have changed (see [`room`]).
    pub fn changes(&self) -> Changes {
        self.changes.clone()
    }

    /// Adds an aggregated engine and returns it.
    pub fn add(&self, url: &str, models: Vec<String>) -> Arc<Engine> {
        self.add_with_role(url, models, Role::Aggregated)
    }

    /// Adds an engine with `role` and returns it.
    pub fn add_with_role(&self, url: &str, models: Vec<String>, role: Role) -> Arc<Engine> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(
            Engine::new(id, url, models)
                .with_role(role)
                .with_changes(self.changes()),
        );
        e.metrics.healthy.set(1.0);
        let added = Arc::clone(&e);
        self.engines.rcu(move |cur| {
            let mut v = Vec::clone(cur);
            v.push(Arc::clone(&added));
            v
        });
        self.changes.notify();
        e
    }

    /// Removes an engine by id; returns it if it was present. Routing decisions made from then
    /// on no longer see it; requests already on it keep their `Arc` and finish. Its health
    /// gauge drops to 0 (the metrics recorder cannot delete a series; an engine re-added at the
    /// same URL takes the series over again).
    pub fn remove(&self, id: u32) -> Option<Arc<Engine>> {
        let mut removed = None;
        self.engines.rcu(|cur| {
            let mut v = Vec::clone(cur);
            removed = v.iter().position(|e| e.id == id).map(|pos| v.remove(pos));
            v
        });
        if let Some(e) = &removed {
            e.retired.store(true, Ordering::Relaxed);
            e.metrics.healthy.set(0.0);
            self.changes.notify();
        }
        removed
    }

    /// Replaces engine `id` by a new engine at the same URL serving `models` in `role`, in one
    /// step (no request sees the registry without it). The new engine has a new id, fresh
    /// health and no scraped figures; requests on the old one finish. Returns the new engine,
    /// or `None` if `id` is not in the registry.
    pub fn replace(&self, id: u32, models: Vec<String>, role: Role) -> Option<Arc<Engine>> {
        let old = self.all().iter().find(|e| e.id == id).cloned()?;
        let new_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let new = Arc::new(
            Engine::new(new_id, &old.url, models)
                .with_role(role)
                .with_changes(self.changes()),
        );
        let mut replaced = None;
        self.engines.rcu(|cur| {
            let mut v = Vec::clone(cur);
            replaced = v
                .iter()
                .position(|e| e.id == id)
                .map(|pos| std::mem::replace(&mut v[pos], Arc::clone(&new)));
            v
        });
        let was = replaced?;
        was.retired.store(true, Ordering::Relaxed);
        new.metrics.healthy.set(1.0);
        self.changes.notify();
        Some(new)
    }

    pub fn all(&self) -> Arc<Vec<Arc<Engine>>> {
        self.engines.load_full()
    }

    /// The union of all engines' models, deduplicated, in first-seen order.
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.engines.load().iter() {
            for m in &e.models {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
        out
    }

    pub fn any_healthy(&self) -> bool {
        self.engines.load().iter().any(|e| e.is_healthy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn host_header_is_what_the_client_would_set() {
        let host = |url: &str| Engine::unregistered(0, url, vec![]).host_header;
        assert_eq!(host("http://127.0.0.1:8000/").unwrap(), "127.0.0.1:8000");
        assert_eq!(host("http://engine:80").unwrap(), "engine");
        assert_eq!(host("http://engine").unwrap(), "engine");
        assert_eq!(host("https://engine:443").unwrap(), "engine");
        assert_eq!(host("https://engine:80").unwrap(), "engine:80");
        assert_eq!(host("http://[::1]:9000").unwrap(), "[::1]:9000");
    }

    #[test]
    fn queue_is_scraped_figures_corrected_by_in_flight_change() {
        let e = Arc::new(Engine::new(0, "http://127.0.0.1:1/", vec!["m".into()]));
        assert_eq!(&*e.name, "127.0.0.1:1");
        let g1 = e.begin_request();
        assert_eq!(
            e.snapshot().queue,
            1.0,
            "no scrape yet: queue is the router's in-flight"
        );
        e.set_stats(ScrapedStats {
            running: 3.0,
            waiting: 2.0,
            scraped_at: Some(Instant::now()),
            in_flight_at_scrape: 1,
            ..Default::default()
        });
        let _g2 = e.begin_request();
        assert_eq!(e.snapshot().queue, 6.0);
        drop(g1);
        assert_eq!(e.snapshot().queue, 5.0);
        e.set_stats(ScrapedStats {
            running: 0.0,
            waiting: 0.0,
            scraped_at: Some(Instant::now()),
            in_flight_at_scrape: 3,
            ..Default::default()
        });
        assert_eq!(e.snapshot().queue, 0.0, "never below zero");
    }

    #[test]
    fn in_flight_tokens_follow_the_guards() {
        let e = Arc::new(Engine::new(0, "http://127.0.0.1:1/", vec!["m".into()]));
        let a = e.begin_request_of(1000);
        let b = e.begin_request_of(24);
        let _c = e.begin_request();
        assert_eq!((e.in_flight(), e.in_flight_tokens()), (3, 1024));
        assert_eq!(e.snapshot().in_flight_tokens, 1024);
        drop(a);
        assert_eq!((e.in_flight(), e.in_flight_tokens()), (2, 24));
        drop(b);
        assert_eq!(e.snapshot().in_flight_tokens, 0);
    }

    #[test]
    fn registry_models_union_and_remove() {
        let r = Registry::new();
        let a = r.add("http://a:1", vec!["m1".into(), "m2".into()]);
        r.add("http://b:1", vec!["m2".into(), "m3".into()]);
        assert_eq!(r.models(), vec!["m1", "m2", "m3"]);
        assert!(r.remove(a.id).is_some());
        assert_eq!(r.models(), vec!["m2", "m3"]);
        assert!(r.remove(a.id).is_none());
    }
}
