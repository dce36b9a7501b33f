//! What can be set: the flags of `switchyard serve` ([`ServeArgs`]) and the keys of the config
//! file ([`FileConfig`]), the same names with `_`. Defaults and validation are in the parent
//! module's `RouterConfig::resolve`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

use crate::admit::rate_limit::RateLimitRule;

/// Flags of `switchyard serve`. Every flag may also be set in the config file under the same
/// name with `_` instead of `-`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Port to listen on (0 = any free port) [default: 8001].
    #[arg(long)]
    pub port: Option<u16>,
    /// Comma-separated engine base URLs, e.g. http://a:8000,http://b:8000.
    #[arg(long, value_delimiter = ',')]
    pub static_backends: Option<Vec<String>>,
    /// Comma-separated models: one per backend, or one for all.
    #[arg(long, value_delimiter = ',')]
    pub static_models: Option<Vec<String>>,
    /// Seconds between scrapes of each engine's /metrics [default: 1].
    #[arg(long)]
    pub engine_stats_interval: Option<f64>,
    /// trace, debug, info, warn|warning, error|critical [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Header (else JSON body field) holding the session key.
    #[arg(long)]
    pub session_key: Option<String>,
    /// Default routing policy (a file stem in the policies directory) [default: load_balanced_kvaware].
    #[arg(long)]
    pub routing_logic: Option<String>,
    /// Directory of policy files; it must exist [default: ./policies if it exists, else the
    /// built-in policies, read-only (`switchyard policies export DIR` writes them out)].
    #[arg(long)]
    pub policies_dir: Option<PathBuf>,
    /// production-stack's flag for `--routing-logic load_balanced_kvaware`: the `load_balance`
    /// tier's threshold, the spread of queues (running + waiting) at which the least queued
    /// engine takes the request. Applies to the built-in policies (with a policies directory,
    /// edit `load_balance(N)` in its load_balanced_kvaware.rhai) [default: 8, the policy's].
    #[arg(long)]
    pub imbalanced_threshold: Option<u32>,
    /// Seconds one script tier may run for one request; past it the tier passes [default: 0.005].
    #[arg(long)]
    pub script_time_budget: Option<f64>,
    /// Add x-switchyard-policy/-tier/-engine response headers, and x-switchyard-kv
    /// (exact|partial|approximate: the chosen engine's prefix-match source: a complete KV
    /// view, one that joined mid-stream, or the router's own index) when a tier computed
    /// prefix matches.
    #[arg(long)]
    pub decision_headers: bool,
    /// Bearer token required on /admin/* (unset: /admin/* is open; keep the router on loopback then).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest accepted request body in bytes [default: 33554432].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Engines tried per request before giving up with 502 [default: 2].
    #[arg(long)]
    pub max_attempts: Option<usize>,
    /// Seconds to connect to an engine [default: 2].
    #[arg(long)]
    pub connect_timeout: Option<f64>,
    /// Seconds to wait for an engine's response headers [default: 300].
    #[arg(long)]
    pub first_byte_timeout: Option<f64>,
    /// Seconds a client has to send its request headers [default: 10].
    #[arg(long)]
    pub header_read_timeout: Option<f64>,
    /// Seconds an idle client keep-alive connection is kept open [default: 60].
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Seconds a client may go without sending a byte of its request body before it is answered
    /// 408 and its connection closed; the timer restarts on every byte received [default: 30].
    #[arg(long)]
    pub body_read_timeout: Option<f64>,
    /// Client connections served at once; more are accepted and closed at once [default: the
    /// open-file limit (raised to its hard limit at start) minus a reserve for engine connections
    /// and other files: min(limit / 4, 4096)].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds requests in progress (streams included) may take to finish after SIGTERM or
    /// Ctrl-C, while `/health` answers 503 and no connection is accepted; connections still open
    /// then are cut [default: 30].
    #[arg(long)]
    pub shutdown_grace: Option<f64>,
    /// Consecutive failed responses (5xx, transport errors) that eject an engine [default: 3].
    #[arg(long)]
    pub eject_after_failures: Option<u32>,
    /// Seconds between health probes of an ejected engine [default: 0.5].
    #[arg(long)]
    pub health_probe_interval: Option<f64>,
    /// Memory budget of the router's prefix index in MiB [default: 64].
    #[arg(long)]
    pub prefix_index_mib: Option<usize>,
    /// Tokens per prefix block; should match the engines' --block-size [default: 16].
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Simulated engines started in-process when no backends are configured [default: 3].
    #[arg(long)]
    pub demo_engines: Option<usize>,
    /// The engines' tokenizer, for exact prefix matching: a Hugging Face `tokenizer.json`, or a
    /// model directory holding it and `tokenizer_config.json` (chat template, special tokens).
    /// Read once at start; nothing is downloaded [default: none: the 4-bytes-per-token estimate].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// With --tokenizer: the most tokens of a prompt tokenized for exact prefix matching (its
    /// first ones); lowered to a model's max_model_len when its engines' /v1/models give one.
    /// A longer prompt costs no more to tokenize [default: 131072].
    #[arg(long)]
    pub tokenize_max_tokens: Option<usize>,
    /// Where engines come from: `static` (--static-backends) or `k8s` (Ready pods found through
    /// the Kubernetes API) [default: static].
    #[arg(long)]
    pub service_discovery: Option<String>,
    /// k8s: namespace of the engine pods [default: the router pod's own namespace, else the
    /// kubeconfig context's, else default].
    #[arg(long)]
    pub k8s_namespace: Option<String>,
    /// Header whose value names the request's tenant (rate limits are per tenant); without
    /// it, a hash of the bearer token, else one anonymous tenant.
    #[arg(long)]
    pub tenant_header: Option<String>,
    /// Header carrying a request's priority: critical, standard or sheddable
    /// [default: x-priority].
    #[arg(long)]
    pub priority_header: Option<String>,
    /// Hold requests in the router: an engine is sent a request only while its waiting queue
    /// (the scraped vllm:num_requests_waiting, corrected by the router's own requests since the
    /// scrape), counting the request, stays below N: 1 = only into a free running slot, 2 = at
    /// most one waiting, ...; the others wait in the router, released in priority order and
    /// fair across tenants [default: 0: never hold].
    #[arg(long)]
    pub engine_queue_limit: Option<u32>,
    /// With --engine-queue-limit: requests that may wait in the router at once, all models
    /// together; one more is answered 429 [default: 1024].
    #[arg(long)]
    pub max_queued: Option<usize>,
    /// With --engine-queue-limit: seconds a request may wait in the router before it is
    /// answered 503 [default: 60].
    #[arg(long)]
    pub queue_timeout: Option<f64>,
    /// Comma-separated model labels, one per --static-backends entry in the same order
    /// (production-stack's flag): an engine whose label is a --prefill-model-labels value is a
    /// prefill engine, a --decode-model-labels value a decode engine, else it serves whole
    /// requests.
    #[arg(long, value_delimiter = ',')]
    pub static_model_labels: Option<Vec<String>>,
    /// Comma-separated model labels of the prefill engines (static labels, or the Kubernetes
    /// pods' --k8s-model-label values).
    #[arg(long, value_delimiter = ',')]
    pub prefill_model_labels: Option<Vec<String>>,
    /// Comma-separated model labels of the decode engines.
    #[arg(long, value_delimiter = ',')]
    pub decode_model_labels: Option<Vec<String>>,
    /// Seconds a prefill engine may take to answer the prefill leg of a disaggregated request
    /// before another prefill engine is tried (or the decode engine computes the prompt
    /// itself) [default: the first-byte timeout].
    #[arg(long)]
    pub prefill_timeout: Option<f64>,
    /// k8s: label selector of the engine pods, e.g. app=vllm [default: every pod of the namespace].
    #[arg(long)]
    pub k8s_label_selector: Option<String>,
    /// k8s: the engines' port on each pod [default: 8000].
    #[arg(long)]
    pub k8s_port: Option<u16>,
    /// k8s: pod label naming the served model, used while an engine does not answer its
    /// /v1/models (which wins); "" for none [default: model].
    #[arg(long)]
    pub k8s_model_label: Option<String>,
    /// Comma-separated ZMQ endpoints of the engines' KV events (vLLM's --kv-events-config
    /// endpoint), one per --static-backends entry in the same order, an empty entry for none,
    /// e.g. tcp://a:5557,,tcp://c:5557 [default: none: kv_lookup uses the approximate index].
    #[arg(long, value_delimiter = ',')]
    pub static_kv_events: Option<Vec<String>>,
    /// Comma-separated ZMQ endpoints of the engines' KV-event replay sockets, one per
    /// --static-backends entry, an empty entry for none [default: none].
    #[arg(long, value_delimiter = ',')]
    pub static_kv_events_replay: Option<Vec<String>>,
    /// k8s: the port every engine pod publishes KV events on (vLLM's default is 5557)
    /// [default: none: no KV events].
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// k8s: the port of every engine pod's KV-event replay socket [default: none].
    #[arg(long)]
    pub kv_events_replay_port: Option<u16>,
    /// Memory budget of the exact KV index (engines' KV events) in bytes [default: 268435456].
    #[arg(long)]
    pub kv_index_max_bytes: Option<usize>,
    /// Ask each engine where it publishes its KV events (vLLM 0.32's GET /kv_event_sources)
    /// when it joins, and follow every data-parallel rank it lists; engines that do not serve
    /// it (404) use --static-kv-events / --kv-events-port.
    #[arg(long)]
    pub kv_events_discover: bool,
    /// Comma-separated ZMQ SUB sockets to bind (tcp://HOST:PORT, * for every address) for
    /// engines whose vLLM KV-events endpoint names this router (their PUB sockets connect; a
    /// data-parallel rank N connects to PORT+N); each message's topic names its engine:
    /// kv@<ip>@<model> or kv@<ip>:<http port>@<model> [default: none].
    #[arg(long, value_delimiter = ',')]
    pub kv_events_bind: Option<Vec<String>>,
    /// Largest KV-event message kept, in bytes; larger ones are read past without being
    /// buffered, dropped and counted [default: 16777216].
    #[arg(long)]
    pub kv_events_max_message_bytes: Option<usize>,
    /// Export OpenTelemetry traces over OTLP/HTTP (protobuf) to this URL, e.g.
    /// http://localhost:4318 (/v1/traces is appended to a URL without a path) [default: the
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT variables; without
    /// them, no tracing].
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0 to 1; a client's traceparent decides for its own
    /// requests (parent-based) [default: OTEL_TRACES_SAMPLER(_ARG), else 1].
    #[arg(long)]
    pub otlp_sample_ratio: Option<f64>,
}

/// The config file. Keys are the flag names with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub static_backends: Option<Vec<String>>,
    pub static_models: Option<Vec<String>>,
    pub engine_stats_interval: Option<f64>,
    pub log_level: Option<String>,
    pub session_key: Option<String>,
    pub routing_logic: Option<String>,
    pub policies_dir: Option<PathBuf>,
    pub imbalanced_threshold: Option<u32>,
    pub script_time_budget: Option<f64>,
    pub decision_headers: Option<bool>,
    pub admin_token: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_attempts: Option<usize>,
    pub connect_timeout: Option<f64>,
    pub first_byte_timeout: Option<f64>,
    pub header_read_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub body_read_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub shutdown_grace: Option<f64>,
    pub eject_after_failures: Option<u32>,
    pub health_probe_interval: Option<f64>,
    pub prefix_index_mib: Option<usize>,
    pub block_size: Option<usize>,
    pub demo_engines: Option<usize>,
    pub tokenizer: Option<PathBuf>,
    pub tokenize_max_tokens: Option<usize>,
    pub service_discovery: Option<String>,
    pub k8s_namespace: Option<String>,
    pub k8s_label_selector: Option<String>,
    pub k8s_port: Option<u16>,
    pub k8s_model_label: Option<String>,
    pub tenant_header: Option<String>,
    pub priority_header: Option<String>,
    pub engine_queue_limit: Option<u32>,
    pub max_queued: Option<usize>,
    pub queue_timeout: Option<f64>,
    /// Deficit-round-robin weights of tenants in the router's queue: `[tenant_weights]
    /// "gold" = 4` (default 1; hot-reloaded).
    #[serde(default)]
    pub tenant_weights: BTreeMap<String, u32>,
    pub static_model_labels: Option<Vec<String>>,
    pub prefill_model_labels: Option<Vec<String>>,
    pub decode_model_labels: Option<Vec<String>>,
    pub prefill_timeout: Option<f64>,
    pub static_kv_events: Option<Vec<String>>,
    pub static_kv_events_replay: Option<Vec<String>>,
    pub kv_events_port: Option<u16>,
    pub kv_events_replay_port: Option<u16>,
    pub kv_index_max_bytes: Option<usize>,
    pub kv_events_discover: Option<bool>,
    pub kv_events_bind: Option<Vec<String>>,
    pub kv_events_max_message_bytes: Option<usize>,
    pub otlp_endpoint: Option<String>,
    pub otlp_sample_ratio: Option<f64>,
    /// Per-model policies: `[policies] "model-name" = "policy"`.
    #[serde(default)]
    pub policies: BTreeMap<String, String>,
    /// Per-tenant rate limits: `[[rate_limit]] tenant = "t1"` (or `"*"`),
    /// `requests_per_minute`, `tokens_per_minute`.
    #[serde(default)]
    pub rate_limit: Vec<RateLimitRule>,
}
