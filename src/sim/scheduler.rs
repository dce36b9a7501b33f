//! The simulated engine's clock and its step loop: one Tokio task per engine runs
//! [`EngineState`] one step at a time, each lasting the profile's step time (see
//! [`super::profile::step_ms`]) × `speed_factor` × `time_scale` of wall time. Steps are
//! anchored to the wall clock: each ends at the previous one's end plus its duration, so
//! lateness never accumulates (late steps run back-to-back). An idle engine waits for a
//! request without a timer; with `time_scale` 0 steps follow each other without sleeping.
//!
//! A request's HTTP task holds a [`Job`]: it queues the request and waits for its tokens.
//! Tokens of a step are delivered when the step ends; the task is woken for its first token,
//! for its last, and otherwise at most every [`COALESCE`] of wall time (it then takes every
//! token generated since), so that a large batch of short steps does not wake every
//! request's task at every step.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::SimConfig;
use super::block_pool::BlockPool;
use super::cache_events::CacheEvents;
use super::delivery::ReqShared;
use super::engine_loop::{EngineState, Outcome, Req, Step, StepCounts};
use super::leases::ReleaseError;
use super::metrics::{CacheInfo, Gauges, Stats, inc};
use super::profile::{StepCost, step_ms};

/// Least wall time between two wake-ups of a request's task for tokens other than its first
/// and last.
pub(crate) const COALESCE: Duration = Duration::from_millis(10);

/// The engine stopped admitting requests.
#[derive(Debug, thiserror::Error)]
#[error("the simulated engine is shutting down")]
pub(crate) struct Stopped;

/// The engine's clock: simulated milliseconds since its start.
#[derive(Debug)]
struct Clock {
    start: Instant,
    time_scale: f64,
    /// Modelled simulated ms (sum of step times), as `f64` bits: the clock when `time_scale`
    /// is 0.
    model_ms: AtomicU64,
}

impl Clock {
    fn now_ms(&self) -> f64 {
        if self.time_scale > 0.0 {
            self.start.elapsed().as_secs_f64() * 1000.0 / self.time_scale
        } else {
            f64::from_bits(self.model_ms.load(Ordering::Relaxed))
        }
    }

    fn advance(&self, ms: f64) {
        if self.time_scale == 0.0 {
            let _ = self
                .model_ms
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some((f64::from_bits(b) + ms).to_bits())
                });
        }
    }

    fn wall(&self, sim_ms: f64) -> Duration {
        let secs = sim_ms * self.time_scale / 1000.0;
        if secs.is_finite() && secs > 0.0 {
            Duration::from_secs_f64(secs)
        } else {
            Duration::ZERO
        }
    }
}

/// State shared by the loop task and the requests of one engine.
#[derive(Debug)]
struct Core {
    state: Mutex<EngineState>,
    /// A request arrived or left.
    work: Notify,
    clock: Clock,
    cost: StepCost,
    speed_factor: f64,
    stats: Arc<Stats>,
    next_id: AtomicU64,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn step_sim_ms(&self, step: &Step) -> f64 {
        step_ms(
            &self.cost,
            step.work.len(),
            step.prefill_tokens,
            step.prefill_reqs,
        ) * self.speed_factor
    }

    /// Applies a finished step and wakes the requests that must see its tokens.
    fn finish(&self, step: &Step) {
        let outcomes = {
            let mut s = self.lock();
            let before = s.counts;
            let out = s.finish(step);
            debug_assert_eq!(before, s.counts);
            out
        };
        let now_ms = self.clock.now_ms();
        let now_ns = self.clock.start.elapsed().as_nanos() as u64;
        let mut generated = 0;
        for Outcome {
            shared,
            generated: g,
            finished,
            handed_off,
        } in outcomes
        {
            if let Some(h) = handed_off {
                inc(&self.stats.hand_offs, 1);
                let _ = shared.hand_off.set(h);
            }
            generated += 1;
            shared.generated.store(g, Ordering::Release);
            let first = g == 1;
            if first {
                self.stats
                    .ttft
                    .observe((now_ms - shared.arrival_ms) / 1000.0);
            }
            if finished {
                shared.finished.store(true, Ordering::Release);
                inc(&self.stats.completed, 1);
                self.stats
                    .e2e
                    .observe((now_ms - shared.arrival_ms) / 1000.0);
            }
            let last = shared.last_wake_ns.load(Ordering::Relaxed);
            if first || finished || now_ns.saturating_sub(last) >= COALESCE.as_nanos() as u64 {
                shared.last_wake_ns.store(now_ns, Ordering::Relaxed);
                shared.notify.notify_one();
            }
        }
        inc(&self.stats.generation_tokens, generated);
    }

    /// Decides the next step and records its counters.
    fn schedule(&self) -> Step {
        let mut s = self.lock();
        let before = s.counts;
        let step = s.schedule();
        let c = s.counts;
        drop(s);
        self.record(before, c);
        step
    }

    /// Adds the change of the engine's counts to the stats.
    fn record(&self, before: StepCounts, c: StepCounts) {
        inc(&self.stats.preemptions, c.preemptions - before.preemptions);
        inc(
            &self.stats.external_tokens,
            c.external_tokens - before.external_tokens,
        );
        inc(
            &self.stats.hand_offs_expired,
            c.hand_offs_expired - before.hand_offs_expired,
        );
        inc(&self.stats.stale_reads, c.stale_reads - before.stale_reads);
        inc(
            &self.stats.prefix_queries,
            c.prefix_queries - before.prefix_queries,
        );
        inc(&self.stats.prefix_hits, c.prefix_hits - before.prefix_hits);
        inc(
            &self.stats.prompt_tokens,
            c.prompt_tokens - before.prompt_tokens,
        );
    }
}

/// The engine loop: one step after another while there is work.
async fn run(core: Arc<Core>) {
    // Wall time at which the previous step ended; `None` after idling.
    let mut prev_end: Option<Instant> = None;
    loop {
        let step = core.schedule();
        if step.is_empty() {
            prev_end = None;
            core.work.notified().await;
            continue;
        }
        inc(&core.stats.steps, 1);
        inc(
            &core.stats.prefill_computed_tokens,
            step.prefill_tokens as u64,
        );
        let ms = core.step_sim_ms(&step);
        core.clock.advance(ms);
        let wall = core.clock.wall(ms);
        if wall.is_zero() {
            // Lets the requests' tasks run between back-to-back steps.
            tokio::task::yield_now().await;
        } else {
            let end = prev_end.unwrap_or_else(Instant::now) + wall;
            if end > Instant::now() {
                tokio::time::sleep_until(end).await;
            } else {
                // Late: the step is due at once, but a loop that never awaits would keep its
                // worker thread from the requests' tasks (and the other engines').
                tokio::task::yield_now().await;
            }
            prev_end = Some(end);
        }
        core.finish(&step);
    }
}

/// The wall time a hand-off is held: the lease in simulated seconds × `time_scale` (with
/// `time_scale` 0, wall seconds).
fn lease_wall(cfg: &SimConfig) -> Duration {
    let s = if cfg.time_scale > 0.0 {
        cfg.kv_lease_seconds * cfg.time_scale
    } else {
        cfg.kv_lease_seconds
    };
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// Shared scheduler of one simulated engine. Dropping it stops its loop.
#[derive(Debug)]
pub(crate) struct Scheduler {
    core: Arc<Core>,
    task: AbortHandle,
    block_size: usize,
    num_blocks: usize,
    pub(crate) stats: Arc<Stats>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scheduler {
    /// A scheduler for `cfg`, which must have been validated, whose loop runs on the current
    /// Tokio runtime; its block pool reports its changes to `events`.
    pub(crate) fn new(cfg: &SimConfig, events: Option<Arc<dyn CacheEvents>>) -> Scheduler {
        let stats = Arc::new(Stats::default());
        let core = Arc::new(Core {
            state: Mutex::new(
                EngineState::new(
                    BlockPool::new(cfg.num_blocks, cfg.block_size, events),
                    cfg.block_size,
                    cfg.max_num_seqs,
                    cfg.max_num_batched_tokens,
                )
                .with_lease(lease_wall(cfg)),
            ),
            work: Notify::new(),
            clock: Clock {
                start: Instant::now(),
                time_scale: cfg.time_scale,
                model_ms: AtomicU64::new(0f64.to_bits()),
            },
            cost: StepCost::of(cfg),
            speed_factor: cfg.speed_factor,
            stats: Arc::clone(&stats),
            next_id: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(Arc::clone(&core))).abort_handle();
        Scheduler {
            core,
            task,
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            stats,
        }
    }

    pub(crate) fn gauges(&self) -> Gauges {
        let mut s = self.core.lock();
        let before = s.counts;
        s.expire_hand_offs(Instant::now());
        let g = Gauges {
            running: s.running(),
            waiting: s.waiting(),
            kv_usage: s.pool.usage(),
            hand_offs_held: s.hand_offs_held(),
        };
        let after = s.counts;
        drop(s);
        self.core.record(before, after);
        g
    }

    /// D read hand-off `name` holding `block_ids`: its blocks are freed; returns its computed
    /// tokens and block count.
    pub(crate) fn release_hand_off(
        &self,
        name: &str,
        block_ids: &[u32],
    ) -> Result<(usize, usize), ReleaseError> {
        let mut s = self.core.lock();
        let before = s.counts;
        let r = s.release_hand_off(name, block_ids, Instant::now());
        let after = s.counts;
        drop(s);
        self.core.record(before, after);
        if r.is_ok() && after.stale_reads == before.stale_reads {
            inc(&self.stats.hand_offs_read, 1);
            self.core.work.notify_one();
        }
        r
    }

    /// Wall seconds per simulated second (0: the clock is the sum of step times).
    pub(crate) fn time_scale(&self) -> f64 {
        self.core.clock.time_scale
    }

    pub(crate) fn cache_info(&self) -> CacheInfo {
        CacheInfo {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
        }
    }

    /// Whether a request of `tokens` tokens (prompt + max_tokens) fits the KV capacity.
    pub(crate) fn fits(&self, tokens: usize) -> bool {
        self.core.lock().fits(tokens)
    }

    /// Drops every cached block hash (vLLM's `POST /reset_prefix_cache`).
    pub(crate) fn reset_prefix_cache(&self) {
        self.core.lock().pool.reset();
    }

    /// Blocks held by running requests (tests).
    #[cfg(test)]
    pub(crate) fn used_blocks(&self) -> usize {
        self.core.lock().pool.used_blocks()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Queued,
    Done,
}

/// One request's life, seen from its HTTP task. Dropping it before every token is delivered
/// cancels it: it leaves the engine at once (its blocks freed) and counts as cancelled.
#[derive(Debug)]
pub(crate) struct Job {
    sched: Arc<Scheduler>,
    id: u64,
    shared: Arc<ReqShared>,
    /// The request, until it is queued.
    req: Option<Req>,
    prompt_tokens: usize,
    max_tokens: usize,
    delivered: usize,
    state: State,
}

impl Job {
    /// A request whose prompt is `token_ids`, whose full blocks hash to `hashes`, asking for
    /// `max_tokens` (≥ 1) tokens.
    pub(crate) fn new(
        sched: Arc<Scheduler>,
        token_ids: Vec<u32>,
        hashes: Vec<u64>,
        max_tokens: usize,
    ) -> Job {
        let core = &sched.core;
        let shared = Arc::new(ReqShared::new(core.clock.now_ms()));
        let id = core.next_id.fetch_add(1, Ordering::Relaxed);
        let max_tokens = max_tokens.max(1);
        Job {
            prompt_tokens: token_ids.len(),
            req: Some(Req::new(Arc::clone(&shared), token_ids, hashes, max_tokens)),
            sched,
            id,
            shared,
            max_tokens,
            delivered: 0,
            state: State::New,
        }
    }

    pub(crate) fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Makes the request a P leg: at its end its blocks are held under `name` for D.
    pub(crate) fn hand_off_as(&mut self, name: &str) {
        if let Some(r) = &mut self.req {
            r.hand_off = Some(Arc::from(name));
        }
    }

    /// Makes the request a D leg whose first `tokens` prompt tokens were loaded from P.
    pub(crate) fn loaded_from_remote(&mut self, tokens: usize) {
        if let Some(r) = &mut self.req {
            r.external = tokens;
        }
    }

    /// Prompt tokens not computed at its first admission (prefix-cache hit + loaded from P).
    pub(crate) fn cached_tokens(&self) -> usize {
        self.shared.cached_tokens.load(Ordering::Relaxed)
    }

    /// A finished P leg's held blocks and their computed tokens.
    pub(crate) fn handed_off(&self) -> Option<&(Vec<u32>, usize)> {
        self.shared.hand_off.get()
    }

    /// The engine this job runs on.
    pub(crate) fn scheduler(&self) -> &Arc<Scheduler> {
        &self.sched
    }

    pub(crate) fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Queues the request (FIFO) for the engine loop.
    pub(crate) async fn start(&mut self) -> Result<(), Stopped> {
        let Some(req) = self.req.take() else {
            return Ok(());
        };
        let core = &self.sched.core;
        core.lock().add(self.id, req);
        self.state = State::Queued;
        core.work.notify_one();
        Ok(())
    }

    /// Waits until at least one more token is generated and returns the positions of the
    /// tokens not yet delivered (at most `max_batch`, at least 1); an empty range once done or
    /// if not started. The first call returns at the end of the step that produced the first
    /// token.
    pub(crate) async fn next_tokens(&mut self, max_batch: usize) -> Range<usize> {
        if self.state != State::Queued {
            return self.delivered..self.delivered;
        }
        loop {
            let g = self.shared.generated.load(Ordering::Acquire);
            if g > self.delivered {
                let start = self.delivered;
                self.delivered = g.min(start.saturating_add(max_batch.max(1)));
                if self.delivered >= self.max_tokens {
                    self.state = State::Done;
                }
                return start..self.delivered;
            }
            self.shared.notify.notified().await;
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        match self.state {
            State::Done => return,
            State::New => {}
            State::Queued => {
                let core = &self.sched.core;
                let removed = core.lock().remove(self.id).is_some();
                core.work.notify_one();
                if !removed && self.shared.finished.load(Ordering::Acquire) {
                    // Every token was generated; the client left before reading them all.
                    return;
                }
            }
        }
        inc(&self.sched.stats.cancelled, 1);
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
