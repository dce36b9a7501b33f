//! The native implementations of the built-ins (their table is in [`super`]). Each looks at
//! the candidates (and the request's figures) and returns the index of the engine it chooses,
//! or `None` to pass to the next tier.
//!
//! Every function copes with an empty candidate slice (it passes), although
//! [`crate::policy::PolicyStore::decide`] never calls them with one. Ties between equally good engines
//! rotate through a per-policy counter, so equal engines share the traffic instead of the first
//! one taking everything.

use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engines::Candidate;

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
    keep: impl Fn(usize, &Candidate) -> bool,
    cmp: impl Fn(&Candidate, &Candidate) -> Ordering,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut ties = 0usize;
    for (i, c) in cands.iter().enumerate() {
        if !keep(i, c) {
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
        if keep(i, c) && cmp(c, &cands[b]) == Ordering::Equal {
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
    min_rotating(cands, st, |_, _| true, cmp_queue)
}

/// `kv_lookup(min_match)`: the engine with the longest prefix match, if that match is non-zero
/// and at least `min_match` × the prompt's tokens; ties go to the less loaded (then rotate).
/// The match of each candidate is its `prefix_match_tokens`.
pub fn kv_lookup(
    cands: &[Candidate],
    prompt_tokens: usize,
    min_match: f64,
    st: &PolicyState,
) -> Option<usize> {
    let matched: Vec<usize> = cands.iter().map(|c| c.prefix_match_tokens).collect();
    kv_lookup_matches(cands, &matched, prompt_tokens, min_match, st)
}

/// [`kv_lookup`] with the candidates' matches given apart: `matched[i]` is candidate `i`'s
/// (a missing figure is no match).
pub fn kv_lookup_matches(
    cands: &[Candidate],
    matched: &[usize],
    prompt_tokens: usize,
    min_match: f64,
    st: &PolicyState,
) -> Option<usize> {
    let tokens = |i: usize| matched.get(i).copied().unwrap_or(0);
    let best = (0..cands.len()).map(tokens).max()?;
    if best == 0 || (best as f64) < min_match * prompt_tokens as f64 {
        return None;
    }
    min_rotating(cands, st, |i, _| tokens(i) == best, cmp_load)
}

/// `min_cost(prefill_weight, load_weight)`: the engine of least cost, where an engine's cost
/// is `prefill_weight × (prompt tokens not cached there) + load_weight × (prompt tokens of the
/// router's requests in flight there)`: Dynamo's KV router cost (prefill blocks still to
/// compute plus active blocks) in tokens. `matched[i]` is candidate `i`'s prefix match (a
/// missing figure is no match). Equal costs go to the less loaded (then rotate). Passes only
/// without candidates.
pub fn min_cost(
    cands: &[Candidate],
    matched: &[usize],
    prompt_tokens: usize,
    prefill_weight: f64,
    load_weight: f64,
    st: &PolicyState,
) -> Option<usize> {
    let costs: Vec<f64> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let uncached = prompt_tokens.saturating_sub(matched.get(i).copied().unwrap_or(0));
            let cost =
                prefill_weight * uncached as f64 + load_weight * c.load.in_flight_tokens as f64;
            // 0 × ∞ (an infinite weight on a zero term) is no cost, not NaN.
            if cost.is_nan() { 0.0 } else { cost }
        })
        .collect();
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    min_rotating(cands, st, |i, _| costs[i] == min, cmp_load)
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
    min_rotating(cands, st, |_, _| true, cmp_load)
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
