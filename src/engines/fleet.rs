//! A set of engines that come and go at runtime: the discovered set (URL → models) is applied
//! to the registry as a whole, level-triggered, so the order in which a source reports changes
//! does not matter.
//!
//! An engine's identity is its URL (`http://{pod IP}:{port}`); its name (`host:port`) is what
//! `session_hash()` hashes, so every router replica that discovers the same engines makes the
//! same sticky decisions whatever the order it learned them in. An engine that leaves and comes
//! back at the same URL is a new registry entry (new id, fresh health and figures, empty prefix
//! index) under the same name.
//!
//! Leaving never cuts a request: the registry hands out `Arc<Engine>`s, and a request already on
//! a removed engine keeps its `Arc` until its response ends.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::health::Monitor;
use super::kv_events::{KvEventsPorts, KvSubscribers};
use super::{Engine, Registry, Role};
use crate::prefix::PrefixIndex;

/// The engines a discovery source wants in the registry: URL → what it is.
pub type Desired = BTreeMap<String, Wanted>;

/// What a discovery source wants of one engine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wanted {
    /// The models it serves.
    pub models: Vec<String>,
    /// Its part in serving requests.
    pub role: Role,
}

/// What [`Fleet::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Engines whose models changed (replaced by a new entry at the same URL).
    pub replaced: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

/// The registry entries owned by a discovery source, and what adding or removing one involves:
/// its scrape loop (started here, ending by itself once the engine left the registry) and its
/// entries in the prefix index.
pub struct Fleet {
    registry: Arc<Registry>,
    monitor: Arc<Monitor>,
    prefix: Arc<PrefixIndex>,
    owned: BTreeMap<String, Arc<Engine>>,
    /// KV-event subscribers, started with the engines (each engine's own `/kv_event_sources`
    /// if the subscribers discover, else, or as its fallback, each engine's host at these
    /// ports, if any) and stopped (views dropped, also those fed by the bound socket) with them.
    kv_events: Option<(Arc<KvSubscribers>, Option<KvEventsPorts>)>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("owned", &self.owned.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Fleet {
    pub fn new(registry: Arc<Registry>, monitor: Arc<Monitor>, prefix: Arc<PrefixIndex>) -> Fleet {
        Fleet {
            registry,
            monitor,
            prefix,
            owned: BTreeMap::new(),
            kv_events: None,
        }
    }

    /// Also follows each engine's KV events: where it says (with discovery, see
    /// [`KvSubscribers::follow`]), else at its host on `ports` (if any); drops the views of
    /// engines that leave.
    pub fn with_kv_events(
        mut self,
        subscribers: Arc<KvSubscribers>,
        ports: Option<KvEventsPorts>,
    ) -> Fleet {
        self.kv_events = Some((subscribers, ports));
        self
    }

    fn start_kv_events(&self, engine: &Arc<Engine>) {
        if let Some((subs, ports)) = &self.kv_events {
            let fallback = ports.and_then(|p| p.endpoints_for(&engine.url));
            subs.follow_engine(engine, fallback);
        }
    }

    fn stop_kv_events(&self, engine: u32) {
        if let Some((subs, _)) = &self.kv_events {
            subs.stop(engine);
        }
    }

    /// The URLs of the engines this fleet has in the registry, sorted.
    pub fn urls(&self) -> Vec<String> {
        self.owned.keys().cloned().collect()
    }

    /// Makes the registry hold exactly the `desired` engines (among those this fleet owns):
    /// adds the new ones (and starts their scrape loops), removes those no longer wanted, and
    /// replaces those whose models or role changed.
    pub fn apply(&mut self, desired: &Desired) -> Changes {
        let mut changes = Changes::default();
        let gone: Vec<String> = self
            .owned
            .keys()
            .filter(|url| !desired.contains_key(*url))
            .cloned()
            .collect();
        for url in gone {
            if let Some(engine) = self.owned.remove(&url) {
                self.registry.remove(engine.id);
                self.prefix.remove_engine(engine.id);
                self.stop_kv_events(engine.id);
                changes.removed.push(url);
            }
        }
        for (url, Wanted { models, role }) in desired {
            let role = *role;
            match self.owned.get(url) {
                Some(engine) if engine.models == *models && engine.role == role => {}
                Some(engine) => {
                    let old_id = engine.id;
                    let new = match self.registry.replace(old_id, models.clone(), role) {
                        Some(new) => new,
                        // Not in the registry any more (removed by someone else): add it back.
                        None => self.registry.add_with_role(url, models.clone(), role),
                    };
                    self.prefix.remove_engine(old_id);
                    self.stop_kv_events(old_id);
                    self.start_kv_events(&new);
                    self.monitor.watch_engine(&new);
                    self.owned.insert(url.clone(), new);
                    changes.replaced.push(url.clone());
                }
                None => {
                    let engine = self.registry.add_with_role(url, models.clone(), role);
                    self.start_kv_events(&engine);
                    self.monitor.watch_engine(&engine);
                    self.owned.insert(url.clone(), engine);
                    changes.added.push(url.clone());
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::health::HealthConfig;
    use std::time::Duration;

    fn fleet() -> (Arc<Registry>, Fleet) {
        let registry = Arc::new(Registry::new());
        let prefix = Arc::new(PrefixIndex::new(1 << 20));
        let monitor = Monitor::new(
            Arc::clone(&registry),
            crate::upstream::build_client(Duration::from_millis(100)),
            Arc::clone(&prefix),
            HealthConfig {
                stats_interval: Duration::from_secs(3600),
                probe_interval: Duration::from_secs(3600),
                eject_after_failures: 3,
            },
        );
        let f = Fleet::new(Arc::clone(&registry), monitor, prefix);
        (registry, f)
    }

    fn desired(v: &[(&str, &str)]) -> Desired {
        v.iter()
            .map(|(u, m)| {
                (
                    u.to_string(),
                    Wanted {
                        models: vec![m.to_string()],
                        role: Role::Aggregated,
                    },
                )
            })
            .collect()
    }

    fn names(r: &Registry) -> Vec<String> {
        let mut v: Vec<String> = r.all().iter().map(|e| e.name.to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_role_change_replaces_the_engine() {
        let (registry, mut f) = fleet();
        let url = "http://10.0.0.9:8000";
        f.apply(&desired(&[(url, "m")]));
        let before = registry.all()[0].clone();
        assert_eq!(before.role, Role::Aggregated);
        let mut d = desired(&[(url, "m")]);
        d.get_mut(url).expect("wanted").role = Role::Prefill;
        let c = f.apply(&d);
        assert_eq!(c.replaced, [url]);
        let after = registry.all()[0].clone();
        assert_eq!((after.role, after.url.as_ref()), (Role::Prefill, url));
        assert!(before.is_retired());
        assert!(f.apply(&d).is_empty());
    }

    #[tokio::test]
    async fn apply_adds_removes_and_replaces() {
        let (registry, mut f) = fleet();
        let c = f.apply(&desired(&[
            ("http://10.0.0.1:8000", "m"),
            ("http://10.0.0.2:8000", "m"),
        ]));
        assert_eq!(c.added.len(), 2);
        assert_eq!(names(&registry), ["10.0.0.1:8000", "10.0.0.2:8000"]);
        let first = registry.all()[0].clone();
        let in_flight = first.begin_request();

        // The same set again changes nothing.
        assert!(
            f.apply(&desired(&[
                ("http://10.0.0.1:8000", "m"),
                ("http://10.0.0.2:8000", "m")
            ]))
            .is_empty()
        );

        // 10.0.0.1 leaves: a request on it still holds the engine and ends normally.
        let c = f.apply(&desired(&[("http://10.0.0.2:8000", "m")]));
        assert_eq!(c.removed, ["http://10.0.0.1:8000"]);
        assert_eq!(names(&registry), ["10.0.0.2:8000"]);
        assert!(first.is_retired());
        assert_eq!(in_flight.engine().in_flight(), 1);
        drop(in_flight);
        assert_eq!(first.in_flight(), 0);

        // It comes back at the same URL: a new entry under the same name.
        let c = f.apply(&desired(&[
            ("http://10.0.0.1:8000", "m"),
            ("http://10.0.0.2:8000", "m"),
        ]));
        assert_eq!(c.added, ["http://10.0.0.1:8000"]);
        let back = registry
            .all()
            .iter()
            .find(|e| &*e.name == "10.0.0.1:8000")
            .cloned()
            .unwrap();
        assert_ne!(back.id, first.id);
        assert!(!back.is_retired() && back.is_healthy());

        // Its models change: replaced in place, in one step.
        let c = f.apply(&desired(&[
            ("http://10.0.0.1:8000", "m2"),
            ("http://10.0.0.2:8000", "m"),
        ]));
        assert_eq!(c.replaced, ["http://10.0.0.1:8000"]);
        assert_eq!(registry.all().len(), 2);
        assert_eq!(registry.models(), ["m", "m2"]);
        assert!(back.is_retired());

        // Everything leaves.
        let c = f.apply(&Desired::new());
        assert_eq!(c.removed.len(), 2);
        assert!(registry.all().is_empty());
    }

    #[tokio::test]
    async fn kv_event_subscribers_follow_the_engine_set() {
        use crate::engines::kv_events::SubscriberOptions;
        use crate::prefix::exact::ExactIndex;
        let (registry, f) = fleet();
        let subs = Arc::new(KvSubscribers::new(
            Arc::new(ExactIndex::new(1 << 20)),
            SubscriberOptions::default(),
        ));
        let ports = KvEventsPorts {
            events: 5557,
            replay: Some(5558),
        };
        let mut f = f.with_kv_events(Arc::clone(&subs), Some(ports));
        f.apply(&desired(&[
            ("http://127.0.0.1:1", "m"),
            ("http://127.0.0.1:2", "m"),
        ]));
        let mut ids: Vec<u32> = registry.all().iter().map(|e| e.id).collect();
        ids.sort_unstable();
        assert_eq!(subs.engines(), ids);
        // Replaced (models changed): the new entry's subscriber replaces the old one's.
        f.apply(&desired(&[
            ("http://127.0.0.1:1", "m"),
            ("http://127.0.0.1:2", "other"),
        ]));
        let mut now: Vec<u32> = registry.all().iter().map(|e| e.id).collect();
        now.sort_unstable();
        assert_eq!(subs.engines(), now);
        assert_ne!(now, ids);
        f.apply(&Desired::new());
        assert!(subs.engines().is_empty());
    }
}
