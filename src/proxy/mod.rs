//! The HTTP proxy: a hyper 1.x server (HTTP/1.1 and h2c) in front of the engines.

mod admission_reload;
mod attempt;
pub mod body;
pub mod coalesce;
pub mod conn;
mod disagg;
pub mod errors;
pub mod forward;
pub mod handoff;
pub mod headers;
pub mod kv;
pub mod routes;
pub mod telemetry;
mod usage;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::RouterConfig;
use crate::engines::Registry;
use crate::engines::discovery::{self, DiscoveryHandle};
use crate::engines::health::{HealthConfig, Monitor};
use crate::engines::kv_events::{DiscoverOptions, KvSubscribers, SubscriberOptions};
use crate::engines::models::ModelCards;
use crate::policy::{PolicyStore, SettingsLoader, WatchHandle};
use crate::prefix::PrefixIndex;
use crate::prefix::exact::ExactIndex;
use crate::upstream::{self, HttpClient};

/// The request-id header, propagated or generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request handler needs.
pub struct AppState {
    pub cfg: RouterConfig,
    /// Reads each request's tenant and priority.
    pub identify: crate::admit::tenant::Identify,
    /// The per-tenant rate limits (the config file's `[[rate_limit]]`, reloaded with it).
    pub limiter: Arc<crate::admit::rate_limit::RateLimiter>,
    /// The router's queues (`--engine-queue-limit`); `None`: requests are never held.
    pub holds: Option<Arc<crate::admit::hold::Holds>>,
    pub registry: Arc<Registry>,
    pub policies: Arc<PolicyStore>,
    pub prefix: Arc<PrefixIndex>,
    /// What each engine really caches, from its KV events (live views only).
    pub exact: Arc<ExactIndex>,
    /// The KV-event subscribers feeding `exact`, one per engine with an events endpoint.
    pub kv_events: Arc<KvSubscribers>,
    pub client: HttpClient,
    pub monitor: Arc<Monitor>,
    pub session_header: Option<HeaderName>,
    pub started_unix: u64,
    /// The engines' own `/v1/models` cards.
    pub cards: ModelCards,
    /// The cap on client connections served at once.
    pub connections: conn::ConnLimit,
    /// Set when shutdown starts: `/health` answers 503 from then on.
    pub draining: AtomicBool,
    /// The engines' tokenizer (`--tokenizer`), loaded at start (a hot reload does not re-read
    /// it: restart to change it); `None`: the stand-in estimate.
    pub tokenizer: Option<Arc<crate::tokens::Tokenizer>>,
    /// OpenTelemetry tracing (`--otlp-endpoint`); off: no span is made.
    pub otel: crate::otel::Otel,
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no backends configured")]
    NoBackends,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("policies: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Discovery(#[from] crate::engines::discovery::DiscoveryError),
    #[error("--tokenizer: {0}")]
    Tokenizer(#[from] crate::tokens::TokenizerError),
    #[error("--kv-events-bind: {0}")]
    KvEventsBind(#[from] crate::engines::kv_events::BindError),
    /// A disaggregated policy serves a model that no decode engine serves: it would never
    /// disaggregate.
    #[error(
        "model `{model}` is routed by `{policy}`, a disaggregated policy, but no static backend serving it is a decode engine (set --static-model-labels and --decode-model-labels)"
    )]
    NoDecodeEngine { model: String, policy: String },
    #[error("tracing: {0}")]
    Otel(#[from] crate::otel::OtelError),
}

/// With static backends, every model whose policy is disaggregated must have a decode engine.
fn check_pools(registry: &Registry, policies: &PolicyStore) -> Result<(), StartError> {
    let settings = policies.settings();
    for model in registry.models() {
        if policies.handoff_for(&model).is_none() {
            continue;
        }
        let has_decode = registry
            .all()
            .iter()
            .any(|e| e.serves(&model) && e.role == crate::engines::Role::Decode);
        if !has_decode {
            let policy = settings
                .per_model
                .get(&model)
                .unwrap_or(&settings.default_policy)
                .clone();
            return Err(StartError::NoDecodeEngine { model, policy });
        }
    }
    Ok(())
}

/// A running router.
pub struct RunningRouter {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<Duration>>,
    /// The accept loop; it ends with the number of connections cut at the shutdown grace.
    server: JoinHandle<usize>,
    /// Hot reload of policies and the config file (and SIGHUP); stops when dropped.
    _policy_watch: Option<WatchHandle>,
    /// Engine discovery (Kubernetes); stops when dropped.
    _discovery: Option<DiscoveryHandle>,
    /// Where the KV-event SUB sockets are bound (`--kv-events-bind`).
    pub kv_events_bound: Vec<SocketAddr>,
}

impl RunningRouter {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts down gracefully: `/health` answers 503 at once, the listener is closed (new
    /// connections are refused), idle keep-alive connections are closed, and requests in
    /// progress (streams included) may finish for up to `grace`; connections still open then
    /// are cut. Engine discovery and health monitoring run until the end. Returns how it went.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownOutcome {
        self.state.draining.store(true, Ordering::SeqCst);
        let open_at_start = self.state.connections.open();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(grace);
        }
        // The accept loop enforces the grace itself; this outer limit only guards against a
        // connection task that does not stop when aborted.
        let cut = match tokio::time::timeout(grace + Duration::from_secs(5), &mut self.server).await
        {
            Ok(Ok(cut)) => cut,
            Ok(Err(_)) => 0,
            Err(_) => {
                self.server.abort();
                self.state.connections.open()
            }
        };
        self.state.monitor.shutdown();
        self.state.otel.shutdown().await;
        ShutdownOutcome { open_at_start, cut }
    }

    /// Whether shutdown has started (`/health` answers 503).
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::SeqCst)
    }

    /// Runs until the server stops (e.g. on Ctrl-C, see [`RunningRouter::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownOutcome {
    /// Client connections open when shutdown started.
    pub open_at_start: usize,
    /// Connections still open at the end of the grace, and cut.
    pub cut: usize,
}

/// Starts the router on `cfg.listen_addr()` (port 0 picks a free port).
pub async fn start(
    cfg: RouterConfig,
    settings_loader: Option<SettingsLoader>,
) -> Result<RunningRouter, StartError> {
    if cfg.backends.is_empty() && !cfg.discovery.is_dynamic() {
        return Err(StartError::NoBackends);
    }
    let tokenizer = match &cfg.tokenizer {
        None => None,
        Some(path) => {
            let t = crate::tokens::Tokenizer::load(path)?;
            tracing::info!(tokenizer = ?t, "tokenizer loaded");
            Some(Arc::new(t))
        }
    };
    let _ = telemetry::prometheus();
    let otel = crate::otel::Otel::start(&cfg.otlp)?;
    let registry = Arc::new(Registry::new());
    let exact = Arc::new(ExactIndex::new(cfg.kv_events.max_bytes));
    let client = upstream::build_client(cfg.connect_timeout);
    let kv_options = SubscriberOptions {
        limits: crate::engines::kv_events::zmtp::Limits {
            max_message_bytes: cfg.kv_events.max_message_bytes,
            ..Default::default()
        },
        ..SubscriberOptions::default()
    };
    let mut subscribers = KvSubscribers::new(Arc::clone(&exact), kv_options);
    if cfg.kv_events.discover {
        subscribers = subscribers.with_discovery(client.clone(), DiscoverOptions::default());
    }
    let kv_events = Arc::new(subscribers);
    for (i, b) in cfg.backends.iter().enumerate() {
        let roles = crate::engines::RoleLabels {
            prefill: cfg.prefill_labels.clone(),
            decode: cfg.decode_labels.clone(),
        };
        let engine =
            registry.add_with_role(&b.url, b.models.clone(), roles.role_of(b.label.as_deref()));
        let fallback = cfg.kv_events.static_endpoints.get(i).cloned().flatten();
        kv_events.follow_engine(&engine, fallback);
    }
    let mut kv_events_bound = Vec::new();
    for endpoint in &cfg.kv_events.bind {
        kv_events_bound.push(kv_events.bind(endpoint, Arc::clone(&registry)).await?);
    }
    let prefix = Arc::new(PrefixIndex::new(cfg.prefix_index_bytes));
    let policies = PolicyStore::new(cfg.policy.clone(), cfg.block_size)?;
    let limiter = Arc::new(crate::admit::rate_limit::RateLimiter::new(
        cfg.rate_limits.clone(),
    ));
    let holds = cfg.queue.enabled().then(|| {
        crate::admit::hold::Holds::start(
            Arc::clone(&registry),
            cfg.queue.engine_queue_limit,
            crate::admit::queue::QueueLimits {
                max_queued: cfg.queue.max_queued,
                queue_timeout: cfg.queue.queue_timeout,
            },
            cfg.queue.tenant_weights.clone(),
        )
    });
    let settings_loader = admission_reload::reload_admission_too(
        settings_loader,
        cfg.config_file.clone(),
        &limiter,
        holds.as_ref(),
    );
    if !cfg.discovery.is_dynamic() {
        check_pools(&registry, &policies)?;
    }
    telemetry::register_families(&registry, &policies);
    let policy_watch = match policies.watch(cfg.config_file.clone(), settings_loader) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "policy hot reload is off: cannot watch the policies directory");
            None
        }
    };
    let monitor = Monitor::new(
        Arc::clone(&registry),
        client.clone(),
        Arc::clone(&prefix),
        HealthConfig {
            stats_interval: cfg.engine_stats_interval,
            probe_interval: cfg.health_probe_interval,
            eject_after_failures: cfg.eject_after_failures,
        },
    );
    monitor.start();
    // With a bound socket too: discovered engines that leave drop their views.
    let kv_discovered = (cfg.kv_events.discover
        || cfg.kv_events.k8s_ports.is_some()
        || !kv_events_bound.is_empty())
    .then(|| (Arc::clone(&kv_events), cfg.kv_events.k8s_ports));
    let discovery = discovery::start(
        &cfg.discovery,
        &registry,
        &monitor,
        &prefix,
        &client,
        kv_discovered,
    )
    .await?;
    let nofile = conn::raise_nofile_limit();
    let max_connections = cfg
        .max_connections
        .unwrap_or_else(|| conn::derive_max_connections(nofile.unwrap_or(1024)));
    if let Some(limit) = nofile
        && max_connections as u64 >= limit
    {
        tracing::warn!(
            max_connections,
            nofile_limit = limit,
            "max_connections is not below the open-file limit: past it, accepting fails (EMFILE) and engine connections cannot be opened"
        );
    }
    match nofile {
        Some(limit) => tracing::info!(
            max_connections,
            nofile_limit = limit,
            "client connection cap (open-file limit raised to its hard limit)"
        ),
        None => tracing::info!(
            max_connections,
            "client connection cap (open-file limit unknown)"
        ),
    }
    let addr = cfg.listen_addr();
    let listener = bind_listener(addr).map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    if let Some(w) = exposure_warning(addr.ip(), cfg.admin_token.is_some()) {
        tracing::warn!("{w}");
    }
    let session_header = cfg
        .session_key
        .as_deref()
        .and_then(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok());
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let identify = crate::admit::tenant::Identify {
        tenant_header: cfg
            .tenant_header
            .as_deref()
            .and_then(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()),
        priority_header: HeaderName::from_bytes(
            cfg.priority_header.to_ascii_lowercase().as_bytes(),
        )
        .unwrap_or_else(|_| HeaderName::from_static(crate::admit::tenant::DEFAULT_PRIORITY_HEADER)),
    };
    let state = Arc::new(AppState {
        identify,
        limiter,
        holds,
        cfg,
        registry,
        policies,
        prefix,
        exact,
        kv_events,
        client,
        monitor,
        session_header,
        started_unix,
        cards: ModelCards::new(),
        connections: conn::ConnLimit::new(max_connections),
        draining: AtomicBool::new(false),
        tokenizer,
        otel,
    });
    let (tx, rx) = oneshot::channel();
    let server = tokio::spawn(accept_loop(listener, Arc::clone(&state), rx));
    tracing::info!(%addr, engines = state.registry.all().len(), policy = %state.cfg.policy.default_policy, "switchyard listening");
    Ok(RunningRouter {
        addr,
        state,
        shutdown: Some(tx),
        server,
        _policy_watch: policy_watch,
        _discovery: discovery,
        kv_events_bound,
    })
}

/// The warning for a router reachable from other machines with `/admin/*` open.
pub fn exposure_warning(ip: std::net::IpAddr, admin_token: bool) -> Option<String> {
    (!ip.is_loopback() && !admin_token).then(|| {
        format!(
            "listening on {ip}, which is not a loopback address, with /admin/* open to anyone \
             who can reach it: set --admin-token to require a bearer token"
        )
    })
}

/// Pending connections the kernel queues for `accept` (capped by `net.core.somaxconn`). The
/// usual 128 overflows under a burst of new connections, and each dropped SYN costs its client
/// a 1 s retransmission.
const LISTEN_BACKLOG: u32 = 4096;

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: oneshot::Receiver<Duration>,
) -> usize {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer would also close idle keep-alive connections; `conn` does both.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let builder = Arc::new(builder);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut last_accept_warning: Option<std::time::Instant> = None;
    let grace = loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, "accept failed");
                        last_accept_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            grace = &mut shutdown => break grace.ok(),
        };
        // Over the cap: closed at once (dropped), never queued.
        let Some(slot) = state.connections.try_admit() else {
            tracing::debug!(%peer, max = state.connections.max(), "connection refused: at max_connections");
            drop(stream);
            continue;
        };
        conns.spawn(serve_connection(
            stream,
            peer,
            slot,
            Arc::clone(&state),
            Arc::clone(&builder),
            stop_rx.clone(),
        ));
    };
    // The sender dropped without a word (the router was dropped, not shut down): the drain
    // gets the time it always had.
    let grace = grace.unwrap_or(Duration::from_secs(10));
    drop(listener);
    let _ = stop_tx.send(true);
    let open = conns.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            grace_seconds = grace.as_secs_f64(),
            "shutting down: waiting for requests in progress"
        );
    }
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_ok() {
        return 0;
    }
    let cut = conns.len();
    tracing::warn!(
        connections = cut,
        grace_seconds = grace.as_secs_f64(),
        "shutdown grace over: cutting the connections still open"
    );
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    cut
}

/// Serves one client connection until it ends, is idle too long, sends its headers too slowly,
/// or the server shuts down (then in-progress requests may finish).
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: conn::ConnSlot,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = conn::ConnActivity::new();
    let act = Arc::clone(&activity);
    let st = Arc::clone(&state);
    let client_addr = headers::ClientAddr::new(peer);
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let client = client_addr.clone();
        let busy = act.begin();
        let http1 = req.version() < hyper::Version::HTTP_2;
        let st = Arc::clone(&st);
        async move {
            let mut resp = routes::handle(st, req, &client).await;
            resp.body_mut().set_busy_guard(busy);
            if http1 {
                resp.body_mut().set_polled_by_conn_task();
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let io = TokioIo::new(conn::WatchedIo::new(stream, Arc::clone(&activity)));
    let conn = conn::PollCounted::new(
        builder.serve_connection_with_upgrades(io, svc),
        Arc::clone(&activity),
    );
    tokio::pin!(conn);
    let (header_timeout, idle_timeout) = (state.cfg.header_read_timeout, state.cfg.idle_timeout);
    // The watchdog: looks at the connection at its next deadline, and at once when its state
    // changes (bytes on an idle connection, end of the last request), so a deadline set while
    // idle never outlives the header timeout of a request that started since.
    let watchdog = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(watchdog);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = stop.changed() => {
                conn.as_mut().inner().graceful_shutdown();
                let _ = conn.as_mut().await;
                return;
            }
            _ = activity.changed() => {}
            _ = watchdog.as_mut() => {}
        }
        match activity.check(header_timeout, idle_timeout) {
            Ok(wait) => watchdog.as_mut().reset(tokio::time::Instant::now() + wait),
            Err(reason) => {
                tracing::debug!(reason, "closing client connection");
                metrics::counter!("switchyard_client_connections_closed_total", "reason" => reason)
                    .increment(1);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_listener_without_a_token_is_warned_about() {
        let any: std::net::IpAddr = [0, 0, 0, 0].into();
        assert!(exposure_warning(any, false).is_some_and(|w| w.contains("--admin-token")));
        assert!(exposure_warning(any, true).is_none());
        assert!(exposure_warning([127, 0, 0, 2].into(), false).is_none());
        assert!(exposure_warning("::1".parse().unwrap(), false).is_none());
    }
}
