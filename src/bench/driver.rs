//! The load generator: one Tokio task per chain (user), every request planned up-front from
//! the seeded workload, each streamed (`"stream": true`) through a pooled `TCP_NODELAY`
//! client, timed on the client side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;

use super::sse::{SseEvent, SseReader};
use super::stats::{Outcome, RequestRecord};
use super::workload::Workload;
use crate::tokens;

/// The session header every request carries (the router's `session_key`).
pub const SESSION_HEADER: &str = "x-user-id";

/// The benchmark's HTTP client.
pub type BenchClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client with `TCP_NODELAY`.
pub fn client() -> BenchClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(c)
}

/// Where and how to send a workload.
#[derive(Debug, Clone)]
pub struct DriveConfig {
    /// Base URL of the router, e.g. `http://127.0.0.1:8001`.
    pub url: String,
    /// Other replicas of the router: requests are spread over `url` and these, request `k` of
    /// chain `c` to replica `(c + k) % replicas` (each replica sees its share of every user).
    pub replica_urls: Vec<String>,
    pub model: String,
    /// Wall seconds per simulated second: arrival times are multiplied by it, measured times
    /// divided by it.
    pub time_scale: f64,
    /// Wall-clock safety net per request.
    pub request_timeout: Duration,
}

impl DriveConfig {
    /// How many router replicas share the load.
    pub fn replicas(&self) -> usize {
        1 + self.replica_urls.len()
    }

    /// The base URL of replica `i` (0 is `url`; out of range: `url`).
    pub fn replica_url(&self, i: usize) -> &str {
        match i.checked_sub(1).and_then(|j| self.replica_urls.get(j)) {
            Some(u) => u,
            None => &self.url,
        }
    }
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<Msg<'a>>,
    max_tokens: usize,
    stream: bool,
    /// vLLM's extension: generate exactly `max_tokens` (the sims always do).
    ignore_eos: bool,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

/// [`drive`] on a dedicated thread with its own single-threaded Tokio runtime and client, so
/// that the client's timers and timestamps do not queue behind the engines' and the router's
/// tasks when they share the caller's runtime (as a separate benchmark process would not).
pub async fn drive_isolated(
    cfg: DriveConfig,
    workload: Arc<Workload>,
    progress: ProgressBar,
) -> Result<Vec<RequestRecord>, std::io::Error> {
    on_client_thread(move |client| async move { drive(&cfg, &client, workload, &progress).await })
        .await
}

/// Runs `load` with a fresh [`client`] on a dedicated thread with its own single-threaded
/// Tokio runtime (see [`drive_isolated`]).
pub(super) async fn on_client_thread<F, Fut, T>(load: F) -> Result<T, std::io::Error>
where
    F: FnOnce(BenchClient) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("switchyard-bench-client".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = rt.map(|rt| rt.block_on(load(client())));
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the benchmark client thread ended early"))?
}

/// Sends every request of `workload` to `cfg.url` and returns what the client saw, ordered by
/// send time. Each chain's turns go in order, a turn no earlier than planned and only after
/// the previous turn's answer came back.
pub async fn drive(
    cfg: &DriveConfig,
    client: &BenchClient,
    workload: Arc<Workload>,
    progress: &ProgressBar,
) -> Vec<RequestRecord> {
    // A short lead so that the first arrivals are not late because of spawning.
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut tasks = JoinSet::new();
    for idx in 0..workload.chains.len() {
        tasks.spawn(run_chain(
            cfg.clone(),
            client.clone(),
            Arc::clone(&workload),
            idx,
            t0,
            progress.clone(),
        ));
    }
    let mut records = Vec::with_capacity(workload.requests());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(recs) => records.extend(recs),
            Err(e) => tracing::error!(error = %e, "a benchmark client task failed"),
        }
    }
    records.sort_by(|a, b| a.start.total_cmp(&b.start));
    records
}

async fn run_chain(
    cfg: DriveConfig,
    client: BenchClient,
    workload: Arc<Workload>,
    idx: usize,
    t0: Instant,
    progress: ProgressBar,
) -> Vec<RequestRecord> {
    let chain = &workload.chains[idx];
    let ts = cfg.time_scale;
    let mut history: Vec<(&str, Arc<str>)> = chain
        .preamble
        .iter()
        .map(|m| (m.role, Arc::clone(&m.content)))
        .collect();
    let mut records = Vec::with_capacity(chain.turns.len());
    let mut ready = t0;
    for (turn_idx, turn) in chain.turns.iter().enumerate() {
        let planned = t0 + Duration::from_secs_f64(turn.at * ts);
        let due = planned.max(ready);
        tokio::time::sleep_until(due.into()).await;
        history.push(("user", Arc::from(turn.question.as_str())));
        let body = ChatBody {
            model: &cfg.model,
            messages: history
                .iter()
                .map(|(role, content)| Msg { role, content })
                .collect(),
            max_tokens: turn.max_tokens,
            stream: true,
            ignore_eos: true,
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise a request");
                break;
            }
        };
        let replica = (idx + turn_idx) % cfg.replicas();
        let url = cfg.replica_url(replica);
        let done = send(
            &client,
            url,
            "/v1/chat/completions",
            &[(SESSION_HEADER, &chain.user)],
            body,
            cfg.request_timeout,
        )
        .await;
        let answer = done.exchange.answer.clone();
        records.push(done.record(idx, turn_idx, replica, t0, due, ts));
        progress.inc(1);
        // The next round carries the answer actually received.
        history.push(("assistant", Arc::from(answer)));
        ready = Instant::now();
    }
    records
}

/// One request sent and its response read (or cut short by `timeout`).
pub(super) struct Sent {
    pub(super) exchange: Exchange,
    pub(super) sent: Instant,
    pub(super) end: Instant,
    pub(super) timed_out: bool,
}

/// POSTs `body` to `url` + `path` with `headers` (e.g. the session header), streams the
/// response.
pub(super) async fn send(
    client: &BenchClient,
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Sent {
    let sent = Instant::now();
    let mut exchange = Exchange::default();
    let timed_out = match request(url, path, headers, body) {
        Ok(req) => tokio::time::timeout(timeout, exchange.run(client, req))
            .await
            .is_err(),
        Err(e) => {
            exchange.error = Some(e);
            false
        }
    };
    Sent {
        exchange,
        sent,
        end: Instant::now(),
        timed_out,
    }
}

impl Sent {
    /// The record of this request: `chain`/`turn` name it, `t0` is the run's start, `due` when
    /// it could have been sent at the earliest, `ts` the time scale.
    pub(super) fn record(
        self,
        chain: usize,
        turn: usize,
        replica: usize,
        t0: Instant,
        due: Instant,
        ts: f64,
    ) -> RequestRecord {
        let sim = |d: Duration| d.as_secs_f64() / ts;
        let ex = self.exchange;
        let outcome = ex.outcome(self.timed_out);
        RequestRecord {
            chain,
            turn,
            start: sim(self.sent.saturating_duration_since(t0)),
            ttft: ex
                .first
                .map(|f| sim(f.saturating_duration_since(self.sent))),
            e2e: sim(self.end.saturating_duration_since(self.sent)),
            output_tokens: tokens::estimate_tokens(ex.answer.len()),
            outcome,
            engine: ex.engine,
            tier: ex.tier,
            policy: ex.policy,
            kv: ex.kv,
            stage: ex.stage,
            replica,
            lag: sim(self.sent.saturating_duration_since(due)),
        }
    }
}

fn request(
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let mut req = Request::post(format!("{url}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))
}

/// What one exchange produced so far (kept when the safety-net timeout cuts it short).
#[derive(Debug, Default)]
pub(super) struct Exchange {
    status: Option<u16>,
    engine: Option<String>,
    tier: Option<String>,
    policy: Option<String>,
    kv: Option<String>,
    /// A P/D policy's stage (`x-switchyard-stage`: `disaggregated` or `decode_only`).
    stage: Option<String>,
    first: Option<Instant>,
    answer: String,
    done: bool,
    error: Option<String>,
    /// A refusal's `Retry-After` in seconds (the delay form; the date form is not read).
    retry_after: Option<u64>,
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Exchange {
    /// The response's `Retry-After`, seconds, when it gave one.
    pub(super) fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    async fn run(&mut self, client: &BenchClient, req: Request<Full<Bytes>>) {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.error = Some(format!("request failed: {e}"));
                return;
            }
        };
        let status = resp.status();
        self.status = Some(status.as_u16());
        let h = resp.headers();
        self.engine = header(h, "x-switchyard-engine");
        self.tier = header(h, "x-switchyard-tier");
        self.policy = header(h, "x-switchyard-policy");
        self.kv = header(h, "x-switchyard-kv");
        self.stage = header(h, "x-switchyard-stage");
        self.retry_after = header(h, "retry-after").and_then(|v| v.trim().parse::<u64>().ok());
        let mut body = resp.into_body();
        if !status.is_success() {
            let mut text = Vec::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    text.extend_from_slice(&d[..d.len().min(2048 - text.len().min(2048))]);
                }
            }
            self.error = Some(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&text).trim()
            ));
            return;
        }
        let mut reader = SseReader::new();
        let mut events = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => {
                    self.error = Some(format!("response body broke: {e}"));
                    return;
                }
            };
            let now = Instant::now();
            reader.push(&data, &mut events);
            for ev in events.drain(..) {
                match ev {
                    SseEvent::Content(t) => {
                        if !t.is_empty() && self.first.is_none() {
                            self.first = Some(now);
                        }
                        self.answer.push_str(&t);
                    }
                    SseEvent::Done => self.done = true,
                    SseEvent::Error(m) => {
                        self.error.get_or_insert(m);
                    }
                }
            }
        }
    }

    fn outcome(&self, timed_out: bool) -> Outcome {
        if timed_out {
            return Outcome::TimedOut;
        }
        match (self.status, &self.error) {
            (Some(s), _) if !(200..300).contains(&s) => Outcome::Status(s),
            (_, Some(e)) => Outcome::Failed(e.clone()),
            (None, None) => Outcome::Failed("no response".into()),
            (Some(_), None) if !self.done => {
                Outcome::Failed("the stream ended without [DONE]".into())
            }
            (Some(_), None) => Outcome::Ok,
        }
    }
}
