//! Kubernetes discovery: the engines are the Ready pods matching a label selector in one
//! namespace, watched through the API server with kube-rs's `watcher` (list, then watch from
//! the list's resourceVersion; bookmarks on).
//!
//! - A pod is an engine when its `Ready` condition is `True`, it is not being deleted and it has
//!   a pod IP: `http://{podIP}:{port}`. It leaves when it is deleted or stops being Ready;
//!   requests in flight on it finish (see [`super::fleet`]).
//! - Its models are what the engine's own `GET /v1/models` lists, fetched when the pod joins
//!   (before it takes traffic) and refreshed every `models_refresh`. While the engine does not
//!   answer it (e.g. it requires an API key), the value of the pod label `model_label` stands
//!   in, if the pod has it; without either the engine is not routed to (asked again every
//!   `models_retry`). The engine's list wins over the label: production-stack's chart labels
//!   engine pods `model=<short name>`, which is not the name clients send.
//! - Watch errors are logged, counted in `switchyard_discovery_errors_total{kind}` and retried
//!   with exponential backoff (`backoff_min` doubling up to `backoff_max`). The watcher resumes
//!   from the last resourceVersion it saw; when that is too old (the API server answers
//!   `410 Gone`) it lists again. During a relist, and while the API server cannot be reached,
//!   the last known engine set stays in place: it is replaced only by a complete list.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::fleet::{Changes, Desired, Fleet, Wanted};
use super::role::{LLMD_ROLE_LABEL, Role, RoleLabels};
use crate::upstream::{self, HttpClient};

/// `--k8s-port`'s default: vLLM's.
pub const DEFAULT_PORT: u16 = 8000;
/// `--k8s-model-label`'s default: the label production-stack's chart puts on engine pods.
pub const DEFAULT_MODEL_LABEL: &str = "model";
/// Where a pod finds its own namespace.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// How long an engine's `/v1/models` may take.
const MODELS_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of Kubernetes discovery.
#[derive(Clone)]
pub struct K8sDiscovery {
    /// The namespace watched; `None`: the pod's own (service account), else the kubeconfig
    /// context's, else `default`.
    pub namespace: Option<String>,
    /// Label selector of the engine pods (`app=vllm`); `None`: every pod of the namespace.
    pub label_selector: Option<String>,
    /// The engines' port on each pod.
    pub port: u16,
    /// The pod label naming the served model while the engine's `/v1/models` does not answer;
    /// `None`: no fallback.
    pub model_label: Option<String>,
    /// How to reach the API server; `None`: inferred like kubectl (`KUBECONFIG` or
    /// `~/.kube/config`, else the in-cluster service account).
    pub kube_config: Option<kube::Config>,
    /// How often known engines' `/v1/models` are fetched again.
    pub models_refresh: Duration,
    /// How often an engine whose models are still unknown is asked again.
    pub models_retry: Duration,
    /// Backoff after a watch error: starts at `backoff_min`, doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Model label values that make a pod a prefill or a decode engine (production-stack's
    /// convention); a pod's `llm-d.ai/role` label, when present, decides instead.
    pub role_labels: RoleLabels,
}

impl Default for K8sDiscovery {
    fn default() -> K8sDiscovery {
        K8sDiscovery {
            namespace: None,
            label_selector: None,
            port: DEFAULT_PORT,
            model_label: Some(DEFAULT_MODEL_LABEL.into()),
            kube_config: None,
            models_refresh: Duration::from_secs(30),
            models_retry: Duration::from_secs(1),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            role_labels: RoleLabels::default(),
        }
    }
}

impl std::fmt::Debug for K8sDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sDiscovery")
            .field("namespace", &self.namespace)
            .field("label_selector", &self.label_selector)
            .field("port", &self.port)
            .field("model_label", &self.model_label)
            .field(
                "api_server",
                &self.kube_config.as_ref().map(|c| c.cluster_url.to_string()),
            )
            .field("models_refresh", &self.models_refresh)
            .finish()
    }
}

/// Why Kubernetes discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "service_discovery = k8s: no Kubernetes API configuration (neither a kubeconfig nor an in-cluster service account): {0}"
    )]
    Config(#[from] kube::config::InferConfigError),
    #[error("service_discovery = k8s: cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// What discovery knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub ready: bool,
    pub deleting: bool,
    /// The value of the model label, if the pod has it (non-empty).
    pub model: Option<String>,
    /// The role its `llm-d.ai/role` label names, if it has one.
    pub llmd_role: Option<Role>,
}

impl PodView {
    pub fn from_pod(pod: &Pod, model_label: Option<&str>) -> PodView {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        PodView {
            name: meta.name.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            deleting: meta.deletion_timestamp.is_some(),
            model: model_label
                .and_then(|l| meta.labels.as_ref()?.get(l))
                .filter(|m| !m.is_empty())
                .cloned(),
            llmd_role: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LLMD_ROLE_LABEL))
                .and_then(|v| Role::from_llmd(v)),
        }
    }

    /// The pod's role: its `llm-d.ai/role` label's, else its model label's under `labels`.
    pub fn role(&self, labels: &RoleLabels) -> Role {
        self.llmd_role
            .unwrap_or_else(|| labels.role_of(self.model.as_deref()))
    }

    /// The engine URL if this pod takes traffic: Ready, not being deleted, with an IP.
    pub fn engine_url(&self, port: u16) -> Option<String> {
        if !self.ready || self.deleting {
            return None;
        }
        Some(match self.ip? {
            IpAddr::V4(ip) => format!("http://{ip}:{port}"),
            IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
        })
    }
}

/// The namespace watched when none is configured: the pod's own, else the kube config's.
pub fn default_namespace(kube_config: &kube::Config) -> String {
    std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| kube_config.default_namespace.clone())
}

/// Connects to the API server and spawns the discovery task, which runs until aborted.
pub async fn spawn(
    cfg: K8sDiscovery,
    fleet: Fleet,
    http: HttpClient,
) -> Result<tokio::task::JoinHandle<()>, K8sError> {
    let kube_config = match cfg.kube_config.clone() {
        Some(c) => c,
        None => kube::Config::infer().await?,
    };
    let namespace = cfg
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace(&kube_config));
    let api_server = kube_config.cluster_url.to_string();
    let client = kube::Client::try_from(kube_config)?;
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    tracing::info!(
        %api_server, %namespace, label_selector = cfg.label_selector.as_deref().unwrap_or("(none: every pod)"),
        port = cfg.port, model_label = cfg.model_label.as_deref().unwrap_or("(none)"),
        "discovering engines from Kubernetes pods"
    );
    if cfg.label_selector.is_none() {
        tracing::warn!(%namespace, "no k8s_label_selector: every Ready pod of the namespace is taken for an engine");
    }
    let d = Discoverer {
        cfg,
        fleet,
        http,
        pods: BTreeMap::new(),
        relist: None,
        models: HashMap::new(),
        fetches: JoinSet::new(),
    };
    Ok(tokio::spawn(d.run(api)))
}

type PodEvents = Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send>>;

/// What is known of one engine's `/v1/models`.
#[derive(Debug)]
struct ModelsState {
    /// What the engine's `/v1/models` listed last time it answered.
    models: Option<Vec<String>>,
    /// The pod's model label, the fallback while the engine does not answer.
    label: Option<String>,
    next_fetch: Instant,
    fetching: bool,
    /// Consecutive failed fetches (only the first is logged as a warning).
    failures: u32,
}

struct Discoverer {
    cfg: K8sDiscovery,
    fleet: Fleet,
    http: HttpClient,
    /// The last known pods, by name.
    pods: BTreeMap<String, PodView>,
    /// Pods received during a relist; they replace `pods` when it completes.
    relist: Option<BTreeMap<String, PodView>>,
    /// Models fetched from engines, by URL.
    models: HashMap<String, ModelsState>,
    fetches: JoinSet<(String, Result<Vec<String>, String>)>,
}

impl Discoverer {
    async fn run(mut self, api: Api<Pod>) {
        let mut wc = watcher::Config::default();
        if let Some(s) = &self.cfg.label_selector {
            wc = wc.labels(s);
        }
        let new_stream = || -> PodEvents { Box::pin(watcher::watcher(api.clone(), wc.clone())) };
        let mut events = new_stream();
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut resume_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.cfg.models_retry);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(resume_at.unwrap_or_else(Instant::now)), if resume_at.is_some() => {
                    resume_at = None;
                }
                ev = events.next(), if resume_at.is_none() => match ev {
                    Some(Ok(ev)) => {
                        backoff.reset();
                        self.on_event(ev);
                    }
                    Some(Err(e)) => {
                        let (kind, restart) = classify(&e);
                        metrics::counter!("switchyard_discovery_errors_total", "kind" => kind).increment(1);
                        let wait = backoff.next_delay();
                        tracing::warn!(error = %e, kind, retry_in = ?wait, engines = self.fleet.urls().len(),
                            "Kubernetes watch failed; keeping the last known engines");
                        if restart {
                            events = new_stream();
                        }
                        resume_at = Some(Instant::now() + wait);
                    }
                    None => events = new_stream(),
                },
                Some(done) = self.fetches.join_next(), if !self.fetches.is_empty() => {
                    if let Ok((url, result)) = done {
                        self.on_models(url, result);
                    }
                }
                _ = tick.tick() => {}
            }
            self.reconcile();
        }
    }

    fn on_event(&mut self, ev: watcher::Event<Pod>) {
        let label = self.cfg.model_label.as_deref();
        match ev {
            watcher::Event::Init => {
                tracing::debug!("listing pods");
                metrics::counter!("switchyard_discovery_relists_total").increment(1);
                self.relist = Some(BTreeMap::new());
            }
            watcher::Event::InitApply(pod) => {
                let v = PodView::from_pod(&pod, label);
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(v.name.clone(), v);
            }
            watcher::Event::InitDone => {
                self.pods = self.relist.take().unwrap_or_default();
                tracing::info!(
                    pods = self.pods.len(),
                    "pod list complete; watching for changes"
                );
            }
            watcher::Event::Apply(pod) => {
                let v = PodView::from_pod(&pod, label);
                self.pods.insert(v.name.clone(), v);
            }
            watcher::Event::Delete(pod) => {
                let v = PodView::from_pod(&pod, label);
                self.pods.remove(&v.name);
            }
        }
    }

    fn on_models(&mut self, url: String, result: Result<Vec<String>, String>) {
        let Some(st) = self.models.get_mut(&url) else {
            return; // the pod left meanwhile
        };
        st.fetching = false;
        let now = Instant::now();
        match result {
            Ok(models) => {
                if let Some(label) = &st.label
                    && st.models.is_none()
                    && !models.contains(label)
                {
                    tracing::warn!(%url, %label, ?models, "the pod's model label names no model the engine lists; routing by the engine's own list");
                }
                if st.models.as_ref().is_some_and(|m| *m != models) {
                    tracing::info!(%url, ?models, "the engine's /v1/models changed");
                }
                st.models = Some(models);
                st.failures = 0;
                st.next_fetch = now + self.cfg.models_refresh;
            }
            Err(e) => {
                metrics::counter!("switchyard_discovery_errors_total", "kind" => "models")
                    .increment(1);
                st.failures += 1;
                let known = st.models.is_some() || st.label.is_some();
                match (&st.models, &st.label) {
                    _ if st.failures > 1 => {
                        tracing::debug!(%url, error = %e, failures = st.failures, "engine /v1/models failed again")
                    }
                    (Some(_), _) => {
                        tracing::debug!(%url, error = %e, "engine /v1/models failed; keeping its models")
                    }
                    (None, Some(label)) => {
                        tracing::warn!(%url, error = %e, %label, "engine /v1/models failed; routing by the pod's model label until it answers")
                    }
                    (None, None) => {
                        tracing::warn!(%url, error = %e, "engine /v1/models failed; not routing to it until it answers (retrying)")
                    }
                }
                st.next_fetch = now
                    + if known {
                        self.cfg.models_refresh
                    } else {
                        self.cfg.models_retry
                    };
            }
        }
    }

    /// Applies the pods' state to the registry and starts the model fetches that are due.
    fn reconcile(&mut self) {
        let port = self.cfg.port;
        // URL → the model label and role of (the first) pod there.
        let mut wanted: BTreeMap<String, (Option<String>, Role)> = BTreeMap::new();
        for pod in self.pods.values() {
            let Some(url) = pod.engine_url(port) else {
                continue;
            };
            wanted
                .entry(url)
                .or_insert_with(|| (pod.model.clone(), pod.role(&self.cfg.role_labels)));
        }
        let now = Instant::now();
        self.models.retain(|url, _| wanted.contains_key(url));
        let mut desired = Desired::new();
        for (url, (label, role)) in wanted {
            let st = self
                .models
                .entry(url.clone())
                .or_insert_with(|| ModelsState {
                    models: None,
                    label: None,
                    next_fetch: now,
                    fetching: false,
                    failures: 0,
                });
            st.label = label;
            if !st.fetching && st.next_fetch <= now {
                st.fetching = true;
                let (http, u) = (self.http.clone(), url.clone());
                self.fetches.spawn(async move {
                    let r = fetch_models(&http, &u).await;
                    (u, r)
                });
            }
            // The engine's own list; else, once it failed to answer, the pod's label.
            let models = st.models.clone().or_else(|| {
                (st.failures > 0)
                    .then(|| st.label.clone().map(|l| vec![l]))
                    .flatten()
            });
            if let Some(models) = models {
                desired.insert(url, Wanted { models, role });
            }
        }
        let changes = self.fleet.apply(&desired);
        if !changes.is_empty() {
            log_changes(&changes, &self.fleet.urls(), &self.pods);
            metrics::gauge!("switchyard_discovery_engines").set(self.fleet.urls().len() as f64);
        }
    }
}

fn log_changes(changes: &Changes, engines: &[String], pods: &BTreeMap<String, PodView>) {
    let ready = pods.values().filter(|p| p.engine_url(0).is_some()).count();
    tracing::info!(
        added = ?changes.added, removed = ?changes.removed, models_changed = ?changes.replaced,
        engines = ?engines, pods = pods.len(), ready_pods = ready,
        "engine set changed"
    );
}

/// The metric label of a watch error, and whether the watcher must be started afresh.
///
/// kube's watcher resumes from its last resourceVersion by itself, and lists again when the
/// API server reports that version expired the way the API server does it (an `ERROR` watch
/// event with code 410). A watch *request* answered with HTTP 410 would make it retry the same
/// expired version forever, so that case starts a new watcher (a fresh list).
fn classify(e: &watcher::Error) -> (&'static str, bool) {
    match e {
        watcher::Error::InitialListFailed(_) => ("list", false),
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410 => {
            ("watch_start", true)
        }
        watcher::Error::WatchStartFailed(_) => ("watch_start", false),
        watcher::Error::WatchError(s) if s.code == 410 => ("expired", false),
        watcher::Error::WatchError(_) => ("watch_event", false),
        watcher::Error::WatchFailed(_) => ("watch_stream", false),
        watcher::Error::NoResourceVersion => ("no_resource_version", false),
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelId>,
}

#[derive(Deserialize)]
struct ModelId {
    id: String,
}

/// The model ids an engine's `GET /v1/models` lists (at least one).
async fn fetch_models(http: &HttpClient, base: &str) -> Result<Vec<String>, String> {
    let body = upstream::get(
        http,
        &format!("{base}/v1/models"),
        MODELS_FETCH_TIMEOUT,
        crate::engines::models::CARDS_MAX_BYTES,
    )
    .await
    .map_err(|e| e.to_string())?;
    let list: ModelList =
        serde_json::from_slice(&body).map_err(|e| format!("not a model list: {e}"))?;
    let mut ids: Vec<String> = Vec::new();
    for m in list.data {
        if !m.id.is_empty() && !ids.contains(&m.id) {
            ids.push(m.id);
        }
    }
    if ids.is_empty() {
        return Err("the engine lists no model".into());
    }
    Ok(ids)
}

/// Exponential backoff with ±20 % jitter.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.8 + 0.4 * fastrand::f64())
    }
}

/// Discovery metrics' descriptions (registered with the recorder when discovery starts).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "switchyard_discovery_errors_total",
        "Kubernetes discovery errors, by kind (list, watch_start, watch_stream, watch_event, expired, models, ...)"
    );
    metrics::describe_counter!(
        "switchyard_discovery_relists_total",
        "Full pod lists made by Kubernetes discovery (at start and after a watch expired)"
    );
    metrics::describe_gauge!(
        "switchyard_discovery_engines",
        "Engines currently taken from Kubernetes pods"
    );
}

#[cfg(test)]
mod tests;
