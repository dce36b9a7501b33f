//! Engines' own KV-cache events (vLLM's `--kv-events-config`): the wire format ([`wire`],
//! [`encode`]), our ZMTP transport ([`zmtp`]: SUB and DEALER with a message-size cap), the
//! subscribers ([`subscriber`]) that keep each engine's view in the exact index
//! ([`crate::prefix::exact`]), complete or partial by the rules of [`completeness`] (which read
//! the engine's cache capacity, scraped from its `/metrics`, through [`CacheCapacity`]), replay
//! requests ([`replay`]) and the bound socket engines connect to ([`bind`]). [`KvSubscribers`]
//! starts and stops them with the engine set.

pub mod bind;
pub mod completeness;
pub mod encode;
pub mod ingest;
mod metrics;
mod msgpack;
pub mod replay;
pub mod subscriber;
pub mod wire;
pub mod zmtp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Engine;
use crate::prefix::exact::ExactIndex;

pub use metrics::describe as describe_metrics;

/// Where an engine publishes its KV events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEndpoints {
    /// The PUB socket, e.g. `tcp://10.0.0.5:5557`.
    pub events: String,
    /// The replay (ROUTER) socket, if the engine has one.
    pub replay: Option<String>,
}

/// vLLM's default KV-events port (`tcp://*:5557`).
pub const DEFAULT_EVENTS_PORT: u16 = 5557;

/// The KV-event ports of discovered engines (each engine's host, these ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEventsPorts {
    pub events: u16,
    pub replay: Option<u16>,
}

impl KvEventsPorts {
    /// The endpoints of the engine at `url` (`http://HOST:PORT`).
    pub fn endpoints_for(&self, url: &str) -> Option<KvEndpoints> {
        let uri: http::Uri = url.parse().ok()?;
        let host = uri.host()?;
        Some(KvEndpoints {
            events: format!("tcp://{host}:{}", self.events),
            replay: self.replay.map(|p| format!("tcp://{host}:{p}")),
        })
    }
}

/// How subscribers follow their streams.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// Batches followed in sequence before a view that started mid-stream counts as complete,
    /// when the engine's cache capacity is unknown (see [`completeness`]) [default: 1000].
    pub rebuild_after_batches: u64,
    /// How long one replay may take [default: 5 s].
    pub replay_timeout: Duration,
    /// Reconnection backoff bounds [default: 100 ms to 5 s].
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The message-size cap and handshake timeout of every connection.
    pub limits: zmtp::Limits,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            rebuild_after_batches: 1000,
            replay_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            limits: zmtp::Limits::default(),
        }
    }
}

/// Where a subscriber reads its engine's KV-cache capacity in blocks: the figure last scraped
/// from the engine's `/metrics` ([`super::stats`]), which the scrape loop keeps up to date. The
/// scraper writes it on the [`Engine`], the subscriber reads it there: neither calls the other.
#[derive(Debug, Clone, Default)]
pub struct CacheCapacity(Option<Arc<Engine>>);

impl CacheCapacity {
    /// `engine`'s scraped capacity.
    pub fn of(engine: &Arc<Engine>) -> CacheCapacity {
        CacheCapacity(Some(Arc::clone(engine)))
    }

    /// Always unknown.
    pub fn unknown() -> CacheCapacity {
        CacheCapacity(None)
    }

    /// The capacity in blocks, if known.
    pub fn blocks(&self) -> Option<u64> {
        self.0.as_ref()?.stats().kv_capacity_blocks
    }
}

/// The running subscribers, one per engine with an events endpoint. Dropping it stops them.
#[derive(Debug)]
pub struct KvSubscribers {
    index: Arc<ExactIndex>,
    opts: SubscriberOptions,
    tasks: Mutex<HashMap<u32, Running>>,
    /// The bound sockets' accept loops.
    bound: Mutex<Vec<JoinHandle<()>>>,
}

/// A subscriber task and the engine's name (its metric label).
type Running = (JoinHandle<()>, Arc<str>);

impl KvSubscribers {
    pub fn new(index: Arc<ExactIndex>, opts: SubscriberOptions) -> KvSubscribers {
        self::metrics::describe();
        KvSubscribers {
            index,
            opts,
            tasks: Mutex::new(HashMap::new()),
            bound: Mutex::new(Vec::new()),
        }
    }

    /// Binds a SUB socket at `endpoint` (`tcp://HOST:PORT`, port 0 for any) that engines'
    /// PUB sockets connect to, each message's topic naming its engine among `registry`'s
    /// ([`bind`]). Returns the bound address. Must be called within a Tokio runtime.
    pub async fn bind(
        &self,
        endpoint: &str,
        registry: Arc<crate::engines::Registry>,
    ) -> Result<std::net::SocketAddr, BindError> {
        let addr = zmtp::tcp_address(endpoint).map_err(|_| BindError::Endpoint(endpoint.into()))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| BindError::Bind(endpoint.into(), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| BindError::Bind(endpoint.into(), e))?;
        let task = tokio::spawn(bind::serve(
            listener,
            registry,
            Arc::clone(&self.index),
            self.opts.clone(),
        ));
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        tracing::info!(%local, "KV-event SUB socket bound: engines may connect");
        Ok(local)
    }

    pub fn index(&self) -> &Arc<ExactIndex> {
        &self.index
    }

    /// Starts following `endpoints` for `engine`, replacing any subscriber it had; a view
    /// that starts mid-stream is complete once the engine stored its cache capacity, read from
    /// the engine's scraped figures. Must be called within a Tokio runtime.
    pub fn start_for(&self, engine: &Arc<Engine>, endpoints: KvEndpoints) {
        self.spawn(
            engine.id,
            &engine.name,
            endpoints,
            CacheCapacity::of(engine),
        );
    }

    /// Starts following `endpoints` for engine `engine` (named `name` in metrics), replacing
    /// any subscriber it had, its cache capacity unknown. Must be called within a Tokio
    /// runtime.
    pub fn start(&self, engine: u32, name: &str, endpoints: KvEndpoints) {
        self.spawn(engine, name, endpoints, CacheCapacity::unknown());
    }

    fn spawn(&self, engine: u32, name: &str, endpoints: KvEndpoints, capacity: CacheCapacity) {
        self.index.add_engine(engine);
        let name: Arc<str> = Arc::from(name);
        let task = tokio::spawn(subscriber::run(
            engine,
            Arc::clone(&name),
            endpoints,
            Arc::clone(&self.index),
            self.opts.clone(),
            capacity,
        ));
        let old = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(engine, (task, name));
        if let Some((old, _)) = old {
            old.abort();
        }
    }

    /// Stops `engine`'s subscriber and drops its view.
    pub fn stop(&self, engine: u32) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&engine);
        if let Some((task, name)) = task {
            task.abort();
            ::metrics::gauge!("switchyard_kv_events_live", "engine" => name.to_string()).set(0.0);
            for gauge in [
                "switchyard_kv_events_complete",
                "switchyard_kv_events_unkeyed_blocks",
            ] {
                ::metrics::gauge!(gauge, "engine" => name.to_string()).set(0.0);
            }
        }
        self.index.remove_engine(engine);
    }

    /// The engines with a subscriber, sorted.
    pub fn engines(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

/// Why the KV-event socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0:?} is not a tcp://HOST:PORT endpoint")]
    Endpoint(String),
    #[error("cannot bind the KV-event socket {0}: {1}")]
    Bind(String, std::io::Error),
}

impl Drop for KvSubscribers {
    fn drop(&mut self) {
        for task in self
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        for (_, (task, _)) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            task.abort();
        }
    }
}
