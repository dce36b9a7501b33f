//! OpenTelemetry tracing end to end: the real router in front of stub (and simulated) engines
//! on loopback, exporting over OTLP/HTTP to a receiver in the test that decodes the protobufs.
//! Asserted: the span tree (SERVER → route → CLIENT), its attributes, the `traceparent` the
//! engine receives (its parent is the CLIENT span), retries, sampling, the P/D legs, and that
//! an unreachable collector costs no request.

mod common;
mod otel_support;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{MODEL, client, send, start_router};
use http::Request;
use http_body_util::Full;
use otel_support::*;
use serde_json::json;
use switchyard::config::OtlpSettings;
use switchyard::sim::{self, KvRole, SimConfig};

fn otlp(endpoint: &str, ratio: Option<f64>) -> OtlpSettings {
    OtlpSettings {
        endpoint: Some(endpoint.to_owned()),
        sample_ratio: ratio,
        schedule_delay: Some(Duration::from_millis(20)),
        max_queue: None,
    }
}

fn id(b: &[u8]) -> String {
    hex(b)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_server_span_over_a_decision_over_the_attempt_the_engine_joins() {
    let collector = Collector::start().await;
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = otlp(&collector.url, None);
    })
    .await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(
        &client(),
        completion(Some(&tp), "req-otel-1", &router.url()),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let spans = collector
        .wait_for("the request's three spans", |s| {
            of_trace(s, CLIENT_TRACE).len() >= 3
        })
        .await;
    let spans = of_trace(&spans, CLIENT_TRACE);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let srv = spans.iter().find(|s| is_server(s)).expect("a SERVER span");
    let route = named(&spans, "route")[0];
    let cli = spans.iter().find(|s| is_client(s)).expect("a CLIENT span");

    // The SERVER span continues the client's trace.
    assert_eq!(srv.name, "POST /v1/completions");
    assert_eq!(id(&srv.parent_span_id), CLIENT_PARENT);
    assert_eq!(str_attr(srv, "http.request.method"), Some("POST"));
    assert_eq!(str_attr(srv, "http.route"), Some("/v1/completions"));
    assert_eq!(str_attr(srv, "url.path"), Some("/v1/completions"));
    assert_eq!(int_attr(srv, "http.response.status_code"), Some(200));
    assert_eq!(str_attr(srv, "gen_ai.request.model"), Some(MODEL));
    assert_eq!(
        str_attr(srv, "gen_ai.operation.name"),
        Some("text_completion")
    );
    assert_eq!(str_attr(srv, "switchyard.request_id"), Some("req-otel-1"));
    assert_eq!(bool_attr(srv, "switchyard.stream"), Some(false));
    // The answer's usage (the stub engine reports 3 prompt and 1 completion tokens).
    assert_eq!(int_attr(srv, "gen_ai.usage.input_tokens"), Some(3));
    assert_eq!(int_attr(srv, "gen_ai.usage.output_tokens"), Some(1));
    assert_eq!(str_attr(srv, "switchyard.body"), Some("completed"));
    assert!(
        srv.events.iter().any(|e| e.name == "first_token"),
        "{:?}",
        srv.events
    );
    assert!(srv.end_time_unix_nano >= cli.end_time_unix_nano);

    // SERVER → route → CLIENT.
    assert_eq!(route.parent_span_id, srv.span_id);
    assert_eq!(cli.parent_span_id, route.span_id);
    assert_eq!(str_attr(route, "switchyard.stage"), Some("aggregated"));
    assert_eq!(int_attr(route, "switchyard.attempt"), Some(0));
    assert_eq!(
        str_attr(route, "switchyard.policy"),
        Some("load_balanced_kvaware")
    );
    assert!(str_attr(route, "switchyard.tier").is_some_and(|t| !t.is_empty()));
    assert!(str_attr(route, "switchyard.kv.source").is_some());
    let engine_name = engine.url.trim_start_matches("http://");
    assert_eq!(str_attr(route, "switchyard.engine"), Some(engine_name));
    assert_eq!(cli.name, "POST /v1/completions");
    assert_eq!(str_attr(cli, "switchyard.engine"), Some(engine_name));
    assert_eq!(str_attr(cli, "switchyard.leg"), Some("aggregated"));
    assert_eq!(str_attr(cli, "switchyard.outcome"), Some("answered"));
    assert_eq!(int_attr(cli, "http.response.status_code"), Some(200));
    assert_eq!(int_attr(cli, "switchyard.attempt"), Some(0));
    assert_eq!(
        str_attr(cli, "url.full"),
        Some(format!("{}/v1/completions", engine.url).as_str())
    );

    // The engine's traceparent: the same trace, the CLIENT span as parent, sampled; the
    // client's tracestate goes along.
    let seen = engine.seen();
    assert_eq!(seen.len(), 1);
    let (trace, parent, flags) = parts(seen[0].0.as_deref().expect("a traceparent"));
    assert_eq!(trace, CLIENT_TRACE);
    assert_eq!(parent, id(&cli.span_id));
    assert_eq!(flags, "01");
    assert_eq!(seen[0].1.as_deref(), Some("vendor=abc"));

    assert!(collector.services().iter().all(|s| s == "switchyard"));
    let posts = collector.posts.lock().unwrap().clone();
    assert!(
        posts
            .iter()
            .all(|(p, t)| p == "/v1/traces" && t == "application/x-protobuf"),
        "{posts:?}"
    );
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_traceparent_a_new_trace_starts_and_reaches_the_engine() {
    let collector = Collector::start().await;
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = otlp(&collector.url, Some(1.0));
    })
    .await;
    let r = send(&client(), completion(None, "req-new", &router.url())).await;
    assert_eq!(r.status, 200);
    let tp = engine.traceparents()[0].clone().expect("a traceparent");
    let (trace, parent, flags) = parts(&tp);
    assert_eq!(flags, "01");
    assert_ne!(trace, "0".repeat(32));
    let spans = collector
        .wait_for("the new trace", |s| of_trace(s, &trace).len() >= 3)
        .await;
    let spans = of_trace(&spans, &trace);
    let srv = spans.iter().find(|s| is_server(s)).expect("SERVER");
    assert!(srv.parent_span_id.is_empty(), "a root span");
    let cli = spans.iter().find(|s| is_client(s)).expect("CLIENT");
    assert_eq!(id(&cli.span_id), parent);
    assert_eq!(engine.seen()[0].1, None, "no tracestate invented");
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_makes_two_client_spans_with_their_retry_numbers() {
    let collector = Collector::start().await;
    // The first request either engine gets answers 500; every other succeeds.
    let fail_once = Arc::new(AtomicUsize::new(1));
    let a = StubEngine::start(Arc::clone(&fail_once)).await;
    let b = StubEngine::start(Arc::clone(&fail_once)).await;
    let router = start_router(&[a.url.clone(), b.url.clone()], |c| {
        c.otlp = otlp(&collector.url, None);
        c.max_attempts = 2;
    })
    .await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(&client(), completion(Some(&tp), "req-retry", &router.url())).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let spans = collector
        .wait_for("two attempts", |s| of_trace(s, CLIENT_TRACE).len() >= 5)
        .await;
    let spans = of_trace(&spans, CLIENT_TRACE);
    assert_eq!(spans.len(), 5, "SERVER, 2 route, 2 CLIENT: {spans:#?}");
    let srv = spans.iter().find(|s| is_server(s)).expect("SERVER");
    let mut routes = named(&spans, "route");
    routes.sort_by_key(|s| int_attr(s, "switchyard.attempt"));
    let mut clis: Vec<&Span> = spans.iter().filter(|s| is_client(s)).collect();
    clis.sort_by_key(|s| int_attr(s, "switchyard.attempt"));
    assert_eq!(clis.len(), 2);
    for (n, (route, cli)) in routes.iter().zip(&clis).enumerate() {
        assert_eq!(route.parent_span_id, srv.span_id);
        assert_eq!(cli.parent_span_id, route.span_id);
        assert_eq!(int_attr(route, "switchyard.attempt"), Some(n as i64));
        assert_eq!(int_attr(cli, "switchyard.attempt"), Some(n as i64));
        assert_eq!(
            str_attr(cli, "switchyard.engine"),
            str_attr(route, "switchyard.engine")
        );
    }
    assert_eq!(
        str_attr(clis[0], "switchyard.outcome"),
        Some("engine_error")
    );
    assert_eq!(int_attr(clis[0], "http.response.status_code"), Some(500));
    assert_eq!(str_attr(clis[0], "error.type"), Some("500"));
    assert_eq!(int_attr(clis[0], "http.request.resend_count"), None);
    assert_eq!(str_attr(clis[1], "switchyard.outcome"), Some("answered"));
    assert_eq!(int_attr(clis[1], "http.response.status_code"), Some(200));
    assert_eq!(int_attr(clis[1], "http.request.resend_count"), Some(1));
    assert_ne!(
        str_attr(clis[0], "switchyard.engine"),
        str_attr(clis[1], "switchyard.engine"),
        "the retry went to the other engine"
    );
    assert_eq!(int_attr(srv, "http.response.status_code"), Some(200));

    // Each engine received the traceparent of its own attempt.
    let mut parents: Vec<String> = a
        .traceparents()
        .into_iter()
        .chain(b.traceparents())
        .map(|tp| parts(&tp.expect("traceparent")).1)
        .collect();
    parents.sort();
    let mut want: Vec<String> = clis.iter().map(|c| id(&c.span_id)).collect();
    want.sort();
    assert_eq!(parents, want);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_exports_nothing_yet_propagates_and_a_sampled_parent_is_followed() {
    let collector = Collector::start().await;
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = otlp(&collector.url, Some(0.0));
    })
    .await;
    let c = client();
    // No parent: a new trace, not sampled, still passed on (flag 00).
    assert_eq!(
        send(&c, completion(None, "r0", &router.url())).await.status,
        200
    );
    // A parent that is not sampled: the same.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{unsampled}-b7ad6b7169203331-00");
    assert_eq!(
        send(&c, completion(Some(&tp), "r1", &router.url()))
            .await
            .status,
        200
    );
    // A sampled parent: sampled, whatever the ratio.
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    assert_eq!(
        send(&c, completion(Some(&tp), "r2", &router.url()))
            .await
            .status,
        200
    );

    let seen = engine.traceparents();
    let (t0, _, f0) = parts(seen[0].as_deref().expect("traceparent"));
    assert_eq!(f0, "00");
    assert_ne!(t0, "0".repeat(32));
    let (t1, _, f1) = parts(seen[1].as_deref().expect("traceparent"));
    assert_eq!((t1.as_str(), f1.as_str()), (unsampled, "00"));
    let (t2, p2, f2) = parts(seen[2].as_deref().expect("traceparent"));
    assert_eq!((t2.as_str(), f2.as_str()), (CLIENT_TRACE, "01"));

    // Spans leave in order: once the sampled trace's are in, the others would be too.
    let spans = collector
        .wait_for("the sampled trace", |s| {
            of_trace(s, CLIENT_TRACE).len() >= 3
        })
        .await;
    assert!(of_trace(&spans, &t0).is_empty());
    assert!(of_trace(&spans, unsampled).is_empty());
    assert_eq!(spans.len(), 3, "only the sampled trace: {spans:#?}");
    let cli = spans.iter().find(|s| is_client(s)).expect("CLIENT");
    assert_eq!(id(&cli.span_id), p2);
    router.shutdown(Duration::from_secs(1)).await;
}

/// A collector that takes connections and never answers: each export hangs until its timeout.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind(common::loopback())
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_no_request_and_drops_are_counted() {
    let (url, _hole) = black_hole().await;
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = OtlpSettings {
            max_queue: Some(4),
            ..otlp(&url, Some(1.0))
        };
    })
    .await;
    let c = client();
    let started = Instant::now();
    for i in 0..30 {
        let one = Instant::now();
        let r = send(&c, completion(None, &format!("bh-{i}"), &router.url())).await;
        assert_eq!(r.status, 200);
        // The export's own timeout is 10 s: a request that waited on it would show.
        assert!(
            one.elapsed() < Duration::from_secs(5),
            "request {i} took {:?}",
            one.elapsed()
        );
    }
    assert_eq!(engine.seen().len(), 30);
    let m = String::from_utf8_lossy(&common::get(&c, &router.url(), "/metrics").await.body)
        .into_owned();
    let dropped: f64 = m
        .lines()
        .find(|l| {
            l.starts_with("switchyard_trace_spans_dropped_total")
                && l.contains("reason=\"queue_full\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the dropped-spans counter");
    // 90 spans, 4 held and at most one batch in the hung export: most are dropped.
    assert!(dropped >= 60.0, "dropped {dropped}\n{m}");
    let t = Instant::now();
    router.shutdown(Duration::from_secs(1)).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown waits a bounded time for the export: {:?}",
        t.elapsed()
    );
    eprintln!("30 requests in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_no_request() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = otlp(&dead, Some(1.0));
    })
    .await;
    let c = client();
    for i in 0..20 {
        let one = Instant::now();
        let r = send(&c, completion(None, &format!("dead-{i}"), &router.url())).await;
        assert_eq!(r.status, 200);
        assert!(
            one.elapsed() < Duration::from_secs(5),
            "{:?}",
            one.elapsed()
        );
    }
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaggregated_request_has_a_prefill_leg_and_a_decode_leg() {
    let collector = Collector::start().await;
    let engine = |role| async move {
        let cfg = SimConfig {
            kv_role: Some(role),
            ..common::instant_sim()
        };
        sim::start(cfg, common::loopback()).await.expect("sim")
    };
    let p = engine(KvRole::Producer).await;
    let d = engine(KvRole::Consumer).await;
    let router = start_router(&[p.url(), d.url()], |c| {
        common::prefill_then_decode(c);
        c.otlp = otlp(&collector.url, None);
    })
    .await;
    let prompt: String = (0..1500).map(|i| format!(" w{i}")).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let req = Request::post(format!("{}/v1/completions", router.url()))
        .header("content-type", "application/json")
        .header("traceparent", &tp)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let spans = collector
        .wait_for("both legs", |s| {
            of_trace(s, CLIENT_TRACE)
                .iter()
                .filter(|s| is_client(s))
                .count()
                >= 2
                && of_trace(s, CLIENT_TRACE).iter().any(is_server)
        })
        .await;
    let spans = of_trace(&spans, CLIENT_TRACE);
    let srv = spans.iter().find(|s| is_server(s)).expect("SERVER");
    let leg = |name: &str| {
        spans
            .iter()
            .find(|s| is_client(s) && str_attr(s, "switchyard.leg") == Some(name))
            .unwrap_or_else(|| panic!("a {name} leg: {spans:#?}"))
    };
    let (pl, dl) = (leg("prefill"), leg("decode"));
    assert_eq!(
        str_attr(pl, "switchyard.engine"),
        Some(p.addr().to_string().as_str())
    );
    assert_eq!(
        str_attr(dl, "switchyard.engine"),
        Some(d.addr().to_string().as_str())
    );
    let route_of = |leg: &Span| {
        spans
            .iter()
            .find(|s| s.span_id == leg.parent_span_id)
            .expect("the leg's route span")
            .clone()
    };
    let (pr, dr) = (route_of(pl), route_of(dl));
    assert_eq!(str_attr(&pr, "switchyard.stage"), Some("prefill"));
    assert_eq!(str_attr(&dr, "switchyard.stage"), Some("decode"));
    assert_eq!(pr.parent_span_id, srv.span_id);
    assert_eq!(dr.parent_span_id, srv.span_id);
    assert!(
        pl.end_time_unix_nano <= dl.start_time_unix_nano,
        "prefill, then decode"
    );
    assert!(
        dr.end_time_unix_nano <= pr.start_time_unix_nano,
        "decode decided first"
    );
    // A prefill engine was chosen, so the decider tier passed; the tiers passed are named.
    let passed = strs_attr(&pr, "switchyard.tiers_passed").expect("prefill tiers passed");
    assert_eq!(
        passed.first().map(String::as_str),
        Some("skip_prefill"),
        "{passed:?}"
    );
    let tier = str_attr(&pr, "switchyard.tier").expect("tier");
    assert!(!passed.iter().any(|t| t == tier), "{passed:?} {tier}");
    let decode_passed = strs_attr(&dr, "switchyard.tiers_passed").expect("decode tiers passed");
    let decode_tiers = ["load_balance", "kv_lookup", "fallback"];
    let decode_passed: Vec<&str> = decode_passed.iter().map(String::as_str).collect();
    assert!(
        decode_tiers.starts_with(&decode_passed),
        "{decode_passed:?}"
    );
    // Where a tier asked for prefix matches, the chosen engine's match is on the span.
    for r in [&pr, &dr] {
        let source = str_attr(r, "switchyard.kv.source").expect("kv source");
        assert_eq!(
            int_attr(r, "switchyard.kv.match_tokens").is_some(),
            source != "none",
            "{r:#?}"
        );
    }
    assert_eq!(int_attr(pl, "http.response.status_code"), Some(200));
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_in_the_routers_queue_is_a_span_with_tenant_priority_and_outcome() {
    let collector = Collector::start().await;
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |c| {
        c.otlp = otlp(&collector.url, None);
        c.queue.engine_queue_limit = 4;
        c.tenant_header = Some("x-tenant".into());
    })
    .await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let mut req = completion(Some(&tp), "req-q", &router.url());
    req.headers_mut()
        .insert("x-tenant", http::HeaderValue::from_static("team-a"));
    req.headers_mut()
        .insert("x-priority", http::HeaderValue::from_static("critical"));
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let spans = collector
        .wait_for("the queue span", |s| of_trace(s, CLIENT_TRACE).len() >= 4)
        .await;
    let spans = of_trace(&spans, CLIENT_TRACE);
    let srv = spans.iter().find(|s| is_server(s)).expect("SERVER");
    let q = named(&spans, "queue");
    assert_eq!(q.len(), 1, "{spans:#?}");
    let q = q[0];
    assert_eq!(q.parent_span_id, srv.span_id);
    assert_eq!(str_attr(q, "switchyard.tenant"), Some("team-a"));
    assert_eq!(str_attr(q, "switchyard.priority"), Some("critical"));
    assert_eq!(str_attr(q, "switchyard.queue.outcome"), Some("admitted"));
    let route = named(&spans, "route")[0];
    assert!(
        q.end_time_unix_nano <= route.start_time_unix_nano,
        "queue, then route"
    );
    router.shutdown(Duration::from_secs(1)).await;
}
