//! Interop with real libzmq: a Python publisher on pyzmq that speaks vLLM's KV-event protocol
//! (`tests/fixtures/kv_events/vllm_publisher.py`: msgspec structs, PUB frames, ROUTER replay)
//! followed by the router's subscriber (pure-Rust `zeromq`).
//!
//! Needs `python3` with `pyzmq` and `msgspec` (`.ci/run` installs them). Without them the test
//! is skipped, except under `CI=true`, where it fails.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard::engines::kv_events::{KvEndpoints, KvSubscribers, SubscriberOptions};
use switchyard::prefix::exact::ExactIndex;

const SAFETY: Duration = Duration::from_secs(20);

struct Publisher {
    child: Child,
    stdin: ChildStdin,
}

impl Publisher {
    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("publisher takes commands");
        self.stdin.flush().unwrap();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_publisher() -> (Publisher, KvEndpoints) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kv_events/vllm_publisher.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("READY line");
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"READY"), "{line}");
    let endpoints = KvEndpoints {
        events: parts[1].to_owned(),
        replay: Some(parts[2].to_owned()),
    };
    (Publisher { child, stdin }, endpoints)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool, mut nudge: impl FnMut()) {
    let deadline = tokio::time::Instant::now() + SAFETY;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        nudge();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn follows_a_libzmq_publisher_and_replays_from_its_router_socket() {
    if !common::pyzmq_ready() {
        return;
    }
    let (publisher, endpoints) = spawn_publisher();
    let publisher = std::sync::Mutex::new(publisher);
    let index = Arc::new(ExactIndex::new(1 << 20));
    let subs = KvSubscribers::new(Arc::clone(&index), SubscriberOptions::default());
    subs.start(1, "python", endpoints);
    let cmd = |c: &str| publisher.lock().unwrap().command(c);
    eventually("live", || index.is_live(1), || cmd("ping")).await;
    let ids: Vec<u32> = (0..64).collect();
    let held = || index.match_tokens(&ids, None, &[1])[0];
    cmd("store");
    eventually("A1, A2 held", || held() == Some(32), || {}).await;
    // B is numbered but never published: C reveals the gap, and B comes from the replay.
    cmd("lose_b");
    cmd("store_c");
    eventually(
        "B replayed, C chained from it",
        || held() == Some(64),
        || {},
    )
    .await;
    assert!(index.is_live(1));
    cmd("quit");
}
