//! The routing benchmark (`switchyard bench`): replays a seeded workload through the real router
//! in front of fresh simulated vLLM engines, once per policy, and compares the policies on time
//! to first token and friends. See `docs/bench.md`.
//!
//! - [`run`]: the CLI entry — progress bars, the table, files in `--out`.
//! - [`run_quiet`]: the same benchmark without printing or writing anything (tests, embedding).
//!
//! Files: `workload.rs` (knobs, presets, seeded generation), `text.rs` (filler text sized in
//! tokens), `driver.rs` (the load generator, TTFT from SSE streams), `sse.rs` (SSE reader),
//! `cluster.rs` (sims + router replicas per run), `plan.rs` (runs, sweep, kv comparison,
//! policies directory), `kvcompare.rs` (`--kv-compare`: its routings and table),
//! `stats.rs` (percentiles, per-run figures), `report.rs` (tables, JSON, CSV, winners),
//! `svg.rs` (charts).

pub mod cluster;
pub mod driver;
pub mod kvcompare;
pub mod plan;
pub mod report;
pub mod sse;
pub mod stats;
pub mod svg;
pub mod text;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use cluster::{Cluster, ClusterSpec};
use driver::DriveConfig;
use plan::{PoliciesDir, RunPlan};
use report::{BenchReport, BenchSettings};
use stats::{EngineFigures, RequestRecord, RunStats};
use workload::{Workload, WorkloadKind, WorkloadKnobs, WorkloadSpec};

/// Flags of `switchyard bench`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct BenchArgs {
    /// Simulated engines per run (each on its own loopback port).
    #[arg(long, default_value_t = 4)]
    pub engines: usize,
    /// Workload shape [default: multi-round-qa, or the workload file's].
    #[arg(long, value_enum)]
    pub workload: Option<WorkloadKind>,
    /// TOML workload file (keys: `workload` and the workload flags with `_`); flags override it.
    #[arg(long)]
    pub workload_file: Option<PathBuf>,
    /// Policies to compare, in order [default: roundrobin,session,kvaware,load_balanced_kvaware;
    /// none with --sweep].
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<String>>,
    /// Directory of policy files, benchmarked as-is.
    #[arg(long, default_value = "policies")]
    pub policies_dir: PathBuf,
    /// Also run load_balanced_kvaware at each load_balance threshold, e.g.
    /// `threshold=1,2,4,8,16,32,inf` (inf: no load_balance tier).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Wall seconds per simulated second for engines and arrivals [default: 0.1; 1 with --target].
    /// Reported times are simulated (wall / time scale).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// A small comparison (seconds per run) for a first look and for tests.
    #[arg(long)]
    pub quick: bool,
    /// Make engine 0 this many times slower (its speed factor).
    #[arg(long)]
    pub slow_engine: Option<f64>,
    /// Benchmark an already-running router at this URL instead (no engines are started).
    #[arg(long)]
    pub target: Option<String>,
    /// Model name served by the engines and sent in requests.
    #[arg(long, default_value = "switchyard-sim")]
    pub model: String,
    /// Output directory for bench.json, bench.md, bench.svg and requests.csv.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// No progress bars or per-run lines (the table is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Per-request safety net, wall seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Running slots per simulated engine (beyond them requests queue) [default: 32].
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Prefix-cache capacity per simulated engine, in blocks of 16 tokens [default: the sim's, 9216].
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// The router's scrape interval of engine metrics, simulated seconds.
    #[arg(long, default_value_t = 1.0)]
    pub engine_stats_interval: f64,
    /// Compare exact, approximate and load-only routing (see docs/bench.md): engines with a
    /// small cache and an ample one, behind each count of --router-replicas. Needs --tokenizer.
    #[arg(long)]
    pub kv_compare: bool,
    /// Router replicas sharing the load in --kv-compare, one set of runs per count
    /// [default: 1,3].
    #[arg(long, value_delimiter = ',')]
    pub router_replicas: Option<Vec<usize>>,
    /// The model's tokenizer (a tokenizer.json or a model directory) for --kv-compare: the
    /// engines cache by its token ids and render chat prompts with its chat template.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: WorkloadKnobs,
}

impl Default for BenchArgs {
    fn default() -> BenchArgs {
        BenchArgs {
            engines: 4,
            workload: None,
            workload_file: None,
            policies: None,
            policies_dir: PathBuf::from("policies"),
            sweep: None,
            time_scale: None,
            quick: false,
            slow_engine: None,
            target: None,
            model: "switchyard-sim".into(),
            out: PathBuf::from("bench-out"),
            quiet: false,
            request_timeout: 120.0,
            max_num_seqs: None,
            num_blocks: None,
            engine_stats_interval: 1.0,
            kv_compare: false,
            router_replicas: None,
            tokenizer: None,
            knobs: WorkloadKnobs::default(),
        }
    }
}

/// The bench's default running slots per engine. vLLM's default (256) assumes short prompts:
/// the sim does not limit admission by KV-cache capacity, and with multi-thousand-token
/// prompts an A100's 147k-token cache holds a few dozen sequences.
pub const DEFAULT_MAX_NUM_SEQS: usize = 32;

impl BenchArgs {
    /// A command line that reproduces this benchmark (flags that differ from the defaults).
    pub fn command_line(&self) -> String {
        let d = BenchArgs::default();
        let mut a = vec!["switchyard".to_owned(), "bench".to_owned()];
        let mut flag = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{name}"));
                if !v.is_empty() {
                    // A NUL byte cannot be quoted for a shell; such a value is shown as it is.
                    a.push(shlex::try_quote(&v).map_or(v.clone(), |q| q.into_owned()));
                }
            }
        };
        let differs = |x: bool| x.then_some(());
        flag("quick", differs(self.quick).map(|_| String::new()));
        flag(
            "engines",
            differs(self.engines != d.engines).map(|_| self.engines.to_string()),
        );
        flag("workload", self.workload.map(|w| w.name().to_owned()));
        flag(
            "workload-file",
            self.workload_file.as_ref().map(|p| p.display().to_string()),
        );
        flag("policies", self.policies.as_ref().map(|p| p.join(",")));
        flag(
            "policies-dir",
            differs(self.policies_dir != d.policies_dir)
                .map(|_| self.policies_dir.display().to_string()),
        );
        flag("sweep", self.sweep.clone());
        flag("time-scale", self.time_scale.map(|v| v.to_string()));
        flag("slow-engine", self.slow_engine.map(|v| v.to_string()));
        flag("target", self.target.clone());
        flag(
            "model",
            differs(self.model != d.model).map(|_| self.model.clone()),
        );
        flag("max-num-seqs", self.max_num_seqs.map(|v| v.to_string()));
        flag("num-blocks", self.num_blocks.map(|v| v.to_string()));
        flag(
            "kv-compare",
            differs(self.kv_compare).map(|_| String::new()),
        );
        flag(
            "router-replicas",
            self.router_replicas.as_ref().map(|r| {
                r.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        );
        flag(
            "tokenizer",
            self.tokenizer.as_ref().map(|p| p.display().to_string()),
        );
        flag(
            "engine-stats-interval",
            differs(self.engine_stats_interval != d.engine_stats_interval)
                .map(|_| self.engine_stats_interval.to_string()),
        );
        let k = &self.knobs;
        flag("seed", k.seed.map(|v| v.to_string()));
        flag("qps", k.qps.map(|v| v.to_string()));
        flag("users", k.users.map(|v| v.to_string()));
        flag("rounds", k.rounds.map(|v| v.to_string()));
        flag(
            "system-prompt-tokens",
            k.system_prompt_tokens.map(|v| v.to_string()),
        );
        flag("history-tokens", k.history_tokens.map(|v| v.to_string()));
        flag("question-tokens", k.question_tokens.map(|v| v.to_string()));
        flag("answer-tokens", k.answer_tokens.map(|v| v.to_string()));
        flag("groups", k.groups.map(|v| v.to_string()));
        flag(
            "prompts-per-group",
            k.prompts_per_group.map(|v| v.to_string()),
        );
        flag("prefix-tokens", k.prefix_tokens.map(|v| v.to_string()));
        flag("requests", k.requests.map(|v| v.to_string()));
        flag("hot-fraction", k.hot_fraction.map(|v| v.to_string()));
        flag("cold-tokens", k.cold_tokens.map(|v| v.to_string()));
        a.join(" ")
    }
}

/// The directory the benchmark reads policies from: the one given, or, for the default
/// `policies` when there is none here (outside a checkout), the router's built-in set.
fn policies_source(dir: &std::path::Path) -> Result<PathBuf, BenchError> {
    if dir != std::path::Path::new("policies") || dir.is_dir() {
        return Ok(dir.to_owned());
    }
    crate::policy::shipped::builtin_dir(None).map_err(|e| BenchError::PolicyDir {
        path: "built-in policies".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
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

/// Everything resolved from the arguments before any run starts.
struct Setup {
    spec: WorkloadSpec,
    time_scale: f64,
    runs: Vec<RunPlan>,
    dir: Option<PoliciesDir>,
    cluster: ClusterSpec,
    request_timeout: Duration,
}

fn setup(args: &BenchArgs) -> Result<Setup, BenchError> {
    let file = match &args.workload_file {
        Some(p) => Some(WorkloadKnobs::from_file(p)?),
        None => None,
    };
    let spec = WorkloadSpec::resolve(args.workload, args.quick, file.as_ref(), &args.knobs)?;
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
    let sweep = match &args.sweep {
        Some(s) => plan::parse_sweep(s).map_err(BenchError::Args)?,
        None => Vec::new(),
    };
    if !args.kv_compare && (args.router_replicas.is_some() || args.tokenizer.is_some()) {
        return bad("--router-replicas and --tokenizer are settings of --kv-compare".into());
    }
    let (runs, dir) = if args.kv_compare {
        let (replicas, small) = kvcompare::settings(args, &spec, !sweep.is_empty())?;
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
        if args.slow_engine.is_some() || args.max_num_seqs.is_some() || args.num_blocks.is_some() {
            return bad(
                "--slow-engine, --max-num-seqs and --num-blocks configure simulated engines; \
                 they cannot be used with --target"
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
            }],
            None,
        )
    } else {
        let runs = plan::plan_runs(args.policies.as_deref(), &sweep).map_err(BenchError::Args)?;
        let dir = PoliciesDir::prepare(&policies_source(&args.policies_dir)?, &sweep)?;
        dir.check(&runs)?;
        (runs, Some(dir))
    };
    Ok(Setup {
        cluster: ClusterSpec {
            engines: args.engines,
            model: args.model.clone(),
            time_scale,
            slow_engine: args.slow_engine,
            max_num_seqs: Some(args.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS)),
            num_blocks: args.num_blocks,
            engine_stats_interval: args.engine_stats_interval,
            seed: spec.seed,
            router_replicas: 1,
            tokenizer: args.tokenizer.clone(),
            exact_kv: false,
        },
        spec,
        time_scale,
        runs,
        dir,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
    })
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
    let workload = Arc::new(Workload::generate(&s.spec));
    let planned = workload.requests();
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
            s.spec.describe(),
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
        let (recs, engines, figures) = run_one(args, &s, r, Arc::clone(&workload), &bar).await?;
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
    Ok(BenchReport {
        settings: BenchSettings {
            command: args.command_line(),
            workload: s.spec.clone(),
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
    workload: Arc<Workload>,
    bar: &ProgressBar,
) -> Result<(Vec<RequestRecord>, Vec<String>, EngineFigures), BenchError> {
    let policy = run.policy.as_str();
    if let Some(target) = &args.target {
        let cfg = drive_config(target.trim_end_matches('/'), args, s);
        let recs = driver::drive_isolated(cfg, workload, bar.clone())
            .await
            .map_err(BenchError::Client)?;
        return Ok((recs, Vec::new(), EngineFigures::default()));
    }
    let Some(dir) = &s.dir else {
        return Err(BenchError::Args("no policies directory".into()));
    };
    let mut spec = s.cluster.clone();
    if let Some(kv) = &run.kv {
        spec.num_blocks = kv.num_blocks;
        spec.router_replicas = kv.replicas;
        spec.exact_kv = kv.mode == kvcompare::KvMode::Exact;
    }
    let cluster = Cluster::start(&spec, dir.path(), policy).await?;
    let mut cfg = drive_config(&cluster.url(), args, s);
    cfg.replica_urls = cluster.urls().into_iter().skip(1).collect();
    let recs = driver::drive_isolated(cfg, workload, bar.clone()).await;
    let figures = match &recs {
        Ok(_) => cluster.engine_figures().await,
        Err(_) => Ok(EngineFigures::default()),
    };
    let engines = cluster.engine_names();
    cluster.shutdown().await;
    Ok((recs.map_err(BenchError::Client)?, engines, figures?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().bench
    }

    #[test]
    fn default_matches_the_flags_defaults() {
        assert_eq!(parse(&[]), BenchArgs::default());
        assert_eq!(BenchArgs::default().command_line(), "switchyard bench");
    }

    #[test]
    fn flags_parse_and_round_trip_through_the_command_line() {
        let a = parse(&[
            "--engines",
            "3",
            "--workload",
            "shared-prefix",
            "--policies",
            "roundrobin,kvaware",
            "--sweep",
            "threshold=1,inf",
            "--time-scale",
            "0.05",
            "--slow-engine",
            "2",
            "--groups",
            "5",
            "--qps",
            "2.5",
            "--policies-dir",
            "my policies/it's here",
            "--quick",
        ]);
        assert_eq!(a.engines, 3);
        assert_eq!(a.workload, Some(WorkloadKind::SharedPrefix));
        assert_eq!(
            a.policies.as_deref(),
            Some(&["roundrobin".to_owned(), "kvaware".to_owned()][..])
        );
        assert_eq!(a.knobs.groups, Some(5));
        let line = a.command_line();
        let words = shlex::split(&line).expect("a shell-quoted line");
        let words: Vec<&str> = words.iter().skip(2).map(String::as_str).collect();
        assert_eq!(parse(&words), a, "{line}");
    }

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
            (vec!["--kv-compare"], "--tokenizer"),
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
