//! A stub Kubernetes API server for pods, speaking the real API's JSON and watch protocol closely
//! enough that kube-rs runs against it unmodified, and pods that are real simulated engines on
//! distinct loopback addresses (127.0.0.2, 127.0.0.3, …) sharing one port, so that pod IP +
//! `--k8s-port` works as in a cluster.
//!
//! What the stub serves, as kube-apiserver does:
//! - `GET /api/v1/namespaces/{ns}/pods?labelSelector=…&limit=N[&continue=…]`: a `PodList` with
//!   `metadata.resourceVersion` (items without `kind`/`apiVersion`, as the real server sends
//!   them), paginated with `metadata.continue` when there are more than `limit` items.
//! - `GET …/pods?watch=true&resourceVersion=R&timeoutSeconds=T&allowWatchBookmarks=true&labelSelector=…`:
//!   HTTP 200 and newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{…}}`
//!   for every change after `R`, then the live changes, until `T` seconds passed. A change
//!   that moves a pod out of (into) the selector is sent as `DELETED` (`ADDED`), as the watch
//!   cache does.
//! - A watch from a resourceVersion older than the retained history gets what the API server
//!   sends once it has parsed the version: HTTP 200 with one `ERROR` event whose object is a
//!   `Status` with code 410, reason `Expired` ("too old resource version"), then the end.
//! - Failures on demand: HTTP 500 `Status` answers, streams closed, the whole server down
//!   (connections refused) and up again on the same address, history expired, and (not what a
//!   real API server does, to check the router's fallback) HTTP 410 answers to watch requests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use switchyard::sim::{self, SimConfig, SimHandle};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A pod as the stub stores it.
#[derive(Debug, Clone)]
pub struct StubPod {
    pub name: String,
    pub ip: Option<String>,
    pub ready: bool,
    pub deleting: bool,
    pub labels: BTreeMap<String, String>,
}

impl StubPod {
    /// A pod labelled `app=vllm`, pending (no IP, not Ready).
    pub fn new(name: &str) -> StubPod {
        StubPod {
            name: name.into(),
            ip: None,
            ready: false,
            deleting: false,
            labels: [("app".to_owned(), "vllm".to_owned())].into(),
        }
    }
    pub fn ip(mut self, ip: &str) -> StubPod {
        self.ip = Some(ip.into());
        self
    }
    pub fn ready(mut self, ready: bool) -> StubPod {
        self.ready = ready;
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> StubPod {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn without_label(mut self, k: &str) -> StubPod {
        self.labels.remove(k);
        self
    }

    fn to_json(&self, ns: &str, uid: u64, rv: u64) -> Value {
        let mut meta = json!({
            "name": self.name, "namespace": ns, "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "resourceVersion": rv.to_string(), "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": self.labels,
        });
        if self.deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T01:00:00Z");
            meta["deletionGracePeriodSeconds"] = json!(30);
        }
        let ready = if self.ready { "True" } else { "False" };
        let mut status = json!({
            "phase": if self.ip.is_some() { "Running" } else { "Pending" },
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Ready", "status": ready, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        });
        if let Some(ip) = &self.ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
            status["hostIP"] = json!("10.0.0.1");
        }
        json!({
            "metadata": meta,
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest",
                                "ports": [{"containerPort": 8000, "protocol": "TCP"}]}],
            },
            "status": status,
        })
    }
}

/// One change in the history: the object before (if any) and after.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    before: Option<Value>,
    after: Value,
}

#[derive(Debug, Default)]
struct State {
    namespace: String,
    rv: u64,
    next_uid: u64,
    /// Current pods by name: (uid, object JSON with its resourceVersion).
    pods: BTreeMap<String, (u64, Value)>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this - 1 get 410 Expired.
    oldest: u64,
    /// Streams opened before the current epoch end.
    epoch: u64,
    /// Bookmarks asked for (each open watch with bookmarks sends one per increment).
    bookmarks: u64,
    fail_next: usize,
    failures_served: usize,
    http_410_next: usize,
    requests: Vec<String>,
    /// Watch streams currently open (sending events).
    open_watches: usize,
}

struct Inner {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Inner {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The stub API server.
pub struct ApiStub {
    addr: SocketAddr,
    inner: Arc<Inner>,
    server: Mutex<Option<Server>>,
}

/// The running server task and how to stop it.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    fn start(listener: TcpListener, inner: Arc<Inner>) -> Server {
        let (stop, rx) = tokio::sync::oneshot::channel();
        Server {
            stop,
            task: tokio::spawn(serve(listener, inner, rx)),
        }
    }
}

impl Drop for ApiStub {
    fn drop(&mut self) {
        if let Ok(mut s) = self.server.lock()
            && let Some(server) = s.take()
        {
            server.task.abort();
        }
    }
}

impl ApiStub {
    /// Starts the stub on 127.0.0.1 (a free port), serving pods of `namespace`.
    pub async fn start(namespace: &str) -> ApiStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("stub binds");
        let addr = listener.local_addr().expect("stub addr");
        let (changed, _) = tokio::sync::watch::channel(0);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                namespace: namespace.into(),
                rv: 100,
                oldest: 1,
                ..State::default()
            }),
            changed,
        });
        let server = Server::start(listener, Arc::clone(&inner));
        ApiStub {
            addr,
            inner,
            server: Mutex::new(Some(server)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at the stub (no TLS, no credentials).
    pub fn kube_config(&self) -> kube::Config {
        let mut c = kube::Config::new(self.url().parse().expect("stub url"));
        c.default_namespace = self.state().namespace.clone();
        c
    }

    /// A kubeconfig file's text pointing at the stub, with `namespace` as the context's.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stub\n  cluster:\n    server: {}\ncontexts:\n- name: stub\n  context:\n    cluster: stub\n    user: nobody\n    namespace: {}\nusers:\n- name: nobody\n  user: {{}}\ncurrent-context: stub\n",
            self.url(),
            self.state().namespace
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("stub state")
    }

    /// Creates or updates a pod (an ADDED or MODIFIED event).
    pub fn apply(&self, pod: StubPod) {
        {
            let mut s = self.state();
            s.rv += 1;
            let rv = s.rv;
            let ns = s.namespace.clone();
            let (uid, before) = match s.pods.get(&pod.name) {
                Some((uid, v)) => (*uid, Some(v.clone())),
                None => {
                    s.next_uid += 1;
                    (s.next_uid, None)
                }
            };
            let after = pod.to_json(&ns, uid, rv);
            let kind = if before.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.pods.insert(pod.name.clone(), (uid, after.clone()));
            s.history.push(Change {
                rv,
                kind,
                before,
                after,
            });
        }
        self.inner.bump();
    }

    /// Deletes a pod (a DELETED event carrying its last state).
    pub fn delete(&self, name: &str) {
        {
            let mut s = self.state();
            let Some((_, mut last)) = s.pods.remove(name) else {
                return;
            };
            s.rv += 1;
            last["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let rv = s.rv;
            s.history.push(Change {
                rv,
                kind: "DELETED",
                before: Some(last.clone()),
                after: last,
            });
        }
        self.inner.bump();
    }

    /// Ends every open watch stream cleanly (as a timeout or a load balancer would).
    pub fn break_watches(&self) {
        self.state().epoch += 1;
        self.inner.bump();
    }

    /// The next `n` requests are answered HTTP 500 with a `Status`.
    pub fn fail_next(&self, n: usize) {
        self.state().fail_next = n;
    }

    /// How many 500s the stub has served.
    pub fn failures_served(&self) -> usize {
        self.state().failures_served
    }

    /// The next `n` watch requests are answered HTTP 410 (a real API server sends an ERROR
    /// event on a 200 stream instead).
    pub fn http_410_next_watches(&self, n: usize) {
        self.state().http_410_next = n;
    }

    /// Forgets the history: something elsewhere in the cluster changed (the resourceVersion
    /// moves on) and etcd was compacted, so a watch from any version seen so far gets 410.
    /// Open streams end.
    pub fn expire_history(&self) {
        {
            let mut s = self.state();
            s.rv += 1;
            s.oldest = s.rv + 1;
            s.epoch += 1;
        }
        self.inner.bump();
    }

    /// Every open watch that asked for bookmarks gets one with the current resourceVersion.
    pub fn bookmark(&self) {
        self.state().bookmarks += 1;
        self.inner.bump();
    }

    /// The API server goes away: the listener closes (connections refused) and every open
    /// connection is cut.
    /// Returns once the listener is closed and every connection task has ended.
    pub async fn go_down(&self) {
        let server = self.server.lock().expect("server").take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// The API server comes back on the same address.
    pub async fn come_up(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 200, "stub cannot rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let server = Server::start(listener, Arc::clone(&self.inner));
        *self.server.lock().expect("server") = Some(server);
    }

    /// Every request line served so far (`GET /api/v1/…?…`).
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.state().open_watches
    }
}

/// Counts one open watch stream while alive.
struct OpenWatch(Arc<Inner>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.open_watches -= 1;
        }
    }
}

async fn serve(
    listener: TcpListener,
    inner: Arc<Inner>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // Connections live in this set: stopping (or aborting) the server cuts them all.
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => {
                drop(listener);
                conns.shutdown().await;
                return;
            }
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let inner = Arc::clone(&inner);
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let inner = Arc::clone(&inner);
                async move { Ok::<_, Infallible>(handle(&inner, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("ct"));
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url_decode_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default();
    let mut s = inner.state.lock().expect("stub state");
    s.requests.push(format!("{} {}", req.method(), req.uri()));
    if s.fail_next > 0 {
        s.fail_next -= 1;
        s.failures_served += 1;
        return full(
            StatusCode::INTERNAL_SERVER_ERROR,
            status(500, "InternalError", "stub: etcdserver: request timed out"),
        );
    }
    let pods_path = format!("/api/v1/namespaces/{}/pods", s.namespace);
    let other_ns = path.starts_with("/api/v1/namespaces/") && path.ends_with("/pods");
    if req.method() != http::Method::GET || (path != pods_path && !other_ns) {
        return full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let selector = Selector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""));
    let Some(selector) = selector else {
        return full(
            StatusCode::BAD_REQUEST,
            status(400, "BadRequest", "unable to parse requirement"),
        );
    };
    let foreign = path != pods_path;
    if query.get("watch").map(String::as_str) == Some("true") {
        if s.http_410_next > 0 {
            s.http_410_next -= 1;
            return full(
                StatusCode::GONE,
                status(410, "Expired", "too old resource version"),
            );
        }
        drop(s);
        return watch(inner, &query, selector, foreign);
    }
    // List.
    let mut items: Vec<Value> = if foreign {
        Vec::new()
    } else {
        s.pods
            .values()
            .filter(|(_, p)| selector.matches(p))
            .map(|(_, p)| {
                let mut p = p.clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                p
            })
            .collect()
    };
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.strip_prefix("stub-offset-"))
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let total = items.len();
    items = items.into_iter().skip(offset).take(limit).collect();
    let mut meta = json!({ "resourceVersion": s.rv.to_string() });
    if offset + items.len() < total {
        meta["continue"] = json!(format!("stub-offset-{}", offset + items.len()));
        meta["remainingItemCount"] = json!(total - offset - items.len());
    }
    full(
        StatusCode::OK,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}),
    )
}

fn event_line(kind: &str, mut object: Value) -> Bytes {
    if let Some(o) = object.as_object_mut() {
        o.insert(
            "kind".into(),
            json!(if kind == "ERROR" { "Status" } else { "Pod" }),
        );
        o.insert("apiVersion".into(), json!("v1"));
    }
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    inner: &Arc<Inner>,
    query: &BTreeMap<String, String>,
    selector: Selector,
    foreign: bool,
) -> Response<Body> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let mut changed = inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let (epoch, mut bookmarks_seen, mut cursor, _open) = {
            let mut s = inner.state.lock().expect("stub state");
            let start = match from.as_str() {
                // "Start at most recent": synthetic ADDED events for what exists now.
                "" | "0" => {
                    let mut lines = Vec::new();
                    if !foreign {
                        for (_, p) in s.pods.values() {
                            if selector.matches(p) {
                                lines.push(event_line("ADDED", p.clone()));
                            }
                        }
                    }
                    for l in lines {
                        if tx.try_send(l).is_err() {
                            return;
                        }
                    }
                    s.rv
                }
                rv => match rv.parse::<u64>() {
                    Ok(rv) if rv + 1 < s.oldest => {
                        let st = status(
                            410,
                            "Expired",
                            &format!("too old resource version: {rv} ({})", s.oldest - 1),
                        );
                        let _ = tx.try_send(event_line("ERROR", st));
                        return;
                    }
                    Ok(rv) => rv,
                    Err(_) => return,
                },
            };
            s.open_watches += 1;
            (s.epoch, s.bookmarks, start, OpenWatch(Arc::clone(&inner)))
        };
        loop {
            let (lines, ended) = {
                let s = inner.state.lock().expect("stub state");
                let mut lines = Vec::new();
                if !foreign {
                    for c in s.history.iter().filter(|c| c.rv > cursor) {
                        let was = c.before.as_ref().is_some_and(|b| selector.matches(b));
                        let is = c.kind != "DELETED" && selector.matches(&c.after);
                        let kind = match (was, is, c.kind) {
                            (_, _, "DELETED") if was => "DELETED",
                            (true, true, k) => k,
                            (false, true, _) => "ADDED",
                            (true, false, _) => "DELETED",
                            _ => continue,
                        };
                        lines.push(event_line(kind, c.after.clone()));
                    }
                }
                cursor = s.rv;
                if bookmarks && s.bookmarks != bookmarks_seen {
                    bookmarks_seen = s.bookmarks;
                    lines.push(event_line(
                        "BOOKMARK",
                        json!({"metadata": {"resourceVersion": s.rv.to_string()}}),
                    ));
                }
                (lines, s.epoch != epoch)
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("ct"));
    r
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
struct Selector(Vec<(String, Op)>);

enum Op {
    Eq(String),
    Ne(String),
    Exists,
    Absent,
}

impl Selector {
    fn parse(s: &str) -> Option<Selector> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, val)) = part.split_once("!=") {
                (k.trim().to_owned(), Op::Ne(val.trim().to_owned()))
            } else if let Some((k, val)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k.trim().to_owned(), Op::Eq(val.trim().to_owned()))
            } else if let Some(k) = part.strip_prefix('!') {
                (k.trim().to_owned(), Op::Absent)
            } else {
                (part.to_owned(), Op::Exists)
            };
            if req.0.is_empty() || req.0.contains(' ') {
                return None;
            }
            v.push(req);
        }
        Some(Selector(v))
    }

    fn matches(&self, pod: &Value) -> bool {
        let labels = &pod["metadata"]["labels"];
        self.0.iter().all(|(k, op)| {
            let l = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq(v) => l == Some(v.as_str()),
                Op::Ne(v) => l != Some(v.as_str()),
                Op::Exists => l.is_some(),
                Op::Absent => l.is_none(),
            }
        })
    }
}

/// Simulated engines playing pods: one per address 127.0.0.2, 127.0.0.3, … all on one port,
/// then (optionally) "locked" engines, which answer `/v1/models` with 401 like a vLLM started
/// with `--api-key`, and completions without asking for the key.
pub struct PodEngines {
    pub port: u16,
    pub sims: Vec<SimHandle>,
    pub locked: Vec<LockedEngine>,
}

impl PodEngines {
    /// Starts `n` engines with `cfg` (seeded 1, 2, …) on 127.0.0.2.. with a common free port.
    pub async fn start(n: usize, cfg: SimConfig) -> PodEngines {
        PodEngines::start_with(n, 0, cfg).await
    }

    /// `n` simulated engines, then `locked` locked engines, on one common free port.
    pub async fn start_with(n: usize, locked: usize, cfg: SimConfig) -> PodEngines {
        'attempt: for _ in 0..50 {
            let mut sims = Vec::new();
            let mut port = 0u16;
            for i in 0..n {
                let c = SimConfig {
                    seed: i as u64 + 1,
                    ..cfg.clone()
                };
                let addr = SocketAddr::from(([127, 0, 0, 2 + i as u8], port));
                match sim::start(c, addr).await {
                    Ok(s) => {
                        port = s.addr().port();
                        sims.push(s);
                    }
                    Err(_) => {
                        for s in sims {
                            s.shutdown().await;
                        }
                        continue 'attempt;
                    }
                }
            }
            let mut lockeds = Vec::new();
            for j in 0..locked {
                let addr = SocketAddr::from(([127, 0, 0, 2 + (n + j) as u8], port));
                match LockedEngine::start(addr).await {
                    Some(l) => {
                        port = l.port;
                        lockeds.push(l);
                    }
                    None => {
                        for s in sims {
                            s.shutdown().await;
                        }
                        continue 'attempt;
                    }
                }
            }
            return PodEngines {
                port,
                sims,
                locked: lockeds,
            };
        }
        panic!("no common free port on 127.0.0.2..{}", 1 + n + locked);
    }

    /// The pod IP of engine `i` (simulated engines first, then locked ones).
    pub fn ip(&self, i: usize) -> String {
        format!("127.0.0.{}", 2 + i)
    }

    /// The engine name the router gives engine `i` (`ip:port`).
    pub fn name(&self, i: usize) -> String {
        format!("{}:{}", self.ip(i), self.port)
    }
}

/// An engine whose `/v1/models` answers 401; it serves completions of `MODEL`.
pub struct LockedEngine {
    pub port: u16,
    models_asked: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for LockedEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LockedEngine {
    async fn start(addr: SocketAddr) -> Option<LockedEngine> {
        let listener = TcpListener::bind(addr).await.ok()?;
        let port = listener.local_addr().ok()?.port();
        let models_asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let asked = Arc::clone(&models_asked);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let asked = Arc::clone(&asked);
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let asked = Arc::clone(&asked);
                        async move {
                            let (status, body) = match req.uri().path() {
                                "/v1/models" => {
                                    asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    (StatusCode::UNAUTHORIZED, json!({"error": "Unauthorized"}))
                                }
                                "/v1/completions" => (
                                    StatusCode::OK,
                                    json!({"id": "cmpl-locked", "object": "text_completion",
                                           "model": "switchyard-sim",
                                           "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}),
                                ),
                                "/metrics" => {
                                    let text = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n";
                                    let r = Response::new(Full::new(Bytes::from(text)).boxed());
                                    return Ok::<_, Infallible>(r);
                                }
                                _ => (StatusCode::OK, json!({})),
                            };
                            Ok::<_, Infallible>(full(status, body))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Some(LockedEngine {
            port,
            models_asked,
            task,
        })
    }

    /// How many times `/v1/models` was asked (and refused).
    pub fn models_asked(&self) -> usize {
        self.models_asked.load(std::sync::atomic::Ordering::Relaxed)
    }
}
