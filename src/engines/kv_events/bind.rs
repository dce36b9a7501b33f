//! The bound SUB socket (`--kv-events-bind`): engines whose vLLM endpoint names a host connect
//! their PUB sockets to the router (as llm-d deploys vLLM), and each message's topic names its
//! engine: `kv@<ip>@<model>` (llm-d) or `kv@<ip>:<port>@<model>`, the port being the engine's
//! HTTP port (to tell apart engines that share a host). An IPv6 address may be bracketed,
//! `kv@[fd00::5]:8000@m`. The engine is the known one (a static backend, or a discovered pod)
//! whose URL has that host (and port, when given); a topic that names none, or several (two
//! engines on one host and no port), is counted in `switchyard_kv_events_unknown_engine_total`
//! and dropped. The model part is not checked.
//!
//! Each publisher connection is followed on its own (one [`Stream`] per engine it speaks
//! for): every data-parallel rank of vLLM has its own PUB socket and its own sequence numbers,
//! and feeds the view of its rank (the `data_parallel_rank` of the connection's first batch)
//! in the exact index.
//! There is no replay socket here: a gap or a reconnection starts the view anew from the
//! stream. Messages over the size cap are dropped and counted under the engine their topic
//! names (`unknown` when none).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use metrics::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::subscriber::Stream;
use super::wire;
use super::zmtp::{Connection, Received, SocketType};
use super::{CacheCapacity, KvEndpoints, SubscriberOptions};
use crate::engines::{Engine, Registry};
use crate::prefix::exact::ExactIndex;

/// Most publisher connections followed at once (engines × data-parallel ranks); more are
/// closed at once.
pub const MAX_BOUND_CONNECTIONS: usize = 1024;

/// An engine as a topic names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub host: &'a str,
    pub port: Option<u16>,
    pub model: &'a str,
}

/// Reads `kv@<host>[:<port>]@<model>`.
pub fn parse_topic(topic: &[u8]) -> Option<Topic<'_>> {
    let rest = std::str::from_utf8(topic).ok()?.strip_prefix("kv@")?;
    let (addr, model) = rest.split_once('@')?;
    let (host, port) = if let Some(b) = addr.strip_prefix('[') {
        let (host, after) = b.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match addr.matches(':').count() {
            0 => (addr, None),
            1 => {
                let (h, p) = addr.split_once(':')?;
                (h, Some(p.parse().ok()?))
            }
            // A bare IPv6 address.
            _ => (addr, None),
        }
    };
    (!host.is_empty()).then_some(Topic { host, port, model })
}

/// The engine a topic names, or why none.
#[derive(Debug)]
pub enum Resolved {
    Engine(Arc<Engine>),
    Unknown,
    Ambiguous,
}

fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// An engine URL's host (without IPv6 brackets) and port.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some((host.to_owned(), port))
}

/// The engine among `engines` that `topic` names.
pub fn resolve(engines: &[Arc<Engine>], topic: &Topic<'_>) -> Resolved {
    let mut found: Option<&Arc<Engine>> = None;
    for e in engines {
        let Some((host, port)) = host_port(&e.url) else {
            continue;
        };
        if !same_host(&host, topic.host) || topic.port.is_some_and(|p| p != port) {
            continue;
        }
        if found.is_some() {
            return Resolved::Ambiguous;
        }
        found = Some(e);
    }
    found.map_or(Resolved::Unknown, |e| Resolved::Engine(Arc::clone(e)))
}

/// What every bound connection shares.
struct Shared {
    registry: Arc<Registry>,
    index: Arc<ExactIndex>,
    opts: SubscriberOptions,
    unknown: Counter,
    ambiguous: Counter,
    malformed_topic: Counter,
    /// Publisher connections past their handshake.
    connections: metrics::Gauge,
}

/// Accepts publisher connections on `listener` until aborted.
pub(super) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    index: Arc<ExactIndex>,
    opts: SubscriberOptions,
) {
    let unknown = |reason: &'static str| {
        let c = metrics::counter!("switchyard_kv_events_unknown_engine_total", "reason" => reason);
        c.increment(0);
        c
    };
    let shared = Arc::new(Shared {
        registry,
        index,
        opts,
        unknown: unknown("unknown"),
        ambiguous: unknown("ambiguous"),
        malformed_topic: unknown("malformed_topic"),
        connections: metrics::gauge!("switchyard_kv_events_bound_connections"),
    });
    shared.connections.set(0.0);
    let slots = Arc::new(Semaphore::new(MAX_BOUND_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "KV-event bind socket cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "too many KV-event publisher connections: closing this one");
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            follow(stream, peer, &shared).await;
            drop(slot);
        });
    }
}

/// Follows one publisher connection until it closes.
async fn follow(stream: TcpStream, peer: SocketAddr, sh: &Shared) {
    let mut conn = match Connection::handshake(stream, SocketType::Sub, &sh.opts.limits).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "KV-event publisher handshake failed");
            return;
        }
    };
    if let Err(e) = conn.subscribe(b"").await {
        tracing::debug!(%peer, error = %e, "KV-event publisher connection lost");
        return;
    }
    tracing::info!(%peer, "KV-event publisher connected");
    sh.connections.increment(1.0);
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    // The last topic seen and its engine: a connection speaks for one engine.
    let mut last: Option<(Bytes, u32)> = None;
    loop {
        let (topic, frames) = match conn.recv().await {
            Ok(Received::Message(frames)) => match frames.first() {
                Some(t) => (t.clone(), Some(frames)),
                None => continue,
            },
            Ok(Received::Oversized { first, bytes }) => {
                let engine = first.and_then(|t| sh.engine_for(&t, &mut last, false));
                let name = engine.as_ref().map_or("unknown", |e| &*e.name);
                metrics::counter!("switchyard_kv_events_oversized_total", "engine" => name.to_owned())
                    .increment(1);
                tracing::warn!(%peer, engine = name, bytes, cap = sh.opts.limits.max_message_bytes, "KV-event message over the size cap dropped");
                continue;
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "KV-event publisher disconnected");
                break;
            }
        };
        let Some(engine) = sh.engine_for(&topic, &mut last, true) else {
            continue;
        };
        let stream = streams.entry(engine.id).or_insert_with(|| {
            // A connection is one rank's PUB socket: its first batch says which.
            let rank = frames
                .as_ref()
                .and_then(|f| f.get(2))
                .and_then(|p| wire::decode_batch(p).ok())
                .and_then(|b| b.data_parallel_rank)
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or(0);
            sh.index.add_rank(engine.id, rank);
            let endpoints = KvEndpoints {
                events: format!("bound, from {peer}"),
                replay: None,
            };
            let mut s = Stream::new(
                engine.id,
                rank,
                &engine.name,
                endpoints,
                Arc::clone(&sh.index),
                sh.opts.clone(),
                CacheCapacity::of(&engine),
            );
            s.connected();
            s
        });
        if let Some(frames) = frames {
            stream.on_frames(&frames).await;
        }
    }
    for s in streams.values_mut() {
        s.disconnected();
    }
    sh.connections.decrement(1.0);
}

impl Shared {
    /// The registered engine `topic` names (`last` caches the previous answer); counts the
    /// topics that name none when `count` is set.
    fn engine_for(
        &self,
        topic: &Bytes,
        last: &mut Option<(Bytes, u32)>,
        count: bool,
    ) -> Option<Arc<Engine>> {
        let engines = self.registry.all();
        if let Some((t, id)) = last.as_ref()
            && t == topic
            && let Some(e) = engines.iter().find(|e| e.id == *id)
        {
            return Some(Arc::clone(e));
        }
        let counter = match parse_topic(topic) {
            None => &self.malformed_topic,
            Some(t) => match resolve(&engines, &t) {
                Resolved::Engine(e) => {
                    *last = Some((topic.clone(), e.id));
                    return Some(e);
                }
                Resolved::Unknown => &self.unknown,
                Resolved::Ambiguous => &self.ambiguous,
            },
        };
        if count {
            counter.increment(1);
            tracing::debug!(topic = %String::from_utf8_lossy(topic), "KV-event message from an unknown engine dropped");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_a_host_an_optional_port_and_a_model() {
        fn t(s: &str) -> Option<(&str, Option<u16>, &str)> {
            parse_topic(s.as_bytes()).map(|t| (t.host, t.port, t.model))
        }
        assert_eq!(
            t("kv@10.0.0.5@meta/llama"),
            Some(("10.0.0.5", None, "meta/llama"))
        );
        assert_eq!(
            t("kv@127.0.0.1:8001@m"),
            Some(("127.0.0.1", Some(8001), "m"))
        );
        assert_eq!(t("kv@[fd00::5]:8000@m"), Some(("fd00::5", Some(8000), "m")));
        assert_eq!(t("kv@[fd00::5]@m"), Some(("fd00::5", None, "m")));
        assert_eq!(t("kv@fd00::5@m"), Some(("fd00::5", None, "m")));
        assert_eq!(t("kv@host@"), Some(("host", None, "")));
        for bad in [
            "",
            "kv@",
            "kv@10.0.0.5",
            "x@10.0.0.5@m",
            "kv@@m",
            "kv@h:port@m",
            "kv@[::1@m",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(parse_topic(b"kv@\xff@m"), None);
    }

    #[test]
    fn engines_are_matched_by_address() {
        let registry = Registry::new();
        let a = registry.add("http://127.0.0.1:8001", vec!["m".into()]);
        let b = registry.add("http://127.0.0.1:8002", vec!["m".into()]);
        let pod = registry.add("http://10.0.0.5:8000", vec!["m".into()]);
        let v6 = registry.add("http://[fd00::5]:8000", vec!["m".into()]);
        let all = registry.all();
        let id = |topic: &str| match resolve(&all, &parse_topic(topic.as_bytes()).unwrap()) {
            Resolved::Engine(e) => Ok(e.id),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(id("kv@127.0.0.1:8001@m"), Ok(a.id));
        assert_eq!(id("kv@127.0.0.1:8002@m"), Ok(b.id));
        assert_eq!(id("kv@10.0.0.5@m"), Ok(pod.id));
        assert_eq!(id("kv@10.0.0.5:8000@m"), Ok(pod.id));
        assert_eq!(id("kv@fd00:0::5@m"), Ok(v6.id));
        assert_eq!(id("kv@[fd00::5]:8000@m"), Ok(v6.id));
        assert_eq!(id("kv@127.0.0.1@m"), Err("Ambiguous".into()));
        assert_eq!(id("kv@10.0.0.5:9000@m"), Err("Unknown".into()));
        assert_eq!(id("kv@10.0.0.6@m"), Err("Unknown".into()));
    }
}
