//! One run's cluster: fresh simulated engines on their own loopback ports and the real router
//! in front of them, running one policy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::config::RouterConfig;
use crate::engines::kv_events::KvEndpoints;
use crate::engines::stats::parse_vllm_metrics;
use crate::proxy::{self, RunningRouter};
use crate::sim::SimHooks;
use crate::sim::{self, SimConfig, SimCounters, SimHandle};
use crate::tokens::Tokenizer;
use crate::upstream;

use super::BenchError;
use super::driver::SESSION_HEADER;
use super::stats::EngineFigures;
use super::text::mix;

/// A ZMQ endpoint on any free loopback port.
const LOOPBACK_ANY_PORT: &str = "tcp://127.0.0.1:0";

/// The engines of every run.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub engines: usize,
    pub model: String,
    /// Wall seconds per simulated second.
    pub time_scale: f64,
    /// Engine 0's `speed_factor` (2.0 = twice as slow).
    pub slow_engine: Option<f64>,
    /// The simulated engines' profile (`None`: the sim's default, `legacy-a100`).
    pub engine_profile: Option<sim::Profile>,
    /// Overrides of the profile's values.
    pub max_num_seqs: Option<usize>,
    pub num_blocks: Option<usize>,
    /// The router's scrape interval of engine `/metrics`, simulated seconds.
    pub engine_stats_interval: f64,
    /// Seeds the engines' generated words.
    pub seed: u64,
    /// Router replicas in front of the same engines (each with its own prefix index).
    pub router_replicas: usize,
    /// The model's tokenizer: the engines cache by its token ids (and render chat templates);
    /// the routers get it too when `exact_kv` is set.
    pub tokenizer: Option<PathBuf>,
    /// The engines publish KV events and the routers follow them (needs `tokenizer`).
    pub exact_kv: bool,
    /// Prefill and decode engines (`None`: every engine aggregated).
    pub pd: Option<super::pd::PdSplit>,
}

impl ClusterSpec {
    /// The configuration of engine `i`: its profile's, with the spec's overrides. With another
    /// `max_num_seqs` than the profile's, `batch_slowdown` is scaled by the same ratio, so that
    /// each sequence in a step costs what the profile says (the step time is
    /// `itl × (1 + batch_slowdown × (n − 1) / max_num_seqs)` for `n` sequences).
    pub fn sim_config(&self, i: usize) -> SimConfig {
        let d = self
            .engine_profile
            .map(sim::Profile::config)
            .unwrap_or_default();
        let max_num_seqs = self.max_num_seqs.unwrap_or(d.max_num_seqs);
        let mut cfg = SimConfig {
            batch_slowdown: d.batch_slowdown * max_num_seqs as f64 / d.max_num_seqs as f64,
            model: self.model.clone(),
            time_scale: self.time_scale,
            speed_factor: match (i, self.slow_engine) {
                (0, Some(f)) => f,
                _ => d.speed_factor,
            },
            max_num_seqs,
            num_blocks: self.num_blocks.unwrap_or(d.num_blocks),
            seed: mix(self.seed, i as u64 + 1),
            tokenizer: self.tokenizer.clone(),
            // Events (with replay, so that a subscriber joining late misses nothing) only
            // when the routers follow them.
            kv_events_endpoint: self.exact_kv.then(|| LOOPBACK_ANY_PORT.to_owned()),
            kv_events_replay_endpoint: self.exact_kv.then(|| LOOPBACK_ANY_PORT.to_owned()),
            ..d
        };
        if let Some(split) = self.pd {
            split.configure_engine(i, &mut cfg);
        }
        cfg
    }
}

/// The sum over label sets of the samples of `name` in Prometheus text (exact name match).
pub fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if let Some(labels) = rest.strip_prefix('{') {
                &labels[labels.find('}')? + 1..]
            } else {
                rest
            };
            if !rest.starts_with(' ') {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .filter(|v| v.is_finite())
        .sum()
}

/// Simulated engines and the router replicas in front of them.
pub struct Cluster {
    sims: Vec<SimHandle>,
    routers: Vec<RunningRouter>,
    /// A P/D cluster (prefill and decode engines).
    pd: bool,
}

impl Cluster {
    /// Starts `spec.engines` fresh engines and `spec.router_replicas` routers (at least one)
    /// running `policy` from `policies_dir`.
    pub async fn start(
        spec: &ClusterSpec,
        policies_dir: &Path,
        policy: &str,
    ) -> Result<Cluster, BenchError> {
        Cluster::start_configured(spec, policies_dir, policy, |_| {}).await
    }

    /// [`Cluster::start`], with `configure` applied to the routers' configuration last (e.g.
    /// the tenant header and the router-side queue of `--tenants`).
    pub async fn start_configured(
        spec: &ClusterSpec,
        policies_dir: &Path,
        policy: &str,
        configure: impl FnOnce(&mut RouterConfig),
    ) -> Result<Cluster, BenchError> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        // One tokenizer shared by the engines (loaded once).
        let tokenizer = match &spec.tokenizer {
            Some(p) => Some(Arc::new(Tokenizer::load(p).map_err(|e| {
                BenchError::Args(format!("--tokenizer {}: {e}", p.display()))
            })?)),
            None => None,
        };
        let mut sims = Vec::with_capacity(spec.engines);
        for i in 0..spec.engines {
            let hooks = SimHooks {
                tokenizer: tokenizer.clone(),
                cache_events: None,
            };
            match sim::start_with(spec.sim_config(i), loopback, hooks).await {
                Ok(s) => sims.push(s),
                Err(e) => {
                    for s in sims {
                        s.shutdown().await;
                    }
                    return Err(BenchError::Sim(e));
                }
            }
        }
        let urls: Vec<String> = sims.iter().map(SimHandle::url).collect();
        let mut cfg = RouterConfig::for_backends(&urls, &spec.model);
        if spec.exact_kv {
            cfg.tokenizer = spec.tokenizer.clone();
            cfg.kv_events.static_endpoints = sims
                .iter()
                .map(|s| {
                    s.kv_events().map(|p| KvEndpoints {
                        events: p.endpoint().to_owned(),
                        replay: p.replay_endpoint().map(str::to_owned),
                    })
                })
                .collect();
        }
        if let Some(split) = spec.pd {
            split.configure_router(&mut cfg);
        }
        cfg.policy.dir = policies_dir.to_owned();
        cfg.policy.default_policy = policy.to_owned();
        cfg.session_key = Some(SESSION_HEADER.to_owned());
        cfg.decision_headers = true;
        cfg.block_size = spec.sim_config(0).block_size;
        cfg.engine_stats_interval =
            Duration::from_secs_f64((spec.engine_stats_interval * spec.time_scale).max(0.01));
        configure(&mut cfg);
        let mut cluster = Cluster {
            sims,
            routers: Vec::new(),
            pd: spec.pd.is_some(),
        };
        for _ in 0..spec.router_replicas.max(1) {
            match proxy::start(cfg.clone(), None).await {
                Ok(router) => cluster.routers.push(router),
                Err(e) => {
                    cluster.shutdown().await;
                    return Err(BenchError::Router {
                        policy: policy.to_owned(),
                        source: e,
                    });
                }
            }
        }
        Ok(cluster)
    }

    /// The (first) router's base URL.
    pub fn url(&self) -> String {
        self.routers
            .first()
            .map(RunningRouter::url)
            .unwrap_or_default()
    }

    /// Every router replica's base URL.
    pub fn urls(&self) -> Vec<String> {
        self.routers.iter().map(RunningRouter::url).collect()
    }

    /// The engines as the router names them (`host:port`), in cluster order.
    pub fn engine_names(&self) -> Vec<String> {
        self.sims.iter().map(|s| s.addr().to_string()).collect()
    }

    /// Each engine's request counters.
    pub fn counters(&self) -> Vec<SimCounters> {
        self.sims.iter().map(SimHandle::counters).collect()
    }

    /// What the engines reported: the prefix-cache hit rate over all engines (the sum of hit
    /// tokens over the sum of queried tokens) and their mean TTFT, from each engine's `/metrics`.
    pub async fn engine_figures(&self) -> Result<EngineFigures, BenchError> {
        let client = upstream::build_client(Duration::from_secs(2));
        let (mut hits, mut queries, mut ttft_sum, mut ttft_count) = (0.0, 0.0, 0.0, 0.0);
        let mut preemptions = 0.0;
        for s in &self.sims {
            let url = format!("{}/metrics", s.url());
            let body = upstream::get(
                &client,
                &url,
                Duration::from_secs(5),
                crate::engines::stats::MAX_METRICS_BYTES,
            )
            .await
            .map_err(|e| BenchError::Metrics(format!("{url}: {e}")))?;
            let text = String::from_utf8_lossy(&body);
            let f = parse_vllm_metrics(&text)
                .map_err(|e| BenchError::Metrics(format!("{url}: {e}")))?;
            hits += f.prefix_hits;
            queries += f.prefix_queries;
            ttft_sum += sample_sum(&text, "vllm:time_to_first_token_seconds_sum");
            ttft_count += sample_sum(&text, "vllm:time_to_first_token_seconds_count");
            preemptions += sample_sum(&text, "vllm:num_preemptions_total");
        }
        Ok(EngineFigures {
            cache_hit_rate: (queries > 0.0).then(|| hits / queries),
            ttft_mean: (ttft_count > 0.0).then(|| ttft_sum / ttft_count),
            preemptions: Some(preemptions as u64),
            kv_transferred_tokens: self.pd.then(|| {
                self.sims
                    .iter()
                    .map(|s| s.counters().kv.tokens_received)
                    .sum()
            }),
        })
    }

    /// Stops the routers, then the engines.
    pub async fn shutdown(self) {
        for r in self.routers {
            r.shutdown(Duration::from_millis(200)).await;
        }
        for s in self.sims {
            s.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_by_exact_name() {
        let text = "# TYPE vllm:time_to_first_token_seconds histogram\n\
vllm:time_to_first_token_seconds_bucket{le=\"0.1\",model_name=\"m\"} 3\n\
vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"m\"} 1.5\n\
vllm:time_to_first_token_seconds_sum{engine=\"1\",model_name=\"m\"} 0.5\n\
vllm:time_to_first_token_seconds_count 4\n\
vllm:time_to_first_token_seconds_count_other 9\n";
        assert_eq!(
            sample_sum(text, "vllm:time_to_first_token_seconds_sum"),
            2.0
        );
        assert_eq!(
            sample_sum(text, "vllm:time_to_first_token_seconds_count"),
            4.0
        );
        assert_eq!(sample_sum(text, "nothing"), 0.0);
    }

    #[test]
    fn engine_configs() {
        let spec = ClusterSpec {
            engines: 3,
            model: "m".into(),
            time_scale: 0.1,
            slow_engine: Some(2.0),
            engine_profile: None,
            max_num_seqs: Some(32),
            num_blocks: Some(100),
            engine_stats_interval: 1.0,
            seed: 5,
            router_replicas: 1,
            tokenizer: None,
            exact_kv: false,
            pd: None,
        };
        let d = SimConfig::default();
        let (a, b) = (spec.sim_config(0), spec.sim_config(1));
        assert_eq!((a.speed_factor, b.speed_factor), (2.0, 1.0));
        assert_eq!(
            (a.time_scale, a.model.as_str(), a.num_blocks),
            (0.1, "m", 100)
        );
        assert_ne!(a.seed, b.seed);
        // Same slowdown per additional running request as the sim's default.
        let slope = |c: &SimConfig| c.batch_slowdown / c.max_num_seqs as f64;
        assert!((slope(&a) - slope(&d)).abs() < 1e-12);
        let none = ClusterSpec {
            max_num_seqs: None,
            ..spec.clone()
        };
        assert_eq!(none.sim_config(1).batch_slowdown, d.batch_slowdown);
        // A profile's values, with the spec's overrides and the same cost per sequence.
        let h100 = ClusterSpec {
            engine_profile: Some(sim::Profile::Llama3_8bH100),
            num_blocks: None,
            ..spec
        };
        let (c, p) = (h100.sim_config(1), sim::Profile::Llama3_8bH100.config());
        assert_eq!((c.max_num_seqs, c.num_blocks), (32, p.num_blocks));
        assert_eq!(c.max_num_batched_tokens, p.max_num_batched_tokens);
        assert!((slope(&c) - slope(&p)).abs() < 1e-12);
    }
}
