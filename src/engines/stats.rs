//! Engine figures scraped from `GET /metrics` (vLLM's Prometheus text format): the few samples
//! routing needs, read by [`parse_vllm_metrics`] and summed over the engine's label sets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use crate::upstream::{self, GetError, HttpClient};

/// Largest `/metrics` page read from an engine; a larger one fails the scrape (the engine's
/// figures are marked stale) without costing the router more than this.
pub const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// The figures last scraped from an engine's `/metrics`, summed over its label sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScrapedStats {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
    pub prefix_queries: f64,
    pub prefix_hits: f64,
    /// The KV-cache capacity of one of the engine's data-parallel ranks in blocks (from
    /// `vllm:cache_config_info{num_gpu_blocks}`, see [`VllmFigures`]), if its page says.
    pub kv_capacity_blocks: Option<u64>,
    /// When the figures were scraped; `None` if never.
    pub scraped_at: Option<Instant>,
    /// The router's in-flight count for the engine at scrape time.
    pub in_flight_at_scrape: u64,
    /// Whether the last scrape failed (the figures are from an earlier one).
    pub stale: bool,
    /// The running slots learned from the scrapes so far (set by [`Engine::set_stats`], see
    /// [`super::room`]); `None` until the engine is seen with requests waiting.
    pub running_slots: Option<f64>,
    /// The most requests seen running at any scrape (set by [`Engine::set_stats`]).
    pub running_max: f64,
    /// Whether `running_slots` is the engine's real limit: it was seen full with requests
    /// waiting at the same running count on two scrapes in a row (set by
    /// [`Engine::set_stats`]).
    pub slots_confirmed: bool,
    pub last_error: Option<String>,
}

/// The vLLM figures found in a `/metrics` text.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VllmFigures {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
    pub prefix_queries: f64,
    pub prefix_hits: f64,
    /// The KV-cache capacity of one data-parallel rank in blocks, from the `num_gpu_blocks`
    /// label of `vllm:cache_config_info`. vLLM 0.32 writes one sample per data-parallel engine
    /// of the API server (label `engine`), each with the API server's total, summed over its
    /// engines (`vllm/v1/engine/core_client.py`): one rank's is the total over the number of
    /// samples (older releases write one sample). `None` when absent or not a positive
    /// integer (`"None"` before vLLM has profiled its memory).
    pub kv_capacity_blocks: Option<u64>,
}

/// Parses vLLM figures from Prometheus text. `vllm:kv_cache_usage_perc` is preferred; the older
/// `vllm:gpu_cache_usage_perc` is used when it is absent. The cache capacity is the
/// `num_gpu_blocks` label of the info gauge `vllm:cache_config_info`. Counters may carry a `_total` suffix or
/// not, so both spellings are accepted; `_created` samples (prometheus_client's counter
/// timestamps) are not counters and are ignored.
///
/// A reader of just these samples, not a general Prometheus parser: each sample line is
/// `name[{labels}] value [timestamp]`, labels are skipped (quoted values may hold `}`, `,`, and
/// escaped quotes; only the info gauge's are read), every label set of a name is summed. Malformed lines are skipped; a
/// non-empty page with no readable sample at all is an error.
pub fn parse_vllm_metrics(text: &str) -> Result<VllmFigures, String> {
    let mut f = VllmFigures::default();
    let (mut kv_new, mut kv_old) = (None::<f64>, None::<f64>);
    let (mut samples, mut malformed) = (0usize, 0usize);
    let (mut total_blocks, mut cache_infos) = (0u64, 0u64);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            malformed += 1;
            continue;
        };
        samples += 1;
        if !value.is_finite() {
            continue;
        }
        let name = name.strip_suffix("_total").unwrap_or(name);
        match name {
            "vllm:num_requests_running" => f.running += value,
            "vllm:num_requests_waiting" => f.waiting += value,
            "vllm:kv_cache_usage_perc" => *kv_new.get_or_insert(0.0) += value,
            "vllm:gpu_cache_usage_perc" => *kv_old.get_or_insert(0.0) += value,
            "vllm:prefix_cache_queries" => f.prefix_queries += value,
            "vllm:prefix_cache_hits" => f.prefix_hits += value,
            "vllm:cache_config_info" => {
                if let Some(blocks) = label_value(labels, "num_gpu_blocks")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&b| b > 0)
                {
                    total_blocks = total_blocks.max(blocks);
                    cache_infos += 1;
                }
            }
            _ => {}
        }
    }
    if samples == 0 && malformed > 0 {
        return Err(format!(
            "unparseable metrics: none of {malformed} lines is a Prometheus sample"
        ));
    }
    f.kv_usage = kv_new.or(kv_old).unwrap_or(0.0);
    f.kv_capacity_blocks = (cache_infos > 0).then(|| (total_blocks / cache_infos).max(1));
    Ok(f)
}

/// The name, label set (`{...}` or empty) and value of one sample line, or `None` if it is not
/// one.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
    let name = &line[..name_end];
    let valid_name = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !valid_name {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        let end = labels_end(rest)?;
        (labels, rest) = rest.split_at(end);
    }
    let value = rest.split_ascii_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// The value of label `key` in a label set `{k="v",...}`, if it is there and needs no
/// unescaping (the numbers read here never do).
fn label_value<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels.strip_prefix('{')?;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let (k, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        // The closing quote: the first one not escaped.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        if k.trim() == key {
            let v = &after[..end];
            return (!v.contains('\\')).then_some(v);
        }
        rest = &after[end + 1..];
    }
}

/// The byte offset just past the `}` closing the label set that `s` starts with.
fn labels_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (false, _, '"') => quoted = true,
            (false, _, '}') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// A failed scrape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ScrapeFailure {
    pub message: String,
    /// The connection was refused or could not be made (as opposed to a slow or bad answer).
    pub unreachable: bool,
    /// The engine answered 2xx, but with a page that cannot be used (over the cap, or not
    /// Prometheus text): its figures are stale, yet it is no sign of ill health (the engine is
    /// not ejected for it).
    pub unusable_page: bool,
}

impl ScrapeFailure {
    fn new(message: impl Into<String>) -> ScrapeFailure {
        ScrapeFailure {
            message: message.into(),
            unreachable: false,
            unusable_page: false,
        }
    }
}

impl From<GetError> for ScrapeFailure {
    fn from(e: GetError) -> ScrapeFailure {
        ScrapeFailure {
            unreachable: matches!(e, GetError::Connect(_)),
            unusable_page: matches!(e, GetError::TooLarge(_)),
            message: e.to_string(),
        }
    }
}

/// Scrapes one engine: on success stores fresh figures, on failure marks them stale (keeping
/// the old figures, whose age stays visible) and returns why.
pub async fn scrape_engine(
    client: &HttpClient,
    engine: &Arc<Engine>,
    timeout: Duration,
) -> Result<(), ScrapeFailure> {
    let url = format!("{}/metrics", engine.url);
    let failure = match upstream::get(client, &url, timeout, MAX_METRICS_BYTES).await {
        Ok(body) => match std::str::from_utf8(&body)
            .map_err(|e| e.to_string())
            .and_then(parse_vllm_metrics)
        {
            Ok(f) => {
                engine.set_stats(ScrapedStats {
                    running: f.running,
                    waiting: f.waiting,
                    kv_usage: f.kv_usage,
                    prefix_queries: f.prefix_queries,
                    prefix_hits: f.prefix_hits,
                    kv_capacity_blocks: f.kv_capacity_blocks,
                    scraped_at: Some(Instant::now()),
                    in_flight_at_scrape: engine.in_flight(),
                    stale: false,
                    last_error: None,
                    running_slots: None,
                    running_max: 0.0,
                    slots_confirmed: false,
                });
                return Ok(());
            }
            Err(message) => ScrapeFailure {
                unusable_page: true,
                ..ScrapeFailure::new(message)
            },
        },
        Err(e) => ScrapeFailure::from(e),
    };
    if failure.unusable_page && !engine.stats().stale {
        // A configuration problem the operator should see, once per fresh-to-stale change.
        tracing::warn!(engine = %engine.name, error = %failure.message, "engine /metrics page unusable: its figures are stale until it is fixed");
    }
    engine.mark_stats_stale(failure.message.clone());
    metrics::counter!("switchyard_engine_scrape_failures_total", "engine" => engine.name.to_string()).increment(1);
    tracing::debug!(engine = %engine.name, error = %failure.message, "metrics scrape failed");
    Err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="m"} 250.0
"#;

    #[test]
    fn sums_label_sets_and_prefers_new_kv_name() {
        let f = parse_vllm_metrics(TEXT).unwrap();
        assert_eq!(
            f,
            VllmFigures {
                running: 4.0,
                waiting: 2.0,
                kv_usage: 0.25,
                prefix_queries: 1000.0,
                prefix_hits: 250.0,
                kv_capacity_blocks: None,
            }
        );
    }

    #[test]
    fn reads_the_page_prometheus_client_writes_for_vllm() {
        // Written by prometheus_client with vLLM's metric definitions (two data-parallel
        // engines): tests/fixtures/gen_vllm_metrics.py.
        let text = include_str!("../../tests/fixtures/vllm-metrics.txt");
        let f = parse_vllm_metrics(text).unwrap();
        assert_eq!(
            f,
            VllmFigures {
                running: 5.0,
                waiting: 5.0,
                kv_usage: 1.0,
                prefix_queries: 4000.0,
                prefix_hits: 1000.0,
                kv_capacity_blocks: Some(27413),
            }
        );
        // Without the new KV name, the old one is used.
        let old: String = text
            .lines()
            .filter(|l| !l.contains("vllm:kv_cache_usage_perc"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_vllm_metrics(&old).unwrap().kv_usage, 2.0);
    }

    #[test]
    fn labels_may_hold_braces_commas_and_escaped_quotes() {
        let text = "vllm:num_requests_running{a=\"x}\",b=\"q \\\" } y\",engine=\"0\"} 3 1712000000000\n\
                    vllm:num_requests_running 2\n\
                    vllm:num_requests_waiting{engine=\"0\"} NaN\n";
        let f = parse_vllm_metrics(text).unwrap();
        assert_eq!(f.running, 5.0);
        assert_eq!(f.waiting, 0.0, "NaN is skipped");
        assert!(parse_vllm_metrics("<html>not metrics</html>\n").is_err());
    }

    #[test]
    fn the_cache_capacity_is_num_gpu_blocks_shared_by_the_data_parallel_engines() {
        let info = |labels: &str| format!("vllm:cache_config_info{{{labels}}} 1.0\n");
        let capacity = |text: &str| parse_vllm_metrics(text).unwrap().kv_capacity_blocks;
        assert_eq!(
            capacity(&info(
                r#"a="x\",num_gpu_blocks=\"1\"",num_gpu_blocks="640",z="}""#
            )),
            Some(640),
            "a quoted look-alike is no label"
        );
        // vLLM 0.32 with two data-parallel engines: each sample has the summed figure.
        let two_ranks = info(r#"engine="0",num_gpu_blocks="1000""#)
            + info(r#"engine="1", num_gpu_blocks="1000""#).as_str();
        assert_eq!(capacity(&two_ranks), Some(500), "per rank");
        assert_eq!(capacity(&info(r#"num_gpu_blocks="None""#)), None);
        assert_eq!(capacity(&info(r#"num_gpu_blocks="0""#)), None);
        assert_eq!(capacity(&info(r#"block_size="16""#)), None);
        assert_eq!(capacity("vllm:cache_config_info 1.0\n"), None);
    }

    #[test]
    fn falls_back_to_old_kv_name_and_tolerates_garbage() {
        let f = parse_vllm_metrics("vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n").unwrap();
        assert_eq!(f.kv_usage, 0.5);
        assert_eq!(parse_vllm_metrics("").unwrap(), VllmFigures::default());
        // Whatever the text, parsing never panics; readable samples count despite garbage.
        let _ = parse_vllm_metrics("vllm:num_requests_running{ 1\n\u{0}");
        let f = parse_vllm_metrics("garbage here\nvllm:num_requests_waiting 2\n").unwrap();
        assert_eq!(f.waiting, 2.0);
    }
}
