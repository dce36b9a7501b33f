//! The router's own ZMTP transport against real peers: replay against vLLM 0.32's recorded
//! bytes (served by a byte-level ROUTER) and against libzmq running vLLM 0.32's
//! `_service_replay` (pyzmq, `tests/fixtures/kv_events/vllm032_zmq.py`); the bound SUB socket
//! (`--kv-events-bind`) with a libzmq PUB that connects to it (oversized messages dropped, the
//! connection kept), and with the real router binary and simulated engines that connect their
//! PUB sockets (the `zeromq` crate) with llm-d topics.
//!
//! The pyzmq tests need `python3` with `pyzmq` and `msgspec` (`.ci/run` installs them); without
//! them they are skipped, except under `CI=true`, where they fail.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use switchyard::engines::Registry;
use switchyard::engines::kv_events::replay::fetch_replay;
use switchyard::engines::kv_events::zmtp::Limits;
use switchyard::engines::kv_events::{KvSubscribers, SubscriberOptions};
use switchyard::prefix::exact::ExactIndex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SAFETY: Duration = Duration::from_secs(20);

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// One ZMTP frame, written by hand (independently of the router's codec).
fn frame(out: &mut Vec<u8>, flags: u8, body: &[u8]) {
    if body.len() > 255 {
        out.push(flags | 0x02);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, body.len() as u8]);
    }
    out.extend_from_slice(body);
}

/// Reads one frame: (flags, body).
async fn read_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let flags = s.read_u8().await.unwrap();
    let n = if flags & 0x02 != 0 {
        s.read_u64().await.unwrap() as usize
    } else {
        s.read_u8().await.unwrap() as usize
    };
    let mut body = vec![0; n];
    s.read_exact(&mut body).await.unwrap();
    (flags, body)
}

/// vLLM 0.32's replay reply messages, recorded from a real engine
/// (`tests/fixtures/vllm-0.32.0/replay_exchange.json`, frames as the DEALER received them),
/// served by a byte-level ZMTP ROUTER: the router's replay client sends the recorded request
/// and reads every batch and the end marker.
#[tokio::test]
async fn replays_vllm_032s_recorded_reply_bytes() {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vllm-0.32.0/replay_exchange.json"
    ))
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let frames_of = |v: &serde_json::Value| -> Vec<Vec<u8>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|f| hex(f.as_str().unwrap()))
            .collect()
    };
    let request = frames_of(&fixture["request"]);
    let replies: Vec<Vec<Vec<u8>>> = fixture["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(frames_of)
        .collect();
    assert!(
        replies.iter().all(|r| r.len() == 4),
        "vLLM 0.32 replies are 4 frames"
    );
    let from = u64::from_be_bytes(request[1].clone().try_into().unwrap());

    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
    let served = replies.clone();
    let router = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut greeting = [0u8; 64];
        greeting[0] = 0xFF;
        greeting[9] = 0x7F;
        greeting[10] = 3;
        greeting[12..16].copy_from_slice(b"NULL");
        s.write_all(&greeting).await.unwrap();
        let mut theirs = [0u8; 64];
        s.read_exact(&mut theirs).await.unwrap();
        assert_eq!((theirs[0], theirs[9], theirs[10]), (0xFF, 0x7F, 3));
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"ROUTER");
        let mut out = Vec::new();
        frame(&mut out, 0x04, &ready);
        s.write_all(&out).await.unwrap();
        let (flags, body) = read_frame(&mut s).await;
        assert_eq!(flags, 0x04);
        assert!(body.starts_with(b"\x05READY") && body.ends_with(b"\x00\x00\x00\x06DEALER"));
        // The request, as the DEALER sent it in the recording.
        let mut got = Vec::new();
        loop {
            let (flags, body) = read_frame(&mut s).await;
            got.push(body);
            if flags & 0x01 == 0 {
                break;
            }
        }
        let mut out = Vec::new();
        for reply in &served {
            for (i, f) in reply.iter().enumerate() {
                frame(&mut out, u8::from(i + 1 < reply.len()), f);
            }
        }
        s.write_all(&out).await.unwrap();
        got
    });
    let batches = fetch_replay(&endpoint, from, SAFETY, &Limits::default())
        .await
        .expect("the recorded replies are read");
    assert_eq!(router.await.unwrap(), request);
    let expected: Vec<(u64, Bytes)> = replies[..replies.len() - 1]
        .iter()
        .map(|r| {
            let seq = u64::from_be_bytes(r[2].clone().try_into().unwrap());
            (seq, Bytes::from(r[3].clone()))
        })
        .collect();
    assert_eq!(batches, expected);
    assert_eq!(batches[0].0, from);
    for (_, payload) in &batches {
        switchyard::engines::kv_events::wire::decode_batch(payload).expect("a real batch");
    }
}

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import zmq, msgspec"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

/// The pyzmq script in one of its modes, after its READY line.
struct Python {
    child: Child,
    stdin: ChildStdin,
    ready: String,
}

impl Python {
    fn spawn(args: &[&str]) -> Python {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kv_events/vllm032_zmq.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .expect("READY line");
        assert!(ready.starts_with("READY"), "{ready}");
        Python {
            child,
            stdin,
            ready: ready.trim().to_owned(),
        }
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("the script takes commands");
        self.stdin.flush().unwrap();
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libzmq ROUTER answering with vLLM 0.32's own `_service_replay` (4 frames per batch with
/// the topic, and `["", "", END_SEQ, ""]` at the end).
#[tokio::test]
async fn replays_from_libzmq_running_vllm_032s_service_replay() {
    if !python_ready() {
        return;
    }
    let router = Python::spawn(&["router", "kv@127.0.0.1:8100@tiny", "5"]);
    let endpoint = router.ready.strip_prefix("READY ").unwrap().to_owned();
    let limits = Limits::default();
    let all = fetch_replay(&endpoint, 0, SAFETY, &limits).await.unwrap();
    let want = |from: u64| -> Vec<(u64, Bytes)> {
        (from..5)
            .map(|s| (s, Bytes::from(format!("batch-{s}"))))
            .collect()
    };
    assert_eq!(all, want(0));
    assert_eq!(
        fetch_replay(&endpoint, 3, SAFETY, &limits).await.unwrap(),
        want(3)
    );
    assert!(
        fetch_replay(&endpoint, 99, SAFETY, &limits)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A libzmq PUB socket that connects to the bound SUB socket (as vLLM's does when its endpoint
/// names a host), with topics naming engines by address: batches reach the named engine's view
/// (an unknown engine's are dropped), and a message over the size cap is read past and dropped
/// without losing the connection.
#[tokio::test]
async fn a_libzmq_publisher_connects_to_the_bound_socket() {
    if !python_ready() {
        return;
    }
    let registry = Arc::new(Registry::new());
    let a = registry.add("http://127.0.0.1:8001", vec!["m".into()]);
    let b = registry.add("http://127.0.0.1:8002", vec!["m".into()]);
    let index = Arc::new(ExactIndex::new(1 << 20));
    let opts = SubscriberOptions {
        rebuild_after_batches: 1,
        limits: Limits {
            max_message_bytes: 64 << 10,
            ..Limits::default()
        },
        ..SubscriberOptions::default()
    };
    let subs = KvSubscribers::new(Arc::clone(&index), opts);
    let bound = subs
        .bind("tcp://127.0.0.1:0", Arc::clone(&registry))
        .await
        .unwrap();
    let mut publisher = Python::spawn(&["pub", &format!("tcp://{bound}")]);
    let held = |first: u32| {
        let ids: Vec<u32> = (first..first + 16).collect();
        index.match_tokens(&ids, None, &[a.id, b.id])
    };
    // The first batches may go out before the subscription reaches the publisher: publish
    // until one arrives.
    let mut seq = 0u64;
    let deadline = tokio::time::Instant::now() + SAFETY;
    while held(0) != [None, Some(16)] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "batches never reached B's view"
        );
        publisher.command(&format!("store kv@127.0.0.1:8002@m {seq} 0"));
        publisher.command(&format!("store kv@10.9.9.9@m {seq} 0"));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 4 MiB, over the 64 KiB cap: dropped; the next batch arrives on the same connection (a
    // gap, so the view starts anew from it).
    publisher.command(&format!("big kv@127.0.0.1:8002@m {seq} {}", 4 << 20));
    publisher.command(&format!("store kv@127.0.0.1:8002@m {} 100", seq + 1));
    eventually("the batch after the oversized one", || {
        held(100) == [None, Some(16)]
    })
    .await;
    assert!(!index.is_live(a.id), "nothing named engine A");
    publisher.command("quit");
}

/// An unused loopback port (for a simulated engine the router must know before it starts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metric(page: &str, line_start: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

/// The real router binary with `--kv-events-bind`, and simulated engines whose PUB sockets
/// connect to it with llm-d's topics (`kv@<ip>:<port>@<model>`, the port telling apart two
/// engines on 127.0.0.1): a prompt cached on engine B behind the router's back is routed
/// `kv_lookup` exact to B on the first request; a publisher whose topic names no engine is
/// counted and dropped.
#[tokio::test]
async fn the_router_binds_and_engines_connect_with_llm_d_topics() {
    let tokenizer = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/llama3");
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("kv.rhai"),
        "kv_lookup() ?? fallback()\n",
    )
    .unwrap();
    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let router = RouterProcess::spawn(&[
        "--static-backends",
        &urls.join(","),
        "--static-models",
        MODEL,
        "--kv-events-bind",
        "tcp://127.0.0.1:0",
        "--policies-dir",
        policies.path().to_str().unwrap(),
        "--routing-logic",
        "kv",
        "--decision-headers",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--health-probe-interval",
        "0.2",
    ]);
    let bound = router
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("Switchyard takes KV events on "))
        .expect("the router says where it takes KV events")
        .to_owned();
    let mut sims = Vec::new();
    for port in ports {
        let cfg = switchyard::sim::SimConfig {
            tokenizer: Some(tokenizer.clone()),
            kv_events_endpoint: Some(bound.clone()),
            kv_events_connect: true,
            kv_events_topic: format!("kv@127.0.0.1:{port}@{MODEL}"),
            ..instant_sim()
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        sims.push(
            switchyard::sim::start(cfg, addr)
                .await
                .expect("the engine starts"),
        );
    }
    let stranger = switchyard::sim::kv_publisher::KvPublisher::start_with(
        &bound,
        None,
        &switchyard::sim::kv_publisher::PublishOptions {
            topic: format!("kv@10.9.9.9@{MODEL}"),
            connect: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = client();
    let metrics = || async {
        String::from_utf8_lossy(&get(&c, &router.url, "/metrics").await.body).into_owned()
    };
    let mut page = String::new();
    let deadline = tokio::time::Instant::now() + SAFETY;
    while metric(&page, "switchyard_kv_events_bound_connections ") != Some(3.0)
        || !urls.iter().all(|u| {
            let name = u.trim_start_matches("http://");
            metric(
                &page,
                &format!("switchyard_engine_healthy{{engine=\"{name}\"}} "),
            ) == Some(1.0)
        })
    {
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        page = metrics().await;
    }
    // Engine B caches the prompt behind the router's back: only its KV events tell.
    let text: Vec<String> = (0..200)
        .map(|i| format!("bound{}", i * 7919 % 1000))
        .collect();
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": text.join(" ") }],
        "max_tokens": 1,
    });
    let direct = post_json(&c, &sims[1].url(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(direct.status, 200);
    let b = urls[1].trim_start_matches("http://");
    let live = format!("switchyard_kv_events_live{{engine=\"{b}\"}} ");
    while metric(&page, &live) != Some(1.0) {
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        page = metrics().await;
    }
    let reply = post_json(&c, &router.url, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-switchyard-engine"), Some(b));
    assert_eq!(reply.header("x-switchyard-kv"), Some("exact"));
    // The stranger's batches are counted and dropped.
    stranger.send_payload(Bytes::from_static(b"\x90"));
    let unknown = "switchyard_kv_events_unknown_engine_total{reason=\"unknown\"} ";
    while metric(&page, unknown).unwrap_or(0.0) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        stranger.send_payload(Bytes::from_static(b"\x90"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        page = metrics().await;
    }
}

/// `switchyard sim --kv-events-connect --kv-events-topic` (what the bind-mode test sets).
#[test]
fn sim_flags_connect_the_publisher_with_a_topic() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: switchyard::sim::SimArgs,
    }
    assert!(Cli::try_parse_from(["sim", "--kv-events-connect"]).is_err());
    assert!(Cli::try_parse_from(["sim", "--kv-events-topic", "kv@a@m"]).is_err());
    let cfg = Cli::try_parse_from([
        "sim",
        "--kv-events-endpoint",
        "tcp://10.0.0.1:5557",
        "--kv-events-connect",
        "--kv-events-topic",
        "kv@10.0.0.5@m",
    ])
    .unwrap()
    .sim
    .to_config();
    assert!(cfg.kv_events_connect);
    assert_eq!(cfg.kv_events_topic, "kv@10.0.0.5@m");
    let cfg = Cli::try_parse_from(["sim", "--kv-events-endpoint", "tcp://127.0.0.1:0"])
        .unwrap()
        .sim
        .to_config();
    assert!(!cfg.kv_events_connect);
    assert_eq!(cfg.kv_events_topic, "");
}
