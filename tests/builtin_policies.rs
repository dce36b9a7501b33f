//! The built-in policies: the binary started outside a checkout serves with them;
//! `switchyard policies export` writes them out byte for byte; a missing explicit
//! `--policies-dir` is an error naming the setting; the built-in table lists every file of
//! `policies/`; and `--imbalanced-threshold N` sets the `load_balance` tier's threshold of the
//! built-in `load_balanced_kvaware` (queue = running + waiting).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use http::StatusCode;
use switchyard::policy::shipped::SHIPPED;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn switchyard(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_builtin_table_is_the_policies_directory() {
    let mut on_disk: Vec<String> = std::fs::read_dir(shipped_policies())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut table: Vec<String> = SHIPPED.iter().map(|(n, _)| (*n).to_owned()).collect();
    table.sort();
    assert_eq!(
        on_disk, table,
        "every file of policies/ must be in src/policy/shipped.rs's SHIPPED table, and only those"
    );
    for (name, text) in SHIPPED {
        let disk = std::fs::read_to_string(shipped_policies().join(name)).unwrap();
        assert_eq!(&disk, text, "{name}");
    }
}

#[test]
fn export_writes_the_shipped_files_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nested/policies");
    let o = switchyard(tmp.path(), &["policies", "export", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let mut written: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written.len(), SHIPPED.len());
    for name in &written {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(shipped_policies().join(name)).unwrap(),
            "{name} is byte-identical to policies/{name}"
        );
    }
    // An edited file is not overwritten without --force.
    std::fs::write(out.join("session.toml"), "# mine\n").unwrap();
    let o = switchyard(tmp.path(), &["policies", "export", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("session.toml")).unwrap(),
        "# mine\n"
    );
    let o = switchyard(
        tmp.path(),
        &["policies", "export", "--force", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(out.join("session.toml")).unwrap(),
        std::fs::read(shipped_policies().join("session.toml")).unwrap()
    );
    // The exported directory checks clean.
    let o = switchyard(
        tmp.path(),
        &["check", "--policies-dir", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_missing_explicit_policies_dir_is_an_error_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    let m = missing.to_str().unwrap();
    let want = format!("policies_dir: directory {m} does not exist");
    let o = switchyard(
        tmp.path(),
        &[
            "serve",
            "--port",
            "0",
            "--policies-dir",
            m,
            "--static-backends",
            "http://127.0.0.1:9",
            "--static-models",
            MODEL,
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains(&want), "{}", text(&o));
    let o = switchyard(tmp.path(), &["check", "--policies-dir", m]);
    assert!(!o.status.success());
    assert!(text(&o).contains(&want), "{}", text(&o));
}

#[test]
fn check_outside_a_checkout_uses_the_builtin_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let o = switchyard(tmp.path(), &["check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("using the built-in policies"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_outside_a_checkout_uses_the_builtin_default_policy() {
    let sims = start_sims(2, instant_sim()).await;
    let backends = urls(&sims).join(",");
    let tmp = tempfile::tempdir().unwrap();
    let router = RouterProcess::spawn_in(
        Some(tmp.path()),
        &[
            "--static-backends",
            &backends,
            "--static-models",
            MODEL,
            "--decision-headers",
        ],
    );
    let c = client();
    let r = post_json(
        &c,
        &router.url,
        "/v1/completions",
        completion("hello", 4, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.header("x-switchyard-policy"),
        Some("load_balanced_kvaware")
    );
    let status = get(&c, &router.url, "/admin/policies").await.json();
    let source = status["policies"][0]["source"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        source.contains("switchyard-policies-"),
        "served from the materialised built-in set: {status}"
    );
    let dir = Path::new(&source).parent().unwrap().to_owned();
    assert!(dir.is_dir());
    stop(router).await;
    assert!(
        !dir.exists(),
        "the built-in set's directory is removed at exit"
    );
}

/// SIGTERM, then waits for a clean exit (which removes the built-in set's directory).
async fn stop(mut router: RouterProcess) {
    let st = Command::new("kill")
        .args(["-TERM", &router.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut status = None;
    eventually("the router exits", || {
        status = router.child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert_eq!(status.unwrap().code(), Some(0));
}

/// A canned engine: `/metrics` reports `running` and `waiting` requests, POSTs get a small
/// completion, other GETs an empty model list.
async fn queued_engine(running: u32, waiting: u32) -> String {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = if head.starts_with("get /metrics") {
                    format!(
                        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"{MODEL}\"}} {running}\n\
                         # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"{MODEL}\"}} {waiting}\n"
                    )
                } else if head.starts_with("get") {
                    r#"{"object":"list","data":[]}"#.to_owned()
                } else {
                    r#"{"id":"c","object":"text_completion","choices":[{"index":0,"text":"ok","finish_reason":"stop"}]}"#.to_owned()
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    url
}

/// The tier deciding a fresh prompt with the engines' stats scraped, through a router started
/// outside a checkout with `extra` flags.
async fn deciding_tier(backends: &str, extra: &[&str]) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--static-backends",
        backends,
        "--static-models",
        MODEL,
        "--decision-headers",
        "--engine-stats-interval",
        "0.05",
    ];
    args.extend_from_slice(extra);
    let router = RouterProcess::spawn_in(Some(tmp.path()), &args);
    let c = client();
    // Both engines' queues known before routing.
    let deadline = std::time::Instant::now() + SAFETY;
    loop {
        let h = get(&c, &router.url, "/health").await.json();
        let scraped = h["engines"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["stats_age_seconds"].is_number()));
        if scraped {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats never scraped: {h}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let r = post_json(
        &c,
        &router.url,
        "/v1/completions",
        completion("a prompt nobody has sent before", 4, false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.header("x-switchyard-policy"),
        Some("load_balanced_kvaware")
    );
    let decided = (
        r.header("x-switchyard-tier").unwrap_or_default().to_owned(),
        r.header("x-switchyard-engine")
            .unwrap_or_default()
            .to_owned(),
    );
    println!(
        "queues 3 and 0, flags {extra:?}: tier {} engine {}",
        decided.0, decided.1
    );
    stop(router).await;
    decided
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imbalanced_threshold_sets_the_load_balance_tier_threshold() {
    // Queues: busy = 2 running + 1 waiting = 3, idle = 0: a spread of 3.
    let busy = queued_engine(2, 1).await;
    let idle = queued_engine(0, 0).await;
    let backends = format!("{busy},{idle}");
    let idle_addr = idle.trim_start_matches("http://").to_owned();

    // Threshold 3: a spread of 3 triggers load_balance, to the idle engine.
    let (tier, engine) = deciding_tier(&backends, &["--imbalanced-threshold", "3"]).await;
    assert_eq!(tier, "load_balance");
    assert!(
        idle.contains(&engine) || engine.contains(&idle_addr),
        "{engine}"
    );
    // Threshold 4 (a spread of N-1): it does not.
    let (tier, _) = deciding_tier(&backends, &["--imbalanced-threshold", "4"]).await;
    assert_ne!(tier, "load_balance");
    // Without the flag the shipped threshold (8) applies: no load_balance either.
    let (tier, _) = deciding_tier(&backends, &[]).await;
    assert_ne!(tier, "load_balance");
}

#[test]
fn imbalanced_threshold_needs_load_balanced_kvaware_and_the_builtin_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--port",
            "0",
            "--static-backends",
            "http://127.0.0.1:9",
            "--static-models",
            MODEL,
        ];
        args.extend_from_slice(extra);
        switchyard(tmp.path(), &args)
    };
    let o = serve(&[
        "--imbalanced-threshold",
        "4",
        "--routing-logic",
        "roundrobin",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "imbalanced_threshold: applies only with routing_logic = load_balanced_kvaware"
        ),
        "{}",
        text(&o)
    );
    let dir = shipped_policies();
    let o = serve(&[
        "--imbalanced-threshold",
        "4",
        "--policies-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("imbalanced_threshold: sets the threshold of the built-in"),
        "{}",
        text(&o)
    );
}

#[test]
fn bench_runs_outside_a_checkout_with_the_builtin_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = switchyard(
        tmp.path(),
        &[
            "bench",
            "--engines",
            "2",
            "--workload",
            "hot-prefix",
            "--requests",
            "6",
            "--policies",
            "roundrobin",
            "--time-scale",
            "0.02",
            "--quiet",
            "--out",
            "out",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = std::fs::read_to_string(tmp.path().join("out/bench.json")).unwrap();
    assert!(report.contains("roundrobin"), "{report}");
}
