//! A tiny mock engine for `benches/proxy.sh`: streams like a real engine, each SSE event its
//! own `write` (one HTTP/1.1 chunk per event, TCP_NODELAY), so a proxy in front of it sees
//! the shape of real token streaming rather than a whole response in one batch.
//!
//!   cargo run --release --example sse_engine -- --port 8100 --tokens 16 --mode burst
//!
//! - `POST` with `"stream":true` in the body: `--tokens` token events and `data: [DONE]`, each
//!   in its own write; `--mode burst` writes them back to back, `--mode paced` waits
//!   `--interval-us` (default 1000) before each event.
//! - `POST` without it: one JSON completion (`Content-Length`).
//! - `GET /health` (and any other `GET`): `200` with an empty body.
//!
//! Hand-written HTTP/1.1 (keep-alive, `Content-Length` request bodies): it is a load fixture,
//! kept as cheap as possible so the core it shares with the load generator stays free.

use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Token events per streamed response (plus the `[DONE]` event).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// `burst`: events back to back; `paced`: `--interval-us` before each event.
    #[arg(long, default_value = "burst")]
    mode: String,
    #[arg(long, default_value_t = 1000)]
    interval_us: u64,
}

const HEAD_SSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

fn event(i: usize, last: bool) -> Vec<u8> {
    let finish = if last { "\"length\"" } else { "null" };
    let data = format!(
        "data: {{\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"text\":\" token{i}\",\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}]}}\n\n"
    );
    chunk(data.as_bytes())
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

fn plain_response(tokens: usize) -> Vec<u8> {
    let text: String = (0..tokens).map(|i| format!(" token{i}")).collect();
    let body = format!(
        "{{\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"text\":\"{text}\",\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null}}],\"usage\":{{\"prompt_tokens\":256,\"total_tokens\":{},\"completion_tokens\":{tokens}}}}}",
        256 + tokens
    );
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body.as_bytes());
    v
}

struct Canned {
    events: Vec<Vec<u8>>,
    done: Vec<u8>,
    plain: Vec<u8>,
    paced: Option<Duration>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    let head = String::from_utf8_lossy(head);
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn serve(mut s: TcpStream, c: &Canned) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        // One request: head, then a Content-Length body.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let len = content_length(&buf[..head_end]);
        while buf.len() < head_end + len {
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let is_get = buf.starts_with(b"GET ");
        let body = &buf[head_end..head_end + len];
        let stream = find(body, b"\"stream\":true").is_some();
        if is_get {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await?;
        } else if !stream {
            s.write_all(&c.plain).await?;
        } else {
            s.write_all(HEAD_SSE).await?;
            // A deadline every interval (the timer's resolution is 1 ms: a plain sleep of 1 ms
            // lasts up to 2), skipping ticks missed rather than bursting to catch up.
            let mut tick = c.paced.map(|d| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            for e in c.events.iter().chain(std::iter::once(&c.done)) {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                s.write_all(e).await?;
            }
        }
        buf.drain(..head_end + len);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let paced = match args.mode.as_str() {
        "burst" => None,
        "paced" => Some(Duration::from_micros(args.interval_us)),
        m => {
            eprintln!("--mode must be burst or paced, not {m}");
            std::process::exit(2);
        }
    };
    let mut done = chunk(b"data: [DONE]\n\n");
    done.extend_from_slice(b"0\r\n\r\n");
    let canned: &'static Canned = Box::leak(Box::new(Canned {
        events: (0..args.tokens)
            .map(|i| event(i, i + 1 == args.tokens))
            .collect(),
        done,
        plain: plain_response(args.tokens),
        paced,
    }));
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve(s, canned).await;
        });
    }
}
