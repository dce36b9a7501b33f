//! `switchyard bench --tenants` end to end at tiny scale: the real router (its tenant header
//! set) in front of real simulated engines over loopback, a noisy tenant's closed-loop clients
//! and a quiet tenant's Poisson arrivals. Assertions are structural (runs, counts, outcomes),
//! never timing ratios: the machine is noisy.

use std::path::PathBuf;

use switchyard::admit::rate_limit::{RateLimitRule, RateLimitRules};
use switchyard::bench::BenchArgs;
use switchyard::bench::cluster::{Cluster, ClusterSpec};
use switchyard::bench::driver::DriveConfig;
use switchyard::bench::stats::Outcome;
use switchyard::bench::tenants::load::{self, TENANT_HEADER, TenantLoad, TenantName};
use switchyard::bench::tenants::run_quiet;
use switchyard::bench::workload::WorkloadKnobs;

fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

const ANSWER: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_tenants_bench_measures_both_tenants_in_every_run() {
    let args = BenchArgs {
        tenants: true,
        quick: true,
        engines: 2,
        max_num_seqs: Some(4),
        policies_dir: shipped_policies(),
        time_scale: Some(0.1),
        request_timeout: 30.0,
        quiet_qps: Some(4.0),
        engine_queue_limits: Some(vec![2]),
        warmup: Some(2.0),
        duration: Some(8.0),
        knobs: WorkloadKnobs {
            prompt_tokens: Some(64),
            answer_tokens: Some(ANSWER),
            ..WorkloadKnobs::default()
        },
        ..BenchArgs::default()
    };
    let report = run_quiet(args).await.expect("the benchmark runs");
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["quiet alone", "flood, no queue", "flood, queue limit 2"]
    );
    assert_eq!(report.settings.load.noisy_clients, 3 * 2 * 4);
    assert_eq!(
        (report.settings.window.start, report.settings.window.end),
        (2.0, 10.0)
    );
    assert_eq!(report.runs.len(), report.records.len());
    for (run, recs) in report.runs.iter().zip(&report.records) {
        let n = &run.name;
        for t in [&run.quiet, &run.noisy] {
            assert_eq!(t.ok + t.rejected + t.failed, t.sent, "{n}: {t:?}");
        }
        assert!(
            run.quiet.sent > 0 && run.quiet.ok > 0,
            "{n}: {:?}",
            run.quiet
        );
        assert!(run.quiet.ttft.is_some(), "{n}");
        assert_eq!(run.noisy.sent > 0, run.flood, "{n}: {:?}", run.noisy);
        // Every request of the run, its tenant recorded; whole answers only, of half to one
        // and a half times ANSWER tokens.
        let quiet = recs
            .iter()
            .filter(|r| r.tenant == TenantName::Quiet)
            .count();
        assert!(quiet >= run.quiet.sent, "{n}");
        assert_eq!(recs.len() - quiet > 0, run.flood, "{n}");
        assert!(
            recs.iter()
                .filter(|r| r.record.is_ok())
                .all(|r| (ANSWER / 2..=ANSWER * 3 / 2).contains(&r.record.output_tokens)),
            "{n}"
        );
        assert!(
            run.requests_per_s > 0.0 && run.output_tokens_per_s > 0.0,
            "{n}"
        );
        assert!(run.quiet_p90_vs_alone.is_some(), "{n}");
        assert_eq!(run.throughput_vs_no_queue.is_some(), run.flood, "{n}");
    }
    // Without the router's queue nothing is refused and nothing fails.
    for run in &report.runs[..2] {
        let n = &run.name;
        assert_eq!((run.quiet.rejected, run.quiet.failed), (0, 0), "{n}");
        assert_eq!((run.noisy.rejected, run.noisy.failed), (0, 0), "{n}");
        assert!(
            report.records[0..2]
                .iter()
                .flatten()
                .all(|r| r.record.outcome == Outcome::Ok),
            "{n}"
        );
    }
    assert_eq!(report.runs[0].quiet_p90_vs_alone, Some(1.0));
    assert_eq!(report.runs[1].throughput_vs_no_queue, Some(1.0));
    assert_eq!(report.runs[2].engine_queue_limit, 2);

    let text = report.render_text();
    for needle in [
        "quiet TTFT p90",
        "p90 / alone",
        "vs no queue",
        "flood, queue limit 2",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    let md = report.render_markdown();
    assert!(md.contains("switchyard bench --quick --tenants"), "{md}");
    let csv = report.render_csv();
    let rows = report.records.iter().map(Vec::len).sum::<usize>();
    assert_eq!(
        csv.lines().count(),
        rows + 1,
        "a header and a row per request"
    );
    assert!(
        csv.lines()
            .skip(1)
            .all(|l| l.contains(",quiet,") || l.contains(",noisy,"))
    );
    let json = serde_json::to_value(&report).expect("JSON");
    assert_eq!(
        json["runs"][1]["quiet_p90_vs_alone"].as_f64(),
        report.runs[1].quiet_p90_vs_alone
    );
    assert!(json.get("records").is_none(), "requests go to the CSV only");
}

/// The router's refusals (here a rate limit on the noisy tenant: 429 with `Retry-After`) are
/// counted as rejections, not failures; a noisy client waits the `Retry-After` (which outlasts
/// the run) before sending again; the quiet tenant, named apart by the tenant header, is not
/// limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_and_noisy_clients_back_off() {
    let spec = ClusterSpec {
        engines: 1,
        model: "switchyard-sim".into(),
        time_scale: 0.05,
        slow_engine: None,
        engine_profile: None,
        max_num_seqs: Some(8),
        num_blocks: None,
        engine_stats_interval: 1.0,
        seed: 1,
        router_replicas: 1,
        tokenizer: None,
        exact_kv: false,
        pd: None,
    };
    let allowed = 3;
    let rules = RateLimitRules::new(&[RateLimitRule {
        tenant: "noisy".into(),
        requests_per_minute: Some(allowed),
        tokens_per_minute: None,
    }])
    .expect("rules");
    let cluster = Cluster::start_configured(&spec, &shipped_policies(), "roundrobin", |cfg| {
        cfg.tenant_header = Some(TENANT_HEADER.into());
        cfg.rate_limits = rules;
    })
    .await
    .expect("cluster");
    let clients = 4;
    let tenant_load = TenantLoad {
        noisy_clients: clients,
        quiet_qps: 2.0,
        prompt_tokens: 32,
        answer_tokens: 8,
        seed: 5,
        warmup: 0.0,
        duration: 20.0,
    };
    let quiet_planned = tenant_load.quiet_arrivals().len();
    let cfg = DriveConfig {
        url: cluster.url(),
        replica_urls: Vec::new(),
        model: spec.model.clone(),
        time_scale: spec.time_scale,
        request_timeout: std::time::Duration::from_secs(30),
    };
    let recs = load::drive_isolated(cfg, tenant_load, indicatif::ProgressBar::hidden())
        .await
        .expect("the client runs");
    cluster.shutdown().await;
    let (quiet, noisy): (Vec<_>, Vec<_>) = recs.iter().partition(|r| r.tenant == TenantName::Quiet);
    assert!(quiet_planned > 0);
    assert_eq!(quiet.len(), quiet_planned);
    assert!(quiet.iter().all(|r| r.record.is_ok()), "{quiet:?}");
    let ok = noisy.iter().filter(|r| r.record.is_ok()).count();
    let refused: Vec<_> = noisy
        .iter()
        .filter(|r| r.record.outcome == Outcome::Status(429))
        .collect();
    assert_eq!(ok, allowed as usize, "the limit's requests pass");
    assert_eq!(ok + refused.len(), noisy.len(), "nothing else happens");
    // Each client stops at its first refusal: the Retry-After outlasts the window.
    assert!(
        (1..=clients).contains(&refused.len()),
        "{} refusals",
        refused.len()
    );
    let mut by_client: Vec<usize> = refused.iter().map(|r| r.record.chain).collect();
    by_client.sort_unstable();
    by_client.dedup();
    assert_eq!(
        by_client.len(),
        refused.len(),
        "one refusal per client at most"
    );

    let run = switchyard::bench::tenants::stats::TenantRun::compute(
        "limited",
        0,
        true,
        &recs,
        switchyard::bench::tenants::stats::Window {
            start: 0.0,
            end: 20.0,
        },
    );
    assert_eq!(run.noisy.rejected, refused.len());
    assert_eq!(run.noisy.failed, 0);
    assert_eq!(run.quiet.rejected + run.quiet.failed, 0);
}
