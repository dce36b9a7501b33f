//! Holding requests in the router (`--engine-queue-limit N`): one [`FairQueue`] per model,
//! whose room is what that model's engines take before their estimated queues reach N
//! ([`EngineRoom`]), released as the engines free up.
//!
//! A request is admitted while fewer admitted requests are on their way to an engine than the
//! engines' room; once the proxy counts it on its engine (its in-flight count, which the room
//! estimate includes), it drops the [`Admitted`] guard. Engine changes (a request finished,
//! a scrape, a health change, an engine joined or left: [`crate::engines::Changes`]) wake one
//! task that re-checks every queue. `max_queued` bounds all models' queues together.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock, PoisonError, RwLock, Weak};

use super::queue::{Admitted, Capacity, FairQueue, QueueLimits, QueueSnapshot, Refused};
use super::{Priority, Tenant};
use crate::engines::{Engine, Registry, Role};

/// The room of one model's engines below the limit: the engines that serve it whole or as
/// decode engines, healthy (prefill engines are not held for).
pub struct EngineRoom {
    registry: Arc<Registry>,
    model: Arc<str>,
    limit: u32,
}

impl EngineRoom {
    /// Whether `engine` takes this model's requests through the queue.
    fn counts(&self, engine: &Engine) -> bool {
        engine.role != Role::Prefill && engine.is_healthy() && engine.serves(&self.model)
    }
}

impl Capacity for EngineRoom {
    fn headroom(&self) -> usize {
        self.registry
            .all()
            .iter()
            .filter(|e| self.counts(e))
            .map(|e| e.room_below(self.limit))
            .sum()
    }
}

/// The router's queues, one per model, created when a model's first request comes.
pub struct Holds {
    registry: Arc<Registry>,
    limit: u32,
    limits: QueueLimits,
    queued: Arc<AtomicUsize>,
    inner: RwLock<Inner>,
    /// The task re-checking the queues on engine changes (aborted when dropped).
    release: OnceLock<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<Arc<str>, FairQueue>,
    weights: HashMap<Tenant, u32>,
}

impl Holds {
    /// Queues holding requests while every engine of their model has `limit` or more waiting,
    /// and the task that releases them as engines change. Call from within a tokio runtime.
    pub fn start(
        registry: Arc<Registry>,
        limit: u32,
        limits: QueueLimits,
        weights: HashMap<Tenant, u32>,
    ) -> Arc<Holds> {
        let holds = Arc::new(Holds {
            registry,
            limit,
            limits,
            queued: Arc::default(),
            inner: RwLock::new(Inner {
                queues: HashMap::new(),
                weights,
            }),
            release: OnceLock::new(),
        });
        let changes = holds.registry.changes();
        let me: Weak<Holds> = Arc::downgrade(&holds);
        let release = tokio::spawn(async move {
            loop {
                changes.changed().await;
                let Some(holds) = me.upgrade() else { return };
                for q in holds.queues() {
                    q.notify();
                }
            }
        });
        let _ = holds.release.set(release);
        holds
    }

    /// The per-engine limit (`--engine-queue-limit`).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Waits until `model`'s engines have room for `tenant`'s request (see
    /// [`FairQueue::wait`]). Call only for a model some engine serves: each model gets a queue
    /// for good.
    pub async fn wait(
        &self,
        model: &str,
        tenant: Tenant,
        priority: Priority,
        cost: u64,
    ) -> Result<Admitted, Refused> {
        self.queue_for(model).wait(tenant, priority, cost).await
    }

    /// Whether `engine` has room below the limit now (the proxy routes an admitted request
    /// among those that have).
    pub fn has_room(&self, engine: &Engine) -> bool {
        engine.room_below(self.limit) > 0
    }

    /// New tenant weights for every queue (the config file reloaded).
    pub fn set_weights(&self, weights: HashMap<Tenant, u32>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for q in inner.queues.values() {
            q.set_weights(weights.clone());
        }
        inner.weights = weights;
    }

    /// Each model's queue now, for `/health`, by model name.
    pub fn snapshot(&self) -> Vec<(String, QueueSnapshot)> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = inner
            .queues
            .iter()
            .map(|(m, q)| (m.to_string(), q.snapshot()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Requests waiting, all models.
    pub fn queued(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The queue bounds.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    fn queues(&self) -> Vec<FairQueue> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.queues.values().cloned().collect()
    }

    fn queue_for(&self, model: &str) -> FairQueue {
        {
            let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(q) = inner.queues.get(model) {
                return q.clone();
            }
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let weights = inner.weights.clone();
        let model: Arc<str> = Arc::from(model);
        let room = EngineRoom {
            registry: Arc::clone(&self.registry),
            model: Arc::clone(&model),
            limit: self.limit,
        };
        inner
            .queues
            .entry(model)
            .or_insert_with(|| {
                let q = FairQueue::sharing(self.limits, Arc::new(room), Arc::clone(&self.queued));
                q.set_weights(weights);
                q
            })
            .clone()
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        if let Some(task) = self.release.get() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_util::FutureExt;

    use super::*;
    use crate::engines::ScrapedStats;

    fn saturated(e: &Engine, waiting: f64) {
        e.set_stats(ScrapedStats {
            running: 4.0,
            waiting,
            scraped_at: Some(Instant::now()),
            in_flight_at_scrape: e.in_flight(),
            ..Default::default()
        });
    }

    fn t(name: &str) -> Tenant {
        Tenant(Arc::from(name))
    }

    #[tokio::test]
    async fn requests_wait_while_every_engine_is_at_the_limit_and_go_as_one_frees_up() {
        let registry = Arc::new(Registry::new());
        let a = registry.add("http://127.0.0.1:1", vec!["m".into()]);
        let b = registry.add("http://127.0.0.1:2", vec!["m".into(), "other".into()]);
        let prefill = registry.add_with_role("http://127.0.0.1:3", vec!["m".into()], Role::Prefill);
        saturated(&prefill, 0.0);
        let limits = QueueLimits {
            max_queued: 10,
            queue_timeout: Duration::from_secs(3600),
        };
        let holds = Holds::start(Arc::clone(&registry), 3, limits, HashMap::new());
        saturated(&a, 2.0);
        saturated(&b, 1.0);
        // b has room for one: the first is admitted at once, the second waits.
        let first = holds
            .wait("m", t("x"), Priority::Standard, 10)
            .now_or_never();
        let first = first.unwrap().unwrap();
        assert!(!holds.has_room(&a) && holds.has_room(&b));
        let _on_b = b.begin_request();
        drop(first);
        assert!(!holds.has_room(&b));
        let mut second = Box::pin(holds.wait("m", t("x"), Priority::Standard, 10));
        assert!((&mut second).now_or_never().is_none(), "no room: it waits");
        assert_eq!(holds.queued(), 1);
        // A request on `a` finishes: the release task admits the waiting one.
        let done = a.begin_request();
        saturated(&a, 2.0);
        drop(done);
        let admitted = tokio::time::timeout(Duration::from_secs(30), second)
            .await
            .expect("admitted once a's queue shrank");
        assert!(admitted.is_ok());
        assert_eq!(holds.queued(), 0);
        let snapshot = holds.snapshot();
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].0, "m");
    }

    #[tokio::test]
    async fn an_unhealthy_engine_gives_no_room_and_a_healthy_one_again_releases() {
        let registry = Arc::new(Registry::new());
        let a = registry.add("http://127.0.0.1:1", vec!["m".into()]);
        let limits = QueueLimits {
            max_queued: 10,
            queue_timeout: Duration::from_secs(3600),
        };
        let holds = Holds::start(Arc::clone(&registry), 1, limits, HashMap::new());
        a.set_healthy(false);
        let waiting = holds.wait("m", t("x"), Priority::Standard, 10);
        let mut waiting = Box::pin(waiting);
        assert!((&mut waiting).now_or_never().is_none());
        a.set_healthy(true);
        let admitted = tokio::time::timeout(Duration::from_secs(30), waiting).await;
        assert!(admitted.expect("released when healthy again").is_ok());
    }
}
