//! Configuration: command-line flags (production-stack's names where the concept is the same)
//! and an optional TOML file (`--config`). Flags override the file. Unknown or inconsistent
//! settings fail at start with a message naming the setting.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admit::rate_limit::RateLimitRules;
use crate::engines::discovery::ServiceDiscovery;
use crate::policy::PolicySettings;

mod backends;
mod disagg;
mod discovery;
mod flags;
mod kv_events;
mod otlp;
mod policies;
mod queue;
mod rate_limits;

pub use backends::Backend;
use backends::backends_from;
pub use flags::{FileConfig, ServeArgs};
pub use kv_events::KvEventsSettings;
pub use otlp::{OtlpSettings, check_endpoint};
pub use policies::{policy_settings, resolve_policies_dir};
pub use queue::{QueueSettings, tenant_weights};
pub use rate_limits::rate_limit_rules;

/// A configuration error; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

/// The resolved router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub host: IpAddr,
    pub port: u16,
    /// Static backends; empty with static discovery means "start `demo_engines` simulated engines".
    pub backends: Vec<Backend>,
    /// Where engines come from: the static backends, or Kubernetes pods.
    pub discovery: ServiceDiscovery,
    pub demo_engines: usize,
    pub engine_stats_interval: Duration,
    /// A tracing filter directive (`info`, `warn`, …).
    pub log_level: String,
    pub session_key: Option<String>,
    pub policy: PolicySettings,
    pub decision_headers: bool,
    /// Bearer token required on `/admin/*`, if set.
    pub admin_token: Option<String>,
    pub max_body_bytes: usize,
    pub max_attempts: usize,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Longest gap between two request-body frames before the request is answered 408.
    pub body_read_timeout: Duration,
    /// Client connections served at once; `None`: derived from the open-file limit at start
    /// (see [`crate::proxy::conn::derive_max_connections`]).
    pub max_connections: Option<usize>,
    /// How long requests in progress may take to finish once shutdown starts.
    pub shutdown_grace: Duration,
    pub eject_after_failures: u32,
    pub health_probe_interval: Duration,
    pub prefix_index_bytes: usize,
    pub block_size: usize,
    /// The engines' tokenizer (`tokenizer.json` or a model directory), loaded when the router
    /// starts (into its `AppState`); `None`: the stand-in estimate.
    pub tokenizer: Option<PathBuf>,
    /// The most tokens of a prompt tokenized for exact matching
    /// ([`crate::tokens::bound`]).
    pub tokenize_max_tokens: usize,
    /// The config file, watched for policy settings.
    pub config_file: Option<PathBuf>,
    /// `--imbalanced-threshold`, applied to the built-in load_balanced_kvaware policy (already
    /// in `policy.dir`); kept for display.
    pub imbalanced_threshold: Option<u32>,
    /// The engines' KV-event endpoints and the exact index's budget.
    pub kv_events: KvEventsSettings,
    /// Model labels of the prefill engines (`--prefill-model-labels`).
    pub prefill_labels: Vec<String>,
    /// Model labels of the decode engines (`--decode-model-labels`).
    pub decode_labels: Vec<String>,
    /// How long the prefill leg of a disaggregated request may take (`--prefill-timeout`).
    pub prefill_timeout: Duration,
    /// Per-tenant rate limits (the file's `[[rate_limit]]` tables; hot-reloaded with it:
    /// [`rate_limit_rules`]).
    pub rate_limits: RateLimitRules,
    /// `--tenant-header` (validated header name).
    pub tenant_header: Option<String>,
    /// `--priority-header` (validated header name).
    pub priority_header: String,
    /// The router-side queue (`--engine-queue-limit` and its bounds, tenant weights).
    pub queue: QueueSettings,
    /// OpenTelemetry trace export (`--otlp-endpoint`, `--otlp-sample-ratio`).
    pub otlp: OtlpSettings,
}

impl Default for RouterConfig {
    fn default() -> RouterConfig {
        RouterConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8001,
            backends: Vec::new(),
            discovery: ServiceDiscovery::Static,
            demo_engines: 3,
            engine_stats_interval: Duration::from_secs(1),
            log_level: "info".into(),
            session_key: None,
            policy: PolicySettings::default(),
            decision_headers: false,
            admin_token: None,
            max_body_bytes: 32 * 1024 * 1024,
            max_attempts: 2,
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            max_connections: None,
            shutdown_grace: Duration::from_secs(30),
            eject_after_failures: 3,
            health_probe_interval: Duration::from_millis(500),
            prefix_index_bytes: 64 * 1024 * 1024,
            block_size: crate::tokens::DEFAULT_BLOCK_SIZE,
            tokenizer: None,
            tokenize_max_tokens: crate::tokens::bound::DEFAULT_MAX_TOKENS,
            config_file: None,
            imbalanced_threshold: None,
            kv_events: KvEventsSettings::default(),
            prefill_labels: Vec::new(),
            decode_labels: Vec::new(),
            prefill_timeout: Duration::from_secs(300),
            rate_limits: RateLimitRules::default(),
            tenant_header: None,
            priority_header: crate::admit::tenant::DEFAULT_PRIORITY_HEADER.into(),
            queue: QueueSettings::default(),
            otlp: OtlpSettings::default(),
        }
    }
}

impl RouterConfig {
    /// A config for tests and embedding: these backends, all serving `model`, everything else default.
    pub fn for_backends(urls: &[String], model: &str) -> RouterConfig {
        RouterConfig {
            port: 0,
            backends: urls
                .iter()
                .map(|u| Backend {
                    url: u.clone(),
                    models: vec![model.to_owned()],
                    label: None,
                })
                .collect(),
            ..RouterConfig::default()
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Resolves flags over the config file over defaults, and validates the result.
    pub fn resolve(args: &ServeArgs) -> Result<RouterConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let d = RouterConfig::default();
        let backends_raw = args
            .static_backends
            .clone()
            .or(file.static_backends.clone())
            .unwrap_or_default();
        let models_raw = args.static_models.clone().or(file.static_models.clone());
        let discovery = discovery::discovery_from(args, &file)?;
        if discovery.is_dynamic() {
            for (setting, given) in [
                (
                    "static_backends",
                    args.static_backends.is_some() || file.static_backends.is_some(),
                ),
                (
                    "static_models",
                    args.static_models.is_some() || file.static_models.is_some(),
                ),
                (
                    "demo_engines",
                    args.demo_engines.is_some() || file.demo_engines.is_some(),
                ),
            ] {
                if given {
                    return Err(invalid(
                        setting,
                        "not used with service_discovery = k8s (the engines are the pods found through the Kubernetes API)",
                    ));
                }
            }
        }
        let mut backends = backends_from(&backends_raw, models_raw.as_deref())?;
        let roles = disagg::roles_from(args, &file, &mut backends, discovery.is_dynamic())?;
        let discovery = match discovery {
            ServiceDiscovery::K8s(mut k) => {
                k.role_labels = roles.clone();
                ServiceDiscovery::K8s(k)
            }
            other => other,
        };
        let log_level = normalize_log_level(
            args.log_level
                .as_deref()
                .or(file.log_level.as_deref())
                .unwrap_or("info"),
        )?;
        let max_attempts = args
            .max_attempts
            .or(file.max_attempts)
            .unwrap_or(d.max_attempts);
        if max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1"));
        }
        let block_size = args.block_size.or(file.block_size).unwrap_or(d.block_size);
        if block_size == 0 {
            return Err(invalid("block_size", "must be at least 1"));
        }
        let max_body_bytes = args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(d.max_body_bytes);
        if max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be at least 1"));
        }
        let session_key = args.session_key.clone().or(file.session_key.clone());
        if let Some(k) = &session_key
            && http::HeaderName::from_bytes(k.as_bytes()).is_err()
        {
            return Err(invalid(
                "session_key",
                format!("{k:?} is not a valid header name"),
            ));
        }
        let admin_token = args.admin_token.clone().or(file.admin_token.clone());
        if let Some(t) = &admin_token
            && (t.is_empty() || http::HeaderValue::from_str(&format!("Bearer {t}")).is_err())
        {
            return Err(invalid(
                "admin_token",
                "must be non-empty printable text (it is compared with an Authorization header)",
            ));
        }
        let max_connections = args.max_connections.or(file.max_connections);
        if max_connections == Some(0) {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        let policy = policy_settings(args, &file)?;
        let kv_events =
            kv_events::kv_events_from(args, &file, backends.len(), discovery.is_dynamic())?;
        let tokenizer = args.tokenizer.clone().or(file.tokenizer.clone());
        if let Some(p) = &tokenizer
            && !p.exists()
        {
            return Err(invalid(
                "tokenizer",
                format!("{} does not exist", p.display()),
            ));
        }
        let tokenize_max_tokens = args
            .tokenize_max_tokens
            .or(file.tokenize_max_tokens)
            .unwrap_or(d.tokenize_max_tokens);
        if tokenize_max_tokens == 0 {
            return Err(invalid("tokenize_max_tokens", "must be at least 1"));
        }
        let first_byte_timeout = secs(
            "first_byte_timeout",
            args.first_byte_timeout,
            file.first_byte_timeout,
            d.first_byte_timeout,
        )?;
        let prefill_timeout = disagg::prefill_timeout(args, &file, first_byte_timeout)?;
        let rate_limits = rate_limit_rules(&file)?;
        let queue = queue::queue_settings(args, &file)?;
        let otlp = otlp::otlp_settings(args, &file)?;
        let tenant_header = args.tenant_header.clone().or(file.tenant_header.clone());
        let priority_header = args
            .priority_header
            .clone()
            .or(file.priority_header.clone())
            .unwrap_or_else(|| d.priority_header.clone());
        for (setting, value) in [
            ("tenant_header", tenant_header.as_deref()),
            ("priority_header", Some(priority_header.as_str())),
        ] {
            if let Some(v) = value
                && http::HeaderName::from_bytes(v.as_bytes()).is_err()
            {
                return Err(invalid(
                    setting,
                    format!("{v:?} is not a valid header name"),
                ));
            }
        }
        Ok(RouterConfig {
            host: args.host.or(file.host).unwrap_or(d.host),
            port: args.port.or(file.port).unwrap_or(d.port),
            backends,
            discovery,
            demo_engines: args
                .demo_engines
                .or(file.demo_engines)
                .unwrap_or(d.demo_engines),
            engine_stats_interval: secs(
                "engine_stats_interval",
                args.engine_stats_interval,
                file.engine_stats_interval,
                d.engine_stats_interval,
            )?,
            log_level,
            session_key,
            policy,
            decision_headers: args.decision_headers || file.decision_headers.unwrap_or(false),
            admin_token,
            max_body_bytes,
            max_attempts,
            connect_timeout: secs(
                "connect_timeout",
                args.connect_timeout,
                file.connect_timeout,
                d.connect_timeout,
            )?,
            first_byte_timeout,
            header_read_timeout: secs(
                "header_read_timeout",
                args.header_read_timeout,
                file.header_read_timeout,
                d.header_read_timeout,
            )?,
            idle_timeout: secs(
                "idle_timeout",
                args.idle_timeout,
                file.idle_timeout,
                d.idle_timeout,
            )?,
            body_read_timeout: secs(
                "body_read_timeout",
                args.body_read_timeout,
                file.body_read_timeout,
                d.body_read_timeout,
            )?,
            max_connections,
            shutdown_grace: secs(
                "shutdown_grace",
                args.shutdown_grace,
                file.shutdown_grace,
                d.shutdown_grace,
            )?,
            eject_after_failures: args
                .eject_after_failures
                .or(file.eject_after_failures)
                .unwrap_or(d.eject_after_failures)
                .max(1),
            health_probe_interval: secs(
                "health_probe_interval",
                args.health_probe_interval,
                file.health_probe_interval,
                d.health_probe_interval,
            )?,
            prefix_index_bytes: args
                .prefix_index_mib
                .or(file.prefix_index_mib)
                .map(|m| m * 1024 * 1024)
                .unwrap_or(d.prefix_index_bytes),
            block_size,
            tokenizer,
            tokenize_max_tokens,
            config_file: args.config.clone(),
            imbalanced_threshold: args.imbalanced_threshold.or(file.imbalanced_threshold),
            kv_events,
            prefill_labels: roles.prefill,
            decode_labels: roles.decode,
            prefill_timeout,
            rate_limits,
            tenant_header,
            priority_header,
            queue,
            otlp,
        })
    }
}

/// Reads and parses a config file (unknown keys are errors).
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// A duration in seconds from the flag, else the file, else `default`; it must be positive.
fn secs(
    setting: &'static str,
    flag: Option<f64>,
    file: Option<f64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match flag.or(file) {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e7 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(invalid(
            setting,
            format!("must be a positive number of seconds, got {s}"),
        )),
    }
}

/// Maps tracing's level names and production-stack's (`warning`, `critical`) to a filter.
pub fn normalize_log_level(level: &str) -> Result<String, ConfigError> {
    let l = level.to_ascii_lowercase();
    let norm = match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => l,
        "warning" => "warn".into(),
        "critical" | "fatal" => "error".into(),
        other => {
            return Err(invalid(
                "log_level",
                format!(
                    "unknown level {other:?} (trace, debug, info, warn|warning, error|critical)"
                ),
            ));
        }
    };
    Ok(norm)
}

#[cfg(test)]
mod tests;
