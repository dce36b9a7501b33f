//! Counters of the simulated engine and their rendering as vLLM's Prometheus text.
//!
//! Metric names, types, help texts, label names (`model_name`, `engine`) and histogram buckets
//! are those of vLLM's V1 engine (`vllm/v1/metrics/loggers.py`). Counters are rendered with
//! the `_total` suffix, as Python's `prometheus_client` does.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// vLLM's buckets for `vllm:time_to_first_token_seconds`.
pub(crate) const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's buckets for `vllm:e2e_request_latency_seconds`.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram with fixed buckets, updated lock-free.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last slot is the `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    /// Sum of observations, as `f64` bits.
    sum_bits: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub(crate) fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// Number of observations.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b:?}"),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\",{labels}}} {cumulative:?}.0"
            );
        }
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative:?}.0");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum:?}");
    }
}

/// Every counter of one simulated engine.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) received: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) failed_injected: AtomicU64,
    pub(crate) dropped_injected: AtomicU64,
    /// Prompt tokens looked up in the prefix cache.
    pub(crate) prefix_queries: AtomicU64,
    /// Prompt tokens found in the prefix cache.
    pub(crate) prefix_hits: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    /// Running requests preempted (their KV blocks freed, to be recomputed).
    pub(crate) preemptions: AtomicU64,
    /// Engine steps run (not rendered; for measurements).
    pub(crate) steps: AtomicU64,
    /// Prompt (or recomputed) tokens computed by prefill steps.
    pub(crate) prefill_computed_tokens: AtomicU64,
    /// Prompt tokens loaded from prefill engines (D).
    pub(crate) external_tokens: AtomicU64,
    /// D legs whose blocks were read from P.
    pub(crate) kv_loads: AtomicU64,
    /// D legs whose read failed (P unreachable, hand-off unknown, expired or read).
    pub(crate) kv_load_failures: AtomicU64,
    /// P legs whose blocks were held for D.
    pub(crate) hand_offs: AtomicU64,
    /// Hand-offs read by D (their blocks released).
    pub(crate) hand_offs_read: AtomicU64,
    /// Hand-offs whose lease expired unread (their blocks released).
    pub(crate) hand_offs_expired: AtomicU64,
    /// Reads of hand-offs released before (read already or expired).
    pub(crate) stale_reads: AtomicU64,
    /// Prompt tokens of requests looked up by the KV connector (every request, with a role).
    pub(crate) external_queries: AtomicU64,
    /// Time to first token, in simulated seconds.
    pub(crate) ttft: Histogram,
    /// End-to-end latency of completed requests, in simulated seconds.
    pub(crate) e2e: Histogram,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            received: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            failed_injected: AtomicU64::new(0),
            dropped_injected: AtomicU64::new(0),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            prefill_computed_tokens: AtomicU64::new(0),
            external_tokens: AtomicU64::new(0),
            kv_loads: AtomicU64::new(0),
            kv_load_failures: AtomicU64::new(0),
            hand_offs: AtomicU64::new(0),
            hand_offs_read: AtomicU64::new(0),
            hand_offs_expired: AtomicU64::new(0),
            stale_reads: AtomicU64::new(0),
            external_queries: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

pub(crate) fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// Instantaneous engine state, sampled when `/metrics` is rendered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gauges {
    pub(crate) running: usize,
    pub(crate) waiting: usize,
    pub(crate) kv_usage: f64,
    /// Hand-offs a prefill engine holds for decode engines.
    pub(crate) hand_offs_held: usize,
}

/// Static engine facts shown in `vllm:cache_config_info`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheInfo {
    pub(crate) block_size: usize,
    pub(crate) num_blocks: usize,
}

/// Escapes a Prometheus label value.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name}{{{labels}}} {v:?}");
}

fn counter(out: &mut String, name: &str, help: &str, labels: &str, c: &AtomicU64) {
    let v = c.load(Ordering::Relaxed) as f64;
    let _ = writeln!(out, "# HELP {name}_total {help}");
    let _ = writeln!(out, "# TYPE {name}_total counter");
    let _ = writeln!(out, "{name}_total{{{labels}}} {v:?}");
}

/// Renders the engine's metrics in the Prometheus text format (version 0.0.4).
pub(crate) fn render(model: &str, stats: &Stats, g: Gauges, info: CacheInfo) -> String {
    let l = format!("model_name=\"{}\",engine=\"0\"", escape_label(model));
    let l = l.as_str();
    let mut out = String::with_capacity(8192);
    gauge(
        &mut out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        l,
        g.running as f64,
    );
    gauge(
        &mut out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        l,
        g.waiting as f64,
    );
    gauge(
        &mut out,
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
        l,
        g.kv_usage,
    );
    gauge(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        l,
        g.kv_usage,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        l,
        &stats.prefix_queries,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        l,
        &stats.prefix_hits,
    );
    counter(
        &mut out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        l,
        &stats.prompt_tokens,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source."
    );
    let _ = writeln!(out, "# TYPE vllm:prompt_tokens_by_source_total counter");
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (prompt, local, external) = (
        get(&stats.prompt_tokens),
        get(&stats.prefix_hits),
        get(&stats.external_tokens),
    );
    for (source, v) in [
        ("local_compute", prompt.saturating_sub(local + external)),
        ("local_cache_hit", local),
        ("external_kv_transfer", external),
    ] {
        let _ = writeln!(
            out,
            "vllm:prompt_tokens_by_source_total{{{l},source=\"{source}\"}} {:?}",
            v as f64
        );
    }
    counter(
        &mut out,
        "vllm:nixl_num_failed_transfers",
        "Number of failed NIXL KV Cache transfers, including handshake and notification failures. NOTE: KV expiry is tracked separately in vllm:nixl_num_kv_expired_reqs.",
        l,
        &stats.kv_load_failures,
    );
    counter(
        &mut out,
        "vllm:nixl_num_kv_expired_reqs",
        "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance.",
        l,
        &stats.hand_offs_expired,
    );
    counter(
        &mut out,
        "vllm:nixl_num_notifications_after_expiry",
        "Number of completion notifications for requests that were no longer tracked, usually because their KV lease expired. The KV blocks may have been reused before the transfer finished. Counted per notification (one per remote rank), not per request.",
        l,
        &stats.stale_reads,
    );
    counter(
        &mut out,
        "vllm:external_prefix_cache_queries",
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
        l,
        &stats.external_queries,
    );
    counter(
        &mut out,
        "vllm:external_prefix_cache_hits",
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
        l,
        &stats.external_tokens,
    );
    for (name, help, c) in [
        (
            "switchyard_sim:kv_transfer_loads",
            "D: requests whose prompt KV was read from a prefill engine.",
            &stats.kv_loads,
        ),
        (
            "switchyard_sim:kv_hand_offs",
            "P: finished requests whose KV blocks were held for a decode engine.",
            &stats.hand_offs,
        ),
        (
            "switchyard_sim:kv_hand_offs_read",
            "P: hand-offs read by a decode engine (blocks released).",
            &stats.hand_offs_read,
        ),
    ] {
        counter(&mut out, name, help, l, c);
    }
    gauge(
        &mut out,
        "switchyard_sim:kv_hand_offs_held",
        "P: hand-offs whose KV blocks are held for a decode engine now.",
        l,
        g.hand_offs_held as f64,
    );
    counter(
        &mut out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        l,
        &stats.generation_tokens,
    );
    counter(
        &mut out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        l,
        &stats.preemptions,
    );
    // vLLM's FinishReason: stop, length, abort. The simulator always stops on length, and
    // counts requests cancelled by a client disconnect as abort.
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests."
    );
    let _ = writeln!(out, "# TYPE vllm:request_success_total counter");
    for (reason, v) in [
        ("stop", 0),
        ("length", stats.completed.load(Ordering::Relaxed)),
        ("abort", stats.cancelled.load(Ordering::Relaxed)),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{l},finished_reason=\"{reason}\"}} {:?}",
            v as f64
        );
    }
    stats.ttft.render(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        l,
    );
    stats.e2e.render(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        l,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
    );
    let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{{l},block_size=\"{}\",cache_dtype=\"auto\",\
         enable_prefix_caching=\"True\",gpu_memory_utilization=\"0.9\",\
         num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\"}} 1.0",
        info.block_size, info.num_blocks
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(0.5);
        h.observe(5.0);
        assert_eq!(h.count(), 4);
        let mut s = String::new();
        h.render(&mut s, "x", "help", "a=\"b\"");
        assert!(s.contains("x_bucket{le=\"0.1\",a=\"b\"} 1.0\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1.0\",a=\"b\"} 3.0\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\",a=\"b\"} 4.0\n"), "{s}");
        assert!(s.contains("x_count{a=\"b\"} 4.0\n"), "{s}");
        assert!(s.contains("x_sum{a=\"b\"} 6.05\n"), "{s}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn render_has_model_label_and_values() {
        let stats = Stats::default();
        inc(&stats.prefix_queries, 32);
        inc(&stats.prefix_hits, 16);
        inc(&stats.preemptions, 3);
        let text = render(
            "m",
            &stats,
            Gauges {
                running: 2,
                waiting: 1,
                kv_usage: 0.25,
                hand_offs_held: 0,
            },
            CacheInfo {
                block_size: 16,
                num_blocks: 100,
            },
        );
        let l = "{model_name=\"m\",engine=\"0\"}";
        for line in [
            format!("vllm:num_requests_running{l} 2.0"),
            format!("vllm:num_requests_waiting{l} 1.0"),
            format!("vllm:kv_cache_usage_perc{l} 0.25"),
            format!("vllm:gpu_cache_usage_perc{l} 0.25"),
            format!("vllm:prefix_cache_queries_total{l} 32.0"),
            format!("vllm:prefix_cache_hits_total{l} 16.0"),
            format!("vllm:num_preemptions_total{l} 3.0"),
            "# TYPE vllm:num_preemptions_total counter".to_owned(),
            "# TYPE vllm:prefix_cache_hits_total counter".to_owned(),
            "# TYPE vllm:time_to_first_token_seconds histogram".to_owned(),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.contains("num_gpu_blocks=\"100\""));
    }
}
