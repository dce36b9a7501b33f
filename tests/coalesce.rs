//! Coalescing of an engine's SSE events in the router's relay (issue 12): the router in front
//! of hand-written engines that control every write, and a raw HTTP/1.1 client that sees the
//! router's own chunks, so each test asserts exactly which bytes came and how they were cut.

mod common;

use std::time::Duration;

use common::*;
use switchyard::proxy::coalesce::COALESCE_MAX_BYTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn event(i: usize, pad: usize) -> Vec<u8> {
    format!(
        "data: {{\"i\":{i},\"text\":\"tok{i}{}\"}}\n\n",
        "x".repeat(pad)
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// A hand-written engine: probes and scrapes (GET) get an empty 200; each POST is answered by
/// writing what `writes` yields, each item in its own `write` (TCP_NODELAY), until it closes.
async fn scripted_engine(writes: mpsc::UnboundedReceiver<Vec<u8>>) -> String {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut writes = Some(writes);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            let Some(head) = read_head(&mut s).await else {
                continue;
            };
            if head.starts_with(b"GET") {
                answer_empty_200(&mut s).await;
                continue;
            }
            let Some(mut rx) = writes.take() else {
                continue;
            };
            tokio::spawn(async move {
                while let Some(w) = rx.recv().await {
                    if s.write_all(&w).await.is_err() {
                        return;
                    }
                }
                // Keep the connection until the router is done with it.
                let mut sink = [0u8; 64];
                let _ = s.read(&mut sink).await;
            });
        }
    });
    url
}

/// A raw streamed completion request to the router; the connection closes after the answer.
async fn raw_request(router_url: &str) -> TcpStream {
    let addr = router_url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = format!(r#"{{"model":"{MODEL}","prompt":"hi","max_tokens":4,"stream":true}}"#);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// The chunks of a complete chunked HTTP/1.1 response (head checked: 200, chunked).
fn chunks_of(raw: &[u8]) -> Vec<Vec<u8>> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &raw[head_end..];
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.push(rest[..size].to_vec());
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
    }
}

async fn read_to_end(mut s: TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    tokio::time::timeout(SAFETY, s.read_to_end(&mut raw))
        .await
        .expect("the router ends the response")
        .unwrap();
    raw
}

/// Sends `events` as a burst (each its own write, back to back, then the end) through the
/// router; returns the router's chunks.
async fn relay_burst(events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let engine = scripted_engine(rx).await;
    let router = start_router(&[engine], |c| {
        c.engine_stats_interval = Duration::from_secs(3600)
    })
    .await;
    let client = raw_request(&router.url()).await;
    tx.send(SSE_HEAD.to_vec()).unwrap();
    for e in events {
        tx.send(chunk(e)).unwrap();
    }
    tx.send(b"0\r\n\r\n".to_vec()).unwrap();
    chunks_of(&read_to_end(client).await)
}

#[tokio::test]
async fn a_burst_of_events_is_relayed_byte_exact_in_fewer_writes() {
    let events: Vec<Vec<u8>> = (0..32).map(|i| event(i, 0)).collect();
    let chunks = relay_burst(&events).await;
    assert_eq!(chunks.concat(), events.concat(), "the same bytes, in order");
    // Relayed one by one, each event would be a chunk (a write) of its own.
    assert!(
        chunks.len() <= events.len() / 2,
        "{} events came in {} chunks: {:?}",
        events.len(),
        chunks.len(),
        chunks.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_burst_larger_than_the_bound_is_split_at_the_bound() {
    // 64 events of ~1 KiB: 4x the bound.
    let events: Vec<Vec<u8>> = (0..64).map(|i| event(i, 1000)).collect();
    let one = events[0].len();
    let chunks = relay_burst(&events).await;
    assert_eq!(chunks.concat(), events.concat(), "the same bytes, in order");
    let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
    assert!(
        sizes.iter().all(|&n| n <= COALESCE_MAX_BYTES),
        "a chunk over the bound: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > one),
        "no events were joined: {sizes:?}"
    );
    assert!(
        sizes.len() >= events.concat().len() / COALESCE_MAX_BYTES,
        "{sizes:?}"
    );
    // Events are never cut: every chunk ends at an event's end.
    assert!(chunks.iter().all(|c| c.ends_with(b"\n\n")), "{sizes:?}");
}

#[tokio::test]
async fn a_lone_event_is_relayed_before_the_engine_sends_the_next() {
    // The engine sends event k+1 only once the client has received event k through the
    // router: a relay that held an event back waiting for more would never finish.
    let (tx, rx) = mpsc::unbounded_channel();
    let engine = scripted_engine(rx).await;
    let router = start_router(&[engine], |c| {
        c.engine_stats_interval = Duration::from_secs(3600)
    })
    .await;
    let mut client = raw_request(&router.url()).await;
    tx.send(SSE_HEAD.to_vec()).unwrap();
    let events: Vec<Vec<u8>> = (0..5).map(|i| event(i, 0)).collect();
    let mut raw = Vec::new();
    for e in &events {
        tx.send(chunk(e)).unwrap();
        tokio::time::timeout(SAFETY, async {
            while !raw.windows(e.len()).any(|w| w == e.as_slice()) {
                let mut buf = [0u8; 4096];
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "the router closed early");
                raw.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the event reaches the client while the engine waits");
    }
    tx.send(b"0\r\n\r\n".to_vec()).unwrap();
    raw.extend_from_slice(&read_to_end(client).await);
    let chunks = chunks_of(&raw);
    assert_eq!(chunks.concat(), events.concat());
    assert_eq!(
        chunks.len(),
        events.len(),
        "each lone event in its own write"
    );
}
