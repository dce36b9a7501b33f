//! Continuous-batching scheduler model: running slots, a FIFO waiting queue, prefill with
//! prefix caching, and token-by-token decode whose pace slows down as the batch fills.
//!
//! Timing of one request (all figures in simulated milliseconds, each multiplied by
//! `speed_factor`; the wall-clock wait is the simulated one times `time_scale`):
//!
//! * queue: wait (FIFO) for one of `max_num_seqs` running slots;
//! * prefill: `prefill_overhead_ms + prefill_ms_per_token × uncached prompt tokens`; the first
//!   token is emitted at its end (time to first token = queue + prefill);
//! * decode: each next token `itl_ms × (1 + batch_slowdown × (running − 1) / max_num_seqs)`
//!   after the previous one, `running` being read when the token is scheduled.
//!
//! Tokens are scheduled against absolute deadlines, so timer lateness never accumulates: when
//! a wake-up comes late, every token already due is emitted at once. With zero delays no
//! clock is read and no timer is armed.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::SimConfig;
use super::cache::PrefixCache;
use super::cache_events::CacheEvents;
use super::metrics::{CacheInfo, Gauges, Stats, inc};

/// The engine stopped admitting requests.
#[derive(Debug, thiserror::Error)]
#[error("the simulated engine is shutting down")]
pub(crate) struct Stopped;

/// Shared scheduler state of one simulated engine.
#[derive(Debug)]
pub(crate) struct Scheduler {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    running: AtomicUsize,
    /// KV blocks held by running requests (prompt + generated tokens).
    held_blocks: AtomicUsize,
    cache: Mutex<PrefixCache>,
    block_size: usize,
    num_blocks: usize,
    max_num_seqs: usize,
    prefill_overhead_ms: f64,
    prefill_ms_per_token: f64,
    itl_ms: f64,
    batch_slowdown: f64,
    speed_factor: f64,
    time_scale: f64,
    pub(crate) stats: Stats,
}

impl Scheduler {
    /// A scheduler for `cfg`, which must have been validated; its prefix cache reports its
    /// changes to `events`.
    pub(crate) fn new(cfg: &SimConfig, events: Option<Arc<dyn CacheEvents>>) -> Scheduler {
        Scheduler {
            slots: Arc::new(Semaphore::new(cfg.max_num_seqs)),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            held_blocks: AtomicUsize::new(0),
            cache: Mutex::new(PrefixCache::new(cfg.num_blocks, cfg.block_size, events)),
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            max_num_seqs: cfg.max_num_seqs,
            prefill_overhead_ms: cfg.prefill_overhead_ms,
            prefill_ms_per_token: cfg.prefill_ms_per_token,
            itl_ms: cfg.itl_ms,
            batch_slowdown: cfg.batch_slowdown,
            speed_factor: cfg.speed_factor,
            time_scale: cfg.time_scale,
            stats: Stats::default(),
        }
    }

    pub(crate) fn gauges(&self) -> Gauges {
        let held = self.held_blocks.load(Ordering::Relaxed);
        let kv_usage = if self.num_blocks == 0 {
            0.0
        } else {
            (held as f64 / self.num_blocks as f64).min(1.0)
        };
        Gauges {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            kv_usage,
        }
    }

    pub(crate) fn cache_info(&self) -> CacheInfo {
        CacheInfo {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
        }
    }

    /// Simulated milliseconds between two tokens with `running` requests in the batch.
    pub(crate) fn itl_sim_ms(&self, running: usize) -> f64 {
        let extra = running.saturating_sub(1) as f64 / self.max_num_seqs as f64;
        self.itl_ms * (1.0 + self.batch_slowdown * extra) * self.speed_factor
    }

    fn wall(&self, sim_ms: f64) -> Duration {
        let secs = sim_ms * self.time_scale / 1000.0;
        if secs.is_finite() && secs > 0.0 {
            Duration::from_secs_f64(secs)
        } else {
            Duration::ZERO
        }
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Drops every block of the prefix cache (vLLM's `POST /reset_prefix_cache`).
    pub(crate) fn reset_prefix_cache(&self) {
        self.lock_cache().clear();
    }

    /// Number of blocks in the prefix cache.
    #[cfg(test)]
    pub(crate) fn cached_blocks(&self) -> usize {
        self.lock_cache().len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Waiting,
    Running,
    Done,
}

/// One request's life in the engine. Dropping it before it is done cancels it: its slot and
/// KV blocks are released at once and it counts as cancelled.
#[derive(Debug)]
pub(crate) struct Job {
    sched: Arc<Scheduler>,
    arrival: Instant,
    prompt_tokens: usize,
    /// The prompt's token ids, reported with the blocks it stores.
    token_ids: Vec<u32>,
    /// The engine's chained hashes of the prompt's full blocks.
    hashes: Vec<u64>,
    max_tokens: usize,
    generated: usize,
    state: State,
    permit: Option<OwnedSemaphorePermit>,
    held: usize,
    /// When the next token is due; `None` when the engine has no delays at all.
    due: Option<Instant>,
    /// Modelled simulated milliseconds so far (used for metrics when `time_scale` is 0).
    model_ms: f64,
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
        Job {
            sched,
            arrival: Instant::now(),
            prompt_tokens: token_ids.len(),
            token_ids,
            hashes,
            max_tokens: max_tokens.max(1),
            generated: 0,
            state: State::New,
            permit: None,
            held: 0,
            due: None,
            model_ms: 0.0,
        }
    }

    pub(crate) fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    pub(crate) fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Waits for a running slot (FIFO), then admits the request: prefix-cache lookup and
    /// insertion, and scheduling of its prefill.
    pub(crate) async fn start(&mut self) -> Result<(), Stopped> {
        if self.state != State::New {
            return Ok(());
        }
        let s = Arc::clone(&self.sched);
        self.state = State::Waiting;
        s.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = Arc::clone(&s.slots)
            .acquire_owned()
            .await
            .map_err(|_| Stopped)?;
        s.waiting.fetch_sub(1, Ordering::Relaxed);
        s.running.fetch_add(1, Ordering::Relaxed);
        self.state = State::Running;
        self.permit = Some(permit);

        let hit_blocks = s.lock_cache().admit(&self.hashes, &self.token_ids);
        let hit_tokens = (hit_blocks * s.block_size).min(self.prompt_tokens);
        inc(&s.stats.prefix_queries, self.prompt_tokens as u64);
        inc(&s.stats.prefix_hits, hit_tokens as u64);
        inc(&s.stats.prompt_tokens, self.prompt_tokens as u64);
        self.held = s.blocks_for(self.prompt_tokens);
        s.held_blocks.fetch_add(self.held, Ordering::Relaxed);

        let uncached = (self.prompt_tokens - hit_tokens) as f64;
        let prefill_ms =
            (s.prefill_overhead_ms + s.prefill_ms_per_token * uncached) * s.speed_factor;
        self.model_ms = prefill_ms;
        let prefill = s.wall(prefill_ms);
        if !prefill.is_zero() {
            self.due = Some(Instant::now() + prefill);
        } else if !s.wall(s.itl_sim_ms(1)).is_zero() {
            self.due = Some(Instant::now());
        }
        Ok(())
    }

    /// Waits until at least one more token is due and returns the positions of the tokens
    /// generated now (at most `max_batch`, at least 1); an empty range once done or if not
    /// started. The first call returns at the end of prefill.
    pub(crate) async fn next_tokens(&mut self, max_batch: usize) -> Range<usize> {
        if self.state != State::Running {
            return self.generated..self.generated;
        }
        let s = Arc::clone(&self.sched);
        let remaining = self.max_tokens - self.generated;
        let limit = remaining.min(max_batch.max(1));
        let n = match self.due {
            None => limit,
            Some(mut due) => {
                let mut now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due).await;
                    now = Instant::now().max(due);
                }
                let mut n = 0;
                while n < limit && due <= now {
                    n += 1;
                    let itl = s.itl_sim_ms(s.running.load(Ordering::Relaxed));
                    if self.generated + n > 1 {
                        self.model_ms += itl;
                    }
                    due += s.wall(itl);
                }
                self.due = Some(due);
                n
            }
        };
        let start = self.generated;
        self.generated += n;
        inc(&s.stats.generation_tokens, n as u64);
        if start == 0 && n > 0 {
            s.stats.ttft.observe(self.sim_elapsed_secs());
        }
        let held = s.blocks_for(self.prompt_tokens + self.generated);
        if held > self.held {
            s.held_blocks.fetch_add(held - self.held, Ordering::Relaxed);
            self.held = held;
        }
        if self.generated >= self.max_tokens {
            self.finish();
        }
        start..self.generated
    }

    /// Simulated seconds since arrival: wall time / time_scale, or the modelled time when the
    /// engine runs with `time_scale` 0.
    fn sim_elapsed_secs(&self) -> f64 {
        if self.sched.time_scale > 0.0 {
            self.arrival.elapsed().as_secs_f64() / self.sched.time_scale
        } else {
            self.model_ms / 1000.0
        }
    }

    fn release(&mut self) {
        let s = &self.sched;
        s.running.fetch_sub(1, Ordering::Relaxed);
        s.held_blocks.fetch_sub(self.held, Ordering::Relaxed);
        self.held = 0;
        self.permit = None;
    }

    fn finish(&mut self) {
        self.release();
        self.state = State::Done;
        inc(&self.sched.stats.completed, 1);
        self.sched.stats.e2e.observe(self.sim_elapsed_secs());
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        match self.state {
            State::Done => return,
            State::New => {}
            State::Waiting => {
                self.sched.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            State::Running => self.release(),
        }
        inc(&self.sched.stats.cancelled, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens;
    use std::future::Future;

    fn sched(cfg: SimConfig) -> Arc<Scheduler> {
        Arc::new(Scheduler::new(&cfg, None))
    }

    fn instant() -> SimConfig {
        SimConfig {
            prefill_overhead_ms: 0.0,
            prefill_ms_per_token: 0.0,
            itl_ms: 0.0,
            ..SimConfig::default()
        }
    }

    #[test]
    fn itl_grows_with_the_batch() {
        let s = sched(SimConfig {
            itl_ms: 10.0,
            batch_slowdown: 2.0,
            max_num_seqs: 4,
            speed_factor: 1.5,
            ..SimConfig::default()
        });
        assert_eq!(s.itl_sim_ms(1), 15.0);
        assert_eq!(s.itl_sim_ms(0), 15.0);
        assert_eq!(s.itl_sim_ms(3), 15.0 * (1.0 + 2.0 * 2.0 / 4.0));
    }

    #[tokio::test]
    async fn instant_job_emits_everything_in_one_batch_and_completes() {
        let s = sched(instant());
        let prompt = "p".repeat(4 * 40);
        let ids = tokens::stand_in_token_ids(prompt.as_bytes());
        let hashes = tokens::token_block_hashes(&ids, 16, 1);
        let mut job = Job::new(Arc::clone(&s), ids, hashes, 7);
        job.start().await.unwrap();
        assert_eq!(s.gauges().running, 1);
        assert_eq!(job.next_tokens(usize::MAX).await, 0..7);
        assert!(job.is_done());
        assert_eq!(job.next_tokens(usize::MAX).await, 7..7);
        drop(job);
        let g = s.gauges();
        assert_eq!((g.running, g.waiting), (0, 0));
        assert_eq!(g.kv_usage, 0.0);
        assert_eq!(s.stats.completed.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 0);
        assert_eq!(s.stats.ttft.count(), 1);
        assert_eq!(s.stats.prefix_queries.load(Ordering::Relaxed), 40);
        assert_eq!(s.stats.prefix_hits.load(Ordering::Relaxed), 0);
        assert_eq!(s.cached_blocks(), 2, "40 tokens = 2 full blocks of 16");
    }

    #[tokio::test]
    async fn max_batch_splits_output_and_kv_usage_tracks_blocks() {
        let s = sched(SimConfig {
            num_blocks: 10,
            ..instant()
        });
        let mut job = Job::new(Arc::clone(&s), vec![0; 32], vec![1, 2], 40);
        job.start().await.unwrap();
        assert_eq!(s.gauges().kv_usage, 0.2);
        assert_eq!(job.next_tokens(16).await, 0..16);
        assert_eq!(s.gauges().kv_usage, 0.3, "48 tokens = 3 blocks");
        drop(job);
        assert_eq!(s.gauges().kv_usage, 0.0);
        assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.completed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn repeated_prompt_hits_the_cache() {
        let s = sched(instant());
        for expect_hits in [0, 32] {
            let mut job = Job::new(Arc::clone(&s), vec![0; 40], vec![11, 12], 1);
            job.start().await.unwrap();
            job.next_tokens(1).await;
            assert_eq!(
                s.stats.prefix_hits.load(Ordering::Relaxed),
                expect_hits as u64
            );
        }
        assert_eq!(s.stats.prefix_queries.load(Ordering::Relaxed), 80);
    }

    #[tokio::test]
    async fn waiting_job_dropped_is_cancelled_and_leaves_the_queue() {
        let s = sched(SimConfig {
            max_num_seqs: 1,
            ..instant()
        });
        let mut a = Job::new(Arc::clone(&s), vec![0], vec![], 1);
        a.start().await.unwrap();
        let mut b = Job::new(Arc::clone(&s), vec![0], vec![], 1);
        {
            let mut fut = std::pin::pin!(b.start());
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
            assert_eq!(s.gauges().waiting, 1);
        }
        drop(b);
        assert_eq!(s.gauges().waiting, 0);
        assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(a.next_tokens(1).await, 0..1);
    }

    #[tokio::test]
    async fn tokens_follow_prefill_then_itl_deadlines() {
        let s = sched(SimConfig {
            prefill_overhead_ms: 100.0,
            prefill_ms_per_token: 1.0,
            itl_ms: 100.0,
            batch_slowdown: 0.0,
            time_scale: 0.1,
            ..SimConfig::default()
        });
        let t0 = Instant::now();
        let mut job = Job::new(Arc::clone(&s), vec![0; 100], vec![], 3);
        job.start().await.unwrap();
        assert_eq!(job.next_tokens(8).await, 0..1);
        // (100 + 100 tokens × 1 ms) simulated × 0.1 = 20 ms of wall time at least.
        assert!(t0.elapsed() >= Duration::from_millis(20));
        let mut end = 1;
        while !job.is_done() {
            end = job.next_tokens(8).await.end;
        }
        assert_eq!(end, 3);
        // Two more tokens 10 ms (wall) apart, each against its own deadline.
        assert!(t0.elapsed() >= Duration::from_millis(40));
        let ttft = s.stats.ttft.count();
        assert_eq!(ttft, 1);
    }
}
