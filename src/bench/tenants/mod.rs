//! `switchyard bench --tenants`: a noisy tenant floods the cluster while a quiet one sends a
//! trickle, with and without the router's queue (issue 19's benchmark). See `docs/bench.md`.
//!
//! The runs, each on a fresh cluster (simulated engines and the real router, whose
//! `tenant_header` is [`load::TENANT_HEADER`]), each with the same warm-up and measured window:
//!
//! 1. `quiet alone`: only the quiet tenant (its unloaded TTFT);
//! 2. `flood, no queue`: both tenants, `engine_queue_limit` 0;
//! 3. `flood, queue limit N`: both tenants, `engine_queue_limit` N, for each
//!    `--engine-queue-limits` value.
//!
//! Files: `load.rs` (the two tenants' clients), `stats.rs` (the window's figures and the
//! comparisons between runs), `report.rs` (table, JSON, CSV).

pub mod load;
pub mod report;
pub mod stats;

use std::time::Instant;

use super::cluster::{Cluster, ClusterSpec};
use super::driver::DriveConfig;
use super::plan::{PoliciesDir, RunPlan};
use super::setup::{check_common, cluster_spec, policies_source};
use super::{BenchArgs, BenchError, progress_bar};
use crate::config::QueueSettings;
use load::{TENANT_HEADER, TenantLoad, TenantRecord};
use report::{TenantsReport, TenantsSettings};
use stats::{TenantRun, Window};

/// The queue runs' `--engine-queue-limits` when not given.
pub const DEFAULT_QUEUE_LIMITS: &[u32] = &[1, 4];
/// The noisy tenant's clients per running slot of the cluster when `--noisy-clients` is not
/// given: enough that every engine's own queue stays long.
pub const NOISY_CLIENTS_PER_SLOT: usize = 3;
/// The quiet tenant's default rate, requests per simulated second.
pub const DEFAULT_QUIET_QPS: f64 = 1.0;
/// Default prompt and answer tokens of every request.
pub const DEFAULT_PROMPT_TOKENS: usize = 512;
pub const DEFAULT_ANSWER_TOKENS: usize = 128;
/// The time scale when `--time-scale` is not given: at the bench's usual 0.1 the client's
/// send lag on a busy 2-core machine reached a quarter of the unloaded TTFT (the 2x goal's
/// denominator); at 0.2 it stayed under a tenth, and the default run takes about 2 min.
pub const DEFAULT_TIME_SCALE: f64 = 0.2;
/// Default window and warm-up, simulated seconds (full, `--quick`).
pub const DEFAULT_DURATION: (f64, f64) = (120.0, 20.0);
pub const DEFAULT_WARMUP: (f64, f64) = (20.0, 5.0);

/// One run of the benchmark.
#[derive(Debug, Clone, PartialEq)]
struct TenantPlan {
    name: String,
    flood: bool,
    engine_queue_limit: u32,
}

/// Everything resolved from the flags before any run starts.
struct TenantSetup {
    cluster: ClusterSpec,
    load: TenantLoad,
    limits: Vec<u32>,
    policy: String,
    dir: PoliciesDir,
    request_timeout: std::time::Duration,
}

impl TenantSetup {
    fn runs(&self) -> Vec<TenantPlan> {
        let mut runs = vec![
            TenantPlan {
                name: "quiet alone".into(),
                flood: false,
                engine_queue_limit: 0,
            },
            TenantPlan {
                name: "flood, no queue".into(),
                flood: true,
                engine_queue_limit: 0,
            },
        ];
        runs.extend(self.limits.iter().map(|&n| TenantPlan {
            name: format!("flood, queue limit {n}"),
            flood: true,
            engine_queue_limit: n,
        }));
        runs
    }

    fn window(&self) -> Window {
        Window {
            start: self.load.warmup,
            end: self.load.end(),
        }
    }
}

fn setup(args: &BenchArgs) -> Result<TenantSetup, BenchError> {
    let bad = |m: &str| Err(BenchError::Args(m.to_owned()));
    if args.target.is_some()
        || args.trace.is_some()
        || args.kv_compare
        || args.pd.is_some()
        || args.sweep.is_some()
        || args.workload.is_some()
        || args.workload_file.is_some()
    {
        return bad(
            "--tenants sends its own load on its own engines: not with --target, --trace, \
             --kv-compare, --pd, --sweep, --workload or --workload-file",
        );
    }
    let k = &args.knobs;
    let allowed = super::workload::WorkloadKnobs {
        seed: k.seed,
        prompt_tokens: k.prompt_tokens,
        answer_tokens: k.answer_tokens,
        ..Default::default()
    };
    if *k != allowed {
        return bad(
            "--tenants: of the workload knobs only --prompt-tokens, --answer-tokens and --seed \
             apply (the quiet tenant's rate is --quiet-qps)",
        );
    }
    let policy = match args.policies.as_deref() {
        None => crate::policy::PolicySettings::default().default_policy,
        Some([one]) => one.trim().to_owned(),
        Some(_) => return bad("--tenants runs one policy: give at most one with --policies"),
    };
    let time_scale = check_common(&BenchArgs {
        time_scale: Some(args.time_scale.unwrap_or(DEFAULT_TIME_SCALE)),
        ..args.clone()
    })?;
    let cluster = cluster_spec(args, time_scale, k.seed.unwrap_or(42));
    let slots = args.engines * cluster.sim_config(0).max_num_seqs;
    let pick = |v: Option<f64>, (full, quick): (f64, f64)| {
        v.unwrap_or(if args.quick { quick } else { full })
    };
    let load = TenantLoad {
        noisy_clients: args.noisy_clients.unwrap_or(NOISY_CLIENTS_PER_SLOT * slots),
        quiet_qps: args.quiet_qps.unwrap_or(DEFAULT_QUIET_QPS),
        prompt_tokens: k.prompt_tokens.unwrap_or(DEFAULT_PROMPT_TOKENS),
        answer_tokens: k.answer_tokens.unwrap_or(DEFAULT_ANSWER_TOKENS),
        seed: k.seed.unwrap_or(42),
        warmup: pick(args.warmup, DEFAULT_WARMUP),
        duration: pick(args.duration, DEFAULT_DURATION),
    };
    if !(1..=10_000).contains(&load.noisy_clients) {
        return bad("--noisy-clients must be between 1 and 10000");
    }
    if !(load.quiet_qps.is_finite() && load.quiet_qps > 0.0) {
        return bad("--quiet-qps must be a positive rate");
    }
    if !(load.duration.is_finite() && load.duration > 0.0) {
        return bad("--duration must be a positive number of simulated seconds");
    }
    if !(load.warmup.is_finite() && load.warmup >= 0.0) {
        return bad("--warmup must be a non-negative number of simulated seconds");
    }
    if load.quiet_qps * load.end() > super::workload::MAX_REQUESTS as f64 {
        return bad("--quiet-qps x (--warmup + --duration) is above 100000 requests");
    }
    let max = super::workload::MAX_TOKENS;
    if !(1..=max).contains(&load.prompt_tokens) || !(1..=max).contains(&load.answer_tokens) {
        return bad("--prompt-tokens and --answer-tokens must be between 1 and 1000000");
    }
    let limits = args
        .engine_queue_limits
        .clone()
        .unwrap_or_else(|| DEFAULT_QUEUE_LIMITS.to_vec());
    if limits.contains(&0) {
        return bad(
            "--engine-queue-limits: 0 turns the queue off (that run is always made: \
             `flood, no queue`); give limits of at least 1",
        );
    }
    let mut unique: Vec<u32> = Vec::with_capacity(limits.len());
    for l in limits {
        if !unique.contains(&l) {
            unique.push(l);
        }
    }
    let dir = PoliciesDir::prepare(&policies_source(&args.policies_dir)?, &[])?;
    dir.check(&[RunPlan {
        name: policy.clone(),
        policy: policy.clone(),
        kv: None,
        pd: None,
    }])?;
    Ok(TenantSetup {
        cluster,
        load,
        limits: unique,
        policy,
        dir,
        request_timeout: std::time::Duration::from_secs_f64(args.request_timeout),
    })
}

/// Runs the benchmark: a progress bar per run, then the table; writes `bench.json`,
/// `bench.md` and `requests.csv` to `--out`.
pub async fn run(args: BenchArgs) -> Result<TenantsReport, BenchError> {
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
pub async fn run_quiet(args: BenchArgs) -> Result<TenantsReport, BenchError> {
    execute(&args, false).await
}

async fn execute(args: &BenchArgs, show: bool) -> Result<TenantsReport, BenchError> {
    let s = setup(args)?;
    let queue = QueueSettings::default();
    if show {
        eprintln!(
            "switchyard bench --tenants: {} noisy clients, quiet {} req/s, {} simulated engines; \
             warm-up {} s + window {} s per run; time scale {} (times in simulated seconds = \
             wall / {})",
            s.load.noisy_clients,
            s.load.quiet_qps,
            s.cluster.engines,
            s.load.warmup,
            s.load.duration,
            s.cluster.time_scale,
            s.cluster.time_scale
        );
    }
    let mut runs = Vec::new();
    let mut records = Vec::new();
    for plan in s.runs() {
        let load = TenantLoad {
            noisy_clients: if plan.flood { s.load.noisy_clients } else { 0 },
            ..s.load.clone()
        };
        // The bar counts the quiet tenant's requests (the noisy tenant's are not known ahead).
        let bar = progress_bar(load.quiet_arrivals().len(), &plan.name, show);
        let wall = Instant::now();
        let limit = plan.engine_queue_limit;
        let cluster = Cluster::start_configured(&s.cluster, s.dir.path(), &s.policy, |cfg| {
            cfg.tenant_header = Some(TENANT_HEADER.to_owned());
            cfg.queue.engine_queue_limit = limit;
        })
        .await?;
        let cfg = DriveConfig {
            url: cluster.url(),
            replica_urls: Vec::new(),
            model: s.cluster.model.clone(),
            time_scale: s.cluster.time_scale,
            request_timeout: s.request_timeout,
        };
        let recs = load::drive_isolated(cfg, load, bar.clone()).await;
        cluster.shutdown().await;
        bar.finish_and_clear();
        let recs: Vec<TenantRecord> = recs.map_err(BenchError::Client)?;
        let st = TenantRun::compute(&plan.name, limit, plan.flood, &recs, s.window());
        if show {
            eprintln!(
                "{:>24}: quiet {}/{} ok, TTFT p90 {}; noisy {}/{} ok; {:.0} out tok/s ({:.1} s wall)",
                st.name,
                st.quiet.ok,
                st.quiet.sent,
                st.quiet
                    .ttft
                    .map_or_else(|| "-".into(), |t| format!("{:.0} ms", t.p90 * 1000.0)),
                st.noisy.ok,
                st.noisy.sent,
                st.output_tokens_per_s,
                wall.elapsed().as_secs_f64()
            );
        }
        runs.push(st);
        records.push(recs);
    }
    stats::compare(&mut runs);
    let engine = s.cluster.sim_config(0);
    Ok(TenantsReport {
        settings: TenantsSettings {
            command: args.command_line(),
            engines: s.cluster.engines,
            engine_profile: args
                .engine_profile
                .unwrap_or(crate::sim::Profile::LegacyA100)
                .name()
                .to_owned(),
            max_num_seqs: engine.max_num_seqs,
            time_scale: s.cluster.time_scale,
            policy: s.policy.clone(),
            engine_stats_interval: s.cluster.engine_stats_interval,
            load: s.load.clone(),
            window: s.window(),
            max_queued: queue.max_queued,
            queue_timeout_s: queue.queue_timeout.as_secs_f64(),
            time_unit: "simulated seconds (wall seconds / time_scale)",
        },
        runs,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::parse_for_test as parse;

    #[test]
    fn defaults_scale_with_the_cluster_and_runs_are_planned_in_order() {
        let s = setup(&parse(&[
            "--tenants",
            "--engines",
            "2",
            "--max-num-seqs",
            "8",
        ]))
        .unwrap();
        assert_eq!(s.load.noisy_clients, 3 * 2 * 8);
        assert_eq!((s.load.warmup, s.load.duration), (20.0, 120.0));
        assert_eq!(s.cluster.time_scale, DEFAULT_TIME_SCALE);
        let names: Vec<String> = s.runs().into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "quiet alone",
                "flood, no queue",
                "flood, queue limit 1",
                "flood, queue limit 4"
            ]
        );
        let q = setup(&parse(&[
            "--tenants",
            "--quick",
            "--engine-queue-limits",
            "2,2,8",
        ]))
        .unwrap();
        assert_eq!(q.limits, [2, 8]);
        assert_eq!((q.load.warmup, q.load.duration), (5.0, 20.0));
        assert_eq!(
            q.window(),
            Window {
                start: 5.0,
                end: 25.0
            }
        );
    }

    #[test]
    fn bad_settings_are_named() {
        for (args, needle) in [
            (vec!["--tenants", "--qps", "3"], "--quiet-qps"),
            (vec!["--tenants", "--workload", "hot-prefix"], "--workload"),
            (vec!["--tenants", "--policies", "a,b"], "at most one"),
            (
                vec!["--tenants", "--engine-queue-limits", "0,4"],
                "at least 1",
            ),
            (vec!["--tenants", "--quiet-qps", "0"], "--quiet-qps"),
            (vec!["--tenants", "--duration=-1"], "--duration"),
            (vec!["--tenants", "--noisy-clients", "0"], "--noisy-clients"),
            (vec!["--tenants", "--time-scale", "0"], "--time-scale"),
            (vec!["--tenants", "--policies", "nope"], "unknown policy"),
        ] {
            let e = setup(&parse(&args)).err().map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
