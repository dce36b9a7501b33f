//! The KV blocks a prefill engine holds for decode engines: one entry per finished P leg
//! (its blocks, still referenced in the pool, and their computed tokens) until D reads it or
//! its lease ends (vLLM's `kv_lease_duration`, in the connector's `_reqs_need_send`).
//! Pure bookkeeping: the engine loop frees the blocks it is handed back.
//!
//! A hand-off read again, or read after its lease ended, is served as vLLM 0.32 serves it
//! (recorded in `tests/fixtures/vllm-0.32.0/pd`, `handoff_reused` and `lease_expired`): D reads
//! the released blocks without noticing, and only P counts it
//! (`vllm:nixl_num_notifications_after_expiry`). The engine remembers the last
//! [`RELEASED_MEMORY`] released hand-offs for that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// vLLM's default `kv_lease_duration`, seconds.
pub const DEFAULT_LEASE_SECONDS: f64 = 30.0;

/// Released hand-offs remembered (read again or after expiry: a stale read).
pub const RELEASED_MEMORY: usize = 65_536;

/// A read of a hand-off.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Read {
    /// Its blocks, held until now (the caller frees them).
    Held(Held),
    /// Released before (read, or its lease ended): D reads whatever the freed blocks hold.
    Stale { tokens: usize, blocks: usize },
}

/// One hand-off's blocks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Held {
    pub(crate) blocks: Vec<u32>,
    pub(crate) tokens: usize,
    expires: Instant,
}

/// Why a read of a hand-off is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReleaseError {
    #[error("no hand-off {0} was made here")]
    Unknown(String),
    #[error("hand-off {0} holds other blocks than those read")]
    OtherBlocks(String),
}

/// The held hand-offs of one engine, by request id.
#[derive(Debug)]
pub(crate) struct Leases {
    lease: Duration,
    held: HashMap<Arc<str>, Held>,
    /// The earliest expiry among `held` (a lower bound after removals).
    next_expiry: Option<Instant>,
    /// Released hand-offs (tokens, blocks), oldest first in `released_order`.
    released: HashMap<Arc<str>, (usize, usize)>,
    released_order: std::collections::VecDeque<Arc<str>>,
}

impl Default for Leases {
    fn default() -> Leases {
        Leases::new(Duration::from_secs_f64(DEFAULT_LEASE_SECONDS))
    }
}

impl Leases {
    pub(crate) fn new(lease: Duration) -> Leases {
        Leases {
            lease,
            held: HashMap::new(),
            next_expiry: None,
            released: HashMap::new(),
            released_order: std::collections::VecDeque::new(),
        }
    }

    fn remember(&mut self, name: Arc<str>, h: &Held) {
        if self.released_order.len() >= RELEASED_MEMORY
            && let Some(old) = self.released_order.pop_front()
        {
            self.released.remove(&old);
        }
        if self
            .released
            .insert(Arc::clone(&name), (h.tokens, h.blocks.len()))
            .is_none()
        {
            self.released_order.push_back(name);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds `blocks` under `name` from `now` for the lease; returns an entry it replaced.
    pub(crate) fn insert(
        &mut self,
        name: Arc<str>,
        blocks: Vec<u32>,
        tokens: usize,
        now: Instant,
    ) -> Option<Held> {
        let expires = now + self.lease;
        self.next_expiry = Some(self.next_expiry.map_or(expires, |e| e.min(expires)));
        self.held.insert(
            name,
            Held {
                blocks,
                tokens,
                expires,
            },
        )
    }

    /// Removes and returns the entries whose lease ended by `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Held> {
        if self.next_expiry.is_none_or(|e| e > now) {
            return Vec::new();
        }
        let names: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires <= now)
            .map(|(n, _)| Arc::clone(n))
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(h) = self.held.remove(&n) {
                self.remember(n, &h);
                out.push(h);
            }
        }
        self.next_expiry = self.held.values().map(|h| h.expires).min();
        out
    }

    /// Reads hand-off `name`: if held and holding `block_ids` (in any order), removes it;
    /// if released before, a stale read.
    pub(crate) fn take(&mut self, name: &str, block_ids: &[u32]) -> Result<Read, ReleaseError> {
        let Some(h) = self.held.get(name) else {
            return match self.released.get(name) {
                Some(&(tokens, blocks)) => Ok(Read::Stale { tokens, blocks }),
                None => Err(ReleaseError::Unknown(name.to_owned())),
            };
        };
        let mut a = h.blocks.clone();
        let mut b = block_ids.to_vec();
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            return Err(ReleaseError::OtherBlocks(name.to_owned()));
        }
        let (name, h) = self
            .held
            .remove_entry(name)
            .ok_or_else(|| ReleaseError::Unknown(name.to_owned()))?;
        self.remember(name, &h);
        Ok(Read::Held(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_off_is_released_once_then_read_stale() {
        let now = Instant::now();
        let mut l = Leases::new(Duration::from_secs(30));
        assert!(l.insert("a".into(), vec![3, 4], 20, now).is_none());
        assert_eq!(
            l.take("a", &[9]),
            Err(ReleaseError::OtherBlocks("a".into()))
        );
        let Ok(Read::Held(h)) = l.take("a", &[4, 3]) else {
            panic!("held");
        };
        assert_eq!((h.blocks, h.tokens), (vec![3, 4], 20));
        assert!(l.is_empty());
        assert_eq!(
            l.take("a", &[3, 4]),
            Ok(Read::Stale {
                tokens: 20,
                blocks: 2
            })
        );
        assert_eq!(l.take("b", &[1]), Err(ReleaseError::Unknown("b".into())));
    }

    #[test]
    fn leases_end_at_their_own_time() {
        let t0 = Instant::now();
        let mut l = Leases::new(Duration::from_secs(30));
        l.insert("a".into(), vec![1], 16, t0);
        l.insert("b".into(), vec![2], 16, t0 + Duration::from_secs(10));
        assert!(l.expire(t0 + Duration::from_secs(29)).is_empty());
        let gone = l.expire(t0 + Duration::from_secs(30));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].blocks, vec![1]);
        assert_eq!(l.len(), 1);
        assert!(l.expire(t0 + Duration::from_secs(39)).is_empty());
        assert_eq!(l.expire(t0 + Duration::from_secs(40)).len(), 1);
        assert!(l.is_empty());
        assert!(matches!(
            l.take("a", &[1]),
            Ok(Read::Stale { tokens: 16, .. })
        ));
    }
}
