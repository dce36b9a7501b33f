//! `switchyard bench --trace` end to end at tiny scale: slices of the committed traces replayed
//! through the real router in front of real simulated engines over loopback. Assertions are on
//! what was sent and answered (counts, the prompt tokens the engines counted, which engine a
//! chat went to, hit rates against the ideal), never on timings.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::ProgressBar;
use switchyard::bench::cluster::{Cluster, ClusterSpec, sample_sum};
use switchyard::bench::driver::DriveConfig;
use switchyard::bench::kvcompare::KvMode;
use switchyard::bench::replay::replay_isolated;
use switchyard::bench::stats::Outcome;
use switchyard::bench::workload::trace::{TraceReader, TraceRecord};
use switchyard::bench::workload::trace_plan::TraceSpec;
use switchyard::bench::{BenchArgs, run_quiet};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mooncake() -> PathBuf {
    root().join("benches/data/traces/mooncake_conversation_trace.jsonl")
}

fn bailian() -> PathBuf {
    root().join("benches/data/traces/bailian_sample.jsonl")
}

fn records(path: &Path, n: usize) -> Vec<TraceRecord> {
    TraceReader::open(path)
        .unwrap()
        .take(n)
        .map(Result::unwrap)
        .collect()
}

async fn engine_sum(cluster: &Cluster, name: &str) -> f64 {
    let client = switchyard::upstream::build_client(Duration::from_secs(2));
    let mut sum = 0.0;
    for e in cluster.engine_names() {
        let url = format!("http://{e}/metrics");
        let body = switchyard::upstream::get(&client, &url, Duration::from_secs(5), 1 << 20)
            .await
            .unwrap();
        sum += sample_sum(&String::from_utf8_lossy(&body), name);
    }
    sum
}

/// With the tekken tokenizer (a real 131k vocabulary): the engines and the router take the
/// prompt's ids as they are, the router follows the engines' KV events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mooncake_slice_is_sent_as_token_prompts_the_engines_count_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ClusterSpec {
        engines: 2,
        model: "switchyard-sim".into(),
        time_scale: 0.02,
        slow_engine: None,
        max_num_seqs: Some(32),
        num_blocks: None,
        engine_stats_interval: 1.0,
        seed: 42,
        router_replicas: 1,
        tokenizer: Some(tekken(tmp.path())),
        exact_kv: true,
        engine_profile: None,
        pd: None,
    };
    let trace = TraceSpec {
        path: mooncake(),
        speed: 8.0,
        limit: Some(40),
        seed: 42,
        engine_block_size: 16,
    };
    let summary = trace.summarise().unwrap();
    assert_eq!((summary.records, summary.requests), (40, 40));
    let cluster = Cluster::start(&spec, &root().join("policies"), "load_balanced_kvaware")
        .await
        .unwrap();
    let cfg = DriveConfig {
        url: cluster.url(),
        replica_urls: Vec::new(),
        model: spec.model.clone(),
        time_scale: spec.time_scale,
        request_timeout: Duration::from_secs(30),
    };
    let recs = replay_isolated(cfg, trace.clone(), ProgressBar::hidden())
        .await
        .unwrap();
    let prompt_tokens = engine_sum(&cluster, "vllm:prompt_tokens_total").await;
    let generated = engine_sum(&cluster, "vllm:generation_tokens_total").await;
    let figures = cluster.engine_figures().await.unwrap();
    cluster.shutdown().await;

    let trace_recs = records(&mooncake(), 40);
    assert_eq!(recs.len(), 40);
    let sent: BTreeSet<usize> = recs.iter().map(|r| r.chain).collect();
    assert!(
        recs.iter().any(|r| r.kv.as_deref() == Some("exact")),
        "the router matched prompts on the engines' KV events"
    );
    assert_eq!(sent, (0..40).collect(), "every record sent once");
    for r in &recs {
        assert_eq!(r.outcome, Outcome::Ok, "record {}", r.chain);
        assert_eq!(
            r.output_tokens,
            trace_recs[r.chain].output_length.max(1),
            "record {}: max_tokens = output_length, ignore_eos",
            r.chain
        );
    }
    // The engines counted exactly the trace's prompt tokens: one token per id sent.
    let want: usize = trace_recs.iter().map(|r| r.input_length).sum();
    assert_eq!(summary.prompt_tokens, want as u64);
    assert_eq!(prompt_tokens, want as f64);
    let out: usize = trace_recs.iter().map(|r| r.output_length.max(1)).sum();
    assert_eq!(generated, out as f64);
    // Every request shares the 512-token system block: hits, and never above the ideal.
    let ideal = summary.ideal_cache_hit_rate.unwrap();
    let hit = figures.cache_hit_rate.unwrap();
    assert!(
        0.0 < hit && hit <= ideal + 1e-12,
        "hit {hit}, ideal {ideal}"
    );
    // Arrivals follow the trace at speed 8 (open loop): records are sent in trace order of
    // their planned times (records 0..: timestamps are coarse, equal ones are a burst).
    let last = recs.iter().map(|r| r.start).fold(0.0, f64::max);
    assert!(
        last >= summary.duration_s,
        "the last request went at {last} s, planned {} s",
        summary.duration_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bailian_trace_keeps_each_chat_on_one_engine_under_the_session_policy() {
    let args = BenchArgs {
        engines: 3,
        policies: Some(vec!["session".into(), "roundrobin".into()]),
        policies_dir: root().join("policies"),
        time_scale: Some(0.02),
        request_timeout: 30.0,
        trace: Some(bailian()),
        trace_speed: Some(4.0),
        ..BenchArgs::default()
    };
    let report = run_quiet(args).await.expect("the replay runs");
    let trace = report.settings.trace.as_ref().expect("the trace's summary");
    assert_eq!(trace.format.name(), "bailian");
    assert_eq!(
        (trace.records, trace.requests, trace.block_tokens),
        (12, 12, 16)
    );
    let ideal = report.ideal_cache_hit_rate.expect("an ideal hit rate");
    assert_eq!(trace.ideal_cache_hit_rate, Some(ideal));
    let recs = records(&bailian(), 12);
    for (run, rs) in report.runs.iter().zip(&report.records) {
        assert_eq!(run.requests.ok, 12, "{}: {:?}", run.name, run.requests);
        let hit = run.cache_hit_rate.unwrap();
        assert!(
            hit <= ideal + 1e-12,
            "{}: hit {hit} > ideal {ideal}",
            run.name
        );
        for r in rs {
            assert_eq!(r.turn, recs[r.chain].turn, "Bailian's turn is recorded");
        }
        if run.name == "session" {
            // The chat chain's root is the session key: a chat stays on one engine.
            let mut engines: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for r in rs {
                engines
                    .entry(recs[r.chain].session.as_str())
                    .or_default()
                    .insert(r.engine.as_deref().unwrap());
            }
            assert_eq!(engines.len(), 5, "five chats: {engines:?}");
            assert!(engines.values().all(|e| e.len() == 1), "{engines:?}");
        }
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["ideal_cache_hit_rate"].as_f64(), Some(ideal));
    assert_eq!(json["settings"]["trace"]["format"], "bailian");
    assert!(json["settings"]["workload"].is_null());
    let md = report.render_markdown();
    assert!(md.contains("| cache hit | hit/ideal |"), "{md}");
    assert!(md.contains("Ideal cache hit rate"), "{md}");
}

/// The converted tekken tokenizer of the vLLM fixtures (gzipped), unpacked into `dir` with the
/// ChatML template's files.
fn tekken(dir: &Path) -> PathBuf {
    let src = root().join("tests/fixtures/vllm-0.32.0/tokenizer");
    let model = dir.join("tekken");
    std::fs::create_dir_all(&model).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(src.join("tokenizer.json.gz")).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(model.join("tokenizer.json"), json).unwrap();
    for f in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join("chatml").join(f), model.join(f)).unwrap();
    }
    model
}

/// The test tokenizer (loaded in milliseconds, unlike tekken's 17 MB: six clusters load it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_compare_replays_a_trace() {
    let args = BenchArgs {
        engines: 2,
        policies_dir: root().join("policies"),
        time_scale: Some(0.02),
        request_timeout: 30.0,
        kv_compare: true,
        router_replicas: Some(vec![2]),
        tokenizer: Some(root().join("tests/fixtures/tokenizer/llama3")),
        trace: Some(mooncake()),
        trace_limit: Some(12),
        trace_speed: Some(4.0),
        ..BenchArgs::default()
    };
    let report = run_quiet(args).await.expect("the comparison runs");
    let rows = report.kv_compare.as_ref().expect("the kv table");
    assert_eq!(
        report.runs.len(),
        6,
        "small and ample × 2 replicas × 3 routings"
    );
    let ideal = report.ideal_cache_hit_rate.unwrap();
    for ((run, row), recs) in report.runs.iter().zip(rows).zip(&report.records) {
        let n = &run.name;
        assert_eq!(run.requests.ok, 12, "{n}: {:?}", run.requests);
        assert!(run.cache_hit_rate.unwrap() <= ideal + 1e-12, "{n}");
        let exact = recs
            .iter()
            .filter(|r| r.kv.as_deref() == Some("exact"))
            .count();
        if row.kv.mode == KvMode::Exact {
            assert!(
                exact > 0,
                "{n}: the routers matched on the engines' KV events"
            );
        } else {
            assert_eq!(exact, 0, "{n}");
        }
        let per_replica: Vec<usize> = (0..2)
            .map(|i| recs.iter().filter(|r| r.replica == i).count())
            .collect();
        assert_eq!(per_replica, [6, 6], "{n}: request k to replica k mod 2");
    }
}
