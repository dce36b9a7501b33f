//! Shared test harness: real simulated engines and the real router on loopback (port 0), and a
//! small HTTP client that records when each body frame arrives.
#![allow(dead_code)]

pub mod gate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use switchyard::config::RouterConfig;
use switchyard::proxy::RunningRouter;
use switchyard::sim::{self, SimConfig, SimHandle};

pub const MODEL: &str = "switchyard-sim";
/// Safety net only: nothing in a test should come near it.
pub const SAFETY: Duration = Duration::from_secs(20);

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A fast simulated engine: 1/100 of real time.
pub fn fast_sim() -> SimConfig {
    SimConfig {
        time_scale: 0.01,
        ..SimConfig::default()
    }
}

/// An engine that answers at once.
pub fn instant_sim() -> SimConfig {
    SimConfig {
        prefill_overhead_ms: 0.0,
        prefill_ms_per_token: 0.0,
        itl_ms: 0.0,
        ..SimConfig::default()
    }
}

pub async fn start_sims(n: usize, cfg: SimConfig) -> Vec<SimHandle> {
    let mut v = Vec::new();
    for i in 0..n {
        let c = SimConfig {
            seed: i as u64 + 1,
            ..cfg.clone()
        };
        v.push(sim::start(c, loopback()).await.expect("sim starts"));
    }
    v
}

pub fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A policies directory holding the shipped policies plus `NAME.toml` with `text`.
pub fn shipped_policies_with(name: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(shipped_policies()).expect("policies") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    std::fs::write(dir.path().join(format!("{name}.toml")), text).expect("write");
    dir
}

/// A router in front of `sims`, configured by `tweak`.
pub async fn start_router(urls: &[String], tweak: impl FnOnce(&mut RouterConfig)) -> RunningRouter {
    let mut cfg = RouterConfig::for_backends(urls, MODEL);
    cfg.policy.dir = shipped_policies();
    cfg.engine_stats_interval = Duration::from_millis(100);
    cfg.health_probe_interval = Duration::from_millis(100);
    tweak(&mut cfg);
    switchyard::proxy::start(cfg, None)
        .await
        .expect("router starts")
}

pub fn urls(sims: &[SimHandle]) -> Vec<String> {
    sims.iter().map(|s| s.url()).collect()
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(c: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    let fut = async {
        let resp = c.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(SAFETY, fut)
        .await
        .expect("reply within the safety net")
}

pub fn post(url: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("request")
}

/// A completion request to `url`'s `/v1/completions`.
pub fn completion_req(
    url: &str,
    prompt: &str,
    max_tokens: usize,
    stream: bool,
) -> Request<Full<Bytes>> {
    post(
        url,
        "/v1/completions",
        completion(prompt, max_tokens, stream).to_string(),
    )
}

pub async fn post_json(c: &TestClient, url: &str, path: &str, body: serde_json::Value) -> Reply {
    send(c, post(url, path, body.to_string())).await
}

pub async fn get(c: &TestClient, url: &str, path: &str) -> Reply {
    send(
        c,
        Request::get(format!("{url}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
}

pub fn completion(prompt: &str, max_tokens: usize, stream: bool) -> serde_json::Value {
    serde_json::json!({ "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream })
}

/// A streamed response: each body frame with its arrival time.
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub sent_at: Instant,
    pub frames: Vec<(Instant, Bytes)>,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
    /// The `data:` payloads of the SSE events, in order.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }
}

pub async fn stream(c: &TestClient, req: Request<Full<Bytes>>) -> Streamed {
    let sent_at = Instant::now();
    let fut = async {
        let resp = c.request(req).await.expect("response");
        let (parts, mut body) = resp.into_parts();
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.expect("frame").into_data() {
                frames.push((Instant::now(), d));
            }
        }
        Streamed {
            status: parts.status,
            headers: parts.headers,
            sent_at,
            frames,
        }
    };
    tokio::time::timeout(SAFETY, fut)
        .await
        .expect("stream within the safety net")
}

/// Opens a streaming request and returns the response with its body unread.
pub async fn open(c: &TestClient, req: Request<Full<Bytes>>) -> http::Response<Incoming> {
    tokio::time::timeout(SAFETY, c.request(req))
        .await
        .expect("headers within the safety net")
        .expect("response")
}

/// Polls `cond` until it holds, failing after the safety net. No fixed sleeps.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SAFETY;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The real `switchyard` binary running as its own process (killed when dropped).
pub struct RouterProcess {
    pub child: std::process::Child,
    pub url: String,
    /// The lines it printed before saying where it routes.
    pub banner: Vec<String>,
}

impl RouterProcess {
    /// Starts `switchyard serve --port 0 ARGS…` and waits for it to say where it listens.
    pub fn spawn(args: &[&str]) -> RouterProcess {
        RouterProcess::spawn_with(None, args, &[])
    }

    /// [`RouterProcess::spawn`] in the working directory `cwd` (else the test's).
    pub fn spawn_in(cwd: Option<&std::path::Path>, args: &[&str]) -> RouterProcess {
        RouterProcess::spawn_with(cwd, args, &[])
    }

    /// [`RouterProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> RouterProcess {
        RouterProcess::spawn_with(None, args, env)
    }

    /// Starts the binary in `cwd` (else the test's) with extra environment variables (and no
    /// inherited `KUBECONFIG`).
    fn spawn_with(
        cwd: Option<&std::path::Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> RouterProcess {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.args(["serve", "--port", "0", "--log-level", "warn"])
            .args(args)
            .env_remove("KUBECONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the router binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut banner = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if !sent && let Some(url) = line.strip_prefix("Switchyard is routing on ") {
                    let _ = tx.send((url.trim().to_owned(), std::mem::take(&mut banner)));
                    sent = true;
                } else if !sent {
                    banner.push(line);
                }
            }
        });
        let (url, banner) = rx
            .recv_timeout(SAFETY)
            .expect("the router binary says where it listens");
        RouterProcess { child, url, banner }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Reads a raw HTTP/1.1 request head (through the blank line) from `s`; `None` if the peer
/// closes first. For hand-written engines that control every byte they send.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Answers a raw request with an empty 200 and closes (scrapes and probes of hand-written
/// engines).
pub async fn answer_empty_200(s: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
}

/// Whether python3 with pyzmq and msgspec is there (the libzmq interop tests' peer). Missing
/// under `CI=true` is a failure, elsewhere a skip.
pub fn pyzmq_ready() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import zmq, msgspec"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but python3 with pyzmq and msgspec is missing: `pip install pyzmq msgspec`"
        );
        eprintln!("skipped: python3 with pyzmq and msgspec is not available");
    }
    ok
}

/// A chat request whose prompt is `words` words unique to `tag` (one output token).
pub fn unique_chat(tag: &str, words: usize) -> serde_json::Value {
    let text: Vec<String> = (0..words)
        .map(|i| format!("{tag}{}", i * 7919 % 1000))
        .collect();
    serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": text.join(" ") }],
        "max_tokens": 1,
    })
}

/// Two static backends as a prefill engine (the first) and a decode engine (the second) under
/// the NIXL-orchestrated disaggregated policy.
pub fn prefill_then_decode(c: &mut RouterConfig) {
    c.backends[0].label = Some("prefill".into());
    c.backends[1].label = Some("decode".into());
    c.prefill_labels = vec!["prefill".into()];
    c.decode_labels = vec!["decode".into()];
    c.policy.default_policy = "disaggregated_prefill_orchestrated".into();
}
