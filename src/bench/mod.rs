//! The routing benchmark (`switchyard bench`): replays a seeded workload through the real router
//! in front of fresh simulated vLLM engines, once per policy, and compares the policies on time
//! to first token and friends. See `docs/bench.md`.
//!
//! - [`run`]: the CLI entry — progress bars, the table, files in `--out`.
//! - [`run_quiet`]: the same benchmark without printing or writing anything (tests, embedding).
//!
//! Files: `args.rs` (the flags, the reproducing command line), `setup.rs` (the flags
//! validated, the runs planned), `workload/` (knobs, presets, seeded generation; traces: their
//! formats, token-id prompts, ideal hit rate), `text.rs` (filler text sized in tokens),
//! `driver.rs` (the load generator, TTFT from SSE streams), `replay.rs` (the open-loop replay
//! of a trace),
//! `sse.rs` (SSE reader), `cluster.rs` (sims + router replicas per run), `plan.rs` (runs,
//! sweep, kv comparison, policies directory), `kvcompare.rs` (`--kv-compare`: its routings and
//! table), `stats.rs` (percentiles, per-run figures), `report.rs` (tables, JSON, CSV),
//! `winners.rs` (the best run per figure), `svg.rs` (charts), `pd.rs` (`--pd`: prefill/decode
//! runs beside the aggregated ones), `tenants/` (`--tenants`: the noisy/quiet tenant benchmark
//! of the router's queue, its own runs and report).

mod args;
pub mod cluster;
pub mod driver;
pub mod kvcompare;
pub mod pd;
pub mod plan;
pub mod replay;
pub mod report;
mod setup;
pub mod sse;
pub mod stats;
pub mod svg;
pub mod tenants;
pub mod text;
pub mod winners;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub use args::{BenchArgs, DEFAULT_MAX_NUM_SEQS};
use cluster::Cluster;
use driver::DriveConfig;
use plan::RunPlan;
use report::{BenchReport, BenchSettings};
use setup::{LoadSpec, Setup, setup};
use stats::{EngineFigures, RequestRecord, RunStats};
use workload::Workload;
use workload::trace_plan::TraceSpec;

/// What a run sends: a generated workload (every request up-front) or a trace (read lazily).
#[derive(Debug, Clone)]
enum Load {
    Workload(Arc<Workload>),
    Trace(TraceSpec),
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error(transparent)]
    Trace(#[from] workload::trace::TraceError),
    #[error("policies directory {path}: {source}")]
    PolicyDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start a simulated engine: {0}")]
    Sim(std::io::Error),
    #[error("cannot start the router with policy {policy}: {source}")]
    Router {
        policy: String,
        source: crate::proxy::StartError,
    },
    #[error("the benchmark client failed: {0}")]
    Client(std::io::Error),
    #[error("cannot read engine metrics: {0}")]
    Metrics(String),
    #[error("cannot write the report to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Runs the benchmark: prints a progress bar per run, then the table and the best policy per
/// figure, and writes `bench.json`, `bench.md`, `bench.svg` and `requests.csv` to `--out`.
pub async fn run(args: BenchArgs) -> Result<BenchReport, BenchError> {
    let report = execute(&args, !args.quiet).await?;
    println!("\n{}", report.render_text());
    let written = report
        .write_files(&args.out)
        .map_err(|source| BenchError::Write {
            path: args.out.display().to_string(),
            source,
        })?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("Wrote {}", names.join(", "));
    Ok(report)
}

/// Runs the benchmark without printing or writing files.
pub async fn run_quiet(args: BenchArgs) -> Result<BenchReport, BenchError> {
    execute(&args, false).await
}

fn progress_bar(len: usize, name: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>28} [{bar:24}] {pos}/{len} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(name.to_owned());
    bar
}

async fn execute(args: &BenchArgs, show: bool) -> Result<BenchReport, BenchError> {
    let s = setup(args)?;
    let (load, planned) = match &s.load {
        LoadSpec::Workload(spec) => {
            let w = Workload::generate(spec);
            let n = w.requests();
            (Load::Workload(Arc::new(w)), n)
        }
        LoadSpec::Trace(spec, summary) => (Load::Trace(spec.clone()), summary.requests),
    };
    if show {
        let engines = match &args.target {
            Some(t) => format!("router {t}"),
            None => format!(
                "{} simulated engines{}",
                s.cluster.engines,
                args.slow_engine
                    .map(|f| format!(" (engine 0 {f}x slower)"))
                    .unwrap_or_default()
            ),
        };
        eprintln!(
            "switchyard bench: {} ({planned} requests); {engines}; time scale {} (times reported in simulated seconds = wall / {})",
            s.load.describe(),
            s.time_scale,
            s.time_scale
        );
    }
    let mut runs = Vec::with_capacity(s.runs.len());
    let mut records = Vec::with_capacity(s.runs.len());
    let mut kv_rows = Vec::new();
    for r in &s.runs {
        let bar = progress_bar(planned, &r.name, show);
        let wall = Instant::now();
        let (recs, engines, figures) = run_one(args, &s, r, &load, &bar).await?;
        if let Some(kv) = &r.kv {
            kv_rows.push(kvcompare::KvRow::new(kv, &recs));
        }
        bar.finish_and_clear();
        let name = if args.target.is_some() && args.policies.is_none() {
            majority_policy(&recs).unwrap_or_else(|| r.name.clone())
        } else {
            r.name.clone()
        };
        let policy = if args.target.is_some() {
            &name
        } else {
            &r.policy
        };
        let st = RunStats::compute(&name, policy, planned, &recs, &engines, figures);
        if show {
            eprintln!("{}", run_line(&st, wall.elapsed(), &recs));
        }
        runs.push(st);
        records.push(recs);
    }
    // The kv comparison's runs differ in their clusters: no single winner per figure.
    let winners = if args.kv_compare {
        Vec::new()
    } else {
        report::winners(&runs)
    };
    let (workload, trace) = match &s.load {
        LoadSpec::Workload(w) => (Some(w.clone()), None),
        LoadSpec::Trace(_, t) => (None, Some(t.clone())),
    };
    Ok(BenchReport {
        ideal_cache_hit_rate: trace.as_ref().and_then(|t| t.ideal_cache_hit_rate),
        settings: BenchSettings {
            command: args.command_line(),
            workload,
            trace,
            engines: args.target.is_none().then_some(s.cluster.engines),
            target: args.target.clone(),
            model: args.model.clone(),
            time_scale: s.time_scale,
            slow_engine: args.slow_engine,
            policies_dir: s
                .dir
                .as_ref()
                .map(|_| args.policies_dir.display().to_string())
                .unwrap_or_default(),
            time_unit: "simulated seconds (wall seconds / time_scale)",
        },
        runs,
        winners,
        kv_compare: args.kv_compare.then_some(kv_rows),
        records,
    })
}

/// One run: the records, the engines' names (empty with `--target`) and their own figures.
async fn run_one(
    args: &BenchArgs,
    s: &Setup,
    run: &RunPlan,
    load: &Load,
    bar: &ProgressBar,
) -> Result<(Vec<RequestRecord>, Vec<String>, EngineFigures), BenchError> {
    let policy = run.policy.as_str();
    if let Some(target) = &args.target {
        let cfg = drive_config(target.trim_end_matches('/'), args, s);
        let recs = drive(cfg, load, bar.clone())
            .await
            .map_err(BenchError::Client)?;
        return Ok((recs, Vec::new(), EngineFigures::default()));
    }
    let Some(dir) = &s.dir else {
        return Err(BenchError::Args("no policies directory".into()));
    };
    let mut spec = s.cluster.clone();
    spec.pd = run.pd;
    if let Some(kv) = &run.kv {
        spec.num_blocks = kv.num_blocks;
        spec.router_replicas = kv.replicas;
        spec.exact_kv = kv.mode == kvcompare::KvMode::Exact;
    }
    let cluster = Cluster::start(&spec, dir.path(), policy).await?;
    let mut cfg = drive_config(&cluster.url(), args, s);
    cfg.replica_urls = cluster.urls().into_iter().skip(1).collect();
    let recs = drive(cfg, load, bar.clone()).await;
    let figures = match &recs {
        Ok(_) => cluster.engine_figures().await,
        Err(_) => Ok(EngineFigures::default()),
    };
    let engines = cluster.engine_names();
    cluster.shutdown().await;
    Ok((recs.map_err(BenchError::Client)?, engines, figures?))
}

/// Sends a run's load on the client's own thread.
async fn drive(
    cfg: DriveConfig,
    load: &Load,
    bar: ProgressBar,
) -> Result<Vec<RequestRecord>, std::io::Error> {
    match load {
        Load::Workload(w) => driver::drive_isolated(cfg, Arc::clone(w), bar).await,
        Load::Trace(t) => replay::replay_isolated(cfg, t.clone(), bar).await,
    }
}

fn drive_config(url: &str, args: &BenchArgs, s: &Setup) -> DriveConfig {
    DriveConfig {
        url: url.to_owned(),
        replica_urls: Vec::new(),
        model: args.model.clone(),
        time_scale: s.time_scale,
        request_timeout: s.request_timeout,
    }
}

/// With `--target`, the row is named after the policy the router reported most often.
fn majority_policy(recs: &[RequestRecord]) -> Option<String> {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for p in recs.iter().filter_map(|r| r.policy.as_deref()) {
        *counts.entry(p).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(p, _)| p.to_owned())
}

fn run_line(st: &RunStats, wall: Duration, recs: &[RequestRecord]) -> String {
    let mut line = format!(
        "{:>28}: {}/{} ok, TTFT p50 {}, cache hit {} ({:.1} s wall)",
        st.name,
        st.requests.ok,
        st.requests.sent,
        st.ttft
            .map(|t| format!("{:.0} ms", t.p50 * 1000.0))
            .unwrap_or_else(|| "-".into()),
        st.cache_hit_rate
            .map(|h| format!("{:.1}%", h * 100.0))
            .unwrap_or_else(|| "-".into()),
        wall.as_secs_f64()
    );
    if let Some(r) = recs.iter().find(|r| !r.is_ok()) {
        line.push_str(&format!(
            "\n{:>28}  {} failed; first: {:?}",
            "", st.requests.failed, r.outcome
        ));
    }
    line
}
