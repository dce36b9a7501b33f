//! The built-in tiers. Each looks at the candidates (and the request) and returns the index of
//! the engine it chooses, or `None` to pass to the next tier.
//!
//! Every function copes with an empty candidate slice (it passes), although
//! [`super::PolicyStore::decide`] never calls them with one. Ties between equally good engines
//! rotate through a per-policy counter, so equal engines share the traffic instead of the first
//! one taking everything.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engines::Candidate;
use crate::request::RequestInfo;

/// `kv_lookup()`'s default minimum match: half of the prompt's tokens.
pub const DEFAULT_KV_MIN_MATCH: f64 = 0.5;

/// A counter on its own cache line, so that policies' counters do not false-share.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicUsize);

impl Counter {
    fn next(&self) -> usize {
        self.0.fetch_add(1, AtomicOrdering::Relaxed)
    }
}

/// Per-policy state shared by its tiers: the tie-rotation and round-robin counters.
#[derive(Debug, Default)]
pub struct PolicyState {
    ties: Counter,
    rr: Counter,
}

/// The built-in tiers, as named in TOML (`builtin = "..."`) and in scripts (`name(...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BuiltinKind {
    LoadBalance = 0,
    KvLookup = 1,
    SessionHash = 2,
    Fallback = 3,
    RoundRobin = 4,
    LeastLoaded = 5,
    Random = 6,
    PowerOfTwo = 7,
}

impl BuiltinKind {
    pub const ALL: [BuiltinKind; 8] = [
        BuiltinKind::LoadBalance,
        BuiltinKind::KvLookup,
        BuiltinKind::SessionHash,
        BuiltinKind::Fallback,
        BuiltinKind::RoundRobin,
        BuiltinKind::LeastLoaded,
        BuiltinKind::Random,
        BuiltinKind::PowerOfTwo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinKind::LoadBalance => "load_balance",
            BuiltinKind::KvLookup => "kv_lookup",
            BuiltinKind::SessionHash => "session_hash",
            BuiltinKind::Fallback => "fallback",
            BuiltinKind::RoundRobin => "round_robin",
            BuiltinKind::LeastLoaded => "least_loaded",
            BuiltinKind::Random => "random",
            BuiltinKind::PowerOfTwo => "power_of_two",
        }
    }

    pub fn from_name(name: &str) -> Option<BuiltinKind> {
        BuiltinKind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: usize) -> Option<BuiltinKind> {
        BuiltinKind::ALL.get(i).copied()
    }
}

/// A built-in with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Builtin {
    LoadBalance {
        threshold: f64,
    },
    KvLookup {
        min_match: f64,
    },
    /// Hash `RequestInfo::session_key`, or this header if given.
    SessionHash {
        header: Option<String>,
    },
    Fallback,
    RoundRobin,
    LeastLoaded,
    Random,
    PowerOfTwo,
}

impl Builtin {
    pub fn kind(&self) -> BuiltinKind {
        match self {
            Builtin::LoadBalance { .. } => BuiltinKind::LoadBalance,
            Builtin::KvLookup { .. } => BuiltinKind::KvLookup,
            Builtin::SessionHash { .. } => BuiltinKind::SessionHash,
            Builtin::Fallback => BuiltinKind::Fallback,
            Builtin::RoundRobin => BuiltinKind::RoundRobin,
            Builtin::LeastLoaded => BuiltinKind::LeastLoaded,
            Builtin::Random => BuiltinKind::Random,
            Builtin::PowerOfTwo => BuiltinKind::PowerOfTwo,
        }
    }

    /// Runs the built-in: the chosen candidate index, or `None` to pass.
    pub fn run(&self, req: &RequestInfo, cands: &[Candidate], st: &PolicyState) -> Option<usize> {
        match self {
            Builtin::LoadBalance { threshold } => load_balance(cands, *threshold, st),
            Builtin::KvLookup { min_match } => {
                kv_lookup(cands, req.prompt_tokens(), *min_match, st)
            }
            Builtin::SessionHash { header: None } => {
                session_hash(cands, req.session_key.as_deref().map(str::as_bytes))
            }
            Builtin::SessionHash { header: Some(h) } => {
                session_hash(cands, req.headers.get(h.as_str()).map(|v| v.as_bytes()))
            }
            Builtin::Fallback | Builtin::LeastLoaded => least_loaded(cands, st),
            Builtin::RoundRobin => round_robin(cands, st),
            Builtin::Random => random(cands),
            Builtin::PowerOfTwo => power_of_two(cands),
        }
    }
}

/// Orders engines by load: queue, then the router's in-flight count.
fn cmp_load(a: &Candidate, b: &Candidate) -> Ordering {
    a.load
        .queue
        .total_cmp(&b.load.queue)
        .then(a.load.in_flight.cmp(&b.load.in_flight))
}

fn cmp_queue(a: &Candidate, b: &Candidate) -> Ordering {
    a.load.queue.total_cmp(&b.load.queue)
}

/// The minimum of the candidates accepted by `keep` under `cmp`; ties rotate.
fn min_rotating(
    cands: &[Candidate],
    st: &PolicyState,
    keep: impl Fn(&Candidate) -> bool,
    cmp: impl Fn(&Candidate, &Candidate) -> Ordering,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut ties = 0usize;
    for (i, c) in cands.iter().enumerate() {
        if !keep(c) {
            continue;
        }
        match best {
            None => {
                best = Some(i);
                ties = 1;
            }
            Some(b) => match cmp(c, &cands[b]) {
                Ordering::Less => {
                    best = Some(i);
                    ties = 1;
                }
                Ordering::Equal => ties += 1,
                Ordering::Greater => {}
            },
        }
    }
    let b = best?;
    if ties == 1 {
        return Some(b);
    }
    let mut k = st.ties.next() % ties;
    for (i, c) in cands.iter().enumerate().skip(b) {
        if keep(c) && cmp(c, &cands[b]) == Ordering::Equal {
            if k == 0 {
                return Some(i);
            }
            k -= 1;
        }
    }
    Some(b)
}

/// `load_balance(threshold)`: if the spread of queues (max − min) over the candidates is at
/// least `threshold`, the least-queued engine (ties rotate); otherwise pass.
pub fn load_balance(cands: &[Candidate], threshold: f64, st: &PolicyState) -> Option<usize> {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for c in cands {
        min = min.min(c.load.queue);
        max = max.max(c.load.queue);
    }
    if cands.is_empty() || max - min < threshold {
        return None;
    }
    min_rotating(cands, st, |_| true, cmp_queue)
}

/// `kv_lookup(min_match)`: the engine with the longest prefix match, if that match is non-zero
/// and at least `min_match` × the prompt's tokens; ties go to the less loaded (then rotate).
pub fn kv_lookup(
    cands: &[Candidate],
    prompt_tokens: usize,
    min_match: f64,
    st: &PolicyState,
) -> Option<usize> {
    let best = cands.iter().map(|c| c.prefix_match_tokens).max()?;
    if best == 0 || (best as f64) < min_match * prompt_tokens as f64 {
        return None;
    }
    min_rotating(cands, st, |c| c.prefix_match_tokens == best, cmp_load)
}

/// The rendezvous-hash weight of `engine` for a key hashed to `key_hash`.
fn rendezvous_weight(key_hash: u64, engine: &str) -> u64 {
    xxh3_64_with_seed(engine.as_bytes(), key_hash)
}

/// `session_hash()`: rendezvous (highest-random-weight) hashing of the session key over the
/// candidates' names; pass if there is no (or an empty) key. Removing an engine moves only the
/// sessions it had; adding one moves about 1/N of them.
pub fn session_hash(cands: &[Candidate], key: Option<&[u8]>) -> Option<usize> {
    let key = key.filter(|k| !k.is_empty())?;
    let kh = xxh3_64(key);
    let mut best: Option<(u64, usize)> = None;
    for (i, c) in cands.iter().enumerate() {
        let w = rendezvous_weight(kh, &c.engine.name);
        let better = match best {
            None => true,
            Some((bw, bi)) => w > bw || (w == bw && c.engine.name < cands[bi].engine.name),
        };
        if better {
            best = Some((w, i));
        }
    }
    best.map(|(_, i)| i)
}

/// `least_loaded()` / `fallback()`: the engine with the smallest queue, then the fewest
/// in-flight requests; ties rotate. Passes only if there are no candidates.
pub fn least_loaded(cands: &[Candidate], st: &PolicyState) -> Option<usize> {
    min_rotating(cands, st, |_| true, cmp_load)
}

/// `round_robin()`: the candidates in URL order, one after the other.
pub fn round_robin(cands: &[Candidate], st: &PolicyState) -> Option<usize> {
    if cands.is_empty() {
        return None;
    }
    let k = st.rr.next() % cands.len();
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_unstable_by(|&a, &b| cands[a].engine.url.cmp(&cands[b].engine.url));
    Some(order[k])
}

/// `random()`: a uniformly random candidate.
pub fn random(cands: &[Candidate]) -> Option<usize> {
    (!cands.is_empty()).then(|| fastrand::usize(..cands.len()))
}

/// `power_of_two()`: two distinct random candidates, the less loaded of them.
pub fn power_of_two(cands: &[Candidate]) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if cmp_load(&cands[b], &cands[a]) == Ordering::Less {
                b
            } else {
                a
            })
        }
    }
}
