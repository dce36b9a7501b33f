//! Counting decisions: `switchyard_routing_decisions_total{policy,tier,engine,kv,stage}`, where
//! `kv` is where the chosen engine's prefix match came from (`exact`, `approximate`), or `none`
//! when no tier of the decision needed prefix matches, and `stage` what the engine was chosen
//! for (`aggregated`, `decode`, `prefill`).
//!
//! Counter handles are cached per thread, keyed by (compiled policy, tier label, engine id,
//! source), so
//! a decision costs one small hash lookup and an atomic increment, with no label strings built.
//! Handles are created against the recorder installed at the time of first use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::kv::KvSource;
use super::pipeline::{CompiledPolicy, Label};
use super::stage::Stage;
use crate::engines::Engine;

/// Entries per thread before the cache is dropped and rebuilt (after many reloads or engine
/// changes).
const MAX_CACHED: usize = 4096;

/// A multiply-rotate hasher for the small integer keys below.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
}

type Key = (u64, Label, u32, u8, u8);
type Cache = HashMap<Key, (Arc<str>, metrics::Counter), BuildHasherDefault<KeyHasher>>;

thread_local! {
    static COUNTERS: RefCell<Cache> = RefCell::new(Cache::default());
}

fn counter(
    policy: &CompiledPolicy,
    tier: &str,
    engine: &Engine,
    source: Option<KvSource>,
    stage: &'static str,
) -> metrics::Counter {
    metrics::counter!(
        "switchyard_routing_decisions_total",
        "policy" => policy.name.to_string(),
        "tier" => tier.to_string(),
        "engine" => engine.name.to_string(),
        "kv" => KvSource::label(source),
        "stage" => stage
    )
}

/// Counts one decision.
pub(crate) fn record(
    policy: &CompiledPolicy,
    label: Label,
    tier: &str,
    engine: &Engine,
    source: Option<KvSource>,
    stage: Stage<'_>,
) {
    let stage_key = match stage {
        Stage::Aggregated => 0,
        Stage::Decode => 1,
        Stage::Prefill(_) => 2,
    };
    let stage = stage.as_str();
    COUNTERS.with(|cell| {
        let Ok(mut cache) = cell.try_borrow_mut() else {
            counter(policy, tier, engine, source, stage).increment(1);
            return;
        };
        let source_key = match source {
            None => 0,
            Some(KvSource::Exact) => 1,
            Some(KvSource::Approximate) => 2,
            Some(KvSource::Partial) => 3,
        };
        let key = (policy.uid, label, engine.id, source_key, stage_key);
        if let Some((name, c)) = cache.get(&key)
            && Arc::ptr_eq(name, &engine.name)
        {
            c.increment(1);
            return;
        }
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        let c = counter(policy, tier, engine, source, stage);
        c.increment(1);
        cache.insert(key, (Arc::clone(&engine.name), c));
    });
}

impl super::PolicyStore {
    /// The tiers of `model`'s pipeline (its prefill pipeline if `prefill`) that passed before
    /// the tier named `tier` decided: all of them when the default decided; `None` when `tier`
    /// is not one of the pipeline's (a built-in a script tier called), or the policy changed.
    /// For trace spans: it allocates, so only sampled requests ask.
    pub fn tiers_passed(&self, model: &str, prefill: bool, tier: &str) -> Option<Vec<String>> {
        let generation = self.current.load();
        let main = Self::policy_of(&generation, model);
        let policy: &CompiledPolicy = match (&main.split, prefill) {
            (Some(split), true) => &split.prefill,
            _ => main,
        };
        let names = policy.tier_names();
        if tier == super::DEFAULT_TIER {
            return Some(names);
        }
        let at = names.iter().position(|n| n == tier)?;
        Some(names[..at].to_vec())
    }
}
