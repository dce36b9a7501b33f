//! Policy drills of issue 8 against the real router in front of simulated engines: a runaway
//! script, policy files symlinked out of the directory, rejected settings, validation leaking
//! into `/metrics`, and SIGHUP to the binary when its file watcher could not start.

mod common;
mod policy_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use policy_support::{WriteAtomic, temp_dir};
use switchyard::policy::{DEFAULT_SCRIPT_TIME_BUDGET, SettingsLoader};

/// The script of issue 8: one operation is a native call over a 4000-element array, so the
/// operation limit alone let it run for seconds per request.
const RUNAWAY: &str = "let a = []; a.pad(4000, 7); loop { if a.contains(8) {} }";

/// The value of the sample whose line contains every one of `parts` (0 if none).
fn sample(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics_text(c: &TestClient, url: &str) -> String {
    String::from_utf8_lossy(&get(c, url, "/metrics").await.body).into_owned()
}

async fn admin_policies(c: &TestClient, url: &str) -> serde_json::Value {
    get(c, url, "/admin/policies").await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_script_is_stopped_by_its_time_budget_and_the_request_served() {
    let dir = temp_dir();
    dir.write("runaway.rhai", RUNAWAY);
    let sims = start_sims(2, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "runaway".into();
        cfg.decision_headers = true;
    })
    .await;
    assert_eq!(
        router.state.cfg.policy.script_time_budget,
        DEFAULT_SCRIPT_TIME_BUDGET
    );
    let (c, url) = (client(), router.url());
    let errors = |text: &str, reason: &str| {
        sample(
            text,
            &[
                "switchyard_policy_script_errors_total{",
                "policy=\"runaway\"",
                &format!("reason=\"{reason}\""),
            ],
        )
    };
    for _ in 0..3 {
        let started = Instant::now();
        let r = send(&c, completion_req(&url, "hello", 4, false)).await;
        eprintln!(
            "request through the runaway policy: {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.header("x-switchyard-policy"), Some("runaway"));
        // The script was stopped and passed: the default tier chose.
        assert_eq!(r.header("x-switchyard-tier"), Some("default"));
    }
    let text = metrics_text(&c, &url).await;
    assert_eq!(errors(&text, "time_budget"), 3.0, "{text}");
    assert_eq!(errors(&text, "operations"), 0.0, "{text}");

    // /health while clients keep the runaway policy busy (figures for the report; the
    // assertion is only that it answers).
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = client();
                for _ in 0..25 {
                    let r = send(&c, completion_req(&url, "hello", 1, false)).await;
                    assert_eq!(r.status, StatusCode::OK);
                }
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&c, &url, "/health").await.status, StatusCode::OK);
        worst = worst.max(started.elapsed());
    }
    for b in busy {
        b.await.expect("client task");
    }
    eprintln!("/health slowest of 20 while 4 clients hit the runaway policy: {worst:?}");
    router.shutdown(Duration::from_secs(2)).await;
}

/// Content that, were it read, the compiler's error message would echo.
const SECRET: &str = "secret_token_51c2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_out_of_the_policies_directory_are_refused_unread() {
    let outside = temp_dir();
    std::fs::write(outside.path().join("shadow"), SECRET).expect("write");
    let dir = temp_dir();
    dir.write("ok.rhai", "fallback()");
    std::os::unix::fs::symlink(outside.path().join("shadow"), dir.path().join("x.rhai"))
        .expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("shadow"), dir.path().join("inner.rhai"))
        .expect("symlink");
    dir.write("tier.toml", "[[tier]]\nfile = \"inner.rhai\"\n");
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "ok".into();
    })
    .await;
    let (c, url) = (client(), router.url());
    let status = admin_policies(&c, &url).await;
    assert!(!status.to_string().contains(SECRET), "{status}");
    for name in ["x", "inner", "tier"] {
        let p = status["policies"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("{name} listed: {status}"));
        assert_eq!(p["loaded"], false, "{p}");
        assert!(
            p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("outside the policies directory")),
            "{p}"
        );
    }
    assert_eq!(
        send(&c, completion_req(&url, "hello", 1, false))
            .await
            .status,
        StatusCode::OK
    );
    router.shutdown(Duration::from_secs(2)).await;
}

fn named(tier: &str) -> String {
    format!("[[tier]]\nname = \"{tier}\"\nbuiltin = \"round_robin\"\n")
}

/// A settings loader reading `conf` as the binary does (`switchyard serve --config conf`).
fn config_loader(conf: &Path) -> SettingsLoader {
    let conf = conf.to_path_buf();
    Arc::new(move || {
        let file = switchyard::config::load_file(&conf).map_err(|e| e.to_string())?;
        switchyard::config::policy_settings(&Default::default(), &file).map_err(|e| e.to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_config_reload_leaves_the_previous_generation_fully_in_effect() {
    let a = temp_dir();
    a.write("p.toml", &named("from_a"));
    let b = temp_dir();
    b.write("p.toml", &named("from_b"));
    b.write("only_b.rhai", "random()");
    let conf_dir = temp_dir();
    let conf = conf_dir.path().join("switchyard.toml");
    let config = |dir: &Path, policy: &str| {
        format!(
            "policies_dir = {:?}\nrouting_logic = {policy:?}\n",
            dir.display().to_string()
        )
    };
    std::fs::write(&conf, config(a.path(), "p")).expect("write config");
    let sims = start_sims(1, instant_sim()).await;
    let mut cfg = switchyard::config::RouterConfig::for_backends(&urls(&sims), MODEL);
    cfg.policy.dir = a.path().to_path_buf();
    cfg.policy.default_policy = "p".into();
    cfg.decision_headers = true;
    cfg.config_file = Some(conf.clone());
    let router = switchyard::proxy::start(cfg, Some(config_loader(&conf)))
        .await
        .expect("router starts");
    let (c, url) = (client(), router.url());
    let before = admin_policies(&c, &url).await;
    let generation = before["generation"].as_u64().expect("generation");

    // The config now points at b, naming a policy b does not have.
    std::fs::write(&conf, config(b.path(), "nope")).expect("write config");
    let deadline = Instant::now() + SAFETY;
    let after = loop {
        let s = admin_policies(&c, &url).await;
        if s["generation"].as_u64() > Some(generation) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the config change was never seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let r = send(&c, completion_req(&url, "hello", 1, false)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-switchyard-policy"), Some("p"));
    assert_eq!(r.header("x-switchyard-tier"), Some("from_a"));
    assert!(
        after["errors"]
            .to_string()
            .contains("unknown default policy `nope`"),
        "{after}"
    );
    assert_eq!(after["dir"], before["dir"]);
    assert_eq!(after["default_policy"], "p");
    assert_eq!(
        after["policies"].as_array().map(Vec::len),
        Some(1),
        "{after}"
    );
    assert_eq!(after["policies"][0]["hash"], before["policies"][0]["hash"]);
    let source = after["policies"][0]["source"].as_str().unwrap_or_default();
    assert!(Path::new(source).starts_with(a.path()), "{after}");
    router.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_registers_no_metrics() {
    let dir = temp_dir();
    // Scripts that run at validation: a .rhai policy, an inline tier, a file tier.
    dir.write(
        "walk.rhai",
        "let b = (); for e in engines { if b == () || e.queue < b.queue { b = e; } } b",
    );
    dir.write("lib.rhai", "fallback()");
    dir.write(
        "mixed.toml",
        "[[tier]]\nscript = \"engines[0]\"\n\n[[tier]]\nfile = \"lib.rhai\"\n",
    );
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |cfg| {
        cfg.policy.dir = dir.path().to_path_buf();
        cfg.policy.default_policy = "walk".into();
    })
    .await;
    let (c, url) = (client(), router.url());
    dir.write("walk.rhai", "engines[0]");
    assert!(router.state.policies.reload_now().is_ok());
    assert!(switchyard::policy::PolicyStore::check_dir(&shipped_policies()).is_empty());
    assert_eq!(
        send(&c, completion_req(&url, "hello", 1, false))
            .await
            .status,
        StatusCode::OK
    );
    let text = metrics_text(&c, &url).await;
    assert!(text.contains("switchyard_engine_healthy{"), "{text}");
    assert!(!text.contains("dry-run"), "{text}");
    router.shutdown(Duration::from_secs(2)).await;
}

/// The router binary, its stdout (logs included) collected line by line.
struct Binary {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the router binary");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Binary { child, lines }
    }

    /// The first collected line containing `needle`, waiting for it (safety net only).
    async fn line(&self, needle: &str) -> String {
        let deadline = Instant::now() + SAFETY;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no line with {needle:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn until_tier(c: &TestClient, url: &str, tier: &str) -> Duration {
    let started = Instant::now();
    loop {
        let r = send(c, completion_req(url, "hello", 1, false)).await;
        assert_eq!(r.status, StatusCode::OK);
        if r.header("x-switchyard-tier") == Some(tier) {
            return started.elapsed();
        }
        assert!(started.elapsed() < SAFETY, "tier {tier} never decided");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_re_arms_the_binary_whose_watcher_could_not_start() {
    let dir = temp_dir();
    dir.write("p.toml", &named("v1"));
    let sims = start_sims(1, instant_sim()).await;
    let backend = sims[0].url();
    let policies = dir.path().display().to_string();
    let mut bin = Binary::spawn(
        &[
            "serve",
            "--static-backends",
            &backend,
            "--static-models",
            MODEL,
            "--port",
            "0",
            "--policies-dir",
            &policies,
            "--routing-logic",
            "p",
            "--decision-headers",
        ],
        // The first attempt to start the file watcher fails.
        &[("SWITCHYARD_TEST_WATCHER_FAILURES", "1")],
    );
    let line = bin.line("Switchyard is routing on ").await;
    let url = line.rsplit(' ').next().expect("url").trim().to_string();
    bin.line("cannot watch for policy changes").await;
    let c = client();
    until_tier(&c, &url, "v1").await;

    // SIGHUP reloads: the process survives it and the edit takes effect.
    dir.write("p.toml", &named("v2"));
    bin.signal("-HUP");
    let took = until_tier(&c, &url, "v2").await;
    eprintln!("edit effective after SIGHUP in {took:?}");
    assert!(bin.alive(), "SIGHUP killed the router");
    bin.line("SIGHUP: reloading policies").await;

    // SIGHUP also started the watcher: the next edit needs no signal.
    dir.write("p.toml", &named("v3"));
    let took = until_tier(&c, &url, "v3").await;
    eprintln!("edit effective without a signal in {took:?}");
    assert!(bin.alive());
}
