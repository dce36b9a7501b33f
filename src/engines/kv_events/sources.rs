//! vLLM's `GET /kv_event_sources` (vLLM 0.32): what each data-parallel rank of an engine
//! publishes, and where the router connects to follow it.
//!
//! The answer maps each rank (a decimal string) to that rank's resolved `KVEventsConfig`:
//! `{"0": {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
//! "replay_endpoint": null, "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000,
//! "topic": ""}}`. vLLM fills it from each rank's handshake (`EngineCoreClient.
//! get_kv_event_sources`); a rank whose publisher is not ZMQ has no entry, so an engine
//! without KV events answers `{}`. Each rank's endpoints are already offset by its rank
//! (`ZmqEventPublisher.offset_endpoint_port`: port + rank), so they are used as given.
//!
//! Where vLLM 0.32's `ZmqEventPublisher` puts its sockets (`_socket_setup`):
//! - the PUB socket **binds** when its endpoint contains `*` or `::`, or is `ipc://` or
//!   `inproc://`; otherwise it **connects** to the endpoint (the engine connects out, e.g. to
//!   a scheduler's bound SUB socket: `--kv-events-bind`). A bound `tcp://*:0` binds the node's
//!   IP and is reported as `tcp://NODE_IP:PORT`: an endpoint naming the engine's own host is
//!   its own bound socket.
//! - the replay (ROUTER) socket always binds.
//!
//! So a bound endpoint's wildcard host (`*`, `0.0.0.0`, `::`, `[::]`) is replaced by the
//! engine's host as the router reaches it (its URL's host); an events endpoint naming another
//! host is one the engine connects out to, not followed here. `ipc://` and `inproc://`
//! sockets cannot be reached from another process over TCP (the subscriber speaks TCP only):
//! skipped.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::KvEndpoints;

/// The path vLLM serves it on.
pub const PATH: &str = "/kv_event_sources";

/// One rank's entry, as vLLM serialises its `KVEventsConfig` (fields this router does not
/// use are ignored; missing ones take vLLM's defaults).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RankConfig {
    #[serde(default)]
    pub enable_kv_cache_events: bool,
    /// `"zmq"`, `"null"` or a custom publisher's name; `null` means vLLM's default for
    /// `enable_kv_cache_events`.
    #[serde(default)]
    pub publisher: Option<String>,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub replay_endpoint: Option<String>,
    #[serde(default)]
    pub topic: String,
}

fn default_endpoint() -> String {
    "tcp://*:5557".to_owned()
}

/// Why an answer is not a `/kv_event_sources` map.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("not a JSON object of ranks: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0:?} is not a data-parallel rank")]
    Rank(String),
}

/// Parses the answer: rank → its config, sorted by rank.
pub fn parse(body: &[u8]) -> Result<BTreeMap<u32, RankConfig>, SourcesError> {
    let raw: BTreeMap<String, RankConfig> = serde_json::from_slice(body)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u32>()
                .map(|r| (r, v))
                .map_err(|_| SourcesError::Rank(k))
        })
        .collect()
}

/// What the router does with one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankPlan {
    /// Connect to the engine's sockets and subscribe to `topic` (a prefix match, as ZMQ's).
    Follow {
        rank: u32,
        endpoints: KvEndpoints,
        topic: String,
    },
    /// The engine's PUB socket connects out to `endpoint`: events arrive on the router's bound
    /// socket (`--kv-events-bind`), if it is that address.
    ConnectsOut { rank: u32, endpoint: String },
    /// Nothing to follow.
    Skip { rank: u32, reason: String },
}

/// Where each rank's events are followed, for an engine reached at `engine_host` (its URL's
/// host: a name, an IPv4 address or a bracketed IPv6 address).
pub fn plan(sources: &BTreeMap<u32, RankConfig>, engine_host: &str) -> Vec<RankPlan> {
    sources
        .iter()
        .map(|(&rank, c)| plan_rank(rank, c, engine_host))
        .collect()
}

fn plan_rank(rank: u32, c: &RankConfig, engine_host: &str) -> RankPlan {
    let skip = |reason: String| RankPlan::Skip { rank, reason };
    let publisher = c
        .publisher
        .as_deref()
        .unwrap_or(if c.enable_kv_cache_events {
            "zmq"
        } else {
            "null"
        });
    if !c.enable_kv_cache_events {
        return skip("KV-cache events are disabled".into());
    }
    if publisher != "zmq" {
        return skip(format!("publisher {publisher:?} is not ZMQ"));
    }
    let ep = c.endpoint.trim();
    if ep.starts_with("ipc://") || ep.starts_with("inproc://") {
        return skip(format!(
            "{ep} is local to the engine's host (the router follows tcp:// endpoints)"
        ));
    }
    let Some(events) = Tcp::parse(ep) else {
        return skip(format!("{ep:?} is not a tcp://HOST:PORT endpoint"));
    };
    // vLLM's `_is_bind_endpoint`: `*` or `::` anywhere binds; anything else connects.
    let binds = ep.contains('*') || ep.contains("::");
    let events = if binds {
        events.reached_at(engine_host)
    } else if same_host(events.host, engine_host) {
        // `tcp://*:0` as bound and reported by vLLM: the node's IP and the port it got.
        events.to_string()
    } else {
        return RankPlan::ConnectsOut {
            rank,
            endpoint: ep.to_owned(),
        };
    };
    let replay = match c.replay_endpoint.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(r) => match Tcp::parse(r) {
            // The replay socket always binds.
            Some(t) => Some(t.reached_at(engine_host)),
            None => {
                tracing::info!(
                    rank,
                    endpoint = r,
                    "KV-event replay endpoint is not tcp://HOST:PORT: followed without replay"
                );
                None
            }
        },
    };
    RankPlan::Follow {
        rank,
        endpoints: KvEndpoints { events, replay },
        topic: c.topic.clone(),
    }
}

/// A `tcp://HOST:PORT` endpoint (HOST as written, IPv6 in brackets or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tcp<'a> {
    host: &'a str,
    port: u16,
}

impl<'a> Tcp<'a> {
    fn parse(ep: &'a str) -> Option<Tcp<'a>> {
        let rest = ep.strip_prefix("tcp://")?;
        let (host, port) = rest.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        (!host.is_empty() && port != 0 && !host.contains(['/', ';'])).then_some(Tcp { host, port })
    }

    fn is_wildcard(&self) -> bool {
        matches!(unbracket(self.host), "*" | "0.0.0.0" | "::")
    }

    /// The endpoint with a wildcard host replaced by `engine_host`.
    fn reached_at(&self, engine_host: &str) -> String {
        if self.is_wildcard() {
            Tcp {
                host: engine_host,
                port: self.port,
            }
            .to_string()
        } else {
            self.to_string()
        }
    }
}

impl std::fmt::Display for Tcp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = unbracket(self.host);
        if host.contains(':') {
            write!(f, "tcp://[{host}]:{}", self.port)
        } else {
            write!(f, "tcp://{host}:{}", self.port)
        }
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Whether two hosts are the same: equal addresses, or equal names (case-insensitive).
fn same_host(a: &str, b: &str) -> bool {
    let (a, b) = (unbracket(a), unbracket(b));
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The host of the engine at `url` (`http://HOST:PORT`), IPv6 in brackets.
pub fn engine_host(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    })
}

#[cfg(test)]
mod tests;
