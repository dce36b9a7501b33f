//! The figures of one `--tenants` run over its measured window, and the comparisons between
//! runs (throughput against the no-queue run, the quiet tenant's p90 against its unloaded one).
//!
//! The window is `[warmup, warmup + duration)` in simulated seconds from the run's start, the
//! same for every run. Latencies and counts are of the requests **sent** in the window (all of
//! them answered: sending stops at the window's end and the requests in flight are read to their
//! end, so none is cut short). Throughput is of the requests that **ended** in the window,
//! divided by its length (a request sent in the warm-up that ends in the window counts; one
//! sent in the window that ends after it does not).

use serde::Serialize;

use super::load::{TenantName, TenantRecord, is_rejection};
use crate::bench::stats::{Outcome, Summary, percentile};

/// The measured window, simulated seconds from the run's start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    pub start: f64,
    pub end: f64,
}

impl Window {
    fn contains(&self, t: f64) -> bool {
        (self.start..self.end).contains(&t)
    }

    fn len(&self) -> f64 {
        self.end - self.start
    }
}

/// One tenant's requests sent in the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantFigures {
    pub sent: usize,
    /// Answered completely with a 2xx.
    pub ok: usize,
    /// Refused by the router with 429 or 503 (its queue full or timed out).
    pub rejected: usize,
    /// Ended otherwise: another status, a broken stream, the client's timeout.
    pub failed: usize,
    /// Time to first token of the `ok` requests, simulated seconds.
    pub ttft: Option<Summary>,
}

impl TenantFigures {
    fn of<'a>(records: impl Iterator<Item = &'a TenantRecord>) -> TenantFigures {
        let (mut sent, mut ok, mut rejected) = (0, 0, 0);
        let mut ttfts = Vec::new();
        for r in records {
            sent += 1;
            match &r.record.outcome {
                Outcome::Ok => {
                    ok += 1;
                    ttfts.extend(r.record.ttft);
                }
                o if is_rejection(o) => rejected += 1,
                _ => {}
            }
        }
        TenantFigures {
            sent,
            ok,
            rejected,
            failed: sent - ok - rejected,
            ttft: Summary::of(ttfts),
        }
    }
}

/// One run's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantRun {
    /// `quiet alone`, `flood, no queue`, `flood, queue limit 4`.
    pub name: String,
    /// The router's `engine_queue_limit` (0: the router never holds a request).
    pub engine_queue_limit: u32,
    /// Whether the noisy tenant sent anything (not in `quiet alone`).
    pub flood: bool,
    pub quiet: TenantFigures,
    pub noisy: TenantFigures,
    /// Both tenants' requests answered completely that ended in the window, per simulated
    /// second of the window.
    pub requests_per_s: f64,
    /// Their output tokens per simulated second of the window.
    pub output_tokens_per_s: f64,
    /// `output_tokens_per_s` / the no-queue run's (the goal: ≥ 0.95); flood runs only.
    pub throughput_vs_no_queue: Option<f64>,
    /// The quiet tenant's TTFT p90 / its p90 alone (the goal: ≤ 2).
    pub quiet_p90_vs_alone: Option<f64>,
    /// 99th percentile of the client's send lag over the run, simulated seconds (large: the
    /// machine was too busy to send on time).
    pub send_lag_p99: f64,
}

impl TenantRun {
    /// The figures of a run's `records` over `window`.
    pub fn compute(
        name: &str,
        engine_queue_limit: u32,
        flood: bool,
        records: &[TenantRecord],
        window: Window,
    ) -> TenantRun {
        let sent_in = |t: TenantName| {
            records
                .iter()
                .filter(move |r| r.tenant == t && window.contains(r.record.start))
        };
        let ended: Vec<&TenantRecord> = records
            .iter()
            .filter(|r| r.record.is_ok() && window.contains(r.record.start + r.record.e2e))
            .collect();
        let per_s = |x: f64| {
            if window.len() > 0.0 {
                x / window.len()
            } else {
                0.0
            }
        };
        let mut lags: Vec<f64> = records.iter().map(|r| r.record.lag).collect();
        lags.sort_by(f64::total_cmp);
        TenantRun {
            name: name.to_owned(),
            engine_queue_limit,
            flood,
            quiet: TenantFigures::of(sent_in(TenantName::Quiet)),
            noisy: TenantFigures::of(sent_in(TenantName::Noisy)),
            requests_per_s: per_s(ended.len() as f64),
            output_tokens_per_s: per_s(
                ended.iter().map(|r| r.record.output_tokens).sum::<usize>() as f64
            ),
            throughput_vs_no_queue: None,
            quiet_p90_vs_alone: None,
            send_lag_p99: percentile(&lags, 99.0).unwrap_or(0.0),
        }
    }
}

/// Fills each run's comparisons: with the first run without a flood (the quiet tenant alone)
/// and the first flood run without the queue.
pub fn compare(runs: &mut [TenantRun]) {
    let alone = runs
        .iter()
        .find(|r| !r.flood)
        .and_then(|r| r.quiet.ttft)
        .map(|t| t.p90);
    let no_queue = runs
        .iter()
        .find(|r| r.flood && r.engine_queue_limit == 0)
        .map(|r| r.output_tokens_per_s);
    for r in runs.iter_mut() {
        r.quiet_p90_vs_alone = match (r.quiet.ttft, alone) {
            (Some(t), Some(a)) if a > 0.0 => Some(t.p90 / a),
            _ => None,
        };
        r.throughput_vs_no_queue = match no_queue {
            Some(n) if r.flood && n > 0.0 => Some(r.output_tokens_per_s / n),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::tests::record;

    fn rec(tenant: TenantName, start: f64, ttft: f64, e2e: f64, outcome: Outcome) -> TenantRecord {
        TenantRecord {
            tenant,
            record: crate::bench::stats::RequestRecord {
                e2e,
                outcome,
                lag: start / 100.0,
                ..record(start, ttft, "e", "t")
            },
        }
    }

    #[test]
    fn window_counts_by_send_time_and_throughput_by_end_time() {
        use TenantName::{Noisy, Quiet};
        let w = Window {
            start: 10.0,
            end: 20.0,
        };
        let recs = vec![
            // Warm-up: not counted, but its end in the window counts for throughput.
            rec(Quiet, 5.0, 0.1, 6.0, Outcome::Ok),
            rec(Noisy, 9.0, 3.0, 4.0, Outcome::Ok),
            // In the window.
            rec(Quiet, 10.0, 0.2, 1.0, Outcome::Ok),
            rec(Quiet, 12.0, 0.4, 1.0, Outcome::Ok),
            rec(Quiet, 13.0, 0.0, 0.0, Outcome::Status(429)),
            rec(Noisy, 11.0, 2.0, 5.0, Outcome::Ok),
            rec(Noisy, 12.0, 0.0, 0.0, Outcome::Status(503)),
            rec(Noisy, 14.0, 0.0, 0.0, Outcome::Status(500)),
            rec(Noisy, 15.0, 0.0, 0.0, Outcome::TimedOut),
            // Sent in the window, ended after it: latency counted, throughput not.
            rec(Noisy, 19.0, 1.0, 2.0, Outcome::Ok),
            // After the window (the drain): nothing.
            rec(Quiet, 20.0, 9.0, 1.0, Outcome::Ok),
        ];
        let r = TenantRun::compute("x", 4, true, &recs, w);
        assert_eq!(
            (r.quiet.sent, r.quiet.ok, r.quiet.rejected, r.quiet.failed),
            (3, 2, 1, 0)
        );
        assert_eq!(
            (r.noisy.sent, r.noisy.ok, r.noisy.rejected, r.noisy.failed),
            (5, 2, 1, 2)
        );
        let q = r.quiet.ttft.unwrap();
        assert!(
            (q.p50 - 0.3).abs() < 1e-9 && (q.p90 - 0.38).abs() < 1e-9,
            "{q:?}"
        );
        assert_eq!(r.noisy.ttft.unwrap().p50, 1.5);
        // Ended in [10, 20): 11 (5+6), 13 (9+4), 11, 13, 16 → 5 requests of 10 tokens.
        assert_eq!(r.requests_per_s, 0.5);
        assert_eq!(r.output_tokens_per_s, 5.0);
        assert!((r.send_lag_p99 - 0.199).abs() < 1e-9, "{}", r.send_lag_p99);
    }

    #[test]
    fn comparisons_use_the_quiet_run_and_the_no_queue_run() {
        let w = Window {
            start: 0.0,
            end: 20.0,
        };
        // Every request ends in the window.
        let quiet = |ttft: f64| {
            (0..10)
                .map(|i| rec(TenantName::Quiet, i as f64, ttft, ttft + 0.1, Outcome::Ok))
                .collect::<Vec<_>>()
        };
        let mut noisy = quiet(4.0);
        noisy.push(rec(TenantName::Noisy, 1.0, 4.0, 4.1, Outcome::Ok));
        let mut runs = vec![
            TenantRun::compute("alone", 0, false, &quiet(0.5), w),
            TenantRun::compute("no queue", 0, true, &noisy, w),
            TenantRun::compute("queue", 1, true, &quiet(1.0), w),
        ];
        compare(&mut runs);
        let ratios: Vec<_> = runs.iter().map(|r| r.quiet_p90_vs_alone).collect();
        assert_eq!(ratios, [Some(1.0), Some(8.0), Some(2.0)]);
        assert_eq!(runs[0].throughput_vs_no_queue, None);
        assert_eq!(runs[1].throughput_vs_no_queue, Some(1.0));
        // 10 requests' tokens with the queue, 11 without: 100 of 110.
        let t = runs[2].throughput_vs_no_queue.unwrap();
        assert!((t - 100.0 / 110.0).abs() < 1e-9, "{t}");
    }
}
