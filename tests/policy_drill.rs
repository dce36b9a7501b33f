//! Hot reload under load, end to end: the real router (its own watcher) in front of real
//! simulated engines while concurrent clients send requests. The threshold of
//! `load_balance(N) ?? fallback()` is edited, the file is broken, replaced by an infinite
//! loop, and fixed; not one request may fail. Also `switchyard check` through the binary.

mod common;
mod policy_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use policy_support::WriteAtomic;

/// The sum of the samples whose line starts with `prefix`.
fn sum_of(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn tier_of(c: &TestClient, url: &str) -> String {
    let r = post_json(c, url, "/v1/completions", completion("probe", 1, false)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.header("x-switchyard-tier").unwrap_or("").to_owned()
}

async fn until_tier(c: &TestClient, url: &str, tier: &str) {
    let deadline = Instant::now() + SAFETY;
    loop {
        if tier_of(c, url).await == tier {
            return;
        }
        assert!(Instant::now() < deadline, "tier {tier} never decided");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn until_status(
    c: &TestClient,
    url: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + SAFETY;
    loop {
        let v = get(c, url, "/admin/policies").await.json();
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} never shown: {v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `text` has `FILE:LINE:COL: ` for `file`.
fn has_position(text: &str, file: &str) -> bool {
    text.match_indices(file).any(|(i, _)| {
        let rest = &text[i + file.len()..];
        let mut parts = rest.splitn(4, ':');
        parts.next() == Some("")
            && parts
                .next()
                .is_some_and(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()))
            && parts
                .next()
                .is_some_and(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_digit()))
    })
}

fn live_error(v: &serde_json::Value) -> Option<String> {
    v["policies"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "live")?["last_error"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_then_runaway_then_fixed_policy_under_load_loses_nothing() {
    let dir = policy_support::temp_dir();
    dir.write(
        "live.rhai",
        "// never relieves: the threshold is out of reach\nload_balance(1000000) ?? fallback()\n",
    );
    let sims = start_sims(3, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "live".into();
        cfg.decision_headers = true;
    })
    .await;
    let url = router.url();

    // Background load through every step.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, sent, failed, url) = (stop.clone(), sent.clone(), failed.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let r = post_json(
                    &c,
                    &url,
                    "/v1/completions",
                    completion(&format!("w{w} r{i}"), 2, false),
                )
                .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let c = client();
    assert_eq!(tier_of(&c, &url).await, "fallback");

    // Threshold 0: any spread relieves, so load_balance decides.
    let edited = Instant::now();
    dir.write("live.rhai", "load_balance(0) ?? fallback()\n");
    until_tier(&c, &url, "load_balance").await;
    println!("threshold edit effective after {:?}", edited.elapsed());

    // A syntax error: the last good version keeps serving, the error says where.
    dir.write("live.rhai", "load_balance(0 ?? fallback()\n");
    let v = until_status(&c, &url, "syntax error", |v| live_error(v).is_some()).await;
    let err = live_error(&v).unwrap();
    assert!(
        has_position(&err, "live.rhai"),
        "error without file:line:col: {err}"
    );
    for _ in 0..20 {
        assert_eq!(tier_of(&c, &url).await, "load_balance");
    }

    // An infinite loop compiles; on every request it is stopped by its time budget (or its
    // operation limit) and passed over: the request still gets the least-loaded engine.
    dir.write("live.rhai", "loop { }\n");
    until_tier(&c, &url, "default").await;
    for _ in 0..20 {
        assert_eq!(tier_of(&c, &url).await, "default");
    }

    // Fixed.
    dir.write("live.rhai", "load_balance(0) ?? fallback()\n");
    until_tier(&c, &url, "load_balance").await;
    until_status(&c, &url, "error cleared", |v| live_error(v).is_none()).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "policy drill: sent {sent}, succeeded {}, failed {failed}",
        sent - failed
    );
    assert!(sent > 0);
    assert_eq!(failed, 0, "requests failed during policy edits");
    let metrics = String::from_utf8(get(&c, &url, "/metrics").await.body.to_vec()).unwrap();
    // The families are registered at zero when the router starts: count, not presence.
    assert!(
        sum_of(
            &metrics,
            "switchyard_policy_reloads_total{result=\"error\"}"
        ) > 0.0,
        "reload errors are counted"
    );
    assert!(
        sum_of(&metrics, "switchyard_policy_script_errors_total{") > 0.0,
        "script errors are counted"
    );
    router.shutdown(Duration::from_secs(2)).await;
}

#[test]
fn check_subcommand_reports_file_line_col_and_exit_status() {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let ok = std::process::Command::new(bin)
        .args(["check", "--policies-dir"])
        .arg(shipped_policies())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let dir = policy_support::temp_dir();
    dir.write("good.rhai", "fallback()\n");
    dir.write("bad.rhai", "let x = 1;\nload_balance(8 ?? fallback()\n");
    let out = std::process::Command::new(bin)
        .args(["check", "--policies-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.lines().any(|l| has_position(l, "bad.rhai")), "{text}");
    assert!(!text.contains("good.rhai:"), "{text}");
}
