//! The `switchyard sim` subcommand: its flags ([`SimArgs`]), their conversion to a
//! [`SimConfig`] and listen address, and [`run_cli`], which serves until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{KvLoadFailurePolicy, KvRole, Profile, SimConfig, defaults, start};

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not within [0, 1]"))
    }
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not a finite number >= 0"))
    }
}

/// Command-line flags of `switchyard sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name.
    #[arg(long, default_value = defaults::MODEL)]
    pub model: String,
    /// Named calibration (cost model, KV capacity, batch limits); the flags below override
    /// its values [default: legacy-a100].
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// Most requests in one step's batch; further requests wait in a FIFO queue
    /// [profile; legacy-a100: 256].
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one step (chunked prefill) [profile; legacy-a100: 2048].
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = defaults::BLOCK_SIZE)]
    pub block_size: usize,
    /// KV capacity in blocks, shared by running requests and the prefix cache (0 = no KV
    /// limit, no prefix caching) [profile; legacy-a100: 9216].
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Step cost per request with a prefill chunk in the step, simulated ms
    /// [profile; legacy-a100: 10].
    #[arg(long, value_parser = parse_non_negative)]
    pub prefill_overhead_ms: Option<f64>,
    /// Step cost per prefill token, simulated ms [profile; legacy-a100: 0.1].
    #[arg(long, value_parser = parse_non_negative)]
    pub prefill_ms_per_token: Option<f64>,
    /// Step time with one sequence, simulated ms [profile; legacy-a100: 13.3].
    #[arg(long, value_parser = parse_non_negative)]
    pub itl_ms: Option<f64>,
    /// A step of n sequences: itl × (1 + batch_slowdown × (n − 1) / max_num_seqs)
    /// [profile; legacy-a100: 7.75].
    #[arg(long, value_parser = parse_non_negative)]
    pub batch_slowdown: Option<f64>,
    /// Tokens generated when a request omits max_tokens.
    #[arg(long, default_value_t = defaults::DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: usize,
    /// Wall seconds per simulated second (0.1 runs 10x faster).
    #[arg(long, default_value_t = 1.0, value_parser = parse_non_negative)]
    pub time_scale: f64,
    /// Multiplies every simulated duration (2.0 = a 2x slower engine).
    #[arg(long, default_value_t = 1.0, value_parser = parse_non_negative)]
    pub speed_factor: f64,
    /// Fraction of inference requests answered HTTP 500.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Fraction of inference requests whose connection is closed without a response.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub drop_rate: f64,
    /// Read inference requests but never answer them.
    #[arg(long)]
    pub hang: bool,
    /// Seed of the generated words, request ids and failure injection.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Zero every delay (prefill and inter-token): measure router overhead.
    #[arg(long)]
    pub instant: bool,
    /// Publish vLLM-format KV events (ZMQ PUB) here, e.g. tcp://127.0.0.1:5557.
    #[arg(long)]
    pub kv_events_endpoint: Option<String>,
    /// Answer KV-event replay requests (ZMQ ROUTER) here, e.g. tcp://127.0.0.1:5558.
    #[arg(long, requires = "kv_events_endpoint")]
    pub kv_events_replay_endpoint: Option<String>,
    /// The topic of every KV-event message, e.g. kv@10.0.0.5@my-model (llm-d's form).
    #[arg(long, default_value = "", requires = "kv_events_endpoint")]
    pub kv_events_topic: String,
    /// Connect the KV-event PUB socket to --kv-events-endpoint (a router's --kv-events-bind
    /// socket) instead of binding it.
    #[arg(long, requires = "kv_events_endpoint")]
    pub kv_events_connect: bool,
    /// Data-parallel ranks: each publishes its KV events on the endpoints' port + its rank
    /// (as vLLM's), and /kv_event_sources lists them all.
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Answer GET /kv_event_sources with 404, as vLLM before 0.32.
    #[arg(long)]
    pub no_kv_event_sources: bool,
    /// The model's tokenizer.json or model directory: cache by its token ids (chat template
    /// included) instead of the stand-in's 4 bytes per token.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Prefill/decode disaggregation as vLLM's NixlConnector (pull mode): producer (P),
    /// consumer (D) or both (vLLM's kv_producer, kv_consumer, kv_both are accepted). Either
    /// role acts on the kv_transfer_params of a request, as vLLM's connector does; without
    /// it they are ignored.
    #[arg(long, value_enum)]
    pub kv_role: Option<KvRole>,
    /// How long P holds a hand-off's KV blocks for D, simulated seconds (vLLM's
    /// kv_lease_duration).
    #[arg(long, default_value_t = defaults::KV_LEASE_SECONDS, value_parser = parse_non_negative)]
    pub kv_lease_seconds: f64,
    /// D's time to load one prompt token's KV from P, simulated ms [default: 128 KiB per
    /// token over 25 GB/s].
    #[arg(long, value_parser = parse_non_negative)]
    pub kv_transfer_ms_per_token: Option<f64>,
    /// What D does when it cannot load a hand-off: fail the request (vLLM's default) or
    /// compute the prompt itself.
    #[arg(long, value_enum, default_value_t = KvLoadFailurePolicy::Fail)]
    pub kv_load_failure_policy: KvLoadFailurePolicy,
    /// Report usage.prompt_tokens_details.cached_tokens (vLLM's flag of the same name).
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
}

impl SimArgs {
    /// The engine configuration these flags describe.
    pub fn to_config(&self) -> SimConfig {
        let mut cfg = SimConfig::default();
        if let Some(p) = self.profile {
            p.apply(&mut cfg);
        }
        let set_usize = |v: Option<usize>, f: &mut usize| {
            if let Some(v) = v {
                *f = v;
            }
        };
        set_usize(self.max_num_seqs, &mut cfg.max_num_seqs);
        set_usize(self.max_num_batched_tokens, &mut cfg.max_num_batched_tokens);
        set_usize(self.num_blocks, &mut cfg.num_blocks);
        for (v, f) in [
            (self.prefill_overhead_ms, &mut cfg.prefill_overhead_ms),
            (self.prefill_ms_per_token, &mut cfg.prefill_ms_per_token),
            (self.itl_ms, &mut cfg.itl_ms),
            (self.batch_slowdown, &mut cfg.batch_slowdown),
        ] {
            if let Some(v) = v {
                *f = v;
            }
        }
        let cfg = SimConfig {
            model: self.model.clone(),
            block_size: self.block_size,
            default_max_tokens: self.default_max_tokens,
            time_scale: self.time_scale,
            speed_factor: self.speed_factor,
            fail_rate: self.fail_rate,
            drop_rate: self.drop_rate,
            hang: self.hang,
            seed: self.seed,
            kv_events_endpoint: self.kv_events_endpoint.clone(),
            kv_events_replay_endpoint: self.kv_events_replay_endpoint.clone(),
            kv_events_topic: self.kv_events_topic.clone(),
            kv_events_connect: self.kv_events_connect,
            data_parallel_size: self.data_parallel_size,
            serve_kv_event_sources: !self.no_kv_event_sources,
            tokenizer: self.tokenizer.clone(),
            kv_role: self.kv_role,
            kv_lease_seconds: self.kv_lease_seconds,
            kv_transfer_ms_per_token: self
                .kv_transfer_ms_per_token
                .unwrap_or(defaults::KV_TRANSFER_MS_PER_TOKEN),
            kv_load_failure_policy: self.kv_load_failure_policy,
            enable_prompt_tokens_details: self.enable_prompt_tokens_details,
            ..cfg
        };
        if self.instant {
            return SimConfig {
                prefill_overhead_ms: 0.0,
                prefill_ms_per_token: 0.0,
                itl_ms: 0.0,
                ..cfg
            };
        }
        cfg
    }

    /// The address to listen on (`--host` may be an IP address or `localhost`).
    pub fn addr(&self) -> Result<SocketAddr, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse::<IpAddr>()
                .map_err(|e| format!("--host {:?}: {e}", self.host))?
        };
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Runs `switchyard sim`: starts an engine, logs its URL and serves until Ctrl-C.
pub async fn run_cli(args: SimArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = args.addr()?;
    let cfg = args.to_config();
    let handle = start(cfg.clone(), addr).await?;
    tracing::info!(
        url = %handle.url(),
        model = %cfg.model,
        max_num_seqs = cfg.max_num_seqs,
        max_num_batched_tokens = cfg.max_num_batched_tokens,
        num_blocks = cfg.num_blocks,
        profile = ?args.profile.map(Profile::name),
        time_scale = cfg.time_scale,
        speed_factor = cfg.speed_factor,
        tokenizer = ?cfg.tokenizer,
        "simulated vLLM engine listening on {}",
        handle.url()
    );
    for p in handle.kv_event_ranks() {
        tracing::info!(rank = p.options().rank, endpoint = p.endpoint(), replay = ?p.replay_endpoint(), topic = %p.options().topic, connected = p.options().connect, "publishing KV events");
    }
    tokio::signal::ctrl_c().await?;
    tracing::info!("simulated engine shutting down");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::SimConfigError;
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn default_flags_match_default_config() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.sim.to_config(), SimConfig::default());
        assert_eq!(
            cli.sim.addr().unwrap(),
            "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
        );
        SimConfig::default().validate().unwrap();
    }

    #[test]
    fn flags_map_to_config_and_instant_zeroes_delays() {
        let cli = Cli::try_parse_from([
            "x",
            "--port",
            "0",
            "--host",
            "::1",
            "--model",
            "m",
            "--max-num-seqs",
            "3",
            "--block-size",
            "8",
            "--num-blocks",
            "5",
            "--batch-slowdown",
            "0.5",
            "--default-max-tokens",
            "9",
            "--time-scale",
            "0.1",
            "--speed-factor",
            "2",
            "--fail-rate",
            "0.25",
            "--drop-rate",
            "0.5",
            "--hang",
            "--seed",
            "7",
            "--instant",
            "--tokenizer",
            "tok.json",
            "--max-num-batched-tokens",
            "512",
        ])
        .unwrap();
        let c = cli.sim.to_config();
        assert_eq!(cli.sim.addr().unwrap(), "[::1]:0".parse().unwrap());
        assert_eq!(
            c,
            SimConfig {
                model: "m".into(),
                max_num_seqs: 3,
                max_num_batched_tokens: 512,
                block_size: 8,
                num_blocks: 5,
                prefill_overhead_ms: 0.0,
                prefill_ms_per_token: 0.0,
                itl_ms: 0.0,
                batch_slowdown: 0.5,
                default_max_tokens: 9,
                time_scale: 0.1,
                speed_factor: 2.0,
                fail_rate: 0.25,
                drop_rate: 0.5,
                hang: true,
                seed: 7,
                tokenizer: Some("tok.json".into()),
                ..SimConfig::default()
            }
        );
    }

    #[test]
    fn kv_flags_map_to_config_and_accept_vllm_role_names() {
        let cli = Cli::try_parse_from([
            "x",
            "--kv-role",
            "kv_consumer",
            "--kv-lease-seconds",
            "2.5",
            "--kv-transfer-ms-per-token",
            "0.01",
            "--kv-load-failure-policy",
            "recompute",
            "--enable-prompt-tokens-details",
        ])
        .unwrap();
        assert_eq!(
            cli.sim.to_config(),
            SimConfig {
                kv_role: Some(KvRole::Consumer),
                kv_lease_seconds: 2.5,
                kv_transfer_ms_per_token: 0.01,
                kv_load_failure_policy: KvLoadFailurePolicy::Recompute,
                enable_prompt_tokens_details: true,
                ..SimConfig::default()
            }
        );
        for (name, role) in [
            ("producer", KvRole::Producer),
            ("kv_producer", KvRole::Producer),
            ("both", KvRole::Both),
            ("kv_both", KvRole::Both),
            ("consumer", KvRole::Consumer),
        ] {
            let cli = Cli::try_parse_from(["x", "--kv-role", name]).unwrap();
            assert_eq!(cli.sim.to_config().kv_role, Some(role), "{name}");
        }
        assert!(Cli::try_parse_from(["x", "--kv-role", "prefill"]).is_err());
    }

    #[test]
    fn a_profile_sets_its_values_and_flags_override_them() {
        let cli = Cli::try_parse_from(["x", "--profile", "llama3-8b-h100", "--num-blocks", "77"])
            .unwrap();
        let c = cli.sim.to_config();
        assert_eq!(
            c,
            SimConfig {
                num_blocks: 77,
                ..Profile::Llama3_8bH100.config()
            }
        );
        let cli = Cli::try_parse_from(["x", "--profile", "legacy-a100"]).unwrap();
        assert_eq!(cli.sim.to_config(), SimConfig::default());
        assert!(Cli::try_parse_from(["x", "--profile", "nope"]).is_err());
    }

    #[test]
    fn bad_flags_and_configs_are_rejected() {
        assert!(Cli::try_parse_from(["x", "--fail-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["x", "--itl-ms", "-1"]).is_err());
        let cli = Cli::try_parse_from(["x", "--host", "nowhere"]).unwrap();
        assert!(cli.sim.addr().is_err());
        let bad = SimConfig {
            max_num_seqs: 0,
            ..SimConfig::default()
        };
        assert_eq!(bad.validate(), Err(SimConfigError::Zero("max_num_seqs")));
        let bad = SimConfig {
            time_scale: f64::NAN,
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = SimConfig {
            drop_rate: 2.0,
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
