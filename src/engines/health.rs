//! Engine health: ejection and readmission, and the per-engine `/metrics` scrape loop.
//!
//! - An engine that refuses connections or times out (on a request or a scrape) is ejected at
//!   once. An engine whose responses fail `eject_after_failures` times in a row (5xx, broken
//!   responses) is ejected too (outlier detection).
//! - An ejected engine is probed with `GET /health` every `probe_interval` in the background and
//!   readmitted on the first 200.
//! - Each engine's `/metrics` is scraped every `stats_interval` by its own task, so a dead or
//!   slow engine never delays the scrapes (or the routing) of the others.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;

use super::{Engine, Registry, stats};
use crate::prefix::PrefixIndex;
use crate::upstream::{self, HttpClient};

/// Largest `/health` body read from a probed engine.
const PROBE_MAX_BYTES: usize = 64 * 1024;

/// Health settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub stats_interval: Duration,
    pub probe_interval: Duration,
    pub eject_after_failures: u32,
}

/// Watches engine health and scrapes engine figures.
pub struct Monitor {
    registry: Arc<Registry>,
    client: HttpClient,
    prefix: Arc<PrefixIndex>,
    cfg: HealthConfig,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("cfg", &self.cfg).finish()
    }
}

impl Monitor {
    pub fn new(
        registry: Arc<Registry>,
        client: HttpClient,
        prefix: Arc<PrefixIndex>,
        cfg: HealthConfig,
    ) -> Arc<Monitor> {
        Arc::new(Monitor {
            registry,
            client,
            prefix,
            cfg,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Starts a scrape loop for every engine in the registry (call once, inside a runtime).
    pub fn start(self: &Arc<Self>) {
        for engine in self.registry.all().iter() {
            self.watch_engine(engine);
        }
    }

    /// Starts the scrape loop of one engine, e.g. one discovered at runtime. The loop (and the
    /// probe loop, if the engine gets ejected) ends by itself at its first tick after the engine
    /// left the registry.
    pub fn watch_engine(self: &Arc<Self>, engine: &Arc<Engine>) {
        let me = Arc::clone(self);
        let engine = Arc::clone(engine);
        let h = tokio::spawn(async move { me.scrape_loop(engine).await });
        self.track(h.abort_handle());
    }

    /// Stops every background task.
    pub fn shutdown(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.drain(..).for_each(|t| t.abort());
        }
    }

    fn track(&self, h: AbortHandle) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(h);
        }
    }

    fn scrape_timeout(&self) -> Duration {
        self.cfg
            .stats_interval
            .clamp(Duration::from_millis(200), Duration::from_secs(2))
    }

    async fn scrape_loop(self: Arc<Self>, engine: Arc<Engine>) {
        let mut tick = tokio::time::interval(self.cfg.stats_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.registry.all().iter().any(|e| e.id == engine.id) {
                return; // removed
            }
            if !engine.is_healthy() {
                continue; // the probe loop owns it until readmission
            }
            match stats::scrape_engine(&self.client, &engine, self.scrape_timeout()).await {
                Ok(()) => {}
                Err(f) if f.unreachable => {
                    self.report_unreachable(&engine, "metrics scrape could not connect")
                }
                // Stale figures, but the engine answered: it keeps its traffic.
                Err(f) if f.unusable_page => {}
                Err(_) => self.report_failure(&engine, "metrics scrape failed"),
            }
        }
    }

    /// The engine could not be reached: eject it now and probe it in the background.
    pub fn report_unreachable(self: &Arc<Self>, engine: &Arc<Engine>, why: &str) {
        engine.record_failure();
        // Its process is gone or stuck: whatever it had cached is no longer known.
        if self.eject(engine, why) {
            self.prefix.remove_engine(engine.id);
        }
    }

    /// The engine answered with a failure (5xx or a broken response).
    pub fn report_failure(self: &Arc<Self>, engine: &Arc<Engine>, why: &str) {
        let n = engine.record_failure();
        if n >= self.cfg.eject_after_failures {
            self.eject(engine, why);
        }
    }

    /// The engine answered well.
    pub fn report_success(&self, engine: &Engine) {
        engine.record_success();
    }

    /// Ejects `engine` if healthy; returns whether this call ejected it.
    fn eject(self: &Arc<Self>, engine: &Arc<Engine>, why: &str) -> bool {
        if !engine.set_healthy(false) {
            return false;
        }
        tracing::warn!(engine = %engine.name, reason = why, "engine ejected");
        metrics::counter!("switchyard_engine_ejections_total", "engine" => engine.name.to_string())
            .increment(1);
        let me = Arc::clone(self);
        let engine = Arc::clone(engine);
        let h = tokio::spawn(async move { me.probe_until_healthy(engine).await });
        self.track(h.abort_handle());
        true
    }

    async fn probe_until_healthy(self: Arc<Self>, engine: Arc<Engine>) {
        let url = format!("{}/health", engine.url);
        let timeout = self
            .cfg
            .probe_interval
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            tokio::time::sleep(self.cfg.probe_interval).await;
            if !self.registry.all().iter().any(|e| e.id == engine.id) {
                return;
            }
            // Only the 2xx status matters; the body is read (bounded) to keep the connection
            // pooled, and a body over the bound still means a 2xx answer.
            let probe = upstream::get(&self.client, &url, timeout, PROBE_MAX_BYTES).await;
            if matches!(probe, Ok(_) | Err(upstream::GetError::TooLarge(_))) {
                // Refresh the figures before taking traffic again, so policies see its real load.
                let _ = stats::scrape_engine(&self.client, &engine, timeout).await;
                engine.set_healthy(true);
                tracing::info!(engine = %engine.name, "engine readmitted after a healthy probe");
                return;
            }
        }
    }
}
