//! `switchyard bench --kv-compare` at tiny scale: real routers (1 and 2 replicas) in front of
//! real simulated engines that cache by the test tokenizer's token ids and publish KV events.
//! Assertions are structural: the runs, their clusters, every request answered, and which
//! runs' decisions used exact matches (only the exact runs, and they did).

use std::path::PathBuf;

use switchyard::bench::kvcompare::{KvMode, LOAD_POLICY};
use switchyard::bench::workload::{WorkloadKind, WorkloadKnobs};
use switchyard::bench::{BenchArgs, run_quiet};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_compare_runs_every_cache_replica_and_routing() {
    let args = BenchArgs {
        engines: 2,
        workload: Some(WorkloadKind::MultiRoundQa),
        policies_dir: root().join("policies"),
        quick: true,
        time_scale: Some(0.05),
        request_timeout: 30.0,
        kv_compare: true,
        router_replicas: Some(vec![1, 2]),
        tokenizer: Some(root().join("tests/fixtures/tokenizer/llama3")),
        knobs: WorkloadKnobs {
            users: Some(4),
            rounds: Some(3),
            system_prompt_tokens: Some(100),
            history_tokens: Some(100),
            question_tokens: Some(20),
            answer_tokens: Some(8),
            ..WorkloadKnobs::default()
        },
        ..BenchArgs::default()
    };
    let report = run_quiet(args).await.expect("the comparison runs");
    let rows = report.kv_compare.as_ref().expect("the kv table");
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "small/1x/exact",
            "small/1x/approximate",
            "small/1x/load-only",
            "small/2x/exact",
            "small/2x/approximate",
            "small/2x/load-only",
            "ample/1x/exact",
            "ample/1x/approximate",
            "ample/1x/load-only",
            "ample/2x/exact",
            "ample/2x/approximate",
            "ample/2x/load-only",
        ]
    );
    assert_eq!(rows.len(), report.runs.len());
    assert!(report.winners.is_empty(), "the runs' clusters differ");
    for ((run, row), recs) in report.runs.iter().zip(rows).zip(&report.records) {
        let n = &run.name;
        assert_eq!(row.run, *n);
        assert_eq!(
            run.requests.ok, 12,
            "{n}: every request answered: {:?}",
            run.requests
        );
        assert!(run.cache_hit_rate.is_some(), "{n}: the engines' hit rate");
        assert_eq!(
            row.kv.num_blocks.is_some(),
            row.kv.cache == "small",
            "{n}: small caches are sized, ample ones the sim's"
        );
        if row.kv.mode == KvMode::LoadOnly {
            assert_eq!(run.policy, LOAD_POLICY);
        }
        let exact = recs
            .iter()
            .filter(|r| r.kv.as_deref() == Some("exact"))
            .count();
        if row.kv.mode == KvMode::Exact {
            assert!(exact > 0, "{n}: exact matches were used");
        } else {
            assert_eq!(exact, 0, "{n}: no router of this run follows KV events");
        }
        // The driver spread the requests over the replicas.
        let per_replica: Vec<usize> = (0..row.kv.replicas)
            .map(|i| recs.iter().filter(|r| r.replica == i).count())
            .collect();
        assert!(per_replica.iter().all(|&k| k > 0), "{n}: {per_replica:?}");
        assert_eq!(per_replica.iter().sum::<usize>(), 12, "{n}");
    }
    let table = report.render_markdown();
    assert!(
        table.contains(
            "| cache | replicas | routing | TTFT p50 | TTFT p90 | out tok/s | cache hit |"
        )
    );
}
