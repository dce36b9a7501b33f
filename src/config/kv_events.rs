//! The KV-event settings: `static_kv_events` / `static_kv_events_replay` (one entry per static
//! backend), `kv_events_port` / `kv_events_replay_port` (Kubernetes discovery) and
//! `kv_index_max_bytes`.

use super::{ConfigError, FileConfig, ServeArgs, invalid};
use crate::engines::kv_events::{KvEndpoints, KvEventsPorts};
use crate::prefix::exact;

/// Where the engines publish their KV events, and the exact index's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsSettings {
    /// Per static backend, in the order of `backends`: its KV-event endpoints, if any.
    pub static_endpoints: Vec<Option<KvEndpoints>>,
    /// With Kubernetes discovery: the ports every engine pod publishes on.
    pub k8s_ports: Option<KvEventsPorts>,
    /// The exact index's memory budget in bytes.
    pub max_bytes: usize,
}

impl Default for KvEventsSettings {
    fn default() -> Self {
        KvEventsSettings {
            static_endpoints: Vec::new(),
            k8s_ports: None,
            max_bytes: exact::DEFAULT_MAX_BYTES,
        }
    }
}

/// Checks a `tcp://HOST:PORT` endpoint.
fn endpoint(setting: &'static str, raw: &str) -> Result<String, ConfigError> {
    let ok = raw.strip_prefix("tcp://").and_then(|rest| {
        let (host, port) = rest.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        (!host.is_empty() && port != 0 && !host.contains('/')).then_some(())
    });
    match ok {
        Some(()) => Ok(raw.to_owned()),
        None => Err(invalid(
            setting,
            format!("{raw:?} is not a tcp://HOST:PORT endpoint"),
        )),
    }
}

/// One optional endpoint per backend: `None` (not given) or exactly `backends` entries.
fn per_backend(
    setting: &'static str,
    raw: Option<&[String]>,
    backends: usize,
) -> Result<Option<Vec<Option<String>>>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.len() != backends {
        return Err(invalid(
            setting,
            format!(
                "{} entries for {backends} static_backends: give one per backend, in the same order (an empty entry for none)",
                raw.len()
            ),
        ));
    }
    raw.iter()
        .map(|e| {
            let e = e.trim();
            if e.is_empty() {
                Ok(None)
            } else {
                endpoint(setting, e).map(Some)
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub(super) fn kv_events_from(
    args: &ServeArgs,
    file: &FileConfig,
    backends: usize,
    k8s: bool,
) -> Result<KvEventsSettings, ConfigError> {
    let d = KvEventsSettings::default();
    let events_raw = args
        .static_kv_events
        .clone()
        .or(file.static_kv_events.clone());
    let replay_raw = args
        .static_kv_events_replay
        .clone()
        .or(file.static_kv_events_replay.clone());
    let port = args.kv_events_port.or(file.kv_events_port);
    let replay_port = args.kv_events_replay_port.or(file.kv_events_replay_port);
    let max_bytes = args
        .kv_index_max_bytes
        .or(file.kv_index_max_bytes)
        .unwrap_or(d.max_bytes);
    if max_bytes == 0 {
        return Err(invalid("kv_index_max_bytes", "must be at least 1"));
    }
    if k8s {
        for (setting, given) in [
            ("static_kv_events", events_raw.is_some()),
            ("static_kv_events_replay", replay_raw.is_some()),
        ] {
            if given {
                return Err(invalid(
                    setting,
                    "not used with service_discovery = k8s (use kv_events_port)",
                ));
            }
        }
    } else {
        for (setting, given) in [
            ("kv_events_port", port.is_some()),
            ("kv_events_replay_port", replay_port.is_some()),
        ] {
            if given {
                return Err(invalid(
                    setting,
                    "only applies with service_discovery = k8s (use static_kv_events)",
                ));
            }
        }
    }
    for (setting, p) in [
        ("kv_events_port", port),
        ("kv_events_replay_port", replay_port),
    ] {
        if p == Some(0) {
            return Err(invalid(setting, "must be a port number, 1 to 65535"));
        }
    }
    if replay_port.is_some() && port.is_none() {
        return Err(invalid(
            "kv_events_replay_port",
            "given without kv_events_port",
        ));
    }
    if replay_raw.is_some() && events_raw.is_none() {
        return Err(invalid(
            "static_kv_events_replay",
            "given without static_kv_events",
        ));
    }
    let events = per_backend("static_kv_events", events_raw.as_deref(), backends)?;
    let replays = per_backend("static_kv_events_replay", replay_raw.as_deref(), backends)?;
    let mut static_endpoints = Vec::new();
    if let Some(events) = events {
        let replays = replays.unwrap_or_else(|| vec![None; backends]);
        for (i, (ev, rp)) in events.into_iter().zip(replays).enumerate() {
            match (ev, rp) {
                (None, Some(_)) => {
                    return Err(invalid(
                        "static_kv_events_replay",
                        format!(
                            "entry {} has a replay endpoint but no static_kv_events one",
                            i + 1
                        ),
                    ));
                }
                (ev, replay) => {
                    static_endpoints.push(ev.map(|events| KvEndpoints { events, replay }))
                }
            }
        }
    }
    Ok(KvEventsSettings {
        static_endpoints,
        k8s_ports: port.map(|events| KvEventsPorts {
            events,
            replay: replay_port,
        }),
        max_bytes,
    })
}
