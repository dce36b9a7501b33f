//! Hostile-client drills (and broken engines, the other peer a router must not trust): the real
//! router, in-process or as the real binary when a drill needs its own process (open-file
//! limits, RSS), in front of real simulated engines or small canned engines over HTTP. Each
//! drill asserts behaviour and prints what it measured.
//!
//! Layout: helpers shared by every drill first (add new ones there), then the drills by peer:
//! hostile clients, broken engines.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

// =============================================================================================
// Helpers
// =============================================================================================

/// The router binary (`switchyard serve`) as a child process, killed when dropped.
struct RouterProcess {
    child: Child,
    addr: SocketAddr,
}

impl RouterProcess {
    /// Starts the binary on 127.0.0.1 (a free port) with the shipped policies, plus `args`;
    /// returns once it prints the address it routes on.
    fn start(args: &[&str]) -> RouterProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--policies-dir",
            ])
            .arg(shipped_policies())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the router binary starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the address line, then keeps draining stdout so the child never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(addr) = line.strip_prefix("Switchyard is routing on http://") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(SAFETY)
            .expect("the router prints its address")
            .parse()
            .expect("an address");
        RouterProcess { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `/proc/PID/status` figure in KiB: `VmRSS` (now) or `VmHWM` (peak so far).
    fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.child.id(), field)
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Raises this process's open-file limit, soft and hard, to `want` if allowed (root has
/// CAP_SYS_RESOURCE), else the soft limit to the hard one. Returns the soft limit in effect.
/// Child processes (the router binary) inherit it.
fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    if soft >= want {
        return soft;
    }
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(soft)
}

/// The sum of a metric's samples in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A metric of a router process, from its `/metrics`.
async fn router_metric(router_url: &str, name: &str) -> Option<f64> {
    let r = get(&client(), router_url, "/metrics").await;
    metric(&String::from_utf8_lossy(&r.body), name)
}

/// Polls an async condition until it holds, failing after `limit` (a safety net only).
async fn eventually_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a raw client saw until the router closed the connection.
struct Closed {
    /// Everything received before the close.
    bytes: Vec<u8>,
    /// Whether the router closed (EOF or reset) before the safety net.
    closed: bool,
    /// When the close was seen.
    at: Instant,
}

impl Closed {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
    /// The JSON body of an HTTP/1.1 response (after the blank line).
    fn json(&self) -> serde_json::Value {
        let text = self.text();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
    }
}

/// Reads until the peer closes the connection (EOF or reset), for at most `SAFETY`.
async fn read_until_closed(s: &mut TcpStream) -> Closed {
    let deadline = tokio::time::Instant::now() + SAFETY;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => {
                return Closed {
                    bytes,
                    closed: false,
                    at: Instant::now(),
                };
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Closed {
                    bytes,
                    closed: true,
                    at: Instant::now(),
                };
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one complete HTTP/1.1 response with a `content-length` (the router's own answers,
/// and non-streamed completions); returns its text.
async fn read_one_response(s: &mut TcpStream) -> String {
    let deadline = tokio::time::Instant::now() + SAFETY;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("a response within the safety net")
            .expect("read");
        assert!(n > 0, "closed before a complete response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// The head of an HTTP/1.1 completion POST announcing `content_length` body bytes.
fn post_head(content_length: usize) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\n\r\n"
    )
}

/// A complete HTTP/1.1 completion POST.
fn full_post(prompt: &str) -> String {
    let body = completion(prompt, 1, false).to_string();
    format!("{}{body}", post_head(body.len()))
}

/// A request body that sends `first` (if any) and then stalls forever: an h2 stream with
/// headers and no (more) data.
struct StallingBody {
    first: Option<Bytes>,
}

impl Body for StallingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// What a canned engine answers to one request.
#[derive(Clone)]
enum Canned {
    /// A complete response.
    Full {
        status: u16,
        content_type: &'static str,
        body: Bytes,
    },
    /// A chunked body: `chunk` bytes every `pause`, as fast as the connection takes them, up to
    /// `total` bytes (the drill's own safety bound: "endless" as far as the router can tell).
    Stream {
        status: u16,
        chunk: usize,
        pause: Duration,
        total: u64,
    },
}

/// A canned engine over HTTP/1.1 (one request per connection).
struct CannedEngine {
    url: String,
    /// Body bytes handed to the kernel so far, over all responses.
    produced: Arc<AtomicU64>,
    /// Requests received per path.
    hits: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl CannedEngine {
    fn hits(&self, path: &str) -> u64 {
        self.hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or_default()
    }
}

/// Starts a canned engine answering `answer(method, path)`.
async fn canned_engine(
    answer: impl Fn(&str, &str) -> Canned + Send + Sync + 'static,
) -> CannedEngine {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let produced = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let answer = Arc::new(answer);
    let (p, h) = (Arc::clone(&produced), Arc::clone(&hits));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (p, h, answer) = (Arc::clone(&p), Arc::clone(&h), Arc::clone(&answer));
            tokio::spawn(async move {
                let _ = serve_canned(s, &*answer, &p, &h).await;
            });
        }
    });
    CannedEngine {
        url,
        produced,
        hits,
    }
}

async fn serve_canned(
    mut s: TcpStream,
    answer: &(dyn Fn(&str, &str) -> Canned + Send + Sync),
    produced: &AtomicU64,
    hits: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
) -> std::io::Result<()> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 || got.len() > 64 * 1024 {
            return Ok(());
        }
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let mut first = head.split_whitespace();
    let (method, path) = (
        first.next().unwrap_or("").to_owned(),
        first.next().unwrap_or("").to_owned(),
    );
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    // Read the request body, so closing never resets the connection under the response.
    let mut body_read = got.len() - head_end;
    while body_read < length {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        body_read += n;
    }
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    match answer(&method, &path) {
        Canned::Full {
            status,
            content_type,
            body,
        } => {
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await?;
            s.write_all(&body).await?;
            produced.fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        Canned::Stream {
            status,
            chunk,
            pause,
            total,
        } => {
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await?;
            let data = vec![b'x'; chunk];
            let mut sent = 0u64;
            while sent < total {
                s.write_all(format!("{chunk:x}\r\n").as_bytes()).await?;
                s.write_all(&data).await?;
                s.write_all(b"\r\n").await?;
                sent += chunk as u64;
                produced.fetch_add(chunk as u64, Ordering::Relaxed);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            s.write_all(b"0\r\n\r\n").await?;
        }
    }
    s.shutdown().await
}

/// A canned OpenAI completion, as an engine would answer it.
fn canned_completion() -> Canned {
    Canned::Full {
        status: 200,
        content_type: "application/json",
        body: Bytes::from(
            serde_json::json!({
                "id": "cmpl-canned", "object": "text_completion", "model": MODEL,
                "choices": [{"index": 0, "text": " canned", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            })
            .to_string(),
        ),
    }
}

fn empty_200() -> Canned {
    Canned::Full {
        status: 200,
        content_type: "text/plain",
        body: Bytes::new(),
    }
}

// =============================================================================================
// Hostile clients
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http1_bodies_get_408_and_the_connection_is_closed() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| c.body_read_timeout = TIMEOUT).await;
    let addr = router.addr;
    let cases: [(&str, String); 3] = [
        (
            "content-length larger than sent",
            format!("{}{{\"model\":", post_head(100)),
        ),
        (
            "chunked without the last chunk",
            "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n9\r\n{\"model\":\r\n".to_owned(),
        ),
        ("headers and no body byte", post_head(50)),
    ];
    let mut tasks = Vec::new();
    for (what, bytes) in cases {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let sent = Instant::now();
            s.write_all(bytes.as_bytes()).await.unwrap();
            let c = read_until_closed(&mut s).await;
            (what, sent, c)
        }));
    }
    for t in tasks {
        let (what, sent, c) = t.await.unwrap();
        let text = c.text();
        assert!(c.closed, "{what}: connection still open after {SAFETY:?}");
        assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text:?}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{what}: {text:?}"
        );
        assert_eq!(c.json()["error"]["code"], "request_timeout", "{what}");
        let took = c.at - sent;
        println!(
            "stalled body ({what}): 408 and closed after {took:?} (--body-read-timeout {TIMEOUT:?})"
        );
        assert!(took >= TIMEOUT, "{what}: closed after {took:?}");
    }

    // The timer counts from the last byte received: a slow but steady body is never cut.
    let router2 = start_router(&urls(&sims), |c| {
        c.body_read_timeout = Duration::from_secs(2)
    })
    .await;
    let body = completion("a steady trickle", 1, false).to_string();
    let mut s = TcpStream::connect(router2.addr).await.unwrap();
    s.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    let started = Instant::now();
    for b in body.as_bytes() {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let text = read_one_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.contains("\"usage\""), "{text:?}");
    println!("a body trickled over {took:?}, one byte per 50 ms, with a 2 s body timeout: 200");
    assert!(
        took > Duration::from_secs(2),
        "the trickle outlasted the timeout"
    );
    router.shutdown(Duration::from_secs(1)).await;
    router2.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_streams_get_408_and_the_connection_stays_usable() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| c.body_read_timeout = TIMEOUT).await;
    let url = router.url();
    let h2: Client<HttpConnector, StallingBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let stalled = |first: Option<&'static str>| {
        Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(StallingBody {
                first: first.map(|s: &'static str| Bytes::from_static(s.as_bytes())),
            })
            .unwrap()
    };
    let started = Instant::now();
    let answer = |req| {
        let h2 = h2.clone();
        async move {
            let r = h2.request(req).await.expect("an answer, not a reset");
            let (status, version) = (r.status(), r.version());
            let body = r.into_body().collect().await.expect("body").to_bytes();
            (status, version, body, started.elapsed())
        }
    };
    let (a, b) = tokio::time::timeout(SAFETY, async {
        tokio::join!(answer(stalled(None)), answer(stalled(Some("{\"model\":"))))
    })
    .await
    .expect("both answered within the safety net");
    for (what, r) in [("headers and no DATA", a), ("DATA then nothing", b)] {
        let took = r.3;
        println!("stalled h2 stream ({what}): {} after {took:?}", r.0);
        assert_eq!(r.0, StatusCode::REQUEST_TIMEOUT, "{what}");
        assert_eq!(r.1, http::Version::HTTP_2);
        let v: serde_json::Value = serde_json::from_slice(&r.2).unwrap();
        assert_eq!(v["error"]["code"], "request_timeout");
        assert!(took >= TIMEOUT);
    }
    // Only the streams ended: the same h2 connection serves the next request.
    let r = tokio::time::timeout(
        SAFETY,
        h2.request(
            Request::get(format!("{url}/health"))
                .body(StallingBody { first: None })
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(router.state.connections.open(), 1, "one h2 connection");
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_holds_from_accept_and_from_a_late_first_byte() {
    // A long idle timeout: every close the test sees within its safety net is the header timeout.
    const HEADER: Duration = Duration::from_secs(1);
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| {
        c.header_read_timeout = HEADER;
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let addr = router.addr;

    // A connection that never sends a byte.
    let silent = tokio::spawn(async move {
        let before = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let c = read_until_closed(&mut s).await;
        (c.closed && c.bytes.is_empty(), c.at - before)
    });
    // A first byte that comes late (after the watchdog's first look at the connection), then
    // nothing: the deadline still runs from the accept.
    let late = tokio::spawn(async move {
        let before = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(HEADER / 4).await; // the hostile client's pause, not a sync point
        s.write_all(b"P").await.unwrap();
        let c = read_until_closed(&mut s).await;
        (c.closed && c.bytes.is_empty(), c.at - before)
    });
    // A keep-alive connection: one request served, a pause, then one byte of the next request:
    // its header deadline runs from that byte.
    let keepalive = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(full_post("first").as_bytes()).await.unwrap();
        let first = read_one_response(&mut s).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
        tokio::time::sleep(HEADER / 4).await; // the pause between two requests
        let byte_at = Instant::now();
        s.write_all(b"P").await.unwrap();
        let c = read_until_closed(&mut s).await;
        (c.closed && c.bytes.is_empty(), c.at - byte_at)
    });
    for (what, t) in [
        ("no byte at all (from before connect)", silent),
        ("first byte late (from before connect)", late),
        ("next request's first byte (from that byte)", keepalive),
    ] {
        let (closed, took) = t.await.unwrap();
        println!(
            "slow header, {what}: closed after {took:?} (--header-read-timeout {HEADER:?}, --idle-timeout 600s)"
        );
        assert!(
            closed,
            "{what}: still open after the safety net, far past the header timeout"
        );
        assert!(took >= HEADER, "{what}: closed after {took:?}");
    }
    router.shutdown(Duration::from_secs(1)).await;
}

/// On h2, bytes between requests are often control frames (PING, WINDOW_UPDATE): they must not
/// start a header deadline that would cut an idle connection long before the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_sending_pings_is_kept_past_the_header_timeout() {
    const HEADER: Duration = Duration::from_millis(300);
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| {
        c.header_read_timeout = HEADER;
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let tcp = TcpStream::connect(router.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let health = || {
        Request::get(format!("{}/health", router.url()))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let r = tokio::time::timeout(SAFETY, send.send_request(health()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Idle while the client pings every 50 ms: well past the header timeout (the scenario's
    // duration, not a synchronisation).
    tokio::time::sleep(HEADER * 4).await;
    assert!(!conn.is_finished(), "the idle h2 connection was closed");
    let r = tokio::time::timeout(SAFETY, send.send_request(health()))
        .await
        .unwrap()
        .expect("the same connection serves again");
    assert_eq!(r.status(), StatusCode::OK);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_at_once_and_served_again_later() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| {
        c.max_connections = Some(8);
        c.body_read_timeout = Duration::from_secs(600);
        c.header_read_timeout = Duration::from_secs(600);
    })
    .await;
    let state = Arc::clone(&router.state);
    // Eight hostile connections, each holding a request whose body never comes.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(router.addr).await.unwrap();
        s.write_all(format!("{}{{\"model\":", post_head(100)).as_bytes())
            .await
            .unwrap();
        held.push(s);
    }
    eventually("8 connections held", || state.connections.open() == 8).await;
    // The ninth: accepted and closed at once, without a response, even with a request sent.
    let before = Instant::now();
    let mut ninth = TcpStream::connect(router.addr).await.unwrap();
    let _ = ninth
        .write_all(b"GET /health HTTP/1.1\r\nhost: r\r\n\r\n")
        .await;
    let c = read_until_closed(&mut ninth).await;
    println!(
        "9th connection with --max-connections 8: closed after {:?} with {} bytes",
        c.at - before,
        c.bytes.len()
    );
    assert!(c.closed, "the ninth connection was kept waiting");
    assert!(c.bytes.is_empty(), "answered: {:?}", c.text());
    assert_eq!(state.connections.open(), 8, "the eight are still held");
    for s in &held {
        let mut b = [0u8; 1];
        assert!(
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a held connection was closed"
        );
    }
    // Once they go, new connections are served again.
    drop(held);
    eventually("held connections released", || {
        state.connections.open() == 0
    })
    .await;
    let r = get(&client(), &router.url(), "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    router.shutdown(Duration::from_secs(1)).await;
}

/// The drill of the issue: 20,000 connections each holding a request whose body never comes,
/// and meanwhile `/health` and a completion still answer (their latency is printed; the
/// requirement is under 1 s), with the router's memory measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_20k_stalled_body_connections_leave_health_and_completions_answering() {
    const HOSTILE: usize = 20_000;
    const OPENERS: usize = 100;
    // Generous: opening the connections takes seconds on a loaded 2-core machine.
    const DRILL_SAFETY: Duration = Duration::from_secs(180);
    // This process holds the client ends (with room left for the other tests of this binary);
    // the router, which inherits the limit, the other ends.
    const ROOM: u64 = 2048;
    let nofile = raise_nofile(65_536);
    let sims = start_sims(1, instant_sim()).await;
    let sim_url = sims[0].url();
    let mut args = vec![
        "--static-backends".to_owned(),
        sim_url,
        "--static-models".to_owned(),
        MODEL.to_owned(),
        // The drill holds the connections as long as it needs to; the timeout has its own tests.
        "--body-read-timeout".to_owned(),
        "600".to_owned(),
        "--log-level".to_owned(),
        "warn".to_owned(),
    ];
    let fits = (HOSTILE as u64 + ROOM) <= nofile;
    if !fits {
        // The limit could not be raised (no CAP_SYS_RESOURCE): let the router use nearly all of
        // it, so the drill gets as close to its count as this machine allows.
        args.extend(["--max-connections".to_owned(), (nofile - 256).to_string()]);
    }
    let router = RouterProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let url = router.url();
    let cap = router_metric(&url, "switchyard_client_connections_max")
        .await
        .expect("the connection cap is exported") as usize;
    let n = HOSTILE
        .min(cap.saturating_sub(64))
        .min(nofile.saturating_sub(ROOM) as usize);
    if n < HOSTILE {
        println!(
            "20k drill: SCALED DOWN to {n} hostile connections: open-file limit {nofile} (raising it needs CAP_SYS_RESOURCE), router cap {cap}{}",
            if fits { "" } else { " (set by the drill)" }
        );
    }
    let rss_before = router.status_kib("VmRSS");

    // Open the hostile connections, OPENERS at a time, from many loopback source addresses (so
    // they do not use up 127.0.0.1's ephemeral ports, shared with whatever else runs).
    let started = Instant::now();
    let head = format!("{}{{\"model\":\"{MODEL}\",", post_head(1000));
    let mut openers = Vec::new();
    for o in 0..OPENERS {
        let (head, addr) = (head.clone(), router.addr);
        let count = n / OPENERS + usize::from(o < n % OPENERS);
        openers.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(count);
            for i in 0..count {
                let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i % 200) as u8, 2 + o as u8));
                let sock = TcpSocket::new_v4().expect("socket");
                sock.bind(SocketAddr::new(src, 0))
                    .expect("bind a loopback source");
                let mut s = tokio::time::timeout(DRILL_SAFETY, sock.connect(addr))
                    .await
                    .expect("connect within the safety net")
                    .expect("connect");
                s.write_all(head.as_bytes()).await.expect("send the head");
                mine.push(s);
            }
            mine
        }));
    }
    let mut hostile = Vec::with_capacity(n);
    for o in openers {
        hostile.extend(o.await.unwrap());
    }
    let opened_in = started.elapsed();
    // Held by the router (accepted and being served), not waiting in the listen backlog.
    eventually_async(
        "the router holds every hostile connection",
        DRILL_SAFETY,
        || {
            let url = url.clone();
            async move {
                router_metric(&url, "switchyard_client_connections")
                    .await
                    .is_some_and(|v| v as usize >= n)
            }
        },
    )
    .await;
    println!(
        "20k drill: {n} stalled-body connections opened in {opened_in:?}, all held after {:?}",
        started.elapsed()
    );

    // Meanwhile: /health and a completion, each on a new connection.
    let mut health = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = get(&client(), &url, "/health").await;
        health.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let t = Instant::now();
    let r = send(&client(), completion_req(&url, "Hello", 4, false)).await;
    let completion_took = t.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    let rss = router.status_kib("VmRSS");
    let hwm = router.status_kib("VmHWM");
    println!(
        "20k drill: with {n} held: /health {health:?}, completion {completion_took:?}; router RSS {:.1} MiB (peak {:.1} MiB, {:.1} MiB before: {:.1} KiB per held connection)",
        mib(rss),
        mib(hwm),
        mib(rss_before),
        (rss.saturating_sub(rss_before)) as f64 / n as f64
    );
    // Every hostile connection is still open: the router held them all, none was refused.
    let closed = hostile
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            !matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(closed, 0, "hostile connections closed by the router");
    drop(hostile);
    eventually_async("hostile connections released", DRILL_SAFETY, || {
        let url = url.clone();
        async move {
            router_metric(&url, "switchyard_client_connections")
                .await
                .is_some_and(|v| v <= 1.0)
        }
    })
    .await;
}

// =============================================================================================
// Broken engines
// =============================================================================================

/// An engine answering 500 with an endless body: the client gets a bounded answer at once, and
/// the router's memory stays flat (measured on the router process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_engine_error_body_is_cut_and_router_memory_stays_flat() {
    const TOTAL: u64 = 256 * 1024 * 1024; // "endless" to the router; bounds the drill
    let engine = canned_engine(|method, _| {
        if method == "POST" {
            Canned::Stream {
                status: 500,
                chunk: 64 * 1024,
                pause: Duration::ZERO,
                total: TOTAL,
            }
        } else {
            empty_200()
        }
    })
    .await;
    let router = RouterProcess::start(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        MODEL,
        "--max-attempts",
        "1",
        // All eight requests reach the engine: its 500s must not eject it midway.
        "--eject-after-failures",
        "100",
        "--log-level",
        "error",
    ]);
    let url = router.url();
    let hwm_before = router.status_kib("VmHWM");
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..8 {
        let url = url.clone();
        answers.push(tokio::spawn(async move {
            send(
                &client(),
                completion_req(&url, &format!("endless {i}"), 1, false),
            )
            .await
        }));
    }
    for a in answers {
        let r = a.await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body.len());
        assert!(r.body.len() < 1024, "{} bytes relayed", r.body.len());
        let v = r.json();
        assert_eq!(v["error"]["code"], "bad_gateway");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("answered 500") && msg.contains("65536"),
            "{msg}"
        );
    }
    let took = started.elapsed();
    let hwm = router.status_kib("VmHWM");
    let produced = engine.produced.load(Ordering::Relaxed);
    println!(
        "endless 500 body x8: 502 for all after {took:?}; router peak RSS {:.1} MiB ({:.1} MiB before); the engine got {:.1} MiB out before the router hung up",
        mib(hwm),
        mib(hwm_before),
        produced as f64 / 1048576.0
    );
    assert!(
        produced < 8 * TOTAL,
        "the router read every endless body to its end"
    );
    assert!(
        hwm < hwm_before + 64 * 1024,
        "router peak RSS grew from {hwm_before} KiB to {hwm} KiB"
    );
}

/// An engine answering 500 and then dripping its body forever: answered within the time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dripping_engine_error_body_is_time_limited() {
    let engine = canned_engine(|method, _| {
        if method == "POST" {
            Canned::Stream {
                status: 500,
                chunk: 1,
                pause: Duration::from_millis(50),
                total: 1 << 20,
            }
        } else {
            empty_200()
        }
    })
    .await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.max_attempts = 1;
        c.first_byte_timeout = Duration::from_secs(1);
        c.engine_stats_interval = Duration::from_secs(3600);
    })
    .await;
    let started = Instant::now();
    let r = send(&client(), completion_req(&router.url(), "drip", 1, false)).await;
    let took = started.elapsed();
    println!("dripping 500 body: {} after {took:?}", r.status);
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("did not end within 1s"), "{msg}");
    assert!(took >= Duration::from_secs(1));
    router.shutdown(Duration::from_secs(1)).await;
}

/// A small error body on the last attempt is still passed on as the engine sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_engine_error_body_is_relayed_as_is() {
    const BODY: &str = r#"{"object":"error","message":"engine overloaded","type":"ServiceUnavailable","code":503}"#;
    let engine = canned_engine(|method, _| {
        if method == "POST" {
            Canned::Full {
                status: 503,
                content_type: "application/json",
                body: Bytes::from_static(BODY.as_bytes()),
            }
        } else {
            empty_200()
        }
    })
    .await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.max_attempts = 1;
        c.engine_stats_interval = Duration::from_secs(3600);
    })
    .await;
    let r = send(&client(), completion_req(&router.url(), "x", 1, false)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, BODY);
    router.shutdown(Duration::from_secs(1)).await;
}

/// An engine whose `/metrics` page is 50 MB: the scrape fails cleanly (stale figures, the
/// reason visible in /health), the engine keeps serving, and the router's memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_engine_metrics_page_fails_the_scrape_cleanly() {
    let line = "vllm:num_requests_running{model_name=\"m\"} 1.0\n";
    let page = Bytes::from(line.repeat(50_000_000 / line.len()));
    let page_len = page.len();
    let engine = canned_engine(move |method, path| match (method, path) {
        ("GET", "/metrics") => Canned::Full {
            status: 200,
            content_type: "text/plain",
            body: page.clone(),
        },
        ("POST", _) => canned_completion(),
        _ => empty_200(),
    })
    .await;
    let router = RouterProcess::start(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        MODEL,
        "--engine-stats-interval",
        "1",
        "--eject-after-failures",
        "3",
        "--log-level",
        "error",
    ]);
    let url = router.url();
    let hwm_before = router.status_kib("VmHWM");
    // More failed scrapes than --eject-after-failures: had they counted against the engine, it
    // would be ejected by now.
    eventually_async("four scrapes of the huge page", SAFETY, || async {
        engine.hits("/metrics") >= 4
    })
    .await;
    let h = get(&client(), &url, "/health").await;
    assert_eq!(h.status, StatusCode::OK, "{:?}", h.body);
    let e = &h.json()["engines"][0];
    assert_eq!(e["healthy"], true, "{e}");
    assert_eq!(e["stats_stale"], true, "{e}");
    assert!(
        e["stats_error"]
            .as_str()
            .is_some_and(|m| m.contains("larger than 4194304")),
        "{e}"
    );
    assert_eq!(
        router_metric(&url, "switchyard_engine_ejections_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "the engine was ejected for its metrics page"
    );
    let r = send(&client(), completion_req(&url, "x", 1, false)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["choices"][0]["text"], " canned");
    let hwm = router.status_kib("VmHWM");
    println!(
        "{:.1} MB /metrics page, {} scrapes: stale, engine healthy and serving; router peak RSS {:.1} MiB ({:.1} MiB before)",
        page_len as f64 / 1e6,
        engine.hits("/metrics"),
        mib(hwm),
        mib(hwm_before)
    );
    assert!(
        hwm < hwm_before + 48 * 1024,
        "router peak RSS grew from {hwm_before} KiB to {hwm} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_timeout_on_the_last_attempt_is_504() {
    let sims = start_sims(2, instant_sim()).await;
    for s in &sims {
        s.faults().set_hang(true);
    }
    let router = start_router(&urls(&sims), |c| {
        c.first_byte_timeout = Duration::from_millis(300);
        c.max_attempts = 2;
        c.engine_stats_interval = Duration::from_secs(3600);
    })
    .await;
    let started = Instant::now();
    let r = send(&client(), completion_req(&router.url(), "x", 1, false)).await;
    println!(
        "two hanging engines, --first-byte-timeout 300ms: {} after {:?}",
        r.status,
        started.elapsed()
    );
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", r.body);
    assert_eq!(r.json()["error"]["code"], "gateway_timeout");
    assert_eq!(
        sims.iter().map(|s| s.counters().received).sum::<u64>(),
        2,
        "both engines were tried"
    );
    router.shutdown(Duration::from_secs(1)).await;
}

/// A non-streamed answer (a body of known length) read in full by the client counts as
/// completed, not as `switchyard_responses_interrupted_total{reason="client_disconnected"}`:
/// hyper stops polling such a body after its last frame and drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_non_streamed_answer_is_not_counted_as_interrupted() {
    let engine = canned_engine(|method, _| {
        if method == "POST" {
            canned_completion()
        } else {
            empty_200()
        }
    })
    .await;
    let router = RouterProcess::start(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        MODEL,
        "--log-level",
        "error",
    ]);
    let url = router.url();
    for _ in 0..3 {
        let r = send(&client(), completion_req(&url, "x", 1, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.json()["choices"][0]["text"], " canned");
    }
    eventually_async("three answered requests recorded", SAFETY, || async {
        router_metric(&url, "switchyard_requests_total")
            .await
            .unwrap_or(0.0)
            >= 3.0
    })
    .await;
    assert_eq!(
        router_metric(&url, "switchyard_responses_interrupted_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "complete answers counted as interrupted"
    );
}
