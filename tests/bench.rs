//! `switchyard bench` end to end at tiny scale: the real router in front of real simulated
//! engines over loopback, the shipped policies, seeded workloads. Assertions are structural
//! (counts, shares, orderings with wide margins), never tight timings.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::bench::cluster::{Cluster, ClusterSpec};
use switchyard::bench::driver::{self, DriveConfig};
use switchyard::bench::report::BenchReport;
use switchyard::bench::stats::Outcome;
use switchyard::bench::workload::{Chain, Message, Turn, Workload, WorkloadKind, WorkloadKnobs};
use switchyard::bench::{BenchArgs, run_quiet};

fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn tiny(workload: WorkloadKind, policies: &[&str], knobs: WorkloadKnobs) -> BenchArgs {
    BenchArgs {
        engines: 3,
        workload: Some(workload),
        policies: Some(policies.iter().map(|s| (*s).to_owned()).collect()),
        policies_dir: shipped_policies(),
        quick: true,
        time_scale: Some(0.05),
        request_timeout: 30.0,
        knobs,
        ..BenchArgs::default()
    }
}

/// Every figure of every run is consistent with the records.
fn assert_consistent(report: &BenchReport, engines: usize) {
    assert_eq!(report.runs.len(), report.records.len());
    for (run, recs) in report.runs.iter().zip(&report.records) {
        let n = &run.name;
        let c = run.requests;
        assert_eq!(c.sent, c.planned, "{n}: every planned request was sent");
        assert_eq!(c.ok, c.sent, "{n}: every request was answered: {c:?}");
        assert_eq!(c.failed, 0, "{n}");
        assert_eq!(recs.len(), c.sent, "{n}");
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok), "{n}");
        let answer = report
            .settings
            .workload
            .as_ref()
            .expect("a generated workload")
            .answer_tokens;
        assert!(
            recs.iter().all(|r| r.output_tokens == answer),
            "{n}: every answer has answer_tokens tokens"
        );
        assert!(
            recs.iter()
                .all(|r| r.policy.as_deref() == Some(run.policy.as_str())),
            "{n}: the router ran the policy of the run"
        );
        if engines > 0 {
            assert_eq!(run.engine_shares.len(), engines, "{n}");
        }
        let shares: f64 = run.engine_shares.iter().map(|e| e.share).sum();
        assert!(
            (shares - 1.0).abs() < 1e-9,
            "{n}: engine shares sum to {shares}"
        );
        let routed: usize = run.engine_shares.iter().map(|e| e.requests).sum();
        assert_eq!(routed, c.sent, "{n}");
        let tiers: f64 = run.tier_shares.values().sum();
        assert!(
            (tiers - 1.0).abs() < 1e-9,
            "{n}: tier shares sum to {tiers}"
        );
        let t = run.ttft.expect("TTFT figures");
        assert!(
            0.0 < t.p50 && t.p50 <= t.p90 && t.p90 <= t.p99,
            "{n}: {t:?}"
        );
        let e = run.e2e.expect("E2E figures");
        assert!(e.p50 >= t.p50, "{n}: a stream ends after its first token");
        assert!(
            run.requests_per_s > 0.0 && run.output_tokens_per_s > 0.0,
            "{n}"
        );
        assert!(!run.ttft_timeline.is_empty(), "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_round_qa_has_a_consistent_row_per_policy() {
    let policies = ["roundrobin", "session", "kvaware", "load_balanced_kvaware"];
    let args = tiny(
        WorkloadKind::MultiRoundQa,
        &policies,
        WorkloadKnobs {
            users: Some(6),
            rounds: Some(2),
            ..WorkloadKnobs::default()
        },
    );
    let report = run_quiet(args).await.expect("bench runs");
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, policies);
    assert_consistent(&report, 3);
    for run in &report.runs {
        assert_eq!(run.requests.planned, 12);
        let hit = run.cache_hit_rate.expect("hit rate from the sims");
        assert!((0.0..=1.0).contains(&hit));
        let engine_ttft = run.engine_ttft_mean.expect("the engines' TTFT");
        let client_ttft = run.ttft.expect("TTFT").mean;
        assert!(
            0.0 < engine_ttft && engine_ttft <= client_ttft,
            "the client sees the engine's TTFT plus the way there and back: {engine_ttft} vs {client_ttft}"
        );
    }
    // Session affinity: each user's rounds all went to one engine.
    let session = &report.records[1];
    for user in 0..6 {
        let engines: std::collections::BTreeSet<_> = session
            .iter()
            .filter(|r| r.chain == user)
            .map(|r| r.engine.clone())
            .collect();
        assert_eq!(engines.len(), 1, "user {user} stuck to one engine");
    }

    // The report renders a row per policy and writes its files.
    let text = report.render_text();
    for p in policies {
        assert!(
            text.lines().filter(|l| l.starts_with(p)).count() >= 2,
            "{p} in both tables:\n{text}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    report.write_files(&out).expect("files written");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(4));
    let svg = std::fs::read_to_string(out.join("bench.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);
    let csv = std::fs::read_to_string(out.join("requests.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4 * 12);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvaware_hits_the_prefix_cache_more_than_roundrobin() {
    // Heavy prefix sharing: 4 groups of 8 prompts behind 1000-token prefixes. Round-robin
    // spreads each group over every engine (one cold prefill per group and engine); kvaware
    // follows the cache after the first prompt of a group.
    let args = tiny(
        WorkloadKind::SharedPrefix,
        &["roundrobin", "kvaware"],
        WorkloadKnobs {
            groups: Some(4),
            prompts_per_group: Some(8),
            prefix_tokens: Some(1000),
            question_tokens: Some(20),
            answer_tokens: Some(8),
            qps: Some(4.0),
            ..WorkloadKnobs::default()
        },
    );
    let report = run_quiet(args).await.expect("bench runs");
    assert_consistent(&report, 3);
    let hit = |i: usize| report.runs[i].cache_hit_rate.expect("hit rate");
    let (rr, kv) = (hit(0), hit(1));
    assert!(
        kv > rr + 0.15,
        "kvaware's hit rate {kv:.3} beats roundrobin's {rr:.3}"
    );
    let kv_tiers = &report.runs[1].tier_shares;
    assert!(
        kv_tiers.keys().any(|t| t.contains("kv")),
        "kvaware decided by its cache tier: {kv_tiers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_rows_are_named_by_threshold() {
    let mut args = tiny(
        WorkloadKind::HotPrefix,
        &[],
        WorkloadKnobs {
            requests: Some(12),
            ..WorkloadKnobs::default()
        },
    );
    args.policies = None;
    args.sweep = Some("threshold=1,inf".into());
    let report = run_quiet(args).await.expect("bench runs");
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["load_balanced_kvaware[t=1]", "load_balanced_kvaware[t=inf]"]
    );
    assert_consistent(&report, 3);
    assert!(
        !report.runs[1].tier_shares.contains_key("load_balance"),
        "t=inf has no load_balance tier: {:?}",
        report.runs[1].tier_shares
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_mode_benchmarks_a_running_router() {
    let spec = ClusterSpec {
        engines: 2,
        model: "switchyard-sim".into(),
        time_scale: 0.05,
        slow_engine: None,
        engine_profile: None,
        max_num_seqs: Some(32),
        num_blocks: None,
        engine_stats_interval: 1.0,
        seed: 1,
        router_replicas: 1,
        tokenizer: None,
        exact_kv: false,
        pd: None,
    };
    let cluster = Cluster::start(&spec, &shipped_policies(), "roundrobin")
        .await
        .expect("cluster starts");
    let mut args = tiny(
        WorkloadKind::SharedPrefix,
        &[],
        WorkloadKnobs {
            groups: Some(2),
            prompts_per_group: Some(4),
            ..WorkloadKnobs::default()
        },
    );
    args.policies = None;
    args.target = Some(cluster.url());
    let report = run_quiet(args).await.expect("bench runs");
    let counters = cluster.counters();
    cluster.shutdown().await;
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(
        run.name, "roundrobin",
        "named after the router's policy header"
    );
    assert_eq!(run.cache_hit_rate, None, "unknown without the engines");
    assert_eq!(run.engine_ttft_mean, None);
    assert_eq!(report.settings.engines, None);
    assert_consistent(&report, 2);
    let received: u64 = counters.iter().map(|c| c.received).sum();
    assert_eq!(received as usize, run.requests.sent);
}

/// A canned router: records each request (session header, JSON body) and answers the n-th
/// request with `answers[n]`: `Ok(text)` streams `text` in two SSE events and `[DONE]`;
/// `Err(500)` is an error status; `Err(0)` streams without `[DONE]`.
async fn canned(
    answers: Vec<Result<&'static str, u16>>,
) -> (String, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            let answers = answers.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = Arc::clone(&log);
                    let answers = answers.clone();
                    async move {
                        let user = req
                            .headers()
                            .get("x-user-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let n = {
                            let mut l = log.lock().unwrap();
                            l.push((user, serde_json::from_slice(&body).unwrap()));
                            l.len() - 1
                        };
                        let mut resp = http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .header("x-switchyard-engine", "e:1")
                            .header("x-switchyard-tier", "canned")
                            .header("x-switchyard-policy", "canned");
                        let event = |t: &str| {
                            format!(
                                "data: {}\n\n",
                                serde_json::json!({"choices": [{"delta": {"content": t}}]})
                            )
                        };
                        let text = match answers[n] {
                            Ok(a) => {
                                let (x, y) = a.split_at(a.len() / 2);
                                format!("{}{}{}data: [DONE]\n\n", event(""), event(x), event(y))
                            }
                            Err(0) => event(" cut"),
                            Err(code) => {
                                resp = resp.status(code);
                                "{\"error\":{\"message\":\"boom\"}}".to_owned()
                            }
                        };
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(text))).unwrap())
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_carry_the_streamed_answers_and_failures_are_counted() {
    let (url, seen) = canned(vec![Ok(" abc def"), Err(500), Err(0), Ok(" wxyz")]).await;
    let turn = |at: f64, q: &str| Turn {
        at,
        question: q.to_owned(),
        max_tokens: 2,
    };
    let workload = Arc::new(Workload {
        chains: vec![Chain {
            user: "user-7".into(),
            preamble: vec![Message {
                role: "system",
                content: Arc::from(" sys"),
            }],
            turns: vec![
                turn(0.0, " q1"),
                turn(0.0, " q2"),
                turn(0.0, " q3"),
                turn(0.0, " q4"),
            ],
        }],
    });
    let cfg = DriveConfig {
        url,
        replica_urls: Vec::new(),
        model: "m".into(),
        time_scale: 1.0,
        request_timeout: Duration::from_secs(20),
    };
    let recs = driver::drive(
        &cfg,
        &driver::client(),
        workload,
        &indicatif::ProgressBar::hidden(),
    )
    .await;
    assert_eq!(recs.len(), 4, "a failed round does not stop the user");
    let outcomes: Vec<&Outcome> = recs.iter().map(|r| &r.outcome).collect();
    assert_eq!(outcomes[0], &Outcome::Ok);
    assert_eq!(outcomes[1], &Outcome::Status(500));
    assert!(
        matches!(outcomes[2], Outcome::Failed(m) if m.contains("[DONE]")),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(outcomes[3], &Outcome::Ok);
    assert_eq!(
        recs[0].output_tokens, 2,
        "\" abc def\" is 8 bytes of answer: 2 tokens"
    );
    assert!(recs[0].ttft.is_some() && recs[0].ttft <= Some(recs[0].e2e));
    assert_eq!(recs[0].engine.as_deref(), Some("e:1"));
    assert_eq!(recs[0].tier.as_deref(), Some("canned"));
    // Turns go in order, each after the previous one ended.
    for w in recs.windows(2) {
        assert!(w[1].start >= w[0].start + w[0].e2e);
    }

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|(u, _)| u == "user-7"),
        "the session header is sent"
    );
    let body = &seen[3].1;
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 2);
    let msgs: Vec<(String, String)> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let m = |r: &str, c: &str| (r.to_owned(), c.to_owned());
    assert_eq!(
        msgs,
        vec![
            m("system", " sys"),
            m("user", " q1"),
            m("assistant", " abc def"),
            m("user", " q2"),
            m("assistant", ""),
            m("user", " q3"),
            m("assistant", " cut"),
            m("user", " q4"),
        ],
        "each round carries the earlier questions and the answers actually streamed"
    );
}
