//! The flags of `switchyard bench` ([`BenchArgs`]), their defaults, and the command line that
//! reproduces a benchmark. Their validation is in `setup.rs`.

use std::path::PathBuf;

use super::workload::{WorkloadKind, WorkloadKnobs};

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
    /// The simulated engines' profile (see docs/sim.md): its cost model, KV capacity,
    /// max_num_seqs and max_num_batched_tokens [default: the sim's, legacy-a100, with
    /// --max-num-seqs 32].
    #[arg(long, value_enum)]
    pub engine_profile: Option<crate::sim::Profile>,
    /// Running slots per simulated engine (beyond them requests queue) [default: the
    /// profile's; 32 without --engine-profile].
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
    /// Replay a production trace (JSON lines, Mooncake or Alibaba Bailian format, see
    /// docs/bench.md) instead of a generated workload.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Arrivals of --trace this many times faster than in the trace [default: 1].
    #[arg(long)]
    pub trace_speed: Option<f64>,
    /// Replay only the first N records of --trace.
    #[arg(long)]
    pub trace_limit: Option<usize>,
    /// Prefill/decode runs beside the aggregated ones: P prefill + D decode engines (P + D =
    /// --engines), e.g. `--pd 2:2,1:3`; each runs every --pd-policies policy.
    #[arg(long, value_delimiter = ',')]
    pub pd: Option<Vec<String>>,
    /// The policies of the --pd runs [default: disaggregated_prefill_orchestrated].
    #[arg(long, value_delimiter = ',', requires = "pd")]
    pub pd_policies: Option<Vec<String>>,
    /// The noisy/quiet tenant benchmark instead of the policy comparison (see docs/bench.md):
    /// the quiet tenant's TTFT alone, under a noisy tenant's flood without the router's
    /// queue, and with it at each --engine-queue-limits value.
    #[arg(long)]
    pub tenants: bool,
    /// --tenants: the noisy tenant's closed-loop clients, each sending back to back
    /// [default: 3 x engines x max_num_seqs].
    #[arg(long)]
    pub noisy_clients: Option<usize>,
    /// --tenants: the quiet tenant's Poisson arrival rate, requests per simulated second
    /// [default: 1].
    #[arg(long)]
    pub quiet_qps: Option<f64>,
    /// --tenants: one run with the router's queue per value, each the router's
    /// --engine-queue-limit [default: 1,4].
    #[arg(long, value_delimiter = ',')]
    pub engine_queue_limits: Option<Vec<u32>>,
    /// --tenants: the measured window of every run, simulated seconds [default: 120; 20 with
    /// --quick].
    #[arg(long)]
    pub duration: Option<f64>,
    /// --tenants: the warm-up before the window (sent, not measured), simulated seconds
    /// [default: 20; 5 with --quick].
    #[arg(long)]
    pub warmup: Option<f64>,
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
            engine_profile: None,
            max_num_seqs: None,
            num_blocks: None,
            engine_stats_interval: 1.0,
            kv_compare: false,
            router_replicas: None,
            tokenizer: None,
            trace: None,
            trace_speed: None,
            trace_limit: None,
            pd: None,
            pd_policies: None,
            tenants: false,
            noisy_clients: None,
            quiet_qps: None,
            engine_queue_limits: None,
            duration: None,
            warmup: None,
            knobs: WorkloadKnobs::default(),
        }
    }
}

/// The bench's default running slots per engine without `--engine-profile` (the legacy
/// profile's 256 with multi-thousand-token prompts mostly waits on KV memory; a profile brings
/// its own).
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
        flag("tenants", differs(self.tenants).map(|_| String::new()));
        flag("noisy-clients", self.noisy_clients.map(|v| v.to_string()));
        flag("quiet-qps", self.quiet_qps.map(|v| v.to_string()));
        flag(
            "engine-queue-limits",
            self.engine_queue_limits.as_ref().map(|l| {
                l.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        );
        flag("duration", self.duration.map(|v| v.to_string()));
        flag("warmup", self.warmup.map(|v| v.to_string()));
        flag(
            "engines",
            differs(self.engines != d.engines).map(|_| self.engines.to_string()),
        );
        flag("workload", self.workload.map(|w| w.name().to_owned()));
        flag(
            "trace",
            self.trace.as_ref().map(|p| p.display().to_string()),
        );
        flag("trace-speed", self.trace_speed.map(|v| v.to_string()));
        flag("trace-limit", self.trace_limit.map(|v| v.to_string()));
        flag(
            "workload-file",
            self.workload_file.as_ref().map(|p| p.display().to_string()),
        );
        flag("policies", self.policies.as_ref().map(|p| p.join(",")));
        flag("pd", self.pd.as_ref().map(|p| p.join(",")));
        flag(
            "pd-policies",
            self.pd_policies.as_ref().map(|p| p.join(",")),
        );
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
        flag(
            "engine-profile",
            self.engine_profile.map(|p| p.name().to_owned()),
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
        flag("prompt-tokens", k.prompt_tokens.map(|v| v.to_string()));
        a.join(" ")
    }
}

/// `switchyard bench ARGS` parsed as the command line parses it (for tests).
#[cfg(test)]
pub(super) fn parse_for_test(args: &[&str]) -> BenchArgs {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    let mut v = vec!["bench"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().bench
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> BenchArgs {
        parse_for_test(args)
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
        let q = parse(&[
            "--tenants",
            "--noisy-clients",
            "64",
            "--quiet-qps",
            "0.5",
            "--engine-queue-limits",
            "1,4",
            "--duration",
            "30",
            "--warmup",
            "5",
            "--prompt-tokens",
            "300",
        ]);
        assert!(q.tenants);
        assert_eq!(q.engine_queue_limits, Some(vec![1, 4]));
        let line = q.command_line();
        let words = shlex::split(&line).expect("a shell-quoted line");
        let words: Vec<&str> = words.iter().skip(2).map(String::as_str).collect();
        assert_eq!(parse(&words), q, "{line}");
        let t = parse(&[
            "--trace",
            "traces/a b.jsonl",
            "--trace-speed",
            "2.5",
            "--trace-limit",
            "40",
            "--seed",
            "3",
        ]);
        assert_eq!(t.trace_speed, Some(2.5));
        assert_eq!(t.trace_limit, Some(40));
        let line = t.command_line();
        let words = shlex::split(&line).expect("a shell-quoted line");
        let words: Vec<&str> = words.iter().skip(2).map(String::as_str).collect();
        assert_eq!(parse(&words), t, "{line}");
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
}
