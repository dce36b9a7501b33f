//! Engines' own KV-cache events (vLLM's `--kv-events-config`): the wire format ([`wire`],
//! [`encode`]), our ZMTP transport ([`zmtp`]: SUB and DEALER with a message-size cap), the
//! subscribers ([`subscriber`]) that keep each engine's view in the exact index
//! ([`crate::prefix::exact`]), one per data-parallel rank of an engine, complete or partial by
//! the rules of [`completeness`] (which read the engine's cache capacity, scraped from its
//! `/metrics`, through [`CacheCapacity`]), replay requests ([`replay`]) and the bound socket
//! engines connect to ([`bind`]). [`KvSubscribers`] starts and stops them with the engine set,
//! from configured endpoints or from what each engine says it publishes ([`sources`], asked by
//! [`discover`]).

pub mod bind;
pub mod completeness;
pub mod discover;
pub mod encode;
pub mod ingest;
mod metrics;
mod msgpack;
pub mod replay;
pub mod sources;
pub mod subscriber;
pub mod wire;
pub mod zmtp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Engine;
use crate::prefix::exact::ExactIndex;
use crate::upstream::HttpClient;

pub use discover::DiscoverOptions;
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

/// The running subscribers, one per (engine, data-parallel rank) followed, and the engines'
/// `/kv_event_sources` discovery tasks (`--kv-events-discover`). Dropping it stops them.
#[derive(Debug)]
pub struct KvSubscribers {
    index: Arc<ExactIndex>,
    opts: SubscriberOptions,
    /// With `--kv-events-discover`: the client and settings of the engines' discovery.
    discovery: Option<(HttpClient, DiscoverOptions)>,
    tasks: Mutex<Tasks>,
    /// The bound sockets' accept loops.
    bound: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Tasks {
    /// Per (engine, rank): its subscriber task and its metric label.
    following: HashMap<(u32, u32), Running>,
    /// Per engine asked for its `/kv_event_sources`: the task asking (kept, finished, until
    /// the engine leaves: it marks the engine as still wanted).
    discovering: HashMap<u32, JoinHandle<()>>,
}

/// A subscriber task and the metric label of its stream.
type Running = (JoinHandle<()>, Arc<str>);

impl KvSubscribers {
    pub fn new(index: Arc<ExactIndex>, opts: SubscriberOptions) -> KvSubscribers {
        self::metrics::describe();
        KvSubscribers {
            index,
            opts,
            discovery: None,
            tasks: Mutex::new(Tasks::default()),
            bound: Mutex::new(Vec::new()),
        }
    }

    /// Finds each engine's sockets by asking it (`GET /kv_event_sources`, see [`discover`])
    /// in [`Self::follow`].
    pub fn with_discovery(mut self, http: HttpClient, opts: DiscoverOptions) -> KvSubscribers {
        self.discovery = Some((http, opts));
        self
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

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts following the engine `engine` at `url` (named `name`) as it joins: with
    /// discovery, its `/kv_event_sources` is asked (retried until it answers), each rank is
    /// followed, and `fallback` is used if the engine does not serve it; without, `fallback`
    /// (if any) is followed as rank 0. Must be called within a Tokio runtime.
    pub fn follow(
        self: &Arc<Self>,
        engine: u32,
        name: &str,
        url: &str,
        fallback: Option<KvEndpoints>,
    ) {
        self.follow_with(engine, name, url, fallback, CacheCapacity::unknown());
    }

    /// [`Self::follow`] for a registered engine, whose scraped cache capacity tells when a
    /// view that started mid-stream is complete.
    pub fn follow_engine(self: &Arc<Self>, engine: &Arc<Engine>, fallback: Option<KvEndpoints>) {
        self.follow_with(
            engine.id,
            &engine.name,
            &engine.url,
            fallback,
            CacheCapacity::of(engine),
        );
    }

    fn follow_with(
        self: &Arc<Self>,
        engine: u32,
        name: &str,
        url: &str,
        fallback: Option<KvEndpoints>,
        capacity: CacheCapacity,
    ) {
        let Some((http, opts)) = &self.discovery else {
            if let Some(endpoints) = fallback {
                let mut tasks = self.tasks();
                self.start_locked(
                    &mut tasks,
                    subscriber::Target::rank0(engine, name, endpoints, capacity),
                );
            }
            return;
        };
        let job = discover::Job {
            subscribers: Arc::downgrade(self),
            http: http.clone(),
            opts: opts.clone(),
            engine,
            name: Arc::from(name),
            url: url.to_owned(),
            fallback,
            capacity,
        };
        // Spawned and recorded under the lock: the task's subscribers can only start once
        // it is recorded, and not once `stop` removed it.
        let mut tasks = self.tasks();
        let old = tasks
            .discovering
            .insert(engine, tokio::spawn(discover::run(job)));
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Starts following `endpoints` for engine `engine` (named `name` in metrics) as its rank
    /// 0, subscribed to every topic, replacing any subscriber it had. Must be called within a
    /// Tokio runtime.
    pub fn start(&self, engine: u32, name: &str, endpoints: KvEndpoints) {
        let mut tasks = self.tasks();
        self.start_locked(
            &mut tasks,
            subscriber::Target::rank0(engine, name, endpoints, CacheCapacity::unknown()),
        );
    }

    /// A discovered rank: started only while the engine is still wanted (its discovery task
    /// is recorded). False if it left meanwhile.
    fn start_discovered(&self, target: subscriber::Target) -> bool {
        let mut tasks = self.tasks();
        if !tasks.discovering.contains_key(&target.engine) {
            return false;
        }
        self.start_locked(&mut tasks, target);
        true
    }

    fn start_locked(&self, tasks: &mut Tasks, target: subscriber::Target) {
        let (engine, rank, name) = (target.engine, target.rank, Arc::clone(&target.name));
        self.index.add_rank(engine, rank);
        let task = tokio::spawn(subscriber::run(
            target,
            Arc::clone(&self.index),
            self.opts.clone(),
        ));
        if let Some((old, _)) = tasks.following.insert((engine, rank), (task, name)) {
            old.abort();
        }
    }

    /// Stops `engine`'s discovery and subscribers and drops its views.
    pub fn stop(&self, engine: u32) {
        let stopped: Vec<Running> = {
            let mut tasks = self.tasks();
            if let Some(d) = tasks.discovering.remove(&engine) {
                d.abort();
            }
            let ranks: Vec<(u32, u32)> = tasks
                .following
                .keys()
                .filter(|k| k.0 == engine)
                .copied()
                .collect();
            ranks
                .iter()
                .filter_map(|k| tasks.following.remove(k))
                .collect()
        };
        for (task, name) in stopped {
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
        let mut v: Vec<u32> = self.tasks().following.keys().map(|k| k.0).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The (engine, rank) pairs followed, with the endpoints' metric label, sorted.
    pub fn streams(&self) -> Vec<(u32, u32, Arc<str>)> {
        let mut v: Vec<(u32, u32, Arc<str>)> = self
            .tasks()
            .following
            .iter()
            .map(|(k, (_, name))| (k.0, k.1, Arc::clone(name)))
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
        let mut tasks = self.tasks();
        for (_, (task, _)) in tasks.following.drain() {
            task.abort();
        }
        for (_, task) in tasks.discovering.drain() {
            task.abort();
        }
    }
}
