//! Routing policies: the one seam through which every engine choice goes.
//!
//! SEAM (stable interface used by the proxy):
//! - `PolicySettings`: where policies live and which one applies to which model.
//! - `PolicyStore::new(settings, prefix_block_size)` loads them; `PolicyStore::decide(&req, &cands)` returns
//!   a `Decision` naming the candidate index, the policy and the deciding tier.
//! - `PolicyStore::status_json()` is served at `GET /admin/policies`.
//!
//! Until the policy engine lands this picks the least in-flight engine with rotating ties.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engines::Candidate;
use crate::request::RequestInfo;

/// Where policies live and which one applies to which model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// The policies directory (`--policies-dir`).
    pub dir: PathBuf,
    /// The default policy name (`--routing-logic`).
    pub default_policy: String,
    /// Per-model policy names.
    pub per_model: BTreeMap<String, String>,
}

/// Reloads [`PolicySettings`] from the config file (CLI overrides still applied).
pub type SettingsLoader = Arc<dyn Fn() -> Result<PolicySettings, String> + Send + Sync>;

/// The outcome of routing one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into the candidates slice.
    pub engine: usize,
    /// Name of the policy that decided.
    pub policy: Arc<str>,
    /// Name of the deciding tier (e.g. `load_balance`, `kv_lookup`, a script, `default`).
    pub tier: Arc<str>,
}

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Load(String),
}

/// All loaded policies.
pub struct PolicyStore {
    settings: PolicySettings,
    rotation: AtomicUsize,
    name: Arc<str>,
    tier: Arc<str>,
}

impl PolicyStore {
    pub fn new(
        settings: PolicySettings,
        _prefix_block_size: usize,
    ) -> Result<Arc<PolicyStore>, PolicyError> {
        let name: Arc<str> = Arc::from(settings.default_policy.as_str());
        Ok(Arc::new(PolicyStore {
            settings,
            rotation: AtomicUsize::new(0),
            name,
            tier: Arc::from("fallback"),
        }))
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Chooses one of `cands` (never empty) for `req`.
    pub fn decide(&self, _req: &RequestInfo, cands: &[Candidate]) -> Decision {
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let n = cands.len();
        let mut best = start % n.max(1);
        for k in 0..n {
            let i = (start + k) % n;
            if cands[i].load.in_flight < cands[best].load.in_flight {
                best = i;
            }
        }
        Decision {
            engine: best,
            policy: Arc::clone(&self.name),
            tier: Arc::clone(&self.tier),
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!({ "policies": [] })
    }
}
