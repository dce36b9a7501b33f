//! The winner of each figure across a benchmark's runs (the best run and any within [`TIE`]
//! of it), and the lines that announce them.

use serde::Serialize;

use super::stats::RunStats;

/// The best run on one figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Winner {
    pub figure: &'static str,
    /// `lower` or `higher` is better.
    pub better: &'static str,
    /// The best run, and any run tied with it.
    pub runs: Vec<String>,
    pub value: f64,
}

/// A figure of a run: its name, whether lower is better, and how to read it.
struct Figure {
    name: &'static str,
    lower_is_better: bool,
    get: fn(&RunStats) -> Option<f64>,
    /// Formats a value for the winners line.
    show: fn(f64) -> String,
}

/// Seconds shown as whole milliseconds.
pub(super) fn ms(s: f64) -> String {
    format!("{:.0} ms", s * 1000.0)
}

const FIGURES: &[Figure] = &[
    Figure {
        name: "TTFT mean",
        lower_is_better: true,
        get: |r| r.ttft.map(|t| t.mean),
        show: ms,
    },
    Figure {
        name: "TTFT p50",
        lower_is_better: true,
        get: |r| r.ttft.map(|t| t.p50),
        show: ms,
    },
    Figure {
        name: "TTFT p90",
        lower_is_better: true,
        get: |r| r.ttft.map(|t| t.p90),
        show: ms,
    },
    Figure {
        name: "TTFT p99",
        lower_is_better: true,
        get: |r| r.ttft.map(|t| t.p99),
        show: ms,
    },
    Figure {
        name: "ITL p50",
        lower_is_better: true,
        get: |r| r.itl.map(|t| t.p50),
        show: |v| format!("{:.1} ms", v * 1000.0),
    },
    Figure {
        name: "ITL p99",
        lower_is_better: true,
        get: |r| r.itl.map(|t| t.p99),
        show: |v| format!("{:.1} ms", v * 1000.0),
    },
    Figure {
        name: "E2E p50",
        lower_is_better: true,
        get: |r| r.e2e.map(|t| t.p50),
        show: ms,
    },
    Figure {
        name: "E2E p99",
        lower_is_better: true,
        get: |r| r.e2e.map(|t| t.p99),
        show: ms,
    },
    Figure {
        name: "output tok/s",
        lower_is_better: false,
        get: |r| Some(r.output_tokens_per_s),
        show: |v| format!("{v:.1}"),
    },
    Figure {
        name: "req/s",
        lower_is_better: false,
        get: |r| Some(r.requests_per_s),
        show: |v| format!("{v:.2}"),
    },
    Figure {
        name: "cache hit rate",
        lower_is_better: false,
        get: |r| r.cache_hit_rate,
        show: |v| format!("{:.1}%", v * 100.0),
    },
    Figure {
        name: "max/min load",
        lower_is_better: true,
        get: |r| {
            if r.engine_shares.is_empty() {
                None
            } else {
                Some(r.max_min_load_ratio.unwrap_or(f64::INFINITY))
            }
        },
        show: |v| format!("{v:.2}"),
    },
];

/// Values within this fraction of the best one share the win (run-to-run noise is larger).
pub const TIE: f64 = 0.01;

/// The best run on each figure that at least two runs have. Runs within [`TIE`] of the best,
/// or equal to it as displayed, share the win.
pub fn winners(runs: &[RunStats]) -> Vec<Winner> {
    let mut out = Vec::new();
    for f in FIGURES {
        let vals: Vec<(&str, f64)> = runs
            .iter()
            .filter_map(|r| Some((r.name.as_str(), (f.get)(r)?)))
            .filter(|(_, v)| !v.is_nan())
            .collect();
        if vals.len() < 2 {
            continue;
        }
        let best = vals.iter().map(|(_, v)| *v).reduce(|a, b| {
            if f.lower_is_better {
                a.min(b)
            } else {
                a.max(b)
            }
        });
        let Some(best) = best else { continue };
        if !best.is_finite() {
            continue;
        }
        let shown = (f.show)(best);
        out.push(Winner {
            figure: f.name,
            better: if f.lower_is_better { "lower" } else { "higher" },
            runs: vals
                .iter()
                .filter(|(_, v)| (v - best).abs() <= best.abs() * TIE || (f.show)(*v) == shown)
                .map(|(n, _)| (*n).to_owned())
                .collect(),
            value: best,
        });
    }
    out
}

/// One line per figure: who won it, by how much, and which way is better.
pub(super) fn winners_text(winners: &[Winner], runs: &[RunStats]) -> Vec<String> {
    winners
        .iter()
        .map(|w| {
            let show = FIGURES
                .iter()
                .find(|f| f.name == w.figure)
                .map(|f| (f.show)(w.value))
                .unwrap_or_default();
            let who = if w.runs.len() == runs.len() {
                "all tied".to_owned()
            } else {
                w.runs.join(" = ")
            };
            format!("{}: {who} ({show}, {} is better)", w.figure, w.better)
        })
        .collect()
}
