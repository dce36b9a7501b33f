//! Percentiles and the per-run figures computed from the request records.
//!
//! Every time here is in simulated seconds (wall seconds divided by the run's time scale).

use std::collections::BTreeMap;

use serde::Serialize;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx response whose stream ended normally.
    Ok,
    /// A non-2xx response.
    Status(u16),
    /// The connection failed or broke, or the stream carried an error event.
    Failed(String),
    /// The per-request timeout (a safety net) expired.
    TimedOut,
}

impl Outcome {
    /// The `outcome` column of `requests.csv`: `ok`, `status N`, `failed`, `timeout`.
    pub fn csv_label(&self) -> String {
        match self {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Status(s) => format!("status {s}"),
            Outcome::Failed(_) => "failed".to_owned(),
            Outcome::TimedOut => "timeout".to_owned(),
        }
    }
}

/// What the client saw of one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Index of the chain (user) in the workload, and of the turn (round) in the chain.
    pub chain: usize,
    pub turn: usize,
    /// When the request was sent, simulated seconds from the start of the run.
    pub start: f64,
    /// Time to the first SSE event with content, simulated seconds.
    pub ttft: Option<f64>,
    /// Time to the end of the response, simulated seconds.
    pub e2e: f64,
    /// Tokens of answer text received (stand-in tokenizer).
    pub output_tokens: usize,
    pub outcome: Outcome,
    /// The decision headers, when the router sends them.
    pub engine: Option<String>,
    pub tier: Option<String>,
    pub policy: Option<String>,
    /// The source of the chosen engine's prefix match (`x-switchyard-kv`), when matched.
    pub kv: Option<String>,
    /// With a P/D policy: `disaggregated` (a prefill leg ran) or `decode_only`
    /// (`x-switchyard-stage`).
    pub stage: Option<String>,
    /// The router replica the request was sent to (0 with one router).
    pub replica: usize,
    /// How much later than it could have been the request was sent (client scheduling lag),
    /// simulated seconds. Large values mean the benchmarking machine was overloaded.
    pub lag: f64,
}

impl RequestRecord {
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolating linearly between the
/// closest ranks (NumPy's default). `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let pos = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

fn sorted(values: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Mean and percentiles of a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Summary> {
        let v = sorted(values);
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        Some(Summary {
            mean,
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
        })
    }
}

/// Request counts of a run. `sent == ok + failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Requests in the workload.
    pub planned: usize,
    /// Requests sent.
    pub sent: usize,
    /// Requests answered completely with a 2xx.
    pub ok: usize,
    /// Requests that ended otherwise (error status, broken stream, timeout).
    pub failed: usize,
}

/// Requests routed to one engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineShare {
    pub engine: String,
    pub requests: usize,
    pub share: f64,
}

/// What the engines themselves reported at the end of a run (unknown with `--target`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineFigures {
    /// Hit tokens / queried tokens of the prefix caches, summed over the engines.
    pub cache_hit_rate: Option<f64>,
    /// Mean of the engines' own `vllm:time_to_first_token_seconds`, simulated seconds.
    pub ttft_mean: Option<f64>,
    /// Requests preempted (KV memory short), summed over the engines'
    /// `vllm:num_preemptions_total`.
    pub preemptions: Option<u64>,
    /// P/D runs: prompt tokens the decode engines loaded from the prefill engines instead of
    /// computing them.
    pub kv_transferred_tokens: Option<u64>,
}

/// The figures of one run (one row of the table).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunStats {
    /// The row name, e.g. `kvaware` or `load_balanced_kvaware[t=4]`.
    pub name: String,
    /// The policy the router ran (the file stem in the policies directory).
    pub policy: String,
    pub requests: Counts,
    /// Time to first token of the successful requests, simulated seconds.
    pub ttft: Option<Summary>,
    /// End-to-end latency of the successful requests, simulated seconds.
    pub e2e: Option<Summary>,
    /// Inter-token latency: per successful request of 2 or more tokens, its mean time between
    /// output tokens, `(e2e − TTFT) / (tokens − 1)` (`vllm bench serve`'s TPOT), simulated
    /// seconds.
    pub itl: Option<Summary>,
    /// Output tokens of successful requests per simulated second of the run.
    pub output_tokens_per_s: f64,
    /// Successful requests per simulated second of the run.
    pub requests_per_s: f64,
    /// From the first send to the last response end, simulated seconds.
    pub duration_s: f64,
    /// Prefix-cache hit rate over all engines (hit tokens / queried tokens), when known.
    pub cache_hit_rate: Option<f64>,
    /// The engines' own mean TTFT (from their `/metrics`), when known: the client's TTFT mean
    /// minus this is the time spent in the router, the client and the network.
    pub engine_ttft_mean: Option<f64>,
    /// Preemptions of running requests on the engines (KV memory short), when known.
    pub preemptions: Option<u64>,
    /// P/D runs: prompt tokens loaded by the decode engines from the prefill engines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_transferred_tokens: Option<u64>,
    /// Requests per engine (from the `x-switchyard-engine` header), engines in cluster order.
    pub engine_shares: Vec<EngineShare>,
    /// Most loaded engine's requests / least loaded engine's; `None` if unknown or if an engine
    /// got no request (see `engine_shares`).
    pub max_min_load_ratio: Option<f64>,
    /// Share of decisions per deciding tier (from the `x-switchyard-tier` header).
    pub tier_shares: BTreeMap<String, f64>,
    /// P/D runs: share of requests per stage (`x-switchyard-stage`: `disaggregated`,
    /// `decode_only`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stage_shares: BTreeMap<String, f64>,
    /// 99th percentile of the client's send lag, simulated seconds (see [`RequestRecord::lag`]).
    pub send_lag_p99: f64,
    /// Median TTFT over request start time: `[start, median ttft]` per time slice.
    pub ttft_timeline: Vec<[f64; 2]>,
}

/// Number of time slices of the TTFT timeline.
pub const TIMELINE_SLICES: usize = 30;

impl RunStats {
    /// Computes a run's figures. `engines` names the cluster's engines in order (as the router
    /// names them in its headers); engines that appear only in headers are appended.
    pub fn compute(
        name: &str,
        policy: &str,
        planned: usize,
        records: &[RequestRecord],
        engines: &[String],
        figures: EngineFigures,
    ) -> RunStats {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.is_ok()).collect();
        let first = records
            .iter()
            .map(|r| r.start)
            .fold(f64::INFINITY, f64::min);
        let last = records
            .iter()
            .map(|r| r.start + r.e2e)
            .fold(f64::NEG_INFINITY, f64::max);
        let duration_s = if records.is_empty() {
            0.0
        } else {
            (last - first).max(0.0)
        };
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let out_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();

        let mut per_engine: Vec<(String, usize)> = engines.iter().map(|e| (e.clone(), 0)).collect();
        let mut with_engine = 0usize;
        for e in records.iter().filter_map(|r| r.engine.as_deref()) {
            with_engine += 1;
            match per_engine.iter_mut().find(|(n, _)| n == e) {
                Some((_, c)) => *c += 1,
                None => per_engine.push((e.to_owned(), 1)),
            }
        }
        let engine_shares: Vec<EngineShare> = if with_engine == 0 {
            Vec::new()
        } else {
            per_engine
                .into_iter()
                .map(|(engine, requests)| EngineShare {
                    engine,
                    requests,
                    share: requests as f64 / with_engine as f64,
                })
                .collect()
        };
        let max = engine_shares.iter().map(|e| e.requests).max();
        let min = engine_shares.iter().map(|e| e.requests).min();
        let max_min_load_ratio = match (max, min) {
            (Some(max), Some(min)) if min > 0 => Some(max as f64 / min as f64),
            _ => None,
        };

        let tier_shares = shares(records.iter().filter_map(|r| r.tier.as_deref()));
        let stage_shares = shares(records.iter().filter_map(|r| r.stage.as_deref()));

        RunStats {
            name: name.to_owned(),
            policy: policy.to_owned(),
            requests: Counts {
                planned,
                sent: records.len(),
                ok: ok.len(),
                failed: records.len() - ok.len(),
            },
            ttft: Summary::of(ok.iter().filter_map(|r| r.ttft)),
            e2e: Summary::of(ok.iter().map(|r| r.e2e)),
            itl: Summary::of(ok.iter().filter_map(|r| itl(r))),
            output_tokens_per_s: per_s(out_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            duration_s,
            cache_hit_rate: figures.cache_hit_rate,
            engine_ttft_mean: figures.ttft_mean,
            preemptions: figures.preemptions,
            kv_transferred_tokens: figures.kv_transferred_tokens,
            engine_shares,
            max_min_load_ratio,
            tier_shares,
            stage_shares,
            send_lag_p99: percentile(&sorted(records.iter().map(|r| r.lag)), 99.0).unwrap_or(0.0),
            ttft_timeline: timeline(&ok, TIMELINE_SLICES),
        }
    }
}

/// The share of each value among `values`.
fn shares<'a>(values: impl Iterator<Item = &'a str>) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::<String, usize>::new();
    for v in values {
        *counts.entry(v.to_owned()).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    counts
        .into_iter()
        .map(|(v, n)| (v, n as f64 / total as f64))
        .collect()
}

/// A request's mean inter-token latency, `(e2e − TTFT) / (tokens − 1)`; `None` below 2 tokens.
pub fn itl(r: &RequestRecord) -> Option<f64> {
    let ttft = r.ttft?;
    (r.output_tokens >= 2).then(|| (r.e2e - ttft).max(0.0) / (r.output_tokens - 1) as f64)
}

/// Median TTFT of the requests started in each of `slices` equal slices of the run's start
/// times; empty slices are skipped. Points are at the middle of their slice.
pub fn timeline(ok: &[&RequestRecord], slices: usize) -> Vec<[f64; 2]> {
    let pts: Vec<(f64, f64)> = ok.iter().filter_map(|r| Some((r.start, r.ttft?))).collect();
    if pts.is_empty() || slices == 0 {
        return Vec::new();
    }
    let lo = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let width = ((hi - lo) / slices as f64).max(f64::MIN_POSITIVE);
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); slices];
    for (s, t) in pts {
        let i = (((s - lo) / width) as usize).min(slices - 1);
        buckets[i].push(t);
    }
    buckets
        .into_iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let med = percentile(&sorted(b), 50.0)?;
            Some([lo + (i as f64 + 0.5) * width, med])
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(51.0));
        assert_eq!(percentile(&v, 90.0), Some(91.0));
        assert_eq!(percentile(&v, 99.0), Some(100.0));
        assert_eq!(percentile(&v, 100.0), Some(101.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(percentile(&[0.0, 10.0], 90.0), Some(9.0));
        let s = Summary::of([4.0, 1.0, 3.0, 2.0, f64::NAN]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.p50, 2.5);
        assert!(Summary::of([]).is_none());
    }

    pub(crate) fn record(start: f64, ttft: f64, engine: &str, tier: &str) -> RequestRecord {
        RequestRecord {
            chain: 0,
            turn: 0,
            start,
            ttft: Some(ttft),
            e2e: ttft + 1.0,
            output_tokens: 10,
            outcome: Outcome::Ok,
            engine: Some(engine.into()),
            tier: Some(tier.into()),
            policy: Some("p".into()),
            kv: None,
            stage: None,
            replica: 0,
            lag: 0.0,
        }
    }

    #[test]
    fn run_figures_are_consistent() {
        let mut recs = vec![
            record(0.0, 0.1, "a", "kv_lookup"),
            record(1.0, 0.2, "a", "kv_lookup"),
            record(2.0, 0.3, "b", "load_balance"),
            record(3.0, 0.4, "a", "kv_lookup"),
        ];
        recs.push(RequestRecord {
            outcome: Outcome::Status(503),
            ttft: None,
            engine: None,
            tier: None,
            ..record(3.5, 0.0, "", "")
        });
        let s = RunStats::compute(
            "x",
            "p",
            5,
            &recs,
            &["a".into(), "b".into(), "c".into()],
            EngineFigures {
                cache_hit_rate: Some(0.5),
                ttft_mean: Some(0.2),
                preemptions: Some(7),
                kv_transferred_tokens: None,
            },
        );
        assert_eq!(
            s.requests,
            Counts {
                planned: 5,
                sent: 5,
                ok: 4,
                failed: 1
            }
        );
        assert_eq!(s.duration_s, 4.5);
        assert_eq!(
            s.preemptions,
            Some(7),
            "the engines' preemptions, as reported"
        );
        assert!((s.requests_per_s - 4.0 / 4.5).abs() < 1e-12);
        assert!((s.output_tokens_per_s - 40.0 / 4.5).abs() < 1e-12);
        let shares: f64 = s.engine_shares.iter().map(|e| e.share).sum();
        assert!((shares - 1.0).abs() < 1e-12);
        assert_eq!(s.engine_shares.len(), 3);
        assert_eq!(s.engine_shares[2].requests, 0);
        assert_eq!(s.max_min_load_ratio, None, "engine c got nothing");
        let tiers: f64 = s.tier_shares.values().sum();
        assert!((tiers - 1.0).abs() < 1e-12);
        assert_eq!(s.tier_shares["kv_lookup"], 0.75);
        let t = s.ttft.unwrap();
        assert!((t.mean - 0.25).abs() < 1e-12);
        assert!((t.p50 - 0.25).abs() < 1e-12);

        let s = RunStats::compute(
            "x",
            "p",
            4,
            &recs[..4],
            &["a".into(), "b".into()],
            EngineFigures::default(),
        );
        assert_eq!(s.max_min_load_ratio, Some(3.0));
    }

    #[test]
    fn timeline_is_median_per_slice() {
        let recs: Vec<RequestRecord> = (0..100)
            .map(|i| record(i as f64, if i < 50 { 1.0 } else { 3.0 }, "a", "t"))
            .collect();
        let refs: Vec<&RequestRecord> = recs.iter().collect();
        let t = timeline(&refs, 10);
        assert_eq!(t.len(), 10);
        assert_eq!(t[0][1], 1.0);
        assert_eq!(t[9][1], 3.0);
        assert!(t.windows(2).all(|w| w[1][0] > w[0][0]));
        assert!(timeline(&[], 10).is_empty());
    }
}
