//! Per-tenant rate limits: requests and tokens per minute (the config file's
//! `[[rate_limit]]` tables), checked when a request is admitted, answered the way OpenAI
//! answers them (`x-ratelimit-*` headers; past a limit, 429 with `Retry-After`).
//!
//! Each limit is a bucket of `limit` units refilled continuously over a minute ([`gcra`]).
//! A request takes one unit of its tenant's request limit and its tokens (prompt estimate +
//! `max_tokens`, counted by the caller) of its token limit, both or neither.
//!
//! State: one slot per tenant that has taken something (a tenant whose buckets are full has
//! none: a full bucket is a fresh one), in 1–64 shards each behind its own mutex, held for
//! one slot's arithmetic. Memory is bounded: at most `max_tenants` slots (rounded up to a
//! multiple of the shard count). A shard at its bound first forgets every slot whose buckets
//! are full again (nothing is lost), and if none is, the slot nearest to full (that tenant
//! gets a fresh bucket early: counted by [`RateLimiter::evicted`]).
//!
//! Limits are per router replica: see docs/admission.md.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::Tenant;

mod gcra;
mod openai;
mod rules;
#[cfg(test)]
mod tests;

pub use gcra::{LimitStatus, WINDOW};
pub use openai::{LimitKind, Limited, RateLimitHeaders, format_reset};
pub use rules::{EVERY_TENANT, Limits, RateLimitRule, RateLimitRules, RuleError};

use gcra::{Bucket, Refusal};

/// Slots kept at most, by default: ~100 bytes each plus the tenant's name.
pub const DEFAULT_MAX_TENANTS: usize = 100_000;
const MAX_SHARDS: usize = 64;
/// Fewest slots per shard before a second shard is worth having.
const MIN_SLOTS_PER_SHARD: usize = 256;

/// Whether a request may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; its limits were taken. Add `headers` to the answer (empty when no rule
    /// applies to the tenant).
    Allowed { headers: RateLimitHeaders },
    /// Refused: nothing was taken. Answer 429 (see [`Limited`]).
    Limited(Limited),
}

/// One tenant's buckets under the limits they were made for.
#[derive(Debug, Clone, Copy)]
struct Slot {
    limits: Limits,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Slot {
    fn fresh(limits: Limits, now: Instant) -> Slot {
        Slot {
            limits,
            requests: limits.requests_per_minute.map(|l| Bucket::full(l, now)),
            tokens: limits.tokens_per_minute.map(|l| Bucket::full(l, now)),
        }
    }

    /// Every bucket full: the same as no slot.
    fn is_idle(&self, now: Instant) -> bool {
        self.buckets().all(|b| b.is_full(now))
    }

    /// When every bucket is full again.
    fn idle_at(&self) -> Option<Instant> {
        self.buckets().map(Bucket::full_at).max()
    }

    fn buckets(&self) -> impl Iterator<Item = &Bucket> {
        self.requests.iter().chain(self.tokens.iter())
    }

    /// Takes one request and `tokens` tokens if both fit, else neither.
    fn check(&mut self, tokens: u64, now: Instant) -> Decision {
        let requests = self.requests.map(|b| b.try_take(1, now));
        let taken_tokens = self.tokens.map(|b| b.try_take(tokens, now));
        let refusal = |kind, r: Option<&Result<(Bucket, LimitStatus), Refusal>>, requested| match r
        {
            Some(Err(refusal)) => Some((kind, *refusal, requested)),
            _ => None,
        };
        let refused = [
            refusal(LimitKind::Requests, requests.as_ref(), 1),
            refusal(LimitKind::Tokens, taken_tokens.as_ref(), tokens),
        ];
        // The limit that frees up last decides; one that never fits decides above all.
        let worst = refused
            .into_iter()
            .flatten()
            .max_by_key(|(_, r, _)| (r.too_large, r.wait));
        let status = |r: Option<Result<(Bucket, LimitStatus), Refusal>>| {
            r.map(|r| match r {
                Ok((_, status)) => status,
                Err(refusal) => refusal.status,
            })
        };
        if let Some((which, refusal, requested)) = worst {
            // Neither taken: the headers show the state as it stays.
            let headers = RateLimitHeaders {
                requests: self.requests.map(|b| b.status(now)),
                tokens: self.tokens.map(|b| b.status(now)),
            };
            return Decision::Limited(Limited {
                which,
                retry_after: refusal.wait,
                headers,
                requested,
                too_large: refusal.too_large,
            });
        }
        let headers = RateLimitHeaders {
            requests: status(requests),
            tokens: status(taken_tokens),
        };
        if let Some(Ok((b, _))) = requests {
            self.requests = Some(b);
        }
        if let Some(Ok((b, _))) = taken_tokens {
            self.tokens = Some(b);
        }
        Decision::Allowed { headers }
    }
}

type Shard = Mutex<HashMap<Tenant, Slot>>;

/// The per-tenant rate limiter: cheap to share (`&self` everywhere), hot-reloadable.
pub struct RateLimiter {
    rules: ArcSwap<RateLimitRules>,
    shards: Box<[Shard]>,
    hasher: RandomState,
    slots_per_shard: usize,
    evicted: AtomicU64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rules", &self.rules.load())
            .field("tenants", &self.tenants())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter keeping at most [`DEFAULT_MAX_TENANTS`] tenants' state.
    pub fn new(rules: RateLimitRules) -> RateLimiter {
        RateLimiter::with_max_tenants(rules, DEFAULT_MAX_TENANTS)
    }

    /// A limiter keeping at most `max_tenants` tenants' state (at least 1; rounded up to a
    /// multiple of its shard count: one shard per 256 up to 64 shards).
    pub fn with_max_tenants(rules: RateLimitRules, max_tenants: usize) -> RateLimiter {
        let max_tenants = max_tenants.max(1);
        let shards = (max_tenants / MIN_SLOTS_PER_SHARD).clamp(1, MAX_SHARDS);
        RateLimiter {
            rules: ArcSwap::from_pointee(rules),
            shards: (0..shards).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            slots_per_shard: max_tenants.div_ceil(shards),
            evicted: AtomicU64::new(0),
        }
    }

    /// The most tenants whose state is kept.
    pub fn max_tenants(&self) -> usize {
        self.slots_per_shard * self.shards.len()
    }

    /// The rules in effect.
    pub fn rules(&self) -> Arc<RateLimitRules> {
        self.rules.load_full()
    }

    /// Takes one request and `tokens` tokens (prompt estimate + `max_tokens`) from `tenant`'s
    /// limits at `now`, or refuses, taking nothing. A tenant no rule applies to is allowed,
    /// with no headers.
    pub fn check(&self, tenant: &Tenant, tokens: u64, now: Instant) -> Decision {
        let Some(limits) = self.rules.load().for_tenant(tenant) else {
            return Decision::Allowed {
                headers: RateLimitHeaders::default(),
            };
        };
        let mut shard = self.lock(tenant);
        if let Some(slot) = shard.get_mut(tenant) {
            if slot.limits != limits {
                // The rule changed since this slot was made: start fresh.
                *slot = Slot::fresh(limits, now);
            }
            return slot.check(tokens, now);
        }
        let mut slot = Slot::fresh(limits, now);
        let decision = slot.check(tokens, now);
        if matches!(decision, Decision::Allowed { .. }) && !slot.is_idle(now) {
            if shard.len() >= self.slots_per_shard {
                self.make_room(&mut shard, now);
            }
            shard.insert(tenant.clone(), slot);
        }
        decision
    }

    /// Replaces the rules (a config reload). A tenant whose limits are the same numbers as
    /// before keeps its state; one whose limits changed starts with full buckets; one no rule
    /// applies to any more is forgotten.
    pub fn update(&self, rules: RateLimitRules) {
        let rules = Arc::new(rules);
        self.rules.store(Arc::clone(&rules));
        for shard in self.shards.iter() {
            lock(shard).retain(|tenant, slot| rules.for_tenant(tenant) == Some(slot.limits));
        }
    }

    /// Tenants whose state is kept now.
    pub fn tenants(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Tenants forgotten before their buckets were full again, to keep within the bound,
    /// since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn shard_of(&self, tenant: &Tenant) -> usize {
        // The shard count is at most 64: the hash's low bits fit.
        (self.hasher.hash_one(tenant) % self.shards.len() as u64) as usize
    }

    fn lock(&self, tenant: &Tenant) -> MutexGuard<'_, HashMap<Tenant, Slot>> {
        lock(&self.shards[self.shard_of(tenant)])
    }

    /// Frees at least one place in a full shard: every idle slot, else the one nearest idle.
    fn make_room(&self, shard: &mut HashMap<Tenant, Slot>, now: Instant) {
        shard.retain(|_, slot| !slot.is_idle(now));
        if shard.len() < self.slots_per_shard {
            return;
        }
        let nearest = shard
            .iter()
            .min_by_key(|(_, slot)| slot.idle_at())
            .map(|(tenant, _)| tenant.clone());
        if let Some(tenant) = nearest {
            shard.remove(&tenant);
            self.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(tenant = %tenant.0, "rate limit state evicted to stay within the tenant bound");
        }
    }
}

/// A shard's lock; a panic elsewhere cannot leave a slot half-written (plain numbers).
fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<Tenant, Slot>> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}
