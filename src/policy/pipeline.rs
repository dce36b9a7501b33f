//! A compiled policy: an ordered list of tiers, each a built-in or a script, tried in turn until
//! one chooses an engine. A `.rhai` policy is a pipeline of one script tier.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rhai::Dynamic;

use super::builtins::{self, BUILTINS, Builtin, Inputs, PolicyState};
use super::kv::Kv;
use super::script::api::{Ctx, ORIGIN_SCRIPT};
use super::script::{self, ErrorReason, Outcome, Script, ScriptError};
use super::stage::Stage;
use crate::engines::Candidate;
use crate::request::RequestInfo;
use crate::request::admission::Admission;

/// Name of the tier that decides when every tier passed.
pub const DEFAULT_TIER: &str = "default";

/// Warn about a failing tier at most this often.
const WARN_INTERVAL_MS: u64 = 1000;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Rate limit for a tier's error log: at most one warning per [`WARN_INTERVAL_MS`].
#[derive(Debug)]
struct WarnLimiter {
    /// Milliseconds since [`EPOCH`] of the last warning, plus one (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    fn new() -> Self {
        WarnLimiter {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last warning)` if a warning may be logged now.
    fn permit(&self) -> Option<u64> {
        let now = EPOCH.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_INTERVAL_MS)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// What a tier is.
#[derive(Debug)]
pub(crate) enum TierKind {
    Builtin(Builtin),
    Script(Script),
}

/// One tier of a pipeline.
#[derive(Debug)]
pub(crate) struct Tier {
    pub name: Arc<str>,
    pub kind: TierKind,
    limiter: WarnLimiter,
}

impl Tier {
    pub fn new(name: &str, kind: TierKind) -> Tier {
        Tier {
            name: Arc::from(name),
            kind,
            limiter: WarnLimiter::new(),
        }
    }
}

/// Identifies the tier that decided: an index into [`CompiledPolicy::labels`].
pub(crate) type Label = u16;

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A policy ready to decide.
#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// The policy's name (its file stem).
    pub name: Arc<str>,
    /// Hash of the policy file and the script files it references.
    pub hash: u64,
    pub loaded_at: SystemTime,
    /// Unique per compiled instance (for per-thread caches).
    pub uid: u64,
    pub tiers: Vec<Tier>,
    /// The `[params]` table as a Rhai map (empty for `.rhai` policies).
    pub params: Dynamic,
    pub state: PolicyState,
    /// Tier names by [`Label`]: the built-ins (when a script's built-in call chose), then each
    /// tier, then [`DEFAULT_TIER`].
    labels: Vec<Arc<str>>,
    /// A disaggregated policy's prefill pipeline and hand-off (its `tiers` are then the decode
    /// pipeline); `None` for an aggregated policy.
    pub split: Option<Box<Split>>,
}

/// How a disaggregated request's KV reaches its decode engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// vLLM's NixlConnector: the prefill leg carries `kv_transfer_params` asking for a remote
    /// decode; the prefill engine's answer's `kv_transfer_params` go to the decode engine
    /// (production-stack's `disaggregated_prefill_orchestrated`).
    Nixl,
    /// A KV store the engines share (LMCache): the prefill leg is the request with
    /// `max_tokens` 1; the decode engine finds the prompt's KV in the store
    /// (production-stack's `disaggregated_prefill`).
    SharedStore,
}

impl Handoff {
    /// `nixl` or `shared_store`: the policy file's `handoff` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Handoff::Nixl => "nixl",
            Handoff::SharedStore => "shared_store",
        }
    }
}

/// The second half of a disaggregated policy.
#[derive(Debug)]
pub(crate) struct Split {
    /// Chooses the prefill engine (or none) among the prefill engines.
    pub prefill: CompiledPolicy,
    pub handoff: Handoff,
}

impl CompiledPolicy {
    pub fn new(name: &str, hash: u64, tiers: Vec<Tier>, params: Dynamic) -> Self {
        let labels = BUILTINS
            .iter()
            .map(|b| Arc::from(b.name))
            .chain(tiers.iter().map(|t| Arc::clone(&t.name)))
            .chain(std::iter::once(Arc::from(DEFAULT_TIER)))
            .collect();
        CompiledPolicy {
            name: Arc::from(name),
            hash,
            loaded_at: SystemTime::now(),
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            tiers,
            params,
            state: PolicyState::default(),
            labels,
            split: None,
        }
    }

    /// This policy as the decode pipeline of a disaggregated policy with `prefill` tiers.
    pub fn with_split(mut self, prefill: Vec<Tier>, handoff: Handoff) -> Self {
        let prefill = CompiledPolicy::new(&self.name, self.hash, prefill, self.params.clone());
        self.split = Some(Box::new(Split { prefill, handoff }));
        self
    }

    pub fn label(&self, l: Label) -> &Arc<str> {
        &self.labels[usize::from(l).min(self.labels.len() - 1)]
    }

    fn tier_label(&self, tier: usize) -> Label {
        (BUILTINS.len() + tier) as Label
    }

    fn default_label(&self) -> Label {
        (self.labels.len() - 1) as Label
    }

    /// Chooses one of `cands` (never empty): the first tier that decides, else the least
    /// loaded engine under the [`DEFAULT_TIER`] label. Each script tier may run for
    /// `script_budget` (wall clock) before it is stopped and passes. Prefix matches are
    /// computed by `kv` when a tier first reads them.
    pub fn decide(
        &self,
        engine: &rhai::Engine,
        script_budget: Duration,
        req: &RequestInfo,
        cands: &[Candidate],
        kv: &Kv<'_>,
        stage: Stage<'_>,
    ) -> (usize, Label) {
        let mut ctx: Option<Ctx<'_>> = None;
        let inputs = Inputs {
            req,
            cands,
            state: &self.state,
            kv,
            stage,
        };
        for (i, tier) in self.tiers.iter().enumerate() {
            match &tier.kind {
                TierKind::Builtin(b) => {
                    if let Some(e) = b.run_on(&inputs) {
                        return (e, self.tier_label(i));
                    }
                }
                TierKind::Script(s) => {
                    let ctx = ctx.get_or_insert_with(|| {
                        Ctx::new(req, cands, &self.state, kv).for_stage(stage)
                    });
                    // A request never fails because of a script, not even if evaluation panics.
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        script::eval(engine, s, ctx, &self.params, script_budget)
                    }))
                    .unwrap_or_else(|_| {
                        Err(ScriptError {
                            line: s.origin.0,
                            col: s.origin.1,
                            message: "script evaluation panicked".into(),
                            reason: ErrorReason::Panic,
                        })
                    });
                    match outcome {
                        Ok(Outcome::Engine(e, ORIGIN_SCRIPT)) => return (e, self.tier_label(i)),
                        Ok(Outcome::Engine(e, origin)) => return (e, Label::from(origin)),
                        Ok(Outcome::Pass) => {}
                        Err(err) => self.script_failed(tier, s, &err),
                    }
                }
            }
        }
        let e = builtins::least_loaded(cands, &self.state).unwrap_or(0);
        (e, self.default_label())
    }

    /// Runs this policy's script tiers as the admission policy: each may set the request's
    /// tenant and priority (`request.tenant = ...`, `request.priority = ...`); their values
    /// are ignored. The changed admission, or `None` if nothing changed or a script failed
    /// (counted and logged like any script error; the request keeps its own).
    pub fn admit(
        &self,
        engine: &rhai::Engine,
        script_budget: Duration,
        req: &RequestInfo,
    ) -> Option<Admission> {
        let cell = RefCell::new(req.admission.clone());
        let kv = Kv::new(None, req, &[]);
        let ctx = Ctx::new(req, &[], &self.state, &kv).for_admission(&cell);
        for tier in &self.tiers {
            let TierKind::Script(s) = &tier.kind else {
                continue;
            };
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                script::run_for_effect(engine, s, &ctx, &self.params, script_budget)
            }))
            .unwrap_or_else(|_| {
                Err(ScriptError {
                    line: s.origin.0,
                    col: s.origin.1,
                    message: "script evaluation panicked".into(),
                    reason: ErrorReason::Panic,
                })
            });
            if let Err(err) = outcome {
                self.script_failed(tier, s, &err);
                return None;
            }
        }
        let admission = cell.into_inner();
        (admission != req.admission).then_some(admission)
    }

    #[cold]
    fn script_failed(&self, tier: &Tier, script: &Script, err: &ScriptError) {
        metrics::counter!(
            "switchyard_policy_script_errors_total",
            "policy" => self.name.to_string(),
            "tier" => tier.name.to_string(),
            "reason" => err.reason.label()
        )
        .increment(1);
        if let Some(suppressed) = tier.limiter.permit() {
            tracing::warn!(
                policy = %self.name,
                tier = %tier.name,
                reason = err.reason.label(),
                suppressed,
                "{}:{}:{}: {} (tier passed)",
                script.file.display(),
                err.line,
                err.col,
                err.message
            );
        }
    }

    /// Whether every tier is a built-in (no script is interpreted).
    pub fn is_native(&self) -> bool {
        self.tiers
            .iter()
            .all(|t| matches!(t.kind, TierKind::Builtin(_)))
            && self.split.as_ref().is_none_or(|s| s.prefill.is_native())
    }

    /// Names of the tiers, in order.
    pub fn tier_names(&self) -> Vec<String> {
        self.tiers.iter().map(|t| t.name.to_string()).collect()
    }
}
