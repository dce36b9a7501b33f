//! Routing policies: the one seam through which every engine choice goes.
//!
//! SEAM (stable interface used by the proxy):
//! - `PolicySettings`: where policies live and which one applies to which model.
//! - `PolicyStore::new(settings, prefix_block_size)` loads them; `PolicyStore::decide(&req, &cands)` returns
//!   a `Decision` naming the candidate index, the policy and the deciding tier.
//! - `PolicyStore::status_json()` is served at `GET /admin/policies`.
//! - `PolicyStore::reload_now()` (SIGHUP), `PolicyStore::watch(..)` (hot reload),
//!   `PolicyStore::check_dir(dir)` (`switchyard check`).
//!
//! A policy is a file in the policies directory: `NAME.rhai`, a script whose value is the chosen
//! engine (or `()` to pass), or `NAME.toml`, an ordered list of tiers (built-ins and scripts). See
//! `docs/policies.md`. The loaded policies form a [`Generation`] swapped atomically on reload;
//! `decide` loads the current one without locking and evaluates without holding anything.

pub mod builtins;
mod chain;
mod decisions;
mod files;
mod generation;
pub mod kv;
mod load;
mod pipeline;
mod reload;
mod script;
pub mod shipped;
pub mod stage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::engines::Candidate;
use crate::request::RequestInfo;

pub use files::MAX_POLICY_FILE_BYTES;
pub use kv::{KvMatches, KvSource, PrefixMatcher};
pub use load::PolicyDiagnostic;
pub use pipeline::{DEFAULT_TIER, Handoff};
pub use reload::{REARM_INTERVAL, WatchHandle};
pub use script::VALIDATION_TIME_BUDGET;
pub use script::sandbox::{
    MAX_ARRAY_SIZE, MAX_CALL_LEVELS, MAX_EXPR_DEPTHS, MAX_MAP_SIZE, MAX_OPERATIONS, MAX_STRING_SIZE,
};
pub use stage::{DecodeChoice, SKIP_PREFILL, Stage};

/// Default wall-clock budget of one script tier's evaluation (`--script-time-budget`).
pub const DEFAULT_SCRIPT_TIME_BUDGET: Duration = Duration::from_millis(5);

use generation::{Generation, load_files, resolve};
use load::FileKind;
use pipeline::CompiledPolicy;
use script::sandbox;

/// Where policies live and which one applies to which model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// The policies directory (`--policies-dir`).
    pub dir: PathBuf,
    /// The default policy name (`--routing-logic`).
    pub default_policy: String,
    /// Per-model policy names.
    pub per_model: BTreeMap<String, String>,
    /// How long one script tier may run for one request before it is stopped and passes
    /// (`--script-time-budget`).
    pub script_time_budget: Duration,
}

impl Default for PolicySettings {
    fn default() -> PolicySettings {
        PolicySettings {
            dir: PathBuf::from("policies"),
            default_policy: "load_balanced_kvaware".into(),
            per_model: BTreeMap::new(),
            script_time_budget: DEFAULT_SCRIPT_TIME_BUDGET,
        }
    }
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
    /// Where the chosen engine's prefix match came from, if a tier of this decision needed
    /// prefix matches (so they were computed); `None` if none did.
    pub kv: Option<KvSource>,
}

/// The outcome of choosing the prefill engine of a disaggregated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefillChoice {
    /// This prefill engine computes the prompt.
    Engine(Decision),
    /// No prefill leg: the decode engine computes the prompt itself. `tier` is the tier that
    /// decided so (`skip_prefill`, `no_prefill`, a script), or `not_disaggregated` if the
    /// policy in effect is no longer a disaggregated one.
    Skip { policy: Arc<str>, tier: Arc<str> },
}

/// Why policies could not be loaded or watched.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Load(String),
    /// Problems in policy files or in the settings' policy names, one per line.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<PolicyDiagnostic>),
    #[error("cannot watch for policy changes: {0}")]
    Watch(String),
    #[error("watching for policy changes needs a running tokio runtime")]
    NoRuntime,
}

fn join_lines(d: &[PolicyDiagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The result of a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Every problem found; the policies concerned keep their last good version.
    pub errors: Vec<PolicyDiagnostic>,
    /// Policies now loaded.
    pub policies: usize,
    /// Whether the new settings' policy names all resolved and were applied.
    pub settings_applied: bool,
}

impl ReloadOutcome {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty() && self.settings_applied
    }
}

/// All loaded policies.
pub struct PolicyStore {
    current: ArcSwap<Generation>,
    /// Serialises reloads (never taken by `decide`).
    reload_lock: Mutex<()>,
    block_size: usize,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.current.load();
        f.debug_struct("PolicyStore")
            .field("settings", &g.settings)
            .field("block_size", &self.block_size)
            .finish()
    }
}

/// Runs `f` (an evaluation that may take up to the script time budget) so that it does not
/// hold up the other tasks of a tokio worker: on a multi-threaded runtime's worker the worker's
/// other tasks (`/health`, other requests) move to another thread for the duration
/// (`block_in_place`); anywhere else `f` simply runs.
pub fn off_the_workers<R>(f: impl Fn() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if !multi_thread {
        return f();
    }
    let mut ran = false;
    // `block_in_place` refuses (panics, before running `f`) in contexts where blocking is not
    // allowed; then `f` runs here. A panic of `f` itself goes on unwinding.
    let blocked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| {
            ran = true;
            f()
        })
    }));
    match blocked {
        Ok(r) => r,
        Err(panic) if ran => std::panic::resume_unwind(panic),
        Err(_) => f(),
    }
}

impl PolicyStore {
    /// Loads the policies of `settings.dir`. Fails if a policy the settings name is missing or
    /// broken; broken policies nobody uses are logged and shown in `status_json`.
    pub fn new(
        settings: PolicySettings,
        prefix_block_size: usize,
    ) -> Result<Arc<PolicyStore>, PolicyError> {
        let sandbox = Arc::new(sandbox::build(&settings.dir));
        let (files, mut errors) = load_files(&sandbox, &settings.dir, None);
        let ((default, per_model, resolved), _) =
            resolve(&settings, &files, None).map_err(|mut e| {
                errors.append(&mut e);
                PolicyError::Invalid(errors.clone())
            })?;
        let generation = Generation::new(
            settings,
            sandbox,
            (default, per_model, resolved),
            files,
            errors,
            1,
        );
        Ok(Arc::new(PolicyStore {
            current: ArcSwap::from_pointee(generation),
            reload_lock: Mutex::new(()),
            block_size: prefix_block_size,
        }))
    }

    /// The settings in effect.
    pub fn settings(&self) -> Arc<PolicySettings> {
        Arc::clone(&self.current.load().settings)
    }

    /// Chooses one of `cands` (never empty) for `req`, on the candidates' own
    /// `prefix_match_tokens`.
    pub fn decide(&self, req: &RequestInfo, cands: &[Candidate]) -> Decision {
        self.decide_inner(req, cands, None, Stage::Aggregated)
    }

    /// Runs the policies directory's `admission.rhai`, if there is one: the request's tenant
    /// and priority as it sets them, or `None` if it changed nothing (or failed: counted and
    /// logged, the request keeps its own).
    pub fn admit(&self, req: &RequestInfo) -> Option<crate::request::admission::Admission> {
        let generation = self.current.load();
        let policy = generation.admission.as_ref()?;
        let run = || {
            policy.admit(
                &generation.sandbox.engine,
                generation.settings.script_time_budget,
                req,
            )
        };
        off_the_workers(run)
    }

    /// The hand-off of the policy that serves `model`, if it is a disaggregated policy.
    pub fn handoff_for(&self, model: &str) -> Option<Handoff> {
        let g = self.current.load();
        Self::policy_of(&g, model).split.as_ref().map(|s| s.handoff)
    }

    /// Chooses the decode engine of a disaggregated request among `cands` (the decode
    /// engines; never empty), with the policy's decode pipeline (an aggregated policy's only
    /// pipeline).
    pub fn decide_decode(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        matcher: &dyn PrefixMatcher,
    ) -> Decision {
        self.decide_inner(req, cands, Some(matcher), Stage::Decode)
    }

    /// Chooses the prefill engine of a disaggregated request among `cands` (the prefill
    /// engines), its decode engine being `decode`; or no prefill leg.
    pub fn decide_prefill(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        matcher: &dyn PrefixMatcher,
        decode: &DecodeChoice<'_>,
    ) -> PrefillChoice {
        let generation = self.current.load();
        let policy = Self::policy_of(&generation, &req.model);
        if policy.split.is_none() {
            return PrefillChoice::Skip {
                policy: Arc::clone(&policy.name),
                tier: Arc::from("not_disaggregated"),
            };
        }
        drop(generation);
        let d = self.decide_inner(req, cands, Some(matcher), Stage::Prefill(decode));
        if d.engine == SKIP_PREFILL {
            metrics::counter!(
                "switchyard_prefill_skipped_total",
                "policy" => d.policy.to_string(),
                "tier" => d.tier.to_string()
            )
            .increment(1);
            PrefillChoice::Skip {
                policy: d.policy,
                tier: d.tier,
            }
        } else {
            PrefillChoice::Engine(d)
        }
    }

    fn policy_of<'g>(generation: &'g Generation, model: &str) -> &'g Arc<CompiledPolicy> {
        if generation.per_model.is_empty() {
            &generation.default
        } else {
            generation
                .per_model
                .get(model)
                .unwrap_or(&generation.default)
        }
    }

    /// Chooses one of `cands` (never empty) for `req`; prefix matches are asked of `matcher`
    /// when a tier first needs them (at most once), never otherwise.
    pub fn decide_with(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        matcher: &dyn PrefixMatcher,
    ) -> Decision {
        self.decide_inner(req, cands, Some(matcher), Stage::Aggregated)
    }

    /// Runs the pipeline of `stage` (the prefill pipeline of a disaggregated policy for
    /// [`Stage::Prefill`], else the policy's main pipeline). In the prefill stage the engine
    /// may be [`SKIP_PREFILL`]; with no candidates it is always 0 (a prefill stage without
    /// candidates: [`SKIP_PREFILL`]).
    fn decide_inner(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        matcher: Option<&dyn PrefixMatcher>,
        stage: Stage<'_>,
    ) -> Decision {
        let generation = self.current.load();
        let main = Self::policy_of(&generation, &req.model);
        let policy: &CompiledPolicy = match (stage, &main.split) {
            (Stage::Prefill(_), Some(split)) => &split.prefill,
            _ => main,
        };
        let prefill = matches!(stage, Stage::Prefill(_));
        if cands.is_empty() {
            if prefill {
                return Decision {
                    engine: SKIP_PREFILL,
                    policy: Arc::clone(&policy.name),
                    tier: Arc::from("no_prefill_engine"),
                    kv: None,
                };
            }
            return Decision {
                engine: 0,
                policy: Arc::clone(&policy.name),
                tier: Arc::from(DEFAULT_TIER),
                kv: None,
            };
        }
        let kv = kv::Kv::new(matcher, req, cands);
        let run = || {
            policy.decide(
                &generation.sandbox.engine,
                generation.settings.script_time_budget,
                req,
                cands,
                &kv,
                stage,
            )
        };
        let (picked, label) = if policy.is_native() {
            run()
        } else {
            off_the_workers(run)
        };
        if prefill && picked == SKIP_PREFILL {
            let tier = policy.label(label);
            tracing::debug!(policy = %policy.name, tier = %tier, model = %req.model, "no prefill leg");
            return Decision {
                engine: SKIP_PREFILL,
                policy: Arc::clone(&policy.name),
                tier: Arc::clone(tier),
                kv: None,
            };
        }
        // Every tier returns a candidate's index; the clamp only keeps a bug from panicking in a
        // release build (fuzzing runs with debug assertions, which catch it).
        debug_assert!(
            picked < cands.len(),
            "policy `{}` tier {label} picked {picked} of {} candidates",
            policy.name,
            cands.len()
        );
        let engine = picked.min(cands.len() - 1);
        let tier = policy.label(label);
        let source = kv.source(engine);
        decisions::record(policy, label, tier, &cands[engine].engine, source, stage);
        tracing::debug!(
            policy = %policy.name,
            stage = stage.as_str(),
            tier = %tier,
            engine = %cands[engine].engine.name,
            kv = KvSource::label(source),
            model = %req.model,
            candidates = cands.len(),
            "routing decision"
        );
        Decision {
            engine,
            policy: Arc::clone(&policy.name),
            tier: Arc::clone(tier),
            kv: source,
        }
    }

    /// Reloads the policies with the current settings (SIGHUP).
    pub fn reload_now(&self) -> ReloadOutcome {
        let settings = PolicySettings::clone(&self.current.load().settings);
        self.reload_with(settings)
    }

    /// Reloads the policies and applies `settings`. Everything is compiled and validated before
    /// the swap; a broken policy keeps its last good version. Settings naming an unknown policy
    /// are rejected as a whole: the previous settings stay in effect with the policies of their
    /// own directory (reloaded from it), so nothing of the rejected settings (not their
    /// directory's files, not their script budget) is used.
    pub fn reload_with(&self, settings: PolicySettings) -> ReloadOutcome {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let prev = self.current.load_full();
        let sandbox_for = |dir: &Path| {
            if prev.settings.dir == dir {
                Arc::clone(&prev.sandbox)
            } else {
                Arc::new(sandbox::build(dir))
            }
        };
        let mut sandbox = sandbox_for(&settings.dir);
        let (mut files, mut errors) = load_files(&sandbox, &settings.dir, Some(&prev));
        let (settings, resolution, settings_applied) = match resolve(&settings, &files, Some(&prev))
        {
            Ok((r, mut kept)) => {
                for d in &kept {
                    tracing::error!("{d}");
                }
                errors.append(&mut kept);
                (settings, r, true)
            }
            Err(mut rejected) => {
                for d in &rejected {
                    tracing::error!("{d}; settings not applied");
                }
                let old = PolicySettings::clone(&prev.settings);
                if old.dir != settings.dir {
                    // The files just loaded belong to the rejected directory: load the
                    // directory in effect instead.
                    sandbox = sandbox_for(&old.dir);
                    (files, errors) = load_files(&sandbox, &old.dir, Some(&prev));
                }
                errors.append(&mut rejected);
                match resolve(&old, &files, Some(&prev)) {
                    Ok((r, mut kept)) => {
                        errors.append(&mut kept);
                        (old, r, false)
                    }
                    // Cannot happen (every previous name resolved before, and vanished ones
                    // keep their last good version); keep the previous generation as it is.
                    Err(_) => {
                        return ReloadOutcome {
                            errors,
                            policies: prev.files.len(),
                            settings_applied: false,
                        };
                    }
                }
            }
        };
        let policies = files.iter().filter(|f| f.policy.is_some()).count();
        let ok = errors.is_empty();
        let generation = Generation::new(
            settings,
            sandbox,
            resolution,
            files,
            errors.clone(),
            prev.number + 1,
        );
        self.current.store(Arc::new(generation));
        let result = if ok { "ok" } else { "error" };
        metrics::counter!("switchyard_policy_reloads_total", "result" => result).increment(1);
        if ok {
            tracing::info!(policies, "policies reloaded");
        } else {
            tracing::warn!(
                policies,
                errors = errors.len(),
                "policies reloaded with errors; affected policies keep their last good version"
            );
        }
        ReloadOutcome {
            errors,
            policies,
            settings_applied,
        }
    }

    /// Watches the policies directory and `config_file` (re-read with `loader`) and reloads on
    /// change (debounced); also reloads on SIGHUP. Needs a running tokio runtime. Dropping the
    /// handle stops watching.
    pub fn watch(
        self: &Arc<Self>,
        config_file: Option<PathBuf>,
        loader: Option<SettingsLoader>,
    ) -> Result<WatchHandle, PolicyError> {
        reload::watch(Arc::clone(self), config_file, loader)
    }

    /// Compiles and validates every policy file in `dir`, as `switchyard check` does.
    pub fn check_dir(dir: &Path) -> Vec<PolicyDiagnostic> {
        let sandbox = Arc::new(sandbox::build(dir));
        load_files(&sandbox, dir, None).1
    }

    /// Status for `GET /admin/policies`: settings, and per policy file its name, source, content
    /// hash, load time, tiers and last error.
    pub fn status_json(&self) -> serde_json::Value {
        let g = self.current.load();
        let active: Vec<&Arc<CompiledPolicy>> = g.resolved.values().collect();
        let policies: Vec<serde_json::Value> = g
            .files
            .iter()
            .map(|f| {
                let p = f.policy.as_ref();
                let last_error = if f.last_error.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::Value::String(join_lines(&f.last_error))
                };
                serde_json::json!({
                    "name": f.file.name,
                    "source": f.file.path.display().to_string(),
                    "kind": match f.file.kind { FileKind::Rhai => "rhai", FileKind::Toml => "toml" },
                    "loaded": p.is_some(),
                    "active": p.is_some_and(|p| active.iter().any(|a| Arc::ptr_eq(a, p))),
                    "hash": p.map(|p| format!("{:016x}", p.hash)),
                    "loaded_at": p.map(|p| humantime::format_rfc3339_millis(p.loaded_at).to_string()),
                    "tiers": p.map(|p| p.tier_names()),
                    "prefill_tiers": p.and_then(|p| p.split.as_ref()).map(|s| s.prefill.tier_names()),
                    "handoff": p.and_then(|p| p.split.as_ref()).map(|s| s.handoff.as_str()),
                    "execution": p.map(|p| if p.is_native() { "native" } else { "rhai" }),
                    "last_error": last_error,
                })
            })
            .collect();
        serde_json::json!({
            "dir": g.settings.dir.display().to_string(),
            "default_policy": g.settings.default_policy,
            "per_model": g.settings.per_model,
            "prefix_block_size": self.block_size,
            "generation": g.number,
            "reloaded_at": humantime::format_rfc3339_millis(g.reloaded_at).to_string(),
            "errors": g.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "policies": policies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_the_workers_runs_anywhere() {
        assert_eq!(off_the_workers(|| 1), 1);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(current.block_on(async { off_the_workers(|| 2) }), 2);
        let local = tokio::task::LocalSet::new();
        assert_eq!(local.block_on(&current, async { off_the_workers(|| 3) }), 3);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        assert_eq!(multi.block_on(async { off_the_workers(|| 4) }), 4);
        let on_worker = multi.spawn(async { off_the_workers(|| 5) });
        assert_eq!(multi.block_on(on_worker).expect("task"), 5);
        // A multi-threaded runtime's handle entered inside a current-thread runtime, where
        // `block_in_place` refuses: runs inline.
        let v = current.block_on(async {
            let _guard = multi.handle().enter();
            off_the_workers(|| 6)
        });
        assert_eq!(v, 6);
        // A panic of the evaluation itself is not swallowed.
        let on_worker = multi.spawn(async {
            std::panic::catch_unwind(|| off_the_workers(|| -> u8 { panic!("evaluation") })).is_err()
        });
        assert!(multi.block_on(on_worker).expect("task"));
    }
}
