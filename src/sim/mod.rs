//! A simulated vLLM engine: OpenAI-compatible endpoints, vLLM's `/metrics`, vLLM V1's step
//! loop (chunked prefill, admission while KV blocks fit, preemption) over one KV block pool
//! shared with the prefix cache, named calibration profiles, and failure injection.
//!
//! Used in-process by the demo, the benchmark and the integration tests, and as the
//! `switchyard sim` subcommand. See `docs/sim.md` for the model, its defaults and their
//! sources.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use switchyard::sim::{SimConfig, start};
//! let engine = start(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! println!("engine at {}", engine.url());
//! engine.shutdown().await;
//! # Ok(()) }
//! ```

mod args;
mod block_pool;
pub mod cache_events;
mod delivery;
mod engine_loop;
mod faults;
mod http;
pub mod kv_publisher;
pub mod kv_ranks;
mod leases;
mod metrics;
pub mod nixl;
pub mod profile;
mod prompt;
mod scheduler;
mod text;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use args::{SimArgs, run_cli};
pub use faults::Faults;
pub use nixl::{KvLoadFailurePolicy, KvRole};
pub use profile::Profile;
pub use prompt::{ENGINE_SEED, SimHooks, engine_block_hashes};

/// Defaults: an 8B model (Llama-3.1-8B, BF16) on one A100 under vLLM, the simulator's constants
/// before its step model ([`Profile::LegacyA100`]); see `docs/sim.md`.
pub mod defaults {
    pub const MODEL: &str = "switchyard-sim";
    /// vLLM's default `max_num_seqs` for the OpenAI server on GPUs below 70 GiB or A100s.
    pub const MAX_NUM_SEQS: usize = 256;
    /// vLLM's default token budget per step for the OpenAI server on GPUs below 70 GiB or
    /// A100s (`EngineArgs.get_batch_defaults`).
    pub const MAX_NUM_BATCHED_TOKENS: usize = 2048;
    pub const BLOCK_SIZE: usize = crate::tokens::DEFAULT_BLOCK_SIZE;
    /// ≈18 GiB of KV cache at 2 MiB per 16-token block of Llama-3.1-8B.
    pub const NUM_BLOCKS: usize = 9216;
    pub const PREFILL_OVERHEAD_MS: f64 = 10.0;
    /// 16 GFLOP per token at ~50 % of an A100's 312 TFLOPS (BF16).
    pub const PREFILL_MS_PER_TOKEN: f64 = 0.1;
    /// ~75 tokens/s for one request on an A100.
    pub const ITL_MS: f64 = 13.3;
    /// ITL × 1.21 at 8 running requests (6.6× the throughput of one).
    pub const BATCH_SLOWDOWN: f64 = 7.75;
    /// `vllm bench serve`'s default output length.
    pub const DEFAULT_MAX_TOKENS: usize = 128;
    /// vLLM's default `kv_lease_duration` (NixlConnector), seconds.
    pub const KV_LEASE_SECONDS: f64 = super::leases::DEFAULT_LEASE_SECONDS;
    /// Time to read one token's KV from a prefill engine, ms: Llama-3-8B's 128 KiB per token
    /// (32 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes) over an assumed 25 GB/s (200 Gb/s
    /// RDMA) link. A derived figure, not a measurement.
    pub const KV_TRANSFER_MS_PER_TOKEN: f64 = 131_072.0 / 25e9 * 1000.0;
}

/// Configuration of one simulated engine. All durations are simulated milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Served model name; requests naming another model get a 404.
    pub model: String,
    /// Most requests in one step's batch: requests beyond this wait in a FIFO queue.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (chunked prefill: longer prefills take several steps).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity in blocks, shared by running requests and the prefix cache; 0: no KV
    /// limit and no prefix caching.
    pub num_blocks: usize,
    /// Step cost per request with a prefill chunk in the step.
    pub prefill_overhead_ms: f64,
    /// Step cost per prefill (or recomputed) token.
    pub prefill_ms_per_token: f64,
    /// Step time with one sequence in the batch.
    pub itl_ms: f64,
    /// A step of `n` sequences lasts `itl_ms × (1 + batch_slowdown × (n − 1) / max_num_seqs)`
    /// plus its prefill costs: with a full batch `1 + batch_slowdown` times a lone decode.
    pub batch_slowdown: f64,
    /// Tokens generated when a request gives no `max_tokens` (`max_completion_tokens`).
    pub default_max_tokens: usize,
    /// Wall seconds per simulated second (0.1 runs 10× faster; 0 never sleeps).
    pub time_scale: f64,
    /// Multiplies every simulated duration (2.0 = an engine twice as slow).
    pub speed_factor: f64,
    /// Fraction of inference requests answered 500.
    pub fail_rate: f64,
    /// Fraction of inference requests whose connection is closed without a response.
    pub drop_rate: f64,
    /// Read inference requests but never answer them.
    pub hang: bool,
    /// Seeds the generated words, the request ids and failure injection.
    pub seed: u64,
    /// Publish vLLM-format KV events on this ZMQ PUB endpoint (`tcp://HOST:PORT`, port 0: any).
    pub kv_events_endpoint: Option<String>,
    /// The ZMQ ROUTER endpoint answering replay requests (needs `kv_events_endpoint`).
    pub kv_events_replay_endpoint: Option<String>,
    /// The topic of every KV-event message (vLLM's `topic`; llm-d's `kv@<ip>@<model>`).
    pub kv_events_topic: String,
    /// Connect the PUB socket to `kv_events_endpoint` (a router's bound SUB socket) instead of
    /// binding it, as vLLM does when its endpoint names a host.
    pub kv_events_connect: bool,
    /// Data-parallel ranks, each publishing its own KV events on the endpoints' port + its
    /// rank (see [`kv_ranks`]) [default: 1].
    pub data_parallel_size: usize,
    /// Serve `GET /kv_event_sources` (vLLM 0.32); false answers 404, as earlier vLLM releases.
    pub serve_kv_event_sources: bool,
    /// The model's tokenizer (`tokenizer.json` or a model directory), loaded at start: the
    /// prefix cache then keys blocks by the model's token ids of each request (chat template
    /// included). `None`: the stand-in's 4 bytes per token.
    pub tokenizer: Option<std::path::PathBuf>,
    /// Prefill/decode disaggregation (vLLM's NixlConnector, pull mode): `None` ignores
    /// `kv_transfer_params`, as an engine without a KV connector.
    pub kv_role: Option<KvRole>,
    /// How long P holds a hand-off's blocks for D, simulated seconds (vLLM's
    /// `kv_lease_duration`).
    pub kv_lease_seconds: f64,
    /// D's time to load one prompt token's KV from P, simulated ms.
    pub kv_transfer_ms_per_token: f64,
    /// What D does when the load fails (vLLM's `kv_load_failure_policy`).
    pub kv_load_failure_policy: KvLoadFailurePolicy,
    /// Report `usage.prompt_tokens_details.cached_tokens` (vLLM's
    /// `--enable-prompt-tokens-details`).
    pub enable_prompt_tokens_details: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            model: defaults::MODEL.to_owned(),
            max_num_seqs: defaults::MAX_NUM_SEQS,
            max_num_batched_tokens: defaults::MAX_NUM_BATCHED_TOKENS,
            block_size: defaults::BLOCK_SIZE,
            num_blocks: defaults::NUM_BLOCKS,
            prefill_overhead_ms: defaults::PREFILL_OVERHEAD_MS,
            prefill_ms_per_token: defaults::PREFILL_MS_PER_TOKEN,
            itl_ms: defaults::ITL_MS,
            batch_slowdown: defaults::BATCH_SLOWDOWN,
            default_max_tokens: defaults::DEFAULT_MAX_TOKENS,
            time_scale: 1.0,
            speed_factor: 1.0,
            fail_rate: 0.0,
            drop_rate: 0.0,
            hang: false,
            seed: 0,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            kv_events_topic: String::new(),
            kv_events_connect: false,
            data_parallel_size: 1,
            serve_kv_event_sources: true,
            tokenizer: None,
            kv_role: None,
            kv_lease_seconds: defaults::KV_LEASE_SECONDS,
            kv_transfer_ms_per_token: defaults::KV_TRANSFER_MS_PER_TOKEN,
            kv_load_failure_policy: KvLoadFailurePolicy::Fail,
            enable_prompt_tokens_details: false,
        }
    }
}

/// Why a [`SimConfig`] cannot be run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} is too large")]
    TooLarge(&'static str),
    #[error("{0} must be a finite number >= 0, got {1}")]
    NotNonNegative(&'static str, f64),
    #[error("{0} must be within [0, 1], got {1}")]
    NotARate(&'static str, f64),
}

impl SimConfig {
    /// A configuration with every delay zero: answers as fast as the machine allows, without
    /// ever arming a timer.
    pub fn instant() -> SimConfig {
        SimConfig {
            prefill_overhead_ms: 0.0,
            prefill_ms_per_token: 0.0,
            itl_ms: 0.0,
            ..SimConfig::default()
        }
    }

    /// Checks that the configuration can be run.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("block_size", self.block_size),
            ("data_parallel_size", self.data_parallel_size),
        ] {
            if v == 0 {
                return Err(SimConfigError::Zero(name));
            }
        }
        if self.data_parallel_size > 1024 {
            return Err(SimConfigError::TooLarge("data_parallel_size"));
        }
        if self.num_blocks >= u32::MAX as usize {
            return Err(SimConfigError::TooLarge("num_blocks"));
        }
        if self.default_max_tokens == 0 {
            return Err(SimConfigError::Zero("default_max_tokens"));
        }
        for (name, v) in [
            ("prefill_overhead_ms", self.prefill_overhead_ms),
            ("prefill_ms_per_token", self.prefill_ms_per_token),
            ("itl_ms", self.itl_ms),
            ("batch_slowdown", self.batch_slowdown),
            ("time_scale", self.time_scale),
            ("speed_factor", self.speed_factor),
            ("kv_lease_seconds", self.kv_lease_seconds),
            ("kv_transfer_ms_per_token", self.kv_transfer_ms_per_token),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SimConfigError::NotNonNegative(name, v));
            }
        }
        for (name, v) in [("fail_rate", self.fail_rate), ("drop_rate", self.drop_rate)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(SimConfigError::NotARate(name, v));
            }
        }
        Ok(())
    }
}

/// Request counters of one engine (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Inference requests received (before failure injection and validation).
    pub received: u64,
    /// Requests whose every token was generated.
    pub completed: u64,
    /// Valid requests abandoned by their client (or aborted by shutdown) before completing.
    pub cancelled: u64,
    /// Requests answered 500 by failure injection.
    pub failed_injected: u64,
    /// Requests whose connection was dropped by failure injection.
    pub dropped_injected: u64,
    /// Disaggregation: the KV transfers of this engine as P or D.
    pub kv: KvCounters,
}

/// Prefill/decode hand-off counters of one engine (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCounters {
    /// Prompt tokens computed by prefill steps (tokens loaded from P or hit in the prefix
    /// cache are not; recomputations after preemption are).
    pub prefill_computed_tokens: u64,
    /// P: finished requests whose blocks were held for D.
    pub hand_offs: u64,
    /// P: hand-offs read by D (blocks released).
    pub hand_offs_read: u64,
    /// P: hand-offs whose lease expired unread (blocks released).
    pub hand_offs_expired: u64,
    /// P: reads of hand-offs released before (read already or expired), answered as vLLM
    /// 0.32 does: D reads the freed blocks without noticing.
    pub stale_reads: u64,
    /// D: requests whose prompt KV was read from P.
    pub loads: u64,
    /// D: reads that failed (P unreachable, or a hand-off P never made).
    pub load_failures: u64,
    /// D: prompt tokens loaded from P (vLLM's `external_kv_transfer` source).
    pub tokens_received: u64,
}

/// State shared by every connection of one engine.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) model: String,
    pub(crate) block_size: usize,
    pub(crate) default_max_tokens: usize,
    pub(crate) seed: u64,
    pub(crate) created: u64,
    pub(crate) sched: Arc<scheduler::Scheduler>,
    pub(crate) faults: Faults,
    pub(crate) tokenizer: Option<Arc<crate::tokens::Tokenizer>>,
    pub(crate) words: text::Words,
    pub(crate) next_id: AtomicU64,
    /// Where the block pool reports its changes (the KV-event publisher), if anywhere.
    #[allow(dead_code)]
    pub(crate) cache_events: Option<Arc<dyn cache_events::CacheEvents>>,
    /// The `GET /kv_event_sources` answer (vLLM 0.32's, for the ranks' publishers); `None`:
    /// 404, as vLLM before 0.32.
    pub(crate) kv_event_sources: Option<Vec<u8>>,
    /// The engine's own HTTP address (P's side channel in its hand-offs).
    pub(crate) addr: SocketAddr,
    /// Disaggregation settings and D's client to P.
    pub(crate) kv: KvTransfer,
}

/// One engine's disaggregation settings.
#[derive(Debug)]
pub(crate) struct KvTransfer {
    pub(crate) role: Option<KvRole>,
    /// A uuid-shaped id, fixed for the engine's life (`remote_engine_id`).
    pub(crate) engine_id: String,
    pub(crate) failure_policy: KvLoadFailurePolicy,
    pub(crate) ms_per_token: f64,
    pub(crate) prompt_tokens_details: bool,
    /// D's client to P's side channel (with a role).
    pub(crate) client: Option<crate::upstream::HttpClient>,
}

/// A running simulated engine. Dropping the handle shuts the engine down (without waiting);
/// [`SimHandle::shutdown`] does it and waits.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    engine: Arc<Engine>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// One publisher per data-parallel rank (none without KV events).
    kv_events: Vec<Arc<kv_publisher::KvPublisher>>,
}

impl SimHandle {
    /// The bound address (with the actual port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the request counters.
    pub fn counters(&self) -> SimCounters {
        let s = &self.engine.sched.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimCounters {
            received: get(&s.received),
            completed: get(&s.completed),
            cancelled: get(&s.cancelled),
            failed_injected: get(&s.failed_injected),
            dropped_injected: get(&s.dropped_injected),
            kv: KvCounters {
                prefill_computed_tokens: get(&s.prefill_computed_tokens),
                hand_offs: get(&s.hand_offs),
                hand_offs_read: get(&s.hand_offs_read),
                hand_offs_expired: get(&s.hand_offs_expired),
                stale_reads: get(&s.stale_reads),
                loads: get(&s.kv_loads),
                load_failures: get(&s.kv_load_failures),
                tokens_received: get(&s.external_tokens),
            },
        }
    }

    /// The KV-event publisher (with `kv_events_endpoint`) of rank 0.
    pub fn kv_events(&self) -> Option<&Arc<kv_publisher::KvPublisher>> {
        self.kv_events.first()
    }

    /// The KV-event publishers, one per data-parallel rank.
    pub fn kv_event_ranks(&self) -> &[Arc<kv_publisher::KvPublisher>] {
        &self.kv_events
    }

    /// Failure injection, adjustable while the engine runs.
    pub fn faults(&self) -> &Faults {
        &self.engine.faults
    }

    /// Simulated death: stops accepting and aborts every open connection and in-flight request
    /// at once (in-flight requests count as cancelled). Returns once the listening socket is
    /// closed and every connection task has ended, so the port can be bound again.
    pub async fn shutdown(self) {
        let SimHandle {
            stop,
            task,
            kv_events,
            ..
        } = self;
        drop(kv_events);
        let _ = stop.send(());
        if let Err(e) = task.await {
            tracing::warn!("simulated engine task ended abnormally: {e}");
        }
    }
}

/// Starts a simulated engine listening on `addr` (port 0 picks a free port).
pub async fn start(cfg: SimConfig, addr: SocketAddr) -> io::Result<SimHandle> {
    start_with(cfg, addr, SimHooks::default()).await
}

/// [`start`] with a shared tokenizer and/or a receiver of the prefix cache's changes.
pub async fn start_with(
    cfg: SimConfig,
    addr: SocketAddr,
    hooks: SimHooks,
) -> io::Result<SimHandle> {
    cfg.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tokenizer = match (hooks.tokenizer, &cfg.tokenizer) {
        (Some(t), _) => Some(t),
        (None, None) => None,
        (None, Some(path)) => Some(Arc::new(crate::tokens::Tokenizer::load(path).map_err(
            |e| io::Error::new(io::ErrorKind::InvalidInput, format!("--tokenizer: {e}")),
        )?)),
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets an engine restart on its port while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let addr = listener.local_addr()?;
    let kv_events = match &cfg.kv_events_endpoint {
        Some(ep) => kv_ranks::start_publishers(
            ep,
            cfg.kv_events_replay_endpoint.as_deref(),
            &kv_publisher::PublishOptions {
                topic: cfg.kv_events_topic.clone(),
                connect: cfg.kv_events_connect,
                rank: 0,
            },
            cfg.data_parallel_size,
        )
        .await
        .map_err(io::Error::other)?,
        None => Vec::new(),
    };
    let published: Option<Arc<dyn cache_events::CacheEvents>> = match kv_events.as_slice() {
        [] => None,
        [one] => Some(Arc::clone(one) as Arc<dyn cache_events::CacheEvents>),
        many => Some(Arc::new(kv_ranks::RankedEvents::new(many.to_vec()))),
    };
    let kv_event_sources = cfg
        .serve_kv_event_sources
        .then(|| kv_ranks::sources_json(&kv_events));
    let engine = Arc::new(Engine {
        model: cfg.model.clone(),
        block_size: cfg.block_size,
        default_max_tokens: cfg.default_max_tokens,
        seed: cfg.seed,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        sched: Arc::new(scheduler::Scheduler::new(
            &cfg,
            hooks.cache_events.or_else(|| published.clone()),
        )),
        faults: Faults::new(cfg.fail_rate, cfg.drop_rate, cfg.hang, cfg.seed),
        tokenizer,
        words: text::Words::new(cfg.seed),
        next_id: AtomicU64::new(0),
        cache_events: published,
        kv_event_sources,
        addr,
        kv: KvTransfer {
            role: cfg.kv_role,
            engine_id: nixl::new_engine_id(),
            failure_policy: cfg.kv_load_failure_policy,
            ms_per_token: cfg.kv_transfer_ms_per_token,
            prompt_tokens_details: cfg.enable_prompt_tokens_details,
            client: cfg
                .kv_role
                .map(|_| crate::upstream::build_client(Duration::from_secs(5))),
        },
    });
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(listener, Arc::clone(&engine), stopped));
    Ok(SimHandle {
        addr,
        engine,
        stop,
        task,
        kv_events,
    })
}

/// Spawns hyper's HTTP/2 stream tasks so that they end when the engine shuts down.
#[derive(Clone)]
struct StreamExecutor {
    stop: watch::Receiver<bool>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn serve(listener: TcpListener, engine: Arc<Engine>, mut stopped: oneshot::Receiver<()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = auto::Builder::new(StreamExecutor { stop: stop_rx });
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Also taken when the handle is dropped.
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let builder = builder.clone();
                    let engine = Arc::clone(&engine);
                    conns.spawn(async move {
                        let svc = service_fn(move |req| http::handle(Arc::clone(&engine), req));
                        if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                            tracing::debug!("simulated engine connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("simulated engine accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    conns.shutdown().await;
}
