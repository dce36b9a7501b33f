//! The `--tenants` report: its JSON form, the text and Markdown table, and the files written to
//! the output directory (`bench.json`, `bench.md`, `requests.csv`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::load::{TenantLoad, TenantRecord};
use super::stats::{TenantRun, Window};

/// The settings a `--tenants` report was produced with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantsSettings {
    /// The command line, for reproduction.
    pub command: String,
    pub engines: usize,
    /// The engines' profile (`legacy-a100` when not given).
    pub engine_profile: String,
    pub max_num_seqs: usize,
    pub time_scale: f64,
    /// The routers' policy.
    pub policy: String,
    /// The router's scrape interval of engine metrics, simulated seconds.
    pub engine_stats_interval: f64,
    /// What the tenants send (the flood runs; `quiet alone` without the noisy clients).
    pub load: TenantLoad,
    pub window: Window,
    /// The router's other queue settings in the queue runs.
    pub max_queued: usize,
    pub queue_timeout_s: f64,
    /// The unit of every time and rate in the report.
    pub time_unit: &'static str,
}

/// Everything a `--tenants` benchmark produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantsReport {
    pub settings: TenantsSettings,
    pub runs: Vec<TenantRun>,
    /// Every request of every run (written to `requests.csv`, not to the JSON).
    #[serde(skip)]
    pub records: Vec<Vec<TenantRecord>>,
}

/// The table's columns.
pub const HEADERS: &[&str] = &[
    "run",
    "quiet ok/sent",
    "quiet TTFT p50",
    "quiet TTFT p90",
    "quiet TTFT p99",
    "p90 / alone",
    "noisy ok/sent",
    "noisy TTFT p90",
    "req/s",
    "out tok/s",
    "vs no queue",
    "rejected",
    "failed",
];

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{:.0} ms", s * 1000.0))
}

/// The table's rows, one per run.
pub fn rows(runs: &[TenantRun]) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            let count = |ok: usize, sent: usize, flood: bool| {
                if flood {
                    format!("{ok}/{sent}")
                } else {
                    "-".into()
                }
            };
            vec![
                r.name.clone(),
                count(r.quiet.ok, r.quiet.sent, true),
                ms(r.quiet.ttft.map(|t| t.p50)),
                ms(r.quiet.ttft.map(|t| t.p90)),
                ms(r.quiet.ttft.map(|t| t.p99)),
                r.quiet_p90_vs_alone
                    .map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
                count(r.noisy.ok, r.noisy.sent, r.flood),
                ms(r.noisy.ttft.map(|t| t.p90)),
                format!("{:.2}", r.requests_per_s),
                format!("{:.0}", r.output_tokens_per_s),
                r.throughput_vs_no_queue
                    .map_or_else(|| "-".into(), |x| format!("{:.1}%", x * 100.0)),
                (r.quiet.rejected + r.noisy.rejected).to_string(),
                (r.quiet.failed + r.noisy.failed).to_string(),
            ]
        })
        .collect()
}

impl TenantsSettings {
    /// One line describing the load and the window.
    pub fn describe(&self) -> String {
        let l = &self.load;
        format!(
            "noisy tenant: {} closed-loop clients; quiet tenant: Poisson {} req/s; every request \
             a unique {}-token prompt and {} output tokens; {} engines ({}, max_num_seqs {}), \
             policy {}; window {}..{} s (warm-up {} s excluded)",
            l.noisy_clients,
            l.quiet_qps,
            l.prompt_tokens,
            l.answer_tokens,
            self.engines,
            self.engine_profile,
            self.max_num_seqs,
            self.policy,
            self.window.start,
            self.window.end,
            l.warmup
        )
    }
}

/// The lines under the table: how to read it.
const LEGEND: &str = "TTFT and counts: requests sent in the window; req/s and out tok/s: \
requests of both tenants that ended in the window, per second of it; p90 / alone: the quiet \
tenant's TTFT p90 over its p90 in `quiet alone` (goal: at most 2x); vs no queue: out tok/s \
over `flood, no queue`'s (goal: at least 95%); rejected: 429 or 503 from the router.";

impl TenantsReport {
    /// The report as the terminal shows it.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(out, "Tenants: {}.", s.describe());
        let _ = writeln!(
            out,
            "Times are simulated-engine time (wall time / {}).\n",
            s.time_scale
        );
        out.push_str(&crate::bench::report::text_table(
            HEADERS,
            &rows(&self.runs),
        ));
        let _ = writeln!(out, "\n{LEGEND}");
        if let Some(w) = self.lag_warning() {
            let _ = writeln!(out, "\n{w}");
        }
        out
    }

    /// The report as Markdown (for a README): command, settings, table.
    pub fn render_markdown(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(out, "```sh\n{}\n```\n", s.command);
        let _ = writeln!(
            out,
            "Tenants: {}. Times are simulated-engine time (wall / {}).\n",
            s.describe(),
            s.time_scale
        );
        out.push_str(&crate::bench::report::markdown_table(
            HEADERS,
            &rows(&self.runs),
        ));
        let _ = writeln!(out, "\n{LEGEND}");
        out
    }

    /// A warning when the client sent late (the machine too busy for the load).
    fn lag_warning(&self) -> Option<String> {
        let ts = self.settings.time_scale;
        let lagging: Vec<&str> = self
            .runs
            .iter()
            .filter(|r| {
                r.send_lag_p99 * ts > 0.005
                    && r.send_lag_p99 > 0.25 * r.quiet.ttft.map_or(f64::INFINITY, |t| t.p50)
            })
            .map(|r| r.name.as_str())
            .collect();
        (!lagging.is_empty()).then(|| {
            format!(
                "warning: the client sent requests late in {} (send lag p99 above a quarter of \
                 the quiet TTFT p50): the machine may be overloaded; try a larger --time-scale.",
                lagging.join(", ")
            )
        })
    }

    /// Every request of every run as CSV.
    pub fn render_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
            "run",
            "tenant",
            "client",
            "request",
            "start_s",
            "ttft_s",
            "e2e_s",
            "output_tokens",
            "outcome",
            "engine",
            "lag_s",
        ]);
        for (run, recs) in self.runs.iter().zip(&self.records) {
            for t in recs {
                let r = &t.record;
                let outcome = r.outcome.csv_label();
                let _ = w.write_record([
                    run.name.clone(),
                    t.tenant.as_str().to_owned(),
                    r.chain.to_string(),
                    r.turn.to_string(),
                    format!("{:.6}", r.start),
                    r.ttft.map(|t| format!("{t:.6}")).unwrap_or_default(),
                    format!("{:.6}", r.e2e),
                    r.output_tokens.to_string(),
                    outcome,
                    r.engine.clone().unwrap_or_default(),
                    format!("{:.6}", r.lag),
                ]);
            }
        }
        w.into_inner()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Writes `bench.json`, `bench.md` and `requests.csv` to `dir` (created if needed);
    /// returns the paths written.
    pub fn write_files(&self, dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let files = [
            ("bench.json", json + "\n"),
            ("bench.md", self.render_markdown()),
            ("requests.csv", self.render_csv()),
        ];
        crate::bench::report::write_named(dir, files)
    }
}
