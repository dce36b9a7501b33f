//! Everything resolved from `switchyard bench`'s flags before any run starts: the flags
//! validated (each error names its flag), the workload or the trace (read once, whole, so that
//! a bad record stops the benchmark before any run), the runs and the policies directory.

use std::path::PathBuf;
use std::time::Duration;

use super::cluster::ClusterSpec;
use super::pd::{DEFAULT_PD_POLICIES, PdSplit};
use super::plan::{self, PoliciesDir, RunPlan};
use super::workload::trace_plan::{TraceSpec, TraceSummary};
use super::workload::{WorkloadKnobs, WorkloadSpec};
use super::{BenchArgs, BenchError, DEFAULT_MAX_NUM_SEQS, kvcompare};

/// What the runs send: a generated workload or a trace.
pub(super) enum LoadSpec {
    Workload(WorkloadSpec),
    Trace(TraceSpec, TraceSummary),
}

impl LoadSpec {
    pub(super) fn describe(&self) -> String {
        match self {
            LoadSpec::Workload(w) => w.describe(),
            LoadSpec::Trace(_, t) => t.describe(),
        }
    }

    pub(super) fn seed(&self) -> u64 {
        match self {
            LoadSpec::Workload(w) => w.seed,
            LoadSpec::Trace(t, _) => t.seed,
        }
    }

    fn kv_load(&self) -> kvcompare::KvLoad<'_> {
        match self {
            LoadSpec::Workload(w) => kvcompare::KvLoad::Workload(w),
            LoadSpec::Trace(_, t) => kvcompare::KvLoad::Trace(t),
        }
    }
}

/// Everything resolved from the arguments before any run starts.
pub(super) struct Setup {
    pub(super) load: LoadSpec,
    pub(super) time_scale: f64,
    pub(super) runs: Vec<RunPlan>,
    pub(super) dir: Option<PoliciesDir>,
    pub(super) cluster: ClusterSpec,
    pub(super) request_timeout: Duration,
}

/// The generated workload, or the trace checked and summarised.
fn load_spec(args: &BenchArgs) -> Result<LoadSpec, BenchError> {
    let bad = |m: &str| Err(BenchError::Args(m.to_owned()));
    let Some(path) = &args.trace else {
        if args.trace_speed.is_some() || args.trace_limit.is_some() {
            return bad("--trace-speed and --trace-limit are settings of --trace");
        }
        let file = match &args.workload_file {
            Some(p) => Some(WorkloadKnobs::from_file(p)?),
            None => None,
        };
        let spec = WorkloadSpec::resolve(args.workload, args.quick, file.as_ref(), &args.knobs)?;
        return Ok(LoadSpec::Workload(spec));
    };
    let knobs = WorkloadKnobs {
        seed: None,
        ..args.knobs.clone()
    };
    if args.workload.is_some() || args.workload_file.is_some() || knobs != WorkloadKnobs::default()
    {
        return bad(
            "--trace replays the trace's requests: --workload, --workload-file and the workload \
             knobs (--qps, --users, ...) do not apply; --seed does (it seeds the prompts' tokens)",
        );
    }
    let speed = args.trace_speed.unwrap_or(1.0);
    if !(speed.is_finite() && speed > 0.0) {
        return Err(BenchError::Args(format!(
            "--trace-speed must be a positive factor, got {speed}"
        )));
    }
    if args.trace_limit == Some(0) {
        return bad("--trace-limit must be at least 1");
    }
    let spec = TraceSpec {
        path: path.clone(),
        speed,
        limit: args.trace_limit,
        seed: args.knobs.seed.unwrap_or(42),
        // The engines' own block size (vLLM's default with --target).
        engine_block_size: crate::sim::SimConfig::default().block_size,
    };
    let summary = spec.summarise()?;
    if summary.requests == 0 {
        return bad("--trace: no request of the trace can be sent (all are skipped)");
    }
    Ok(LoadSpec::Trace(spec, summary))
}

/// The time scale, with the flags every mode shares checked (each error names its flag).
pub(super) fn check_common(args: &BenchArgs) -> Result<f64, BenchError> {
    let bad = |m: String| Err(BenchError::Args(m));
    let time_scale = args
        .time_scale
        .unwrap_or(if args.target.is_some() { 1.0 } else { 0.1 });
    if !(time_scale.is_finite() && time_scale > 0.0 && time_scale <= 100.0) {
        return bad(format!(
            "--time-scale must be in (0, 100], got {time_scale}"
        ));
    }
    if !(args.request_timeout.is_finite() && args.request_timeout > 0.0) {
        return bad(format!(
            "--request-timeout must be a positive number of seconds, got {}",
            args.request_timeout
        ));
    }
    if !(1..=64).contains(&args.engines) {
        return bad(format!(
            "--engines must be between 1 and 64, got {}",
            args.engines
        ));
    }
    if let Some(f) = args.slow_engine
        && !(f.is_finite() && f > 0.0)
    {
        return bad(format!("--slow-engine must be a positive factor, got {f}"));
    }
    if !(args.engine_stats_interval.is_finite() && args.engine_stats_interval > 0.0) {
        return bad(format!(
            "--engine-stats-interval must be positive, got {}",
            args.engine_stats_interval
        ));
    }
    if args.max_num_seqs == Some(0) {
        return bad("--max-num-seqs must be at least 1".into());
    }
    Ok(time_scale)
}

/// The simulated engines of every run, from the flags.
pub(super) fn cluster_spec(args: &BenchArgs, time_scale: f64, seed: u64) -> ClusterSpec {
    ClusterSpec {
        engines: args.engines,
        model: args.model.clone(),
        time_scale,
        slow_engine: args.slow_engine,
        engine_profile: args.engine_profile,
        // A profile brings its own max_num_seqs; without one, the bench's smaller default.
        max_num_seqs: args.max_num_seqs.or_else(|| {
            args.engine_profile
                .is_none()
                .then_some(DEFAULT_MAX_NUM_SEQS)
        }),
        num_blocks: args.num_blocks,
        engine_stats_interval: args.engine_stats_interval,
        seed,
        router_replicas: 1,
        tokenizer: args.tokenizer.clone(),
        exact_kv: false,
        pd: None,
    }
}

pub(super) fn setup(args: &BenchArgs) -> Result<Setup, BenchError> {
    let bad = |m: String| Err(BenchError::Args(m));
    if args.tenants {
        return bad(
            "--tenants is its own benchmark: run it with `switchyard bench --tenants` \
             (bench::tenants::run)"
                .into(),
        );
    }
    let time_scale = check_common(args)?;
    let sweep = match &args.sweep {
        Some(s) => plan::parse_sweep(s).map_err(BenchError::Args)?,
        None => Vec::new(),
    };
    if !args.kv_compare && (args.router_replicas.is_some() || args.tokenizer.is_some()) {
        return bad("--router-replicas and --tokenizer are settings of --kv-compare".into());
    }
    let splits = pd_splits(args)?;
    let load = load_spec(args)?;
    let (runs, dir) = if args.kv_compare {
        let (replicas, small) = kvcompare::settings(args, load.kv_load(), !sweep.is_empty())?;
        let runs = plan::kv_compare_runs(&replicas, small);
        let dir = PoliciesDir::prepare(&policies_source(&args.policies_dir)?, &[])?;
        dir.check(&runs)?;
        (runs, Some(dir))
    } else if let Some(target) = &args.target {
        if !(target.starts_with("http://") && target.len() > 7) {
            return bad(format!("--target must be an http:// URL, got {target:?}"));
        }
        if !sweep.is_empty() {
            return bad("--sweep needs simulated engines; it cannot be used with --target".into());
        }
        if args.slow_engine.is_some()
            || args.max_num_seqs.is_some()
            || args.num_blocks.is_some()
            || args.engine_profile.is_some()
        {
            return bad(
                "--slow-engine, --engine-profile, --max-num-seqs and --num-blocks configure \
                 simulated engines; they cannot be used with --target"
                    .into(),
            );
        }
        let name = match args.policies.as_deref() {
            None => "target".to_owned(),
            Some([one]) => one.clone(),
            Some(_) => {
                return bad(
                    "--target benchmarks the router as it runs: give at most one policy \
                     (the one it is running) to label the row"
                        .into(),
                );
            }
        };
        (
            vec![RunPlan {
                policy: name.clone(),
                name,
                kv: None,
                pd: None,
            }],
            None,
        )
    } else {
        let mut runs =
            plan::plan_runs(args.policies.as_deref(), &sweep).map_err(BenchError::Args)?;
        runs.extend(pd_runs(args, &splits));
        let dir = PoliciesDir::prepare(&policies_source(&args.policies_dir)?, &sweep)?;
        dir.check(&runs)?;
        (runs, Some(dir))
    };
    Ok(Setup {
        cluster: cluster_spec(args, time_scale, load.seed()),
        load,
        time_scale,
        runs,
        dir,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
    })
}

/// `--pd`'s splits, checked: each uses the aggregated runs' engine count, on simulated engines.
fn pd_splits(args: &BenchArgs) -> Result<Vec<PdSplit>, BenchError> {
    let Some(list) = &args.pd else {
        return Ok(Vec::new());
    };
    if args.target.is_some() || args.kv_compare {
        return Err(BenchError::Args(
            "--pd starts its own prefill and decode engines: not with --target or --kv-compare"
                .into(),
        ));
    }
    let mut out: Vec<PdSplit> = Vec::new();
    for s in list.iter().filter(|s| !s.trim().is_empty()) {
        let split = PdSplit::parse(s).map_err(BenchError::Args)?;
        if split.engines() != args.engines {
            return Err(BenchError::Args(format!(
                "--pd {s}: {} engines, but --engines is {} (a P/D run uses as many engines as \
                 the aggregated runs it is compared with)",
                split.engines(),
                args.engines
            )));
        }
        if !out.contains(&split) {
            out.push(split);
        }
    }
    if out.is_empty() {
        return Err(BenchError::Args(
            "--pd: no split given (e.g. --pd 2:2)".into(),
        ));
    }
    Ok(out)
}

/// The P/D runs: every split × every P/D policy.
fn pd_runs(args: &BenchArgs, splits: &[PdSplit]) -> Vec<RunPlan> {
    let policies: Vec<String> = match &args.pd_policies {
        Some(p) => p
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        None => DEFAULT_PD_POLICIES
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
    };
    splits
        .iter()
        .flat_map(|&split| {
            policies.iter().map(move |p| RunPlan {
                name: split.run_name(p),
                policy: p.clone(),
                kv: None,
                pd: Some(split),
            })
        })
        .collect()
}

/// The directory the benchmark reads policies from: the one given, or, for the default
/// `policies` when there is none here (outside a checkout), the router's built-in set.
pub(super) fn policies_source(dir: &std::path::Path) -> Result<PathBuf, BenchError> {
    if dir != std::path::Path::new("policies") || dir.is_dir() {
        return Ok(dir.to_owned());
    }
    crate::policy::shipped::builtin_dir(None).map_err(|e| BenchError::PolicyDir {
        path: "built-in policies".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::parse_for_test as parse;

    #[test]
    fn bad_settings_are_named() {
        let dir = std::env::temp_dir();
        let d = dir.to_str().unwrap();
        for (args, needle) in [
            (vec!["--time-scale", "0"], "--time-scale"),
            (vec!["--engines", "0"], "--engines"),
            (vec!["--slow-engine=-1"], "--slow-engine"),
            (vec!["--sweep", "x=1"], "--sweep"),
            (
                vec!["--target", "http://x:1", "--sweep", "threshold=1"],
                "--sweep",
            ),
            (
                vec!["--target", "http://x:1", "--policies", "a,b"],
                "at most one policy",
            ),
            (vec!["--target", "x:1"], "--target"),
            (
                vec!["--target", "http://x:1", "--slow-engine", "2"],
                "--slow-engine",
            ),
            (vec!["--rounds", "2", "--workload", "hot-prefix"], "rounds"),
            (vec!["--trace-limit", "3"], "settings of --trace"),
            (vec!["--trace", d, "--qps", "3"], "do not apply"),
            (
                vec!["--trace", d, "--workload", "hot-prefix"],
                "do not apply",
            ),
            (vec!["--trace", d, "--trace-speed", "0"], "--trace-speed"),
            (vec!["--trace", d, "--trace-limit", "0"], "--trace-limit"),
            (
                vec!["--trace", "/nonexistent.jsonl"],
                "--trace /nonexistent.jsonl",
            ),
            (vec!["--kv-compare"], "--tokenizer"),
            (vec!["--pd", "2:1"], "--engines is 4"),
            (vec!["--pd", "2:x"], "--pd"),
            (
                vec!["--pd", "2:2", "--target", "http://x:1"],
                "not with --target",
            ),
            (vec!["--router-replicas", "2"], "--kv-compare"),
            (
                vec!["--kv-compare", "--tokenizer", d, "--policies", "a"],
                "chooses its own runs",
            ),
            (
                vec!["--kv-compare", "--tokenizer", d, "--router-replicas", "0"],
                "--router-replicas",
            ),
            (
                vec!["--policies-dir", d, "--policies", "no_such_policy"],
                "unknown policy",
            ),
        ] {
            let e = setup(&parse(&args))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
