//! The router-side queue: requests wait here while no engine can take them.
//!
//! [`FairQueue::wait`] returns an [`Admitted`] guard at once when there is room and nobody
//! waits; otherwise the request waits its turn:
//!
//! - **Priority bands, strictly**: every waiting `Critical` request goes before any
//!   `Standard` one. A `Sheddable` request never waits: when it would have to, it is refused
//!   at once ([`Refused::Shed`]).
//! - **Fair across tenants within a band**: deficit round robin by estimated tokens (the
//!   `cost` given to [`FairQueue::wait`]), with per-tenant weights ([`FairQueue::set_weights`],
//!   default 1) and a quantum of [`QUANTUM_TOKENS`] per unit of weight; first in, first out
//!   within a tenant. See [`drr`] for the algorithm and why DRR.
//! - **Bounded**: at most `max_queued` requests wait; one more is refused ([`Refused::Full`])
//!   unless it can displace the newest waiting request of a lower band (a critical request
//!   displaces the newest standard one, which is refused with [`Refused::Displaced`]).
//!   A request waits at most `queue_timeout` ([`Refused::TimedOut`]), measured with tokio's
//!   clock from the call to `wait`.
//! - **Cancellation**: dropping the future returned by `wait` (the client disconnected)
//!   takes the request out of the queue at once; if it had just been admitted, its guard is
//!   dropped and the room goes to the next one.
//!
//! Room comes from a [`Capacity`]: how many more requests the engines would take now. The
//! queue admits while the guards it handed out and still alive are fewer than that; it asks on
//! every `wait`, every guard dropped and every [`FairQueue::notify`] (call it when engine state
//! changes, e.g. after a scrape). [`ConcurrencyLimit`] is the simplest capacity: at most N
//! guards held at once.

mod drr;
mod observe;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::admit::{Priority, Tenant};
use drr::Band;

pub use drr::QUANTUM_TOKENS;
pub use observe::{
    BandSnapshot, OTHER_TENANTS, QueueSnapshot, SNAPSHOT_TENANTS, TENANT_LABELS, TenantSnapshot,
    describe_metrics, register_metrics,
};

/// The queue's bounds (`--max-queued`, `--queue-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Requests that may wait at once, all bands together (and all queues sharing the count,
    /// see [`FairQueue::sharing`]). 0: none ever waits.
    pub max_queued: usize,
    /// How long a request may wait, from the call to [`FairQueue::wait`].
    pub queue_timeout: Duration,
}

/// How many more requests the engines would take right now.
pub trait Capacity: Send + Sync {
    /// The number of requests that may be admitted, counting the ones this queue admitted whose
    /// [`Admitted`] guard is still alive: the queue admits while fewer guards than this are
    /// alive. Called with the queue's lock held: it must be quick and must not call the queue.
    fn headroom(&self) -> usize;
}

/// At most this many [`Admitted`] guards alive at once: hold the guard for the whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimit(pub usize);

impl Capacity for ConcurrencyLimit {
    fn headroom(&self) -> usize {
        self.0
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `max_queued` requests wait already and none of a lower band could be displaced.
    #[error("the router's queue is full")]
    Full,
    /// The request waited `queue_timeout` without being admitted.
    #[error("the request waited in the router's queue past the queue timeout")]
    TimedOut,
    /// A sheddable request would have had to wait.
    #[error("no engine has room and the request is sheddable")]
    Shed,
    /// The queue was full and a request of a higher band took this one's place.
    #[error("the request was displaced from the full queue by a higher-priority request")]
    Displaced,
}

impl Refused {
    /// Every reason, for registering the metric series.
    pub const ALL: [Refused; 4] = [
        Refused::Full,
        Refused::TimedOut,
        Refused::Shed,
        Refused::Displaced,
    ];

    /// The `code` of the OpenAI-shaped error a client gets.
    pub fn code(self) -> &'static str {
        match self {
            Refused::Full => "queue_full",
            Refused::TimedOut => "queue_timeout",
            Refused::Shed => "request_shed",
            Refused::Displaced => "queue_displaced",
        }
    }

    /// The `reason` label of `switchyard_queue_rejections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::TimedOut => "timed_out",
            Refused::Shed => "shed",
            Refused::Displaced => "displaced",
        }
    }
}

/// The router's queue. Cheap to clone (one shared queue).
#[derive(Clone)]
pub struct FairQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FairQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("limits", &self.shared.limits)
            .finish_non_exhaustive()
    }
}

struct Shared {
    limits: QueueLimits,
    capacity: Arc<dyn Capacity>,
    /// Requests waiting in this queue and the queues sharing the count.
    queued: Arc<AtomicUsize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Indexed by `Priority as usize`: critical, standard, sheddable.
    bands: [Band; 3],
    waiters: HashMap<u64, Waiter>,
    next_id: u64,
    /// Guards handed out and not yet dropped.
    admitted: usize,
    weights: HashMap<Tenant, u32>,
    lengths: observe::Lengths,
}

struct Waiter {
    tenant: Tenant,
    priority: Priority,
    since: Instant,
    series: usize,
    reply: oneshot::Sender<Result<Admitted, Refused>>,
}

/// A request let through. Dropping it gives its place back: hold it until the engines count the
/// request themselves (see [`Capacity`]).
#[must_use = "dropping the guard gives the place back at once"]
pub struct Admitted {
    shared: Arc<Shared>,
    priority: Priority,
    waited: Duration,
}

impl Admitted {
    /// How long the request waited in the queue (zero if admitted at once).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The priority it was admitted with.
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("priority", &self.priority)
            .field("waited", &self.waited)
            .finish()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.shared
            .settle(|state, _| state.admitted = state.admitted.saturating_sub(1));
    }
}

/// What `wait` decided under the lock.
enum Entry {
    Now(Admitted),
    Queued(u64, oneshot::Receiver<Result<Admitted, Refused>>),
    Refused(Refused),
}

impl FairQueue {
    pub fn new(limits: QueueLimits, capacity: Arc<dyn Capacity>) -> FairQueue {
        FairQueue::sharing(limits, capacity, Arc::default())
    }

    /// A queue whose `max_queued` bounds the requests waiting in it and in every queue given the
    /// same `queued` count (one queue per model, one bound for the router).
    pub fn sharing(
        limits: QueueLimits,
        capacity: Arc<dyn Capacity>,
        queued: Arc<AtomicUsize>,
    ) -> FairQueue {
        FairQueue {
            shared: Arc::new(Shared {
                limits,
                capacity,
                queued,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Waits until `tenant`'s request of `priority`, estimated at `cost` tokens (prompt
    /// estimate plus `max_tokens`), may go to an engine. Cancel-safe: dropping the future
    /// leaves the queue.
    pub async fn wait(
        &self,
        tenant: Tenant,
        priority: Priority,
        cost: u64,
    ) -> Result<Admitted, Refused> {
        let since = Instant::now();
        let entry = self.shared.settle(|state, undelivered| {
            if state.admit_waiting(&self.shared, undelivered) && state.waiters.is_empty() {
                let series = state.series_of(&tenant);
                return Entry::Now(state.hand_out(&self.shared, priority, series, Duration::ZERO));
            }
            if priority == Priority::Sheddable {
                return Entry::Refused(Refused::Shed);
            }
            if !self.shared.reserve() {
                if !state.displace_below(&self.shared, priority) {
                    return Entry::Refused(Refused::Full);
                }
                // The displaced request's place (past the bound only if another queue sharing
                // the count took it meanwhile).
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
            }
            let (id, reply) = state.enqueue(tenant.clone(), priority, cost, since);
            Entry::Queued(id, reply)
        });
        match entry {
            Entry::Now(admitted) => Ok(admitted),
            Entry::Refused(refused) => Err(refuse(refused, &tenant, priority)),
            Entry::Queued(id, reply) => {
                let mut ticket = Ticket {
                    shared: &self.shared,
                    id,
                    reply,
                    settled: false,
                };
                let outcome = ticket
                    .outcome(since + self.shared.limits.queue_timeout)
                    .await;
                ticket.settled = true;
                outcome.map_err(|refused| refuse(refused, &tenant, priority))
            }
        }
    }

    /// Re-checks the capacity and admits waiting requests while there is room. Call it when
    /// engine state changes (a scrape, a request finished on an engine).
    pub fn notify(&self) {
        self.shared.settle(|_, _| ());
    }

    /// Per-tenant weights (a tenant not named has weight 1; 0 counts as 1). Takes effect from
    /// each tenant's next turn.
    pub fn set_weights(&self, weights: HashMap<Tenant, u32>) {
        self.shared.settle(|state, _| state.weights = weights);
    }

    /// The limits the queue was built with.
    pub fn limits(&self) -> QueueLimits {
        self.shared.limits
    }

    /// The queue now, for `/health`.
    pub fn snapshot(&self) -> QueueSnapshot {
        let state = self.shared.lock();
        let now = Instant::now();
        let bands = [Priority::Critical, Priority::Standard, Priority::Sheddable]
            .into_iter()
            .map(|priority| {
                let band = &state.bands[priority as usize];
                let oldest = band.oldest().and_then(|id| state.waiters.get(&id));
                let mut tenants: Vec<TenantSnapshot> = band
                    .tenants()
                    .map(|(tenant, queued)| TenantSnapshot {
                        tenant: tenant.0.to_string(),
                        queued,
                        weight: state.weight(tenant),
                    })
                    .collect();
                tenants.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.tenant.cmp(&b.tenant)));
                tenants.truncate(SNAPSHOT_TENANTS);
                BandSnapshot {
                    priority: priority.as_str(),
                    queued: band.len(),
                    oldest_wait_ms: oldest.map_or(0, |w| {
                        u64::try_from(now.duration_since(w.since).as_millis()).unwrap_or(u64::MAX)
                    }),
                    tenants,
                }
            })
            .collect();
        QueueSnapshot {
            queued: state.waiters.len(),
            max_queued: self.shared.limits.max_queued,
            admitted: state.admitted,
            bands,
        }
    }
}

fn refuse(refused: Refused, tenant: &Tenant, priority: Priority) -> Refused {
    observe::count_rejection(refused);
    tracing::debug!(tenant = %tenant.0, priority = priority.as_str(), %refused, "queue refused a request");
    refused
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place among the `max_queued`, if one is free.
    fn reserve(&self) -> bool {
        let max = self.limits.max_queued;
        self.queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back.
    fn release(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Runs `change` under the lock, then admits waiting requests while there is room. Guards
    /// whose waiter left between being admitted and being told are dropped after the lock is
    /// released (dropping one settles again).
    fn settle<R>(self: &Arc<Self>, change: impl FnOnce(&mut State, &mut Vec<Admitted>) -> R) -> R {
        let mut undelivered = Vec::new();
        let result = {
            let mut state = self.lock();
            let result = change(&mut state, &mut undelivered);
            state.admit_waiting(self, &mut undelivered);
            result
        };
        drop(undelivered);
        result
    }
}

impl State {
    fn weight(&self, tenant: &Tenant) -> u32 {
        self.weights.get(tenant).copied().unwrap_or(1).max(1)
    }

    /// The metric series (tenant label) of `tenant`.
    fn series_of(&mut self, tenant: &Tenant) -> usize {
        let weighted = self.weights.contains_key(tenant);
        self.lengths.series_of(tenant, weighted)
    }

    /// Admits waiting requests while there is room; whether room is left (then nothing waits).
    /// Guards whose waiter already left go to `undelivered`, to be dropped once the lock is
    /// released.
    fn admit_waiting(&mut self, shared: &Arc<Shared>, undelivered: &mut Vec<Admitted>) -> bool {
        let headroom = shared.capacity.headroom();
        while self.admitted < headroom {
            let Some(id) = self
                .bands
                .iter_mut()
                .find_map(|band| band.pop(&self.weights).map(|(_, id)| id))
            else {
                return true;
            };
            let Some(waiter) = self.waiters.remove(&id) else {
                continue;
            };
            shared.release();
            self.lengths.change(waiter.series, waiter.priority, false);
            let waited = waiter.since.elapsed();
            let guard = self.hand_out(shared, waiter.priority, waiter.series, waited);
            if let Err(Ok(guard)) = waiter.reply.send(Ok(guard)) {
                undelivered.push(guard);
            }
        }
        false
    }

    fn hand_out(
        &mut self,
        shared: &Arc<Shared>,
        priority: Priority,
        series: usize,
        waited: Duration,
    ) -> Admitted {
        self.admitted += 1;
        self.lengths.record_wait(series, priority, waited);
        Admitted {
            shared: shared.clone(),
            priority,
            waited,
        }
    }

    fn enqueue(
        &mut self,
        tenant: Tenant,
        priority: Priority,
        cost: u64,
        since: Instant,
    ) -> (u64, oneshot::Receiver<Result<Admitted, Refused>>) {
        let id = self.next_id;
        self.next_id += 1;
        let series = self.series_of(&tenant);
        self.lengths.change(series, priority, true);
        self.bands[priority as usize].push(&tenant, id, cost);
        let (reply, receive) = oneshot::channel();
        self.waiters.insert(
            id,
            Waiter {
                tenant,
                priority,
                since,
                series,
                reply,
            },
        );
        (id, receive)
    }

    /// Takes waiter `id` out of its band, if it still waits.
    fn take(&mut self, shared: &Shared, id: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        shared.release();
        self.bands[waiter.priority as usize].remove(&waiter.tenant, id);
        self.lengths.change(waiter.series, waiter.priority, false);
        Some(waiter)
    }

    /// Refuses the newest waiting request of the lowest band below `priority` to make room;
    /// whether there was one.
    fn displace_below(&mut self, shared: &Shared, priority: Priority) -> bool {
        let victim = self.bands[priority as usize + 1..]
            .iter()
            .rev()
            .find_map(|band| band.newest());
        let Some((_, id)) = victim else {
            return false;
        };
        let Some(waiter) = self.take(shared, id) else {
            return false;
        };
        // Counted and logged by the displaced request's `wait`; a receiver already gone has
        // nobody to tell.
        let _ = waiter.reply.send(Err(Refused::Displaced));
        true
    }
}

/// A request waiting in the queue; dropping it (the `wait` future dropped) takes the request
/// out at once.
struct Ticket<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    reply: oneshot::Receiver<Result<Admitted, Refused>>,
    settled: bool,
}

impl Ticket<'_> {
    async fn outcome(&mut self, deadline: Instant) -> Result<Admitted, Refused> {
        match tokio::time::timeout_at(deadline, &mut self.reply).await {
            Ok(Ok(outcome)) => outcome,
            // The sender is only dropped after sending; treat the impossible as a timeout.
            Ok(Err(_)) => Err(Refused::TimedOut),
            Err(_) => {
                let shared = self.shared;
                let gone = shared.settle(|state, _| state.take(shared, self.id).is_some());
                if gone {
                    return Err(Refused::TimedOut);
                }
                // Admitted or displaced under the lock before the deadline struck: the reply
                // is there.
                self.reply.try_recv().unwrap_or(Err(Refused::TimedOut))
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let (id, shared) = (self.id, self.shared);
            shared.settle(|state, _| {
                state.take(shared, id);
            });
        }
        // `reply` drops after this: a guard admitted but not yet received drops with it and
        // gives its place back.
    }
}
