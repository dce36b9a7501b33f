//! Where the engines come from: `--static-backends` (fixed at start) or Kubernetes discovery
//! ([`super::k8s`]), whose changing set is applied through a [`Fleet`].

use std::sync::Arc;

use super::Registry;
use super::fleet::Fleet;
use super::health::Monitor;
use super::k8s::{self, K8sDiscovery, K8sError};
use super::kv_events::{KvEventsPorts, KvSubscribers};
use crate::prefix::PrefixIndex;
use crate::upstream::HttpClient;

/// Where the engines come from (`--service-discovery`).
#[derive(Debug, Clone, Default)]
pub enum ServiceDiscovery {
    /// The configured `static_backends` (or the simulated demo engines).
    #[default]
    Static,
    /// Ready pods found through the Kubernetes API.
    K8s(Box<K8sDiscovery>),
}

impl ServiceDiscovery {
    /// Whether engines come and go at runtime (the router may start with none).
    pub fn is_dynamic(&self) -> bool {
        !matches!(self, ServiceDiscovery::Static)
    }
}

/// A running discovery source; stops when dropped.
#[derive(Debug)]
pub struct DiscoveryHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    K8s(#[from] K8sError),
}

/// Starts the configured discovery source, if it is a dynamic one: it adds engines to the
/// registry (starting their scrape loops, and their KV-event subscribers with `kv_events`:
/// discovered from each engine, or at `kv_events`' ports) and
/// removes them as they come and go.
pub async fn start(
    sd: &ServiceDiscovery,
    registry: &Arc<Registry>,
    monitor: &Arc<Monitor>,
    prefix: &Arc<PrefixIndex>,
    http: &HttpClient,
    kv_events: Option<(Arc<KvSubscribers>, Option<KvEventsPorts>)>,
) -> Result<Option<DiscoveryHandle>, DiscoveryError> {
    match sd {
        ServiceDiscovery::Static => Ok(None),
        ServiceDiscovery::K8s(cfg) => {
            k8s::describe_metrics();
            let mut fleet = Fleet::new(
                Arc::clone(registry),
                Arc::clone(monitor),
                Arc::clone(prefix),
            );
            if let Some((subscribers, ports)) = kv_events {
                fleet = fleet.with_kv_events(subscribers, ports);
            }
            let task = k8s::spawn(K8sDiscovery::clone(cfg), fleet, http.clone()).await?;
            Ok(Some(DiscoveryHandle { task }))
        }
    }
}
