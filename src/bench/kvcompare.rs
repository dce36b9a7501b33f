//! `switchyard bench --kv-compare`: exact against approximate against load-only routing, on
//! workloads where they differ. Every run uses the same chat workload (chat prompts rendered
//! through the tokenizer's chat template by the engines) and the same engines, which cache by
//! real token ids (`--tokenizer`) and publish their KV events; the runs differ in:
//!
//! - the engines' cache: `small` (fewer blocks than the working set: evictions the router's
//!   approximate index never sees) or `ample` (the sim's default);
//! - the number of router replicas sharing the load (`--router-replicas`, e.g. `1,3`): the
//!   driver spreads requests over them, so each approximate index sees 1/N of the traffic;
//! - the routing: `exact` (the default policy, `load_balanced_kvaware`, with `--tokenizer`
//!   and the engines' KV events), `approximate` (the same policy on the router's own index)
//!   and `load-only` (`least_loaded`).

use serde::Serialize;

use super::stats::{RequestRecord, RunStats};
use super::workload::trace_plan::TraceSummary;
use super::workload::{Workload, WorkloadSpec};
use super::{BenchArgs, BenchError};
use crate::tokens::{DEFAULT_BLOCK_SIZE, Tokenizer, estimate_tokens};

/// How a run's routers know what the engines cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvMode {
    /// The engines' KV events over the request's real token ids.
    Exact,
    /// The router's own index of the prompts it sent.
    Approximate,
    /// No prefix matching: the least loaded engine.
    LoadOnly,
}

/// The policy of the kv-aware modes.
pub const KV_POLICY: &str = "load_balanced_kvaware";
/// The policy of `load-only`.
pub const LOAD_POLICY: &str = "least_loaded";

impl KvMode {
    pub const ALL: [KvMode; 3] = [KvMode::Exact, KvMode::Approximate, KvMode::LoadOnly];

    pub fn name(self) -> &'static str {
        match self {
            KvMode::Exact => "exact",
            KvMode::Approximate => "approximate",
            KvMode::LoadOnly => "load-only",
        }
    }

    pub fn policy(self) -> &'static str {
        match self {
            KvMode::LoadOnly => LOAD_POLICY,
            _ => KV_POLICY,
        }
    }
}

/// One run of the comparison: its cluster and routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvRun {
    /// `small` or `ample`.
    pub cache: &'static str,
    /// The engines' prefix-cache blocks; `None`: the sim's default.
    pub num_blocks: Option<usize>,
    pub replicas: usize,
    pub mode: KvMode,
}

impl KvRun {
    /// The row name, e.g. `small/3x/exact`.
    pub fn name(&self) -> String {
        format!("{}/{}x/{}", self.cache, self.replicas, self.mode.name())
    }
}

/// What the comparison's runs send, to size the small cache from.
#[derive(Debug, Clone, Copy)]
pub enum KvLoad<'a> {
    Workload(&'a WorkloadSpec),
    Trace(&'a TraceSummary),
}

/// `--kv-compare`'s settings, validated: the replica counts (default 1 and 3) and the small
/// cache's blocks per engine (`--num-blocks`, else [`small_cache_blocks`] in the tokenizer's
/// tokens, or [`trace_small_cache_blocks`]). `sweep`: whether `--sweep` was given.
pub fn settings(
    args: &BenchArgs,
    load: KvLoad<'_>,
    sweep: bool,
) -> Result<(Vec<usize>, usize), BenchError> {
    let bad = |m: String| Err(BenchError::Args(m));
    if args.target.is_some() || sweep || args.policies.is_some() {
        return bad(
            "--kv-compare chooses its own runs: it cannot be used with --target, --sweep or \
             --policies"
                .into(),
        );
    }
    let Some(tokenizer) = &args.tokenizer else {
        return bad(
            "--kv-compare needs --tokenizer PATH (e.g. tests/fixtures/tokenizer/llama3 in a \
             checkout)"
                .into(),
        );
    };
    let replicas = args.router_replicas.clone().unwrap_or_else(|| vec![1, 3]);
    if replicas.is_empty() || replicas.iter().any(|&n| !(1..=8).contains(&n)) {
        return bad(format!(
            "--router-replicas must be counts between 1 and 8, got {replicas:?}"
        ));
    }
    let t = Tokenizer::load(tokenizer)
        .map_err(|e| BenchError::Args(format!("--tokenizer {}: {e}", tokenizer.display())))?;
    let small = match (args.num_blocks, load) {
        (Some(n), _) => n,
        (None, KvLoad::Workload(spec)) => {
            let w = Workload::generate(spec);
            let ratio = tokens_per_stand_in_token(&w, &t).unwrap_or(1.0);
            small_cache_blocks(&w, args.engines, ratio)
        }
        (None, KvLoad::Trace(trace)) => trace_small_cache_blocks(trace, args.engines),
    };
    Ok((replicas, small))
}

/// Real tokens per stand-in token of the workload's chat prompts under `tokenizer` (its chat
/// template included): the first chain's first request, tokenized as the engines will.
pub fn tokens_per_stand_in_token(workload: &Workload, tokenizer: &Tokenizer) -> Option<f64> {
    let chain = workload.chains.first()?;
    let turn = chain.turns.first()?;
    let mut messages: Vec<serde_json::Value> = chain
        .preamble
        .iter()
        .map(|m| serde_json::json!({ "role": m.role, "content": &*m.content }))
        .collect();
    messages.push(serde_json::json!({ "role": "user", "content": turn.question }));
    let stand_in: usize = messages
        .iter()
        .filter_map(|m| m["content"].as_str())
        .map(|c| estimate_tokens(c.len()))
        .sum();
    let body = serde_json::json!({ "model": "m", "messages": messages }).to_string();
    let real = tokenizer
        .request_token_ids("/v1/chat/completions", body.as_bytes())
        .ok()?
        .len();
    (stand_in > 0).then(|| real as f64 / stand_in as f64)
}

/// The default `small` cache per engine: half of an even share of the workload's working set
/// (every chain's longest prompt and answer, in blocks, stand-in tokens scaled by
/// `tokens_per_stand_in`), at least 64 blocks, and room for two of the largest requests (a
/// chain's last turn), since the cache is also the engine's KV memory.
pub fn small_cache_blocks(workload: &Workload, engines: usize, tokens_per_stand_in: f64) -> usize {
    let per_chain: Vec<usize> = workload
        .chains
        .iter()
        .map(|c| {
            let preamble: usize = c
                .preamble
                .iter()
                .map(|m| estimate_tokens(m.content.len()))
                .sum();
            let turns: usize = c
                .turns
                .iter()
                .map(|t| estimate_tokens(t.question.len()) + t.max_tokens)
                .sum();
            preamble + turns
        })
        .collect();
    let scale = |t: usize| (t as f64 * tokens_per_stand_in.max(0.01)) as usize;
    let tokens = scale(per_chain.iter().sum());
    let largest = scale(per_chain.iter().copied().max().unwrap_or(0));
    (tokens / DEFAULT_BLOCK_SIZE / engines.max(1) / 2)
        .max(64)
        .max((2 * largest).div_ceil(DEFAULT_BLOCK_SIZE))
}

/// The default `small` cache per engine with `--trace`: half of an even share of the trace's
/// distinct prompt tokens (its token ids are the engines' as they are), in blocks, at least 64
/// and at most half the sim's default cache (so that `small` stays smaller than `ample`); and
/// room for two of the trace's largest requests, since the cache is also the engine's KV
/// memory (an engine refuses a request that can never fit).
pub fn trace_small_cache_blocks(trace: &TraceSummary, engines: usize) -> usize {
    let half_ample = crate::sim::SimConfig::default().num_blocks / 2;
    let share = trace.distinct_tokens as usize / DEFAULT_BLOCK_SIZE / engines.max(1) / 2;
    let two_largest = (2 * trace.largest_request_tokens as usize).div_ceil(DEFAULT_BLOCK_SIZE);
    share.clamp(64, half_ample.max(64)).max(two_largest)
}

/// One row of the comparison table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvRow {
    pub run: String,
    #[serde(flatten)]
    pub kv: KvRun,
    /// Share of the successful requests whose chosen engine's match was exact
    /// (`x-switchyard-kv: exact`).
    pub exact_share: f64,
}

impl KvRow {
    pub fn new(kv: &KvRun, records: &[RequestRecord]) -> KvRow {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.is_ok()).collect();
        let exact = ok
            .iter()
            .filter(|r| r.kv.as_deref() == Some("exact"))
            .count();
        KvRow {
            run: kv.name(),
            kv: kv.clone(),
            exact_share: if ok.is_empty() {
                0.0
            } else {
                exact as f64 / ok.len() as f64
            },
        }
    }
}

/// The table's columns, shaped like llm-d's precise-prefix-cache comparison.
pub const HEADERS: &[&str] = &[
    "cache",
    "replicas",
    "routing",
    "TTFT p50",
    "TTFT p90",
    "out tok/s",
    "cache hit",
    "exact matches",
    "ok/sent",
];

/// The table's rows (`runs` in the order of `rows`).
pub fn table_rows(rows: &[KvRow], runs: &[RunStats]) -> Vec<Vec<String>> {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{:.0} ms", s * 1000.0));
    rows.iter()
        .zip(runs)
        .map(|(row, r)| {
            vec![
                row.kv.cache.to_owned(),
                row.kv.replicas.to_string(),
                row.kv.mode.name().to_owned(),
                ms(r.ttft.map(|t| t.p50)),
                ms(r.ttft.map(|t| t.p90)),
                format!("{:.1}", r.output_tokens_per_s),
                r.cache_hit_rate
                    .map_or_else(|| "-".into(), |h| format!("{:.1}%", h * 100.0)),
                format!("{:.0}%", row.exact_share * 100.0),
                format!("{}/{}", r.requests.ok, r.requests.sent),
            ]
        })
        .collect()
}
