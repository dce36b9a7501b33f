//! The benchmark report: its JSON form, the text and Markdown tables, and the files written to
//! the output directory. The winner of each figure is computed in [`super::winners`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::kvcompare;
use super::stats::{RequestRecord, RunStats};
pub use super::winners::{TIE, Winner, winners};
use super::winners::{ms, winners_text};
use super::workload::WorkloadSpec;
use super::workload::trace_plan::TraceSummary;

/// The settings a report was produced with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchSettings {
    /// The command line, for reproduction.
    pub command: String,
    /// The generated workload; `None` with `--trace`.
    pub workload: Option<WorkloadSpec>,
    /// The trace replayed (`--trace`): what was read, sent, skipped, cut, and its ideal hit rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceSummary>,
    /// Simulated engines per run; `None` with `--target`.
    pub engines: Option<usize>,
    /// The router benchmarked with `--target`.
    pub target: Option<String>,
    pub model: String,
    /// Wall seconds per simulated second.
    pub time_scale: f64,
    /// Engine 0's slowdown factor, if any.
    pub slow_engine: Option<f64>,
    pub policies_dir: String,
    /// The unit of every time and rate in the report.
    pub time_unit: &'static str,
}

/// Everything a benchmark produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub settings: BenchSettings,
    /// With `--trace`: the prefix-cache hit rate of one unbounded cache fed every request sent,
    /// at the engines' block size (compare each run's `cache_hit_rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ideal_cache_hit_rate: Option<f64>,
    pub runs: Vec<RunStats>,
    pub winners: Vec<Winner>,
    /// With `--kv-compare`: each run's cluster and routing, in the order of `runs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_compare: Option<Vec<super::kvcompare::KvRow>>,
    /// Every request of every run (written to `requests.csv`, not to the JSON).
    #[serde(skip)]
    pub records: Vec<Vec<RequestRecord>>,
}

/// Renders rows as an aligned text table: the first column left-aligned, the rest right.
pub(super) fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncol = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(ncol) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut parts = Vec::with_capacity(ncol);
        for (i, c) in cells.enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            parts.push(if i == 0 {
                format!("{c}{}", " ".repeat(pad))
            } else {
                format!("{}{c}", " ".repeat(pad))
            });
        }
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &mut headers.iter().copied());
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &mut rule.iter().map(String::as_str));
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

pub(super) fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let align: Vec<&str> = (0..headers.len())
        .map(|i| if i == 0 { ":--" } else { "--:" })
        .collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

const PERF_HEADERS: &[&str] = &[
    "policy",
    "ok/sent",
    "TTFT mean",
    "TTFT p50",
    "TTFT p90",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
    "out tok/s",
    "req/s",
    "cache hit",
    "preempt",
];

const ROUTING_HEADERS: &[&str] = &[
    "policy",
    "requests per engine",
    "max/min",
    "decisions per tier",
];

fn opt_ms(v: Option<f64>) -> String {
    v.map(ms).unwrap_or_else(|| "-".into())
}

/// Seconds as milliseconds with one decimal (inter-token latencies are a few ms).
fn opt_ms_tenths(v: Option<f64>) -> String {
    v.map(|s| format!("{:.1} ms", s * 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// The run's preemptions column: `-` when unknown (`--target`).
fn preemptions_cell(p: Option<u64>) -> String {
    p.map_or_else(|| "-".into(), |n| n.to_string())
}

/// The performance table's headers: with an ideal hit rate, a `hit/ideal` column.
fn perf_headers(ideal: Option<f64>) -> Vec<&'static str> {
    let mut h = PERF_HEADERS.to_vec();
    if ideal.is_some() {
        // Beside the hit rate it divides.
        let at = h
            .iter()
            .position(|c| *c == "cache hit")
            .map_or(h.len(), |i| i + 1);
        h.insert(at, HIT_OF_IDEAL);
    }
    h
}

/// A run's cache hit rate as a share of the ideal one.
const HIT_OF_IDEAL: &str = "hit/ideal";

fn perf_rows(runs: &[RunStats], ideal: Option<f64>) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            let mut row = vec![
                r.name.clone(),
                format!("{}/{}", r.requests.ok, r.requests.sent),
                opt_ms(r.ttft.map(|t| t.mean)),
                opt_ms(r.ttft.map(|t| t.p50)),
                opt_ms(r.ttft.map(|t| t.p90)),
                opt_ms(r.ttft.map(|t| t.p99)),
                opt_ms_tenths(r.itl.map(|t| t.p50)),
                opt_ms_tenths(r.itl.map(|t| t.p99)),
                opt_ms(r.e2e.map(|t| t.p50)),
                opt_ms(r.e2e.map(|t| t.p99)),
                format!("{:.1}", r.output_tokens_per_s),
                format!("{:.2}", r.requests_per_s),
                r.cache_hit_rate
                    .map(|h| format!("{:.1}%", h * 100.0))
                    .unwrap_or_else(|| "-".into()),
            ];
            if let Some(ideal) = ideal {
                row.push(match r.cache_hit_rate {
                    Some(h) if ideal > 0.0 => format!("{:.0}%", h / ideal * 100.0),
                    _ => "-".into(),
                });
            }
            row.push(preemptions_cell(r.preemptions));
            row
        })
        .collect()
}

fn routing_rows(runs: &[RunStats]) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            let engines = if r.engine_shares.is_empty() {
                "-".to_owned()
            } else {
                r.engine_shares
                    .iter()
                    .map(|e| format!("{:.0}%", e.share * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let ratio = match (r.engine_shares.is_empty(), r.max_min_load_ratio) {
                (true, _) => "-".to_owned(),
                (false, None) => "inf".to_owned(),
                (false, Some(x)) => format!("{x:.2}"),
            };
            let mut tiers: Vec<(&String, &f64)> = r.tier_shares.iter().collect();
            tiers.sort_by(|a, b| b.1.total_cmp(a.1));
            let tiers = if tiers.is_empty() {
                "-".to_owned()
            } else {
                tiers
                    .iter()
                    .map(|(t, s)| format!("{t} {:.0}%", *s * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![r.name.clone(), engines, ratio, tiers]
        })
        .collect()
}

fn engine_legend(s: &BenchSettings, runs: &[RunStats]) -> Option<String> {
    runs.iter().find(|r| !r.engine_shares.is_empty())?;
    Some(match (s.engines, s.slow_engine) {
        (Some(_), Some(f)) => {
            format!("requests per engine: e0 e1 ... in start order; e0 is the slow engine ({f}x)")
        }
        (Some(_), None) => "requests per engine: e0 e1 ... in start order".to_owned(),
        (None, _) => "requests per engine: in order of first appearance".to_owned(),
    })
}

/// One line per P/D run: its stages and the prompt tokens moved from prefill to decode
/// engines.
fn pd_lines(runs: &[RunStats]) -> Vec<String> {
    runs.iter()
        .filter_map(|r| {
            let stages = r
                .stage_shares
                .iter()
                .map(|(s, x)| format!("{s} {:.0}%", x * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            Some(format!(
                "{}: the first engines are the prefill engines, the rest decode (requests per \
                 engine: the decode engine); stages: {}; {} prompt tokens loaded by decode \
                 engines from prefill engines.",
                r.name,
                if stages.is_empty() { "-" } else { &stages },
                r.kv_transferred_tokens?
            ))
        })
        .collect()
}

/// "Client TTFT mean − engines' TTFT mean" over the runs that have both: the time spent in the
/// router, the client and the network (in simulated time, so magnified by 1 / time_scale).
/// P/D runs are left out: a request's TTFT spans two engines' requests there.
fn overhead_line(runs: &[RunStats]) -> Option<String> {
    let o: Vec<f64> = runs
        .iter()
        .filter(|r| r.kv_transferred_tokens.is_none())
        .filter_map(|r| Some(r.ttft?.mean - r.engine_ttft_mean?))
        .collect();
    let lo = o.iter().copied().reduce(f64::min)?;
    let hi = o.iter().copied().reduce(f64::max)?;
    let range = if (hi - lo) * 1000.0 < 0.5 {
        ms(lo)
    } else {
        format!("{:.0}–{}", lo * 1000.0, ms(hi))
    };
    Some(format!(
        "Router + client overhead (client TTFT mean − the engines' own TTFT mean): {range}."
    ))
}

impl BenchSettings {
    /// A one-line description of the workload or the trace.
    pub fn describe_load(&self) -> String {
        match (&self.trace, &self.workload) {
            (Some(t), _) => t.describe(),
            (None, Some(w)) => w.describe(),
            (None, None) => "-".into(),
        }
    }

    /// The short name of the load, for chart titles: the workload's kind, or `trace`.
    pub fn load_name(&self) -> &'static str {
        match (&self.trace, &self.workload) {
            (None, Some(w)) => w.kind.name(),
            _ => "trace",
        }
    }
}

impl BenchReport {
    /// The report as the terminal shows it: the tables, then the winner of each figure.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(out, "Workload: {}", s.describe_load());
        let _ = writeln!(
            out,
            "Times are simulated-engine time (wall time / {}).",
            s.time_scale
        );
        out.push('\n');
        if let Some(rows) = &self.kv_compare {
            out.push_str(&text_table(
                kvcompare::HEADERS,
                &kvcompare::table_rows(rows, &self.runs),
            ));
            out.push('\n');
        }
        if let Some(l) = s.trace.as_ref().and_then(TraceSummary::ideal_line) {
            let _ = writeln!(out, "{l}\n");
        }
        let ideal = self.ideal_cache_hit_rate;
        out.push_str(&text_table(
            &perf_headers(ideal),
            &perf_rows(&self.runs, ideal),
        ));
        out.push('\n');
        out.push_str(&text_table(ROUTING_HEADERS, &routing_rows(&self.runs)));
        if let Some(l) = engine_legend(s, &self.runs) {
            let _ = writeln!(out, "({l})");
        }
        for l in pd_lines(&self.runs) {
            let _ = writeln!(out, "{l}");
        }
        let w = winners_text(&self.winners, &self.runs);
        if !w.is_empty() {
            out.push_str("\nBest per figure:\n");
            for line in w {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(o) = overhead_line(&self.runs) {
            let _ = writeln!(out, "\n{o}");
        }
        let lagging: Vec<&str> = self
            .runs
            .iter()
            .filter(|r| {
                // Timer granularity makes a few milliseconds of wall lag normal.
                r.send_lag_p99 * s.time_scale > 0.005
                    && r.send_lag_p99 > 0.25 * r.ttft.map(|t| t.p50).unwrap_or(f64::INFINITY)
            })
            .map(|r| r.name.as_str())
            .collect();
        if !lagging.is_empty() {
            let _ = writeln!(
                out,
                "\nwarning: the client sent requests late in {} (send lag p99 above a quarter of TTFT p50): \
                 the machine may be overloaded; try a larger --time-scale.",
                lagging.join(", ")
            );
        }
        out
    }

    /// The report as Markdown (for a README): command, tables, winners.
    pub fn render_markdown(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(out, "```sh\n{}\n```\n", s.command);
        let _ = writeln!(
            out,
            "Workload: {}. Times are simulated-engine time (wall / {}).\n",
            s.describe_load(),
            s.time_scale
        );
        if let Some(rows) = &self.kv_compare {
            out.push_str(&markdown_table(
                kvcompare::HEADERS,
                &kvcompare::table_rows(rows, &self.runs),
            ));
            out.push('\n');
        }
        if let Some(l) = s.trace.as_ref().and_then(TraceSummary::ideal_line) {
            let _ = writeln!(out, "{l}\n");
        }
        let ideal = self.ideal_cache_hit_rate;
        out.push_str(&markdown_table(
            &perf_headers(ideal),
            &perf_rows(&self.runs, ideal),
        ));
        out.push('\n');
        out.push_str(&markdown_table(ROUTING_HEADERS, &routing_rows(&self.runs)));
        if let Some(l) = engine_legend(s, &self.runs) {
            let _ = writeln!(out, "\n({l})");
        }
        for l in pd_lines(&self.runs) {
            let _ = writeln!(out, "\n{l}");
        }
        let w = winners_text(&self.winners, &self.runs);
        if !w.is_empty() {
            out.push_str("\nBest per figure:\n\n");
            for line in w {
                let _ = writeln!(out, "- {line}");
            }
        }
        out
    }

    /// Every request of every run as CSV (RFC 4180 quoting by the `csv` crate).
    pub fn render_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
            "run",
            "chain",
            "turn",
            "start_s",
            "ttft_s",
            "e2e_s",
            "output_tokens",
            "outcome",
            "engine",
            "tier",
            "policy",
            "kv",
            "replica",
            "lag_s",
        ]);
        for (run, recs) in self.runs.iter().zip(&self.records) {
            for r in recs {
                let outcome = r.outcome.csv_label();
                let _ = w.write_record([
                    run.name.clone(),
                    r.chain.to_string(),
                    r.turn.to_string(),
                    format!("{:.6}", r.start),
                    r.ttft.map(|t| format!("{t:.6}")).unwrap_or_default(),
                    format!("{:.6}", r.e2e),
                    r.output_tokens.to_string(),
                    outcome,
                    r.engine.clone().unwrap_or_default(),
                    r.tier.clone().unwrap_or_default(),
                    r.policy.clone().unwrap_or_default(),
                    r.kv.clone().unwrap_or_default(),
                    r.replica.to_string(),
                    format!("{:.6}", r.lag),
                ]);
            }
        }
        w.into_inner()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Writes `bench.json`, `bench.md`, `bench.svg` and `requests.csv` to `dir` (created if
    /// needed); returns the paths written.
    pub fn write_files(&self, dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let files = [
            ("bench.json", json + "\n"),
            ("bench.md", self.render_markdown()),
            (
                "bench.svg",
                super::svg::render(self.settings.load_name(), &self.runs),
            ),
            ("requests.csv", self.render_csv()),
        ];
        write_named(dir, files)
    }
}

/// Writes each `(name, body)` into `dir`; returns the paths written.
pub(super) fn write_named(
    dir: &Path,
    files: impl IntoIterator<Item = (&'static str, String)>,
) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut written = Vec::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::write(&path, body)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests;
