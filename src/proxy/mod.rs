//! The HTTP proxy: a hyper 1.x server (HTTP/1.1 and h2c) in front of the engines.

pub mod body;
pub mod errors;
pub mod forward;
pub mod routes;
pub mod telemetry;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::RouterConfig;
use crate::engines::Registry;
use crate::engines::health::{HealthConfig, Monitor};
use crate::policy::{PolicyStore, SettingsLoader};
use crate::prefix::PrefixIndex;
use crate::upstream::{self, HttpClient};

/// The request-id header, propagated or generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request handler needs.
pub struct AppState {
    pub cfg: RouterConfig,
    pub registry: Arc<Registry>,
    pub policies: Arc<PolicyStore>,
    pub prefix: Arc<PrefixIndex>,
    pub client: HttpClient,
    pub monitor: Arc<Monitor>,
    pub session_header: Option<HeaderName>,
    pub started_unix: u64,
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
}

/// A running router.
pub struct RunningRouter {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl RunningRouter {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then stops everything.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), &mut self.server).await;
        self.server.abort();
        self.state.monitor.shutdown();
    }

    /// Runs until the server stops (e.g. on Ctrl-C, see [`RunningRouter::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// Starts the router on `cfg.listen_addr()` (port 0 picks a free port).
pub async fn start(
    cfg: RouterConfig,
    settings_loader: Option<SettingsLoader>,
) -> Result<RunningRouter, StartError> {
    if cfg.backends.is_empty() {
        return Err(StartError::NoBackends);
    }
    let _ = telemetry::prometheus();
    let registry = Arc::new(Registry::new());
    for b in &cfg.backends {
        registry.add(&b.url, b.models.clone());
    }
    let prefix = Arc::new(PrefixIndex::new(cfg.prefix_index_bytes));
    let policies = PolicyStore::new(cfg.policy.clone(), cfg.block_size)?;
    let _ = settings_loader; // hot reload of settings is wired with the policy watcher
    let client = upstream::build_client(cfg.connect_timeout);
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
    let addr = cfg.listen_addr();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let session_header = cfg
        .session_key
        .as_deref()
        .and_then(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok());
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let state = Arc::new(AppState {
        cfg,
        registry,
        policies,
        prefix,
        client,
        monitor,
        session_header,
        started_unix,
    });
    let (tx, rx) = oneshot::channel();
    let server = tokio::spawn(accept_loop(listener, Arc::clone(&state), rx));
    tracing::info!(%addr, engines = state.registry.all().len(), policy = %state.cfg.policy.default_policy, "switchyard listening");
    Ok(RunningRouter {
        addr,
        state,
        shutdown: Some(tx),
        server,
    })
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let st = Arc::clone(&state);
        let svc = service_fn(move |req| {
            let st = Arc::clone(&st);
            async move { Ok::<_, Infallible>(routes::handle(st, req).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
