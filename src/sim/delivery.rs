//! What a request's HTTP task and its engine's step loop share: the count of tokens generated
//! so far, whether the request finished, and the wake-up of the task.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use tokio::sync::Notify;

/// The delivery state of one request.
#[derive(Debug)]
pub(crate) struct ReqShared {
    pub(crate) generated: AtomicUsize,
    pub(crate) finished: AtomicBool,
    pub(crate) notify: Notify,
    /// Simulated ms at arrival.
    pub(crate) arrival_ms: f64,
    /// Wall nanoseconds (since the engine's start) of the last wake-up.
    pub(crate) last_wake_ns: AtomicU64,
    /// Prompt tokens not computed at its first admission: its prefix-cache hit plus those
    /// loaded from a prefill engine (`usage.prompt_tokens_details.cached_tokens`).
    pub(crate) cached_tokens: AtomicUsize,
    /// A finished P leg: the blocks held for D and their computed tokens.
    pub(crate) hand_off: OnceLock<(Vec<u32>, usize)>,
}

impl ReqShared {
    /// A request that arrived at `arrival_ms` simulated ms.
    pub(crate) fn new(arrival_ms: f64) -> ReqShared {
        ReqShared {
            generated: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
            notify: Notify::new(),
            arrival_ms,
            last_wake_ns: AtomicU64::new(0),
            cached_tokens: AtomicUsize::new(0),
            hand_off: OnceLock::new(),
        }
    }
}
