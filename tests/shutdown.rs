//! Graceful shutdown of the real binary: SIGTERM closes the listener at once, lets a stream in
//! progress finish (every event, `[DONE]`) and exits 0; a stream longer than `--shutdown-grace`
//! is cut at the grace and the process still exits 0.

mod common;

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Events of the canned stream, `[DONE]` excluded.
const EVENTS: usize = 5;

/// A canned engine whose streams send their first event at once and each later one (then
/// `[DONE]`) only when the test adds a permit to the returned semaphore. GETs (scrapes, probes)
/// get an empty 200.
async fn dripping_engine() -> (String, Arc<Semaphore>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let gate = Arc::new(Semaphore::new(0));
    let g = Arc::clone(&gate);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let gate = Arc::clone(&g);
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                if head.starts_with(b"GET") {
                    answer_empty_200(&mut s).await;
                    return;
                }
                let hdr = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(hdr).await.is_err() {
                    return;
                }
                for i in 0..=EVENTS {
                    if i > 0 {
                        match gate.acquire().await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                    }
                    let event = if i == EVENTS {
                        "data: [DONE]\n\n".to_owned()
                    } else {
                        format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"t{i}\"}}]}}\n\n")
                    };
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if s.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, gate)
}

fn sigterm(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(st.success(), "kill -TERM {pid}: {st}");
}

/// Polls until the router process exits (safety net: fails after [`SAFETY`]).
async fn exit_status(router: &mut RouterProcess) -> ExitStatus {
    let mut status = None;
    eventually("the router process exits", || {
        status = router.child.try_wait().expect("try_wait");
        status.is_some()
    })
    .await;
    status.expect("exited")
}

/// Whether a new TCP connection to `url` is refused.
async fn refused(url: &str) -> bool {
    let addr = url.trim_start_matches("http://");
    match TcpStream::connect(addr).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// Reads `n` data frames' worth of SSE events from `body` (at least `n` events).
async fn read_events(body: &mut hyper::body::Incoming, text: &mut String, n: usize) {
    while text.matches("\n\n").count() < n {
        let frame = tokio::time::timeout(SAFETY, body.frame())
            .await
            .expect("frame within the safety net")
            .expect("stream still open")
            .expect("frame");
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_lets_the_stream_finish_and_exits_0() {
    let (engine, gate) = dripping_engine().await;
    let mut router = RouterProcess::spawn(&[
        "--static-backends",
        &engine,
        "--static-models",
        MODEL,
        "--shutdown-grace",
        "30",
    ]);
    let c = client();
    assert_eq!(get(&c, &router.url, "/health").await.status, StatusCode::OK);
    let resp = open(&c, completion_req(&router.url, "hello", 8, true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    read_events(&mut body, &mut text, 1).await;

    sigterm(router.pid());
    // The listener closes while the stream is still in progress (the engine holds it).
    let mut is_refused = false;
    for _ in 0..4000 {
        if refused(&router.url).await {
            is_refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(is_refused, "new connections are refused after SIGTERM");
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router waits for the stream in progress"
    );

    // The engine finishes the stream: every event and [DONE] reach the client.
    gate.add_permits(EVENTS);
    while let Some(frame) = tokio::time::timeout(SAFETY, body.frame())
        .await
        .expect("stream ends within the safety net")
    {
        if let Ok(d) = frame.expect("the stream completes cleanly").into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), EVENTS + 1, "{text:?}");
    for (i, e) in events[..EVENTS].iter().enumerate() {
        assert!(e.contains(&format!("\"t{i}\"")), "event {i}: {e}");
    }
    assert_eq!(events[EVENTS], "[DONE]");

    let status = exit_status(&mut router).await;
    assert_eq!(status.code(), Some(0), "{status}");
    println!(
        "shutdown drill: new connections refused after SIGTERM, stream of {EVENTS} events + [DONE] completed, exit {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_grace_is_cut_and_the_router_exits_0() {
    let (engine, _gate) = dripping_engine().await; // no permit: the stream never ends
    let mut router = RouterProcess::spawn(&[
        "--static-backends",
        &engine,
        "--static-models",
        MODEL,
        "--shutdown-grace",
        "0.5",
    ]);
    let c = client();
    let resp = open(&c, completion_req(&router.url, "hello", 8, true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    read_events(&mut body, &mut text, 1).await;

    sigterm(router.pid());
    let status = exit_status(&mut router).await;
    assert_eq!(status.code(), Some(0), "{status}");
    // The stream was cut: it ends (with an error: the chunked body is incomplete), no [DONE].
    let mut cut = false;
    while let Some(frame) = tokio::time::timeout(SAFETY, body.frame())
        .await
        .expect("stream ends within the safety net")
    {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(&String::from_utf8_lossy(&d));
                }
            }
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "the stream ends with an error, not cleanly: {text:?}");
    assert!(!text.contains("[DONE]"), "{text:?}");
}

#[tokio::test]
async fn health_says_shutting_down_while_draining() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let c = client();
    let r = get(&c, &router.url(), "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["shutting_down"], false);
    // What `shutdown` sets first (before the listener closes).
    router
        .state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(router.is_draining());
    let r = get(&c, &router.url(), "/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["status"], "shutting down");
    assert_eq!(r.json()["shutting_down"], true);
    let outcome = router.shutdown(Duration::from_secs(5)).await;
    assert_eq!(outcome.cut, 0, "{outcome:?}");
}
