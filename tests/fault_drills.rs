//! Fault drills: the real router in front of real simulated engines under concurrent load,
//! with engines dying, failing, hanging, and clients misbehaving. Each drill prints how many
//! requests it sent, how many succeeded and how many were retried.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use switchyard::proxy::RunningRouter;
use switchyard::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `total` non-streaming requests from `concurrency` workers; returns (sent, ok, failures).
async fn load(
    model: &'static str,
    router_url: String,
    total: usize,
    concurrency: usize,
    max_tokens: usize,
) -> (usize, usize, Vec<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, ok, failures, url) = (
            next.clone(),
            ok.clone(),
            failures.clone(),
            router_url.clone(),
        );
        workers.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let r = post_json(
                    &c,
                    &url,
                    "/v1/completions",
                    completion_for(model, &format!("request {i}"), max_tokens, false),
                )
                .await;
                if r.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.lock().unwrap().push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut f = failures.lock().unwrap().clone();
    f.truncate(5);
    (total, ok.load(Ordering::Relaxed), f)
}

fn retries(router: &RunningRouter) -> u64 {
    // Counted from the router's own metrics (process-wide; drills use distinct models).
    let text = switchyard::proxy::telemetry::prometheus()
        .map(|h| h.render())
        .unwrap_or_default();
    let model = router
        .state
        .registry
        .models()
        .into_iter()
        .next()
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("switchyard_retries_total") && l.contains(&format!("model=\"{model}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn sims_for(model: &str, n: usize, cfg: SimConfig) -> Vec<switchyard::sim::SimHandle> {
    start_sims(
        n,
        SimConfig {
            model: model.into(),
            ..cfg
        },
    )
    .await
}

async fn router_for(
    model: &str,
    urls: &[String],
    tweak: impl FnOnce(&mut switchyard::config::RouterConfig),
) -> RunningRouter {
    start_router(urls, |c| {
        for b in &mut c.backends {
            b.models = vec![model.to_owned()];
        }
        c.decision_headers = true;
        tweak(c);
    })
    .await
}

fn completion_for(model: &str, prompt: &str, max_tokens: usize, stream: bool) -> serde_json::Value {
    serde_json::json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_kill_one_of_three_engines_under_load() {
    const M: &str = "drill-kill";
    // 20 tokens at 5 ms: each request takes ~100 ms, so many are in flight when the engine dies.
    let sims = sims_for(
        M,
        3,
        SimConfig {
            itl_ms: 5.0,
            prefill_overhead_ms: 1.0,
            prefill_ms_per_token: 0.0,
            time_scale: 1.0,
            ..SimConfig::default()
        },
    )
    .await;
    let urls = urls(&sims);
    let router = router_for(M, &urls, |_| {}).await;
    let url = router.url();
    let c = client();

    // Streams already started on every engine.
    let mut streams = Vec::new();
    for i in 0..3 {
        let body = completion_for(M, &format!("stream {i}"), 400, true).to_string();
        let resp = open(&c, post(&url, "/v1/completions", body)).await;
        let engine = resp.headers()["x-switchyard-engine"]
            .to_str()
            .unwrap()
            .to_owned();
        streams.push((engine, resp.into_body()));
    }
    let load_task = tokio::spawn(load(M, url.clone(), 300, 16, 20));
    // Kill engine 0 once load is flowing through it.
    let mut sims = sims;
    let victim = sims.remove(0);
    let victim_addr = victim.addr();
    let victim_name = victim_addr.to_string();
    eventually("load reaches the victim", || {
        victim.counters().received >= 6
    })
    .await;
    let killed_at = Instant::now();
    victim.shutdown().await;
    let st = router.state.clone();
    let engine = st
        .registry
        .all()
        .iter()
        .find(|e| *e.name == victim_name)
        .cloned()
        .unwrap();
    eventually("victim ejected", || !engine.is_healthy()).await;
    let ejected_after = killed_at.elapsed();

    let (sent, ok, failures) = load_task.await.unwrap();
    println!(
        "kill drill: sent {sent}, succeeded {ok}, retried {}, ejected after {ejected_after:?}",
        retries(&router)
    );
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert_eq!(ok, sent);
    // Ejected, it is not tried again: more requests cost no retry.
    let retried = retries(&router);
    for i in 0..20 {
        let r = post_json(
            &c,
            &router.url(),
            "/v1/completions",
            completion_for(M, &format!("after {i}"), 1, false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(
        retries(&router),
        retried,
        "the ejected engine was tried again"
    );

    // Streams: the victim's ends with a clean error event; the others complete.
    for (engine, mut body) in streams {
        let mut text = Vec::new();
        while let Some(f) = tokio::time::timeout(SAFETY, body.frame())
            .await
            .expect("stream ends, no hang")
        {
            match f {
                Ok(f) => text.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => panic!("stream from {engine} broke without an error event: {e}"),
            }
        }
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "{engine}: {}",
            &text[text.len().saturating_sub(200)..]
        );
        if engine == victim_name {
            assert!(
                text.contains("upstream_stream_error"),
                "victim stream has no error event"
            );
        } else {
            assert!(!text.contains("\"error\""), "healthy stream has an error");
        }
    }

    // Back on the same port: readmitted within 2 s.
    let back = switchyard::sim::start(
        SimConfig {
            model: M.into(),
            ..instant_sim()
        },
        victim_addr,
    )
    .await
    .unwrap();
    let back_at = Instant::now();
    eventually("victim readmitted", || engine.is_healthy()).await;
    let readmitted_after = back_at.elapsed();
    println!("kill drill: readmitted {readmitted_after:?} after coming back");
    // Readmitted, it serves again.
    let before = back.counters().received;
    for i in 0..20 {
        let r = post_json(
            &c,
            &router.url(),
            "/v1/completions",
            completion_for(M, &format!("back {i}"), 1, false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(
        back.counters().received > before,
        "the readmitted engine got no request"
    );
    drop(back);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_engine_answering_5xx_is_retried_ejected_and_readmitted() {
    const M: &str = "drill-5xx";
    let sims = sims_for(M, 3, instant_sim()).await;
    let router = router_for(M, &urls(&sims), |c| {
        c.engine_stats_interval = Duration::from_secs(3600)
    })
    .await;
    let bad = &sims[0];
    bad.faults().set_fail_rate(1.0);
    let st = router.state.clone();
    let engine = st
        .registry
        .all()
        .iter()
        .find(|e| *e.name == bad.addr().to_string())
        .cloned()
        .unwrap();
    let (sent, ok, failures) = load(M, router.url(), 200, 8, 4).await;
    println!(
        "5xx drill: sent {sent}, succeeded {ok}, retried {}, engine answered 500 {} times",
        retries(&router),
        bad.counters().failed_injected
    );
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert!(
        bad.counters().failed_injected >= 3,
        "the failing engine was tried"
    );
    // Consecutive failures ejected it (it may have been readmitted and ejected again since: its
    // /health keeps answering 200); with failures stopped it is readmitted and serves again.
    assert!(
        switchyard::proxy::telemetry::prometheus()
            .unwrap()
            .render()
            .lines()
            .any(
                |l| l.starts_with("switchyard_engine_ejections_total") && l.contains(&*engine.name)
            ),
        "no ejection recorded"
    );
    bad.faults().set_fail_rate(0.0);
    eventually("readmitted after a healthy probe", || engine.is_healthy()).await;
    let served_before = bad.counters().completed;
    let (_, ok2, failures2) = load(M, router.url(), 60, 3, 2).await;
    assert!(failures2.is_empty());
    assert_eq!(ok2, 60);
    assert!(
        bad.counters().completed > served_before,
        "the recovered engine takes traffic again"
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_engine_that_never_answers_hits_first_byte_timeout_and_is_retried() {
    const M: &str = "drill-hang";
    let sims = sims_for(M, 2, instant_sim()).await;
    sims[0].faults().set_hang(true);
    let router = router_for(M, &urls(&sims), |c| {
        c.first_byte_timeout = Duration::from_millis(300);
        c.engine_stats_interval = Duration::from_secs(3600);
    })
    .await;
    let started = Instant::now();
    let (sent, ok, failures) = load(M, router.url(), 40, 4, 2).await;
    println!(
        "hang drill: sent {sent}, succeeded {ok}, retried {} in {:?}",
        retries(&router),
        started.elapsed()
    );
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert!(
        sims[0].counters().received >= 1,
        "the hanging engine was tried"
    );
    assert!(retries(&router) >= 1);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_dead_engine_scrapes_do_not_slow_routing() {
    const M: &str = "drill-scrape";
    // A "dead" engine that accepts connections and never answers anything, serving another model.
    let blackhole = TcpListener::bind(loopback()).await.unwrap();
    let hole_url = format!("http://{}", blackhole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            conns.push(s);
        }
    });
    let live = sims_for(M, 1, instant_sim()).await;
    let router = start_router(&[live[0].url(), hole_url], |c| {
        c.backends[0].models = vec![M.into()];
        c.backends[1].models = vec!["other".into()];
        c.engine_stats_interval = Duration::from_millis(100);
    })
    .await;
    let c = client();
    let hole = router
        .state
        .registry
        .all()
        .iter()
        .find(|e| e.serves("other"))
        .cloned()
        .unwrap();
    let mut worst = Duration::ZERO;
    // Requests until the dead engine's first scrape has timed out, then as many again.
    let mut done_before_first_scrape_failed = 0;
    let mut after = 0;
    let deadline = Instant::now() + SAFETY;
    while after < done_before_first_scrape_failed.max(20) {
        assert!(
            Instant::now() < deadline,
            "the dead engine's scrape never failed"
        );
        let t = Instant::now();
        let r = post_json(
            &c,
            &router.url(),
            "/v1/completions",
            completion_for(
                M,
                &format!("p{}", done_before_first_scrape_failed + after),
                1,
                false,
            ),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        worst = worst.max(t.elapsed());
        if hole.stats().last_error.is_none() {
            done_before_first_scrape_failed += 1;
        } else {
            after += 1;
        }
    }
    // Each scrape of the dead engine waits for its timeout; routing never does: requests
    // complete while the first scrape is still hanging, and go on while later ones hang.
    println!(
        "scrape drill: {done_before_first_scrape_failed} requests before the dead engine's first scrape failed, {after} after, all succeeded, slowest {worst:?}"
    );
    assert!(
        done_before_first_scrape_failed >= 2,
        "routing waited for the dead engine's scrape"
    );
    held.abort();
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_make_the_router_buffer_without_bound() {
    // An engine that would send 256 MiB as fast as the connection takes it, counting what it
    // handed over; the client reads slowly. Bytes "in the router" = produced - consumed.
    const CHUNK: usize = 16 * 1024;
    const TOTAL_CHUNKS: usize = 16384; // 256 MiB
    let produced = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let engine_url = format!("http://{}", listener.local_addr().unwrap());
    let p = produced.clone();
    tokio::spawn(async move {
        // Scrapes and probes (GET) get an empty 200; the one POST gets the endless stream.
        while let Ok((mut s, _)) = listener.accept().await {
            let p = p.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                if head.starts_with(b"GET") {
                    answer_empty_200(&mut s).await;
                    return;
                }
                let hdr = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(hdr).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; CHUNK];
                for _ in 0..TOTAL_CHUNKS {
                    let size = format!("{CHUNK:x}\r\n");
                    if s.write_all(size.as_bytes()).await.is_err()
                        || s.write_all(&chunk).await.is_err()
                        || s.write_all(b"\r\n").await.is_err()
                    {
                        return;
                    }
                    p.fetch_add(CHUNK as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let router = start_router(&[engine_url], |c| {
        c.engine_stats_interval = Duration::from_secs(3600)
    })
    .await;
    let resp = open(&client(), completion_req(&router.url(), "x", 1, true)).await;
    let mut body = resp.into_body();
    let mut consumed = 0u64;
    let mut max_gap = 0u64;
    for _ in 0..100 {
        let f = tokio::time::timeout(SAFETY, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        consumed += f.into_data().map(|d| d.len() as u64).unwrap_or(0);
        max_gap = max_gap.max(produced.load(Ordering::Relaxed).saturating_sub(consumed));
        tokio::time::sleep(Duration::from_millis(3)).await; // a slow reader
    }
    println!("slow reader: consumed {consumed} bytes, engine ahead by at most {max_gap} bytes");
    // Kernel socket buffers of two loopback connections (autotuned up to several MiB each way)
    // plus hyper's bounded buffers; an unbounded router would let the engine run to 256 MiB.
    assert!(
        max_gap < 48 * 1024 * 1024,
        "router buffered {max_gap} bytes"
    );
    assert!(produced.load(Ordering::Relaxed) < (CHUNK * TOTAL_CHUNKS) as u64);
    drop(body);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slowloris_headers_are_cut_off_and_idle_connections_closed() {
    let sims = start_sims(1, instant_sim()).await;
    let router = start_router(&urls(&sims), |c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_millis(600);
    })
    .await;
    // Headers trickling in, one byte at a time: cut off at the header timeout.
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    let started = Instant::now();
    let trickle = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-a: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in trickle {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < SAFETY);
    }
    if !closed {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(SAFETY, s.read(&mut buf))
            .await
            .expect("closed, not hung");
        assert!(matches!(n, Ok(0) | Err(_)), "connection still open");
    }
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A keep-alive connection left idle after a request is closed after the idle timeout,
    // and not at the (shorter) header timeout.
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    let body = completion("x", 1, false).to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"usage\"") {
        let n = tokio::time::timeout(SAFETY, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let idle_from = Instant::now();
    let n = tokio::time::timeout(SAFETY, s.read(&mut buf))
        .await
        .expect("idle connection closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    let idle_for = idle_from.elapsed();
    assert!(
        idle_for >= Duration::from_millis(550),
        "closed after {idle_for:?}, before the idle timeout"
    );
    router.shutdown(Duration::from_secs(1)).await;
}
