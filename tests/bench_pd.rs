//! `switchyard bench --pd` end to end at tiny scale: an aggregated run and a P/D run of the
//! same engine count, the real router with the shipped P/D policy in front of simulated
//! prefill and decode engines that hand off KV blocks over loopback.

use std::path::PathBuf;

use switchyard::bench::stats::Outcome;
use switchyard::bench::workload::{WorkloadKind, WorkloadKnobs};
use switchyard::bench::{BenchArgs, run_quiet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pd_run_beside_an_aggregated_one_moves_every_prompt_to_the_decode_engine() {
    let (requests, prompt_tokens, answer) = (12, 600, 8);
    let args = BenchArgs {
        engines: 2,
        workload: Some(WorkloadKind::LongPrompt),
        policies: Some(vec!["roundrobin".into()]),
        policies_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies"),
        pd: Some(vec!["1:1".into()]),
        quick: true,
        time_scale: Some(0.05),
        request_timeout: 30.0,
        knobs: WorkloadKnobs {
            requests: Some(requests),
            prompt_tokens: Some(prompt_tokens),
            answer_tokens: Some(answer),
            qps: Some(20.0),
            ..WorkloadKnobs::default()
        },
        ..BenchArgs::default()
    };
    let report = run_quiet(args).await.expect("the benchmark runs");
    let names: Vec<&str> = report.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "roundrobin",
            "pd 1P+1D / disaggregated_prefill_orchestrated"
        ]
    );
    for (run, recs) in report.runs.iter().zip(&report.records) {
        let n = &run.name;
        assert_eq!(run.requests.ok, requests, "{n}: {:?}", run.requests);
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok), "{n}");
        assert!(recs.iter().all(|r| r.output_tokens == answer), "{n}");
        let itl = run.itl.expect("ITL figures");
        assert!(itl.p50 > 0.0 && itl.p50 <= itl.p99, "{n}: {itl:?}");
    }
    let (agg, pd) = (&report.runs[0], &report.runs[1]);
    assert_eq!(agg.kv_transferred_tokens, None);
    assert!(agg.stage_shares.is_empty());
    // Unique prompts: the decode engine never holds enough of one to skip the prefill leg.
    assert_eq!(
        pd.stage_shares.iter().collect::<Vec<_>>(),
        [(&"disaggregated".to_owned(), &1.0)]
    );
    // Every prompt (unique: no cache hit on the decode engine) was loaded from the prefill
    // engine: at least its `prompt_tokens`, at most those plus the question and chat framing.
    let moved = pd
        .kv_transferred_tokens
        .expect("a P/D run counts its transfers");
    let (lo, hi) = (
        requests * prompt_tokens,
        requests * (prompt_tokens + 40 + 16),
    );
    assert!(
        (lo as u64..=hi as u64).contains(&moved),
        "{moved} tokens moved, expected {lo}..={hi}"
    );
    let md = report.render_markdown();
    assert!(md.contains("ITL p50"), "{md}");
    assert!(
        md.contains("pd 1P+1D / disaggregated_prefill_orchestrated: the first engines"),
        "{md}"
    );
}
