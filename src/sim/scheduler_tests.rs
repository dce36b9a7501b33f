//! The engine loop in time: steps, their durations, delivery of tokens, cancellation.

use super::*;
use crate::sim::Profile;

fn sched(cfg: SimConfig) -> Arc<Scheduler> {
    Arc::new(Scheduler::new(&cfg, None))
}

fn job(s: &Arc<Scheduler>, prompt: usize, max_tokens: usize) -> Job {
    Job::new(Arc::clone(s), vec![0; prompt], vec![], max_tokens)
}

async fn drain(j: &mut Job) -> usize {
    let mut n = 0;
    while !j.is_done() {
        n += j.next_tokens(usize::MAX).await.len();
    }
    n
}

#[tokio::test]
async fn instant_job_delivers_every_token_and_completes() {
    let s = sched(SimConfig::instant());
    let mut j = job(&s, 40, 7);
    j.start().await.unwrap();
    assert_eq!(drain(&mut j).await, 7);
    assert_eq!(j.next_tokens(8).await, 7..7);
    drop(j);
    let g = s.gauges();
    assert_eq!((g.running, g.waiting, g.kv_usage), (0, 0, 0.0));
    assert_eq!(s.stats.completed.load(Ordering::Relaxed), 1);
    assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 0);
    assert_eq!(s.stats.ttft.count(), 1);
    assert_eq!(s.stats.generation_tokens.load(Ordering::Relaxed), 7);
}

#[tokio::test]
async fn max_batch_splits_the_output() {
    let s = sched(SimConfig::instant());
    let mut j = job(&s, 32, 40);
    j.start().await.unwrap();
    let mut end = 0;
    while !j.is_done() {
        let r = j.next_tokens(16).await;
        assert!(r.len() <= 16 && r.start == end);
        end = r.end;
    }
    assert_eq!(end, 40);
}

#[tokio::test]
async fn a_cancelled_request_leaves_the_engine_and_frees_its_blocks() {
    let s = sched(SimConfig {
        num_blocks: 10,
        time_scale: 1.0,
        itl_ms: 1000.0,
        ..SimConfig::instant()
    });
    let mut j = job(&s, 32, 40);
    j.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.used_blocks() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        s.gauges().kv_usage,
        0.2,
        "32 prompt tokens = 2 of 10 blocks"
    );
    drop(j);
    assert_eq!(s.gauges().kv_usage, 0.0);
    assert_eq!(s.gauges().running, 0);
    assert_eq!(s.stats.cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(s.stats.completed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn repeated_prompt_hits_the_cache() {
    let s = sched(SimConfig::instant());
    for expect_hits in [0, 32] {
        let mut j = Job::new(Arc::clone(&s), vec![0; 40], vec![11, 12], 1);
        j.start().await.unwrap();
        drain(&mut j).await;
        assert_eq!(
            s.stats.prefix_hits.load(Ordering::Relaxed),
            expect_hits as u64
        );
    }
    assert_eq!(s.stats.prefix_queries.load(Ordering::Relaxed), 80);
}

/// The legacy profile at time scale 0.1: a 100-token prompt's first token after one step of
/// 13.3 + 10 + 100 × 0.1 ms, each next one 13.3 ms later, all against the wall clock.
#[tokio::test]
async fn tokens_follow_the_profiles_step_times() {
    let s = sched(SimConfig {
        time_scale: 0.1,
        ..Profile::LegacyA100.config()
    });
    let t0 = Instant::now();
    let mut j = job(&s, 100, 3);
    j.start().await.unwrap();
    assert_eq!(j.next_tokens(8).await, 0..1);
    let ttft = t0.elapsed();
    assert!(ttft >= Duration::from_micros(3330), "{ttft:?}");
    assert_eq!(drain(&mut j).await, 2);
    assert!(t0.elapsed() >= Duration::from_micros(3330 + 2 * 1330));
    // The engine's own clock says the same, in simulated seconds.
    assert_eq!(s.stats.ttft.count(), 1);
}

/// With time scale 0 the clock is the sum of modelled step times: the histograms record them.
#[tokio::test]
async fn instant_time_records_modelled_durations() {
    let s = sched(SimConfig {
        time_scale: 0.0,
        ..Profile::LegacyA100.config()
    });
    let mut j = job(&s, 100, 2);
    j.start().await.unwrap();
    drain(&mut j).await;
    let text = crate::sim::metrics::render("m", &s.stats, s.gauges(), s.cache_info());
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:e2e_request_latency_seconds_sum"))
        .unwrap();
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - (0.0333 + 0.0133)).abs() < 1e-9, "{line}");
}

/// CPU cost of the engine loop (documented in docs/sim.md): 2,000 requests of 12,000-token
/// prompts (a tenth of them sharing a 6,000-token prefix) and 300 output tokens through one
/// engine of the H100 profile, each request's task waiting for its tokens as the HTTP side
/// does; at time scale 0 (steps back-to-back) and 0.02 (steps sleeping, tokens coalesced).
/// Run with
/// `cargo test --release --lib sim::scheduler::tests::loop_cpu_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn loop_cpu_cost() {
    fn cpu_secs() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }
    for time_scale in [0.0, 0.02] {
        let s = sched(SimConfig {
            time_scale,
            ..Profile::Llama3_8bH100.config()
        });
        let (n, prompt, out) = (2000usize, 12_000usize, 300usize);
        // Prompts and their hashes are made before the measurement (the HTTP side's work).
        let prompts: Vec<(Vec<u32>, Vec<u64>)> = (0..n)
            .map(|i| {
                let ids: Vec<u32> = (0..prompt as u32)
                    .map(|t| {
                        if i % 10 == 0 && t < 6000 {
                            t
                        } else {
                            t ^ ((i as u32) << 16)
                        }
                    })
                    .collect();
                let hashes = crate::sim::engine_block_hashes(&ids, 16);
                (ids, hashes)
            })
            .collect();
        let (cpu0, t0) = (cpu_secs(), std::time::Instant::now());
        let mut tasks = Vec::new();
        for (ids, hashes) in prompts {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                let mut j = Job::new(s, ids, hashes, out);
                j.start().await.unwrap();
                drain(&mut j).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), out);
        }
        let (cpu, wall) = (cpu_secs() - cpu0, t0.elapsed().as_secs_f64());
        let steps = s.stats.steps.load(Ordering::Relaxed);
        println!(
            "time scale {time_scale}: {n} requests, {steps} steps, {} preemptions: wall {wall:.2} s, \
             CPU {cpu:.2} s = {:.1} µs per step, {:.0} µs per request",
            s.stats.preemptions.load(Ordering::Relaxed),
            cpu * 1e6 / steps as f64,
            cpu * 1e6 / n as f64
        );
    }
}
