//! One engine step at a time, as vLLM V1's `Scheduler.schedule()` and `update_from_output()`,
//! without any clock: [`EngineState::schedule`] picks the step's work and takes its KV blocks,
//! [`EngineState::finish`] applies it once the step's time has passed.
//!
//! * Running requests first, oldest first: each gets its next tokens (1 to decode; the next
//!   chunk of a prefill), within the step's token budget (`max_num_batched_tokens`: chunked
//!   prefill). When a running request cannot get the blocks for them, the newest running
//!   request is preempted (RECOMPUTE: its blocks freed, back to the front of the waiting
//!   queue; counted in `vllm:num_preemptions_total`), until they fit or it is itself the one
//!   preempted.
//! * Then, if nothing was preempted, waiting requests in FIFO order, while the batch has fewer
//!   than `max_num_seqs` requests, budget is left and the blocks for the tokens scheduled fit
//!   (after the prefix-cache hit, whose blocks are referenced, not computed); the first that
//!   does not fit stops admission (it keeps its place).
//! * A request whose computed tokens reach its prompt plus the tokens generated so far samples
//!   one token at the end of the step. A preempted request recomputes its prompt and its
//!   generated tokens (from the prefix cache where it can) and then continues: tokens are
//!   generated once, so a client never sees one twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::block_pool::BlockPool;
use super::delivery::ReqShared;
use super::leases::{Leases, Read, ReleaseError};

/// One request inside the engine.
#[derive(Debug)]
pub(crate) struct Req {
    pub(crate) shared: Arc<ReqShared>,
    pub(crate) token_ids: Vec<u32>,
    pub(crate) hashes: Vec<u64>,
    pub(crate) max_tokens: usize,
    /// Tokens whose KV is computed (or referenced from the prefix cache).
    computed: usize,
    /// Tokens generated; never decreases (not even on preemption).
    pub(crate) generated: usize,
    blocks: Vec<u32>,
    /// Leading prompt blocks already cached (hashed) by this request.
    cached: usize,
    /// Admitted before (its prompt already counted).
    admitted_once: bool,
    /// A P leg: at its end its blocks are held under this name for D to read.
    pub(crate) hand_off: Option<Arc<str>>,
    /// A D leg: prompt tokens whose KV was loaded from P (counted as computed at its first
    /// admission, beyond its own prefix-cache hit).
    pub(crate) external: usize,
}

impl Req {
    pub(crate) fn new(
        shared: Arc<ReqShared>,
        token_ids: Vec<u32>,
        hashes: Vec<u64>,
        max_tokens: usize,
    ) -> Req {
        Req {
            shared,
            token_ids,
            hashes,
            max_tokens: max_tokens.max(1),
            computed: 0,
            generated: 0,
            blocks: Vec::new(),
            cached: 0,
            admitted_once: false,
            hand_off: None,
            external: 0,
        }
    }

    fn total(&self) -> usize {
        self.token_ids.len() + self.generated
    }
}

/// What one step does.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Requests and their number of tokens computed in this step.
    pub(crate) work: Vec<(u64, usize)>,
    /// Of which prompt (or recomputed) tokens: all but decodes.
    pub(crate) prefill_tokens: usize,
    pub(crate) prefill_reqs: usize,
}

impl Step {
    pub(crate) fn is_empty(&self) -> bool {
        self.work.is_empty()
    }
}

/// Figures reported by `/metrics` and counted per step.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct StepCounts {
    pub(crate) preemptions: u64,
    pub(crate) prefix_queries: u64,
    pub(crate) prefix_hits: u64,
    pub(crate) prompt_tokens: u64,
    /// Prompt tokens loaded from a prefill engine (vLLM's `external_kv_transfer` source).
    pub(crate) external_tokens: u64,
    /// Hand-offs whose lease expired before D read them (their blocks freed).
    pub(crate) hand_offs_expired: u64,
    /// Reads of hand-offs released before (read already, or expired): vLLM's
    /// `nixl_num_notifications_after_expiry`.
    pub(crate) stale_reads: u64,
}

/// A request that generated a token at the end of a step.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) shared: Arc<ReqShared>,
    /// Tokens generated so far (1 = its first).
    pub(crate) generated: usize,
    /// That was its last token (it left the engine).
    pub(crate) finished: bool,
    /// A finished P leg: the blocks it holds for D and their computed tokens.
    pub(crate) handed_off: Option<(Vec<u32>, usize)>,
}

/// The scheduler state of one engine.
#[derive(Debug)]
pub(crate) struct EngineState {
    pub(crate) pool: BlockPool,
    block_size: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    reqs: HashMap<u64, Req>,
    waiting: VecDeque<u64>,
    /// In admission order: the newest last.
    running: Vec<u64>,
    /// Blocks of finished P legs, held for D until read or their lease expires.
    held: Leases,
    pub(crate) counts: StepCounts,
}

impl EngineState {
    pub(crate) fn new(
        pool: BlockPool,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
    ) -> EngineState {
        EngineState {
            pool,
            block_size: block_size.max(1),
            max_num_seqs: max_num_seqs.max(1),
            max_num_batched_tokens: max_num_batched_tokens.max(1),
            reqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            held: Leases::default(),
            counts: StepCounts::default(),
        }
    }

    /// Hand-offs are held for `lease` of wall time.
    pub(crate) fn with_lease(mut self, lease: std::time::Duration) -> EngineState {
        self.held = Leases::new(lease);
        self
    }

    /// Frees the blocks of hand-offs whose lease ended by `now`.
    pub(crate) fn expire_hand_offs(&mut self, now: Instant) {
        let expired = self.held.expire(now);
        self.counts.hand_offs_expired += expired.len() as u64;
        for h in expired {
            self.pool.free(&h.blocks);
        }
    }

    /// D read hand-off `name` (whose blocks must be `block_ids`): its blocks are freed.
    /// Returns its computed tokens and block count; a hand-off released before is read again
    /// (stale, counted).
    pub(crate) fn release_hand_off(
        &mut self,
        name: &str,
        block_ids: &[u32],
        now: Instant,
    ) -> Result<(usize, usize), ReleaseError> {
        self.expire_hand_offs(now);
        match self.held.take(name, block_ids)? {
            Read::Held(h) => {
                self.pool.free(&h.blocks);
                Ok((h.tokens, h.blocks.len()))
            }
            Read::Stale { tokens, blocks } => {
                self.counts.stale_reads += 1;
                Ok((tokens, blocks))
            }
        }
    }

    /// Hand-offs held now.
    pub(crate) fn hand_offs_held(&self) -> usize {
        self.held.len()
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Whether a request of `tokens` tokens (prompt + max_tokens) can ever fit the pool.
    pub(crate) fn fits(&self, tokens: usize) -> bool {
        !self.pool.bounded() || tokens.div_ceil(self.block_size) <= self.pool.capacity()
    }

    /// Queues a new request.
    pub(crate) fn add(&mut self, id: u64, req: Req) {
        self.reqs.insert(id, req);
        self.waiting.push_back(id);
    }

    /// Removes a request (cancelled or finished): its blocks are freed.
    pub(crate) fn remove(&mut self, id: u64) -> Option<Req> {
        let req = self.remove_keeping_blocks(id)?;
        self.pool.free(&req.blocks);
        Some(req)
    }

    fn remove_keeping_blocks(&mut self, id: u64) -> Option<Req> {
        let req = self.reqs.remove(&id)?;
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
        }
        Some(req)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Preempts the newest running request: blocks freed, back to the front of the queue.
    fn preempt_newest(&mut self) -> Option<u64> {
        let id = self.running.pop()?;
        if let Some(r) = self.reqs.get_mut(&id) {
            let blocks = std::mem::take(&mut r.blocks);
            r.computed = 0;
            r.cached = 0;
            self.pool.free(&blocks);
        }
        self.waiting.push_front(id);
        self.counts.preemptions += 1;
        Some(id)
    }

    /// Decides the next step and takes the KV blocks of its tokens.
    pub(crate) fn schedule(&mut self) -> Step {
        if !self.held.is_empty() {
            self.expire_hand_offs(Instant::now());
        }
        let mut step = Step::default();
        let mut budget = self.max_num_batched_tokens;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(r) = self.reqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = (r.total() - r.computed).min(budget);
            let need = self
                .blocks_for(r.computed + n)
                .saturating_sub(r.blocks.len());
            let mut scheduled = true;
            let new_blocks = loop {
                if let Some(b) = self.pool.allocate(need) {
                    break b;
                }
                preempted = true;
                let victim = self.preempt_newest();
                if victim == Some(id) || victim.is_none() {
                    scheduled = false;
                    break Vec::new();
                }
            };
            if !scheduled {
                break;
            }
            let Some(r) = self.reqs.get_mut(&id) else {
                break;
            };
            r.blocks.extend(new_blocks);
            if n > 1 || r.computed < r.token_ids.len() {
                step.prefill_tokens += n;
                step.prefill_reqs += 1;
            }
            step.work.push((id, n));
            budget -= n;
            i += 1;
        }
        while !preempted && budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(n) = self.admit(id, budget) else {
                break;
            };
            self.waiting.pop_front();
            self.running.push(id);
            step.prefill_tokens += n;
            step.prefill_reqs += 1;
            step.work.push((id, n));
            budget -= n;
        }
        step
    }

    /// Admits waiting request `id` if the blocks of its next `≤ budget` tokens fit; returns
    /// that number of tokens.
    fn admit(&mut self, id: u64, budget: usize) -> Option<usize> {
        let bs = self.block_size;
        let r = self.reqs.get(&id)?;
        let total = r.total();
        // vLLM recomputes at least the last token: a hit covers at most total − 1 tokens.
        let mut hit = self.pool.lookup(&r.hashes);
        hit.truncate((total - 1) / bs);
        let local = hit.len() * bs;
        // A D leg's first admission: the prompt tokens loaded from P beyond the local hit
        // count as computed (vLLM's `get_num_new_matched_tokens`), but for the last token,
        // which is computed to sample the first (vLLM's `_update_waiting_for_remote_kv`).
        let remote = if r.admitted_once {
            0
        } else {
            r.external.min(r.token_ids.len())
        };
        let external = remote.saturating_sub(local);
        let computed = if external > 0 {
            remote.min(total - 1)
        } else {
            local
        };
        let n = (total - computed).min(budget);
        let need = self.blocks_for(computed + n) - hit.len();
        if need + self.pool.free_among(&hit) > self.pool.free_blocks() {
            return None;
        }
        self.pool.touch(&hit);
        let new_blocks = self.pool.allocate(need)?;
        let r = self.reqs.get_mut(&id)?;
        let prompt = r.token_ids.len() as u64;
        // vLLM 0.32 (`PrefixCacheStats.record`) counts a preempted request's new lookup apart
        // (`preempted_queries`/`_hits`), not in `vllm:prefix_cache_queries`/`_hits`: a
        // recompute finds its own blocks again, which is no hit for the workload.
        if !r.admitted_once {
            r.admitted_once = true;
            let local = (local as u64).min(prompt);
            self.counts.prompt_tokens += prompt;
            self.counts.prefix_queries += prompt;
            self.counts.prefix_hits += local;
            self.counts.external_tokens += external as u64;
            r.shared
                .cached_tokens
                .store(local as usize + external, Ordering::Relaxed);
        }
        r.cached = hit.len();
        r.blocks = hit;
        r.blocks.extend(new_blocks);
        r.computed = computed;
        Some(n)
    }

    /// Applies a step: computed tokens advance, full prompt blocks are cached, requests that
    /// completed their tokens sample one. Returns what happened to each request with a new
    /// token; finished requests are removed (their blocks freed).
    pub(crate) fn finish(&mut self, step: &Step) -> Vec<Outcome> {
        let bs = self.block_size;
        let mut out = Vec::with_capacity(step.work.len());
        let mut finished = Vec::new();
        for &(id, n) in &step.work {
            // Cancelled since: nothing to apply.
            let Some(r) = self.reqs.get_mut(&id) else {
                continue;
            };
            r.computed += n;
            let full = (r.computed.min(r.token_ids.len()) / bs).min(r.hashes.len());
            if full > r.cached {
                self.pool
                    .cache(&r.blocks, &r.hashes, &r.token_ids, r.cached, full);
                r.cached = full;
            }
            if r.computed >= r.total() {
                r.generated += 1;
                let done = r.generated >= r.max_tokens;
                out.push(Outcome {
                    shared: Arc::clone(&r.shared),
                    generated: r.generated,
                    finished: done,
                    handed_off: (done && r.hand_off.is_some())
                        .then(|| (r.blocks.clone(), r.computed)),
                });
                if done {
                    finished.push(id);
                }
            }
        }
        for id in finished {
            self.retire(id);
        }
        out
    }

    /// Removes a finished request; a P leg's blocks stay held for D under its lease.
    fn retire(&mut self, id: u64) {
        let Some(req) = self.remove_keeping_blocks(id) else {
            return;
        };
        match req.hand_off {
            Some(name) => {
                let tokens = req.computed;
                if let Some(old) = self.held.insert(name, req.blocks, tokens, Instant::now()) {
                    self.pool.free(&old.blocks);
                }
            }
            None => self.pool.free(&req.blocks),
        }
    }
}

#[cfg(test)]
#[path = "engine_loop_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "engine_loop_pd_tests.rs"]
mod pd_tests;
