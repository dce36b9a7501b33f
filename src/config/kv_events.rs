//! The KV-event settings: `static_kv_events` / `static_kv_events_replay` (one entry per static
//! backend), `kv_events_port` / `kv_events_replay_port` (Kubernetes discovery) and
//! `kv_index_max_bytes`, `kv_events_bind` (a SUB socket engines connect to),
//! `kv_events_max_message_bytes` and `kv_events_discover` (ask each engine, the endpoint
//! settings as the fallback).

use super::{ConfigError, FileConfig, ServeArgs, invalid};
use crate::engines::kv_events::zmtp::DEFAULT_MAX_MESSAGE_BYTES;
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
    /// Ask each engine for its `/kv_event_sources` (the settings above are the fallback).
    pub discover: bool,
    /// The SUB sockets to bind for engines that connect, `tcp://HOST:PORT` (`*` made
    /// `0.0.0.0`).
    pub bind: Vec<String>,
    /// Largest KV-event message kept, in bytes.
    pub max_message_bytes: usize,
}

/// The smallest `kv_events_max_message_bytes`: below it, ordinary batches would be dropped.
pub const MIN_MESSAGE_BYTES: usize = 4096;

impl Default for KvEventsSettings {
    fn default() -> Self {
        KvEventsSettings {
            static_endpoints: Vec::new(),
            k8s_ports: None,
            max_bytes: exact::DEFAULT_MAX_BYTES,
            discover: false,
            bind: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
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

/// Checks `kv_events_bind`: `tcp://HOST:PORT` with `*` for every address, port 0 for any.
fn bind_endpoint(raw: &str) -> Result<String, ConfigError> {
    let ok = raw.strip_prefix("tcp://").and_then(|rest| {
        let (host, port) = rest.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        (!host.is_empty() && !host.contains('/')).then_some(())
    });
    match ok {
        Some(()) => Ok(raw.replacen("tcp://*:", "tcp://0.0.0.0:", 1)),
        None => Err(invalid(
            "kv_events_bind",
            format!("{raw:?} is not a tcp://HOST:PORT endpoint (HOST may be *)"),
        )),
    }
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
    let bind = args
        .kv_events_bind
        .as_deref()
        .or(file.kv_events_bind.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|e| bind_endpoint(e.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let max_message_bytes = args
        .kv_events_max_message_bytes
        .or(file.kv_events_max_message_bytes)
        .unwrap_or(d.max_message_bytes);
    if max_message_bytes < MIN_MESSAGE_BYTES {
        return Err(invalid(
            "kv_events_max_message_bytes",
            format!("must be at least {MIN_MESSAGE_BYTES}"),
        ));
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
        discover: args.kv_events_discover || file.kv_events_discover.unwrap_or(false),
        bind,
        max_message_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{RouterConfig, ServeArgs};
    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn resolve(v: &[&str]) -> Result<RouterConfig, ConfigError> {
        use clap::Parser;
        let mut full = vec!["switchyard"];
        full.extend_from_slice(v);
        RouterConfig::resolve(&Flags::try_parse_from(full).unwrap().serve)
    }

    fn err(v: &[&str]) -> String {
        resolve(v).unwrap_err().to_string()
    }

    const TWO: [&str; 4] = [
        "--static-backends",
        "http://a:1,http://b:2",
        "--static-models",
        "m",
    ];

    fn with(extra: &[&'static str]) -> Vec<&'static str> {
        let mut v = TWO.to_vec();
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn one_entry_per_backend_with_empty_ones_for_none() {
        let c = resolve(&with(&[
            "--static-kv-events",
            "tcp://a:5557,",
            "--static-kv-events-replay",
            "tcp://a:5558,",
            "--kv-index-max-bytes",
            "1048576",
        ]))
        .unwrap();
        assert_eq!(
            c.kv_events.static_endpoints,
            vec![
                Some(KvEndpoints {
                    events: "tcp://a:5557".into(),
                    replay: Some("tcp://a:5558".into())
                }),
                None
            ]
        );
        assert_eq!(c.kv_events.max_bytes, 1 << 20);
        assert!(!c.kv_events.discover);
        assert!(
            resolve(&with(&["--kv-events-discover"]))
                .unwrap()
                .kv_events
                .discover
        );
        let d = resolve(&TWO).unwrap().kv_events;
        assert_eq!(d, KvEventsSettings::default());
        assert_eq!(d.max_bytes, 256 << 20);
    }

    #[test]
    fn mistakes_name_the_setting() {
        for (args, setting) in [
            (
                with(&["--static-kv-events", "tcp://a:5557"]),
                "static_kv_events:",
            ),
            (
                with(&["--static-kv-events", "a:5557,"]),
                "static_kv_events:",
            ),
            (
                with(&["--static-kv-events", "tcp://a:0,"]),
                "static_kv_events:",
            ),
            (
                with(&["--static-kv-events-replay", "tcp://a:1,"]),
                "static_kv_events_replay:",
            ),
            (
                with(&[
                    "--static-kv-events",
                    ",tcp://b:1",
                    "--static-kv-events-replay",
                    "tcp://a:2,",
                ]),
                "static_kv_events_replay:",
            ),
            (with(&["--kv-events-port", "5557"]), "kv_events_port:"),
            (with(&["--kv-index-max-bytes", "0"]), "kv_index_max_bytes:"),
            (
                with(&["--kv-events-bind", "127.0.0.1:5557"]),
                "kv_events_bind:",
            ),
            (
                with(&["--kv-events-bind", "tcp://:5557"]),
                "kv_events_bind:",
            ),
            (with(&["--kv-events-bind", "tcp://*:x"]), "kv_events_bind:"),
            (
                with(&["--kv-events-max-message-bytes", "4095"]),
                "kv_events_max_message_bytes:",
            ),
            (
                vec![
                    "--service-discovery",
                    "k8s",
                    "--static-kv-events",
                    "tcp://a:1",
                ],
                "static_kv_events:",
            ),
            (
                vec![
                    "--service-discovery",
                    "k8s",
                    "--kv-events-replay-port",
                    "5558",
                ],
                "kv_events_replay_port:",
            ),
            (
                vec!["--service-discovery", "k8s", "--kv-events-port", "0"],
                "kv_events_port:",
            ),
        ] {
            let e = err(&args);
            assert!(e.starts_with(setting), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_bind_socket_and_the_message_cap() {
        let c = resolve(&with(&[
            "--kv-events-bind",
            "tcp://*:5557",
            "--kv-events-max-message-bytes",
            "4096",
        ]))
        .unwrap();
        assert_eq!(c.kv_events.bind, ["tcp://0.0.0.0:5557"]);
        assert_eq!(c.kv_events.max_message_bytes, 4096);
        let c = resolve(&with(&[
            "--kv-events-bind",
            "tcp://127.0.0.1:0,tcp://*:5558",
        ]))
        .unwrap();
        assert_eq!(
            c.kv_events.bind,
            ["tcp://127.0.0.1:0", "tcp://0.0.0.0:5558"]
        );
        assert_eq!(c.kv_events.max_message_bytes, 16 << 20);
        // With discovery too: discovered pods are matched by their IP.
        let c = resolve(&[
            "--service-discovery",
            "k8s",
            "--kv-events-bind",
            "tcp://[::]:5557",
        ])
        .unwrap();
        assert_eq!(c.kv_events.bind, ["tcp://[::]:5557"]);
        // The config keys; flags win.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "static_backends = [\"http://a:1\"]\nstatic_models = [\"m\"]\nkv_events_bind = [\"tcp://*:5557\", \"tcp://*:5558\"]\nkv_events_max_message_bytes = 65536\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = resolve(&["--config", p]).unwrap();
        assert_eq!(
            c.kv_events.bind,
            ["tcp://0.0.0.0:5557", "tcp://0.0.0.0:5558"]
        );
        assert_eq!(c.kv_events.max_message_bytes, 65536);
        let c = resolve(&["--config", p, "--kv-events-bind", "tcp://127.0.0.1:1"]).unwrap();
        assert_eq!(c.kv_events.bind, ["tcp://127.0.0.1:1"]);
        std::fs::write(&path, "kv_events_bind = [\"5557\"]\nstatic_backends = [\"http://a:1\"]\nstatic_models = [\"m\"]\n").unwrap();
        let e = resolve(&["--config", p]).unwrap_err().to_string();
        assert!(e.starts_with("kv_events_bind:"), "{e}");
    }

    #[test]
    fn kubernetes_ports_make_each_pods_endpoints() {
        let c = resolve(&[
            "--service-discovery",
            "k8s",
            "--kv-events-port",
            "5557",
            "--kv-events-replay-port",
            "5558",
        ])
        .unwrap();
        let ports = c.kv_events.k8s_ports.unwrap();
        assert_eq!(
            ports.endpoints_for("http://10.1.2.3:8000"),
            Some(KvEndpoints {
                events: "tcp://10.1.2.3:5557".into(),
                replay: Some("tcp://10.1.2.3:5558".into()),
            })
        );
    }
}
