//! Kubernetes discovery against a stub API server (kube-rs unmodified, speaking the real list
//! and watch protocol), with pods that are real simulated engines on 127.0.0.2, 127.0.0.3, …
//! sharing one port. Each test prints the engine set (from the router's `/health`) as it
//! changes.

mod common;
mod k8s_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use k8s_support::{ApiStub, PodEngines, StubPod};
use switchyard::config::RouterConfig;
use switchyard::engines::discovery::ServiceDiscovery;
use switchyard::engines::k8s::K8sDiscovery;
use switchyard::proxy::RunningRouter;
use switchyard::sim::SimConfig;

const NS: &str = "llm";

/// Discovery settings for tests: the stub's API server, fast model retries and backoff.
fn discovery(stub: &ApiStub, port: u16) -> K8sDiscovery {
    K8sDiscovery {
        namespace: Some(NS.into()),
        label_selector: Some("app=vllm".into()),
        port,
        kube_config: Some(stub.kube_config()),
        models_refresh: Duration::from_secs(2),
        models_retry: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..K8sDiscovery::default()
    }
}

async fn start_router(stub: &ApiStub, port: u16, policy: &str) -> RunningRouter {
    let mut cfg = RouterConfig {
        port: 0,
        discovery: ServiceDiscovery::K8s(Box::new(discovery(stub, port))),
        decision_headers: true,
        engine_stats_interval: Duration::from_millis(100),
        health_probe_interval: Duration::from_millis(100),
        ..RouterConfig::default()
    };
    cfg.policy.dir = shipped_policies();
    cfg.policy.default_policy = policy.into();
    switchyard::proxy::start(cfg, None)
        .await
        .expect("router starts")
}

/// The engines `/health` lists: name → models.
async fn engine_set(c: &TestClient, url: &str) -> BTreeMap<String, Vec<String>> {
    let h = get(c, url, "/health").await.json();
    h["engines"]
        .as_array()
        .expect("engines array")
        .iter()
        .map(|e| {
            let models = e["models"]
                .as_array()
                .expect("models")
                .iter()
                .map(|m| m.as_str().unwrap_or_default().to_owned())
                .collect();
            (e["name"].as_str().unwrap_or_default().to_owned(), models)
        })
        .collect()
}

/// Polls `/health` until the engine names are exactly `want`; prints the set it reached.
async fn wait_for_engines(c: &TestClient, url: &str, step: &str, want: &[String]) {
    let mut want: Vec<String> = want.to_vec();
    want.sort();
    let deadline = Instant::now() + SAFETY;
    let started = Instant::now();
    loop {
        let set = engine_set(c, url).await;
        let names: Vec<String> = set.keys().cloned().collect();
        if names == want {
            println!(
                "[{:>6.3}s] {step}: engine set = {:?}",
                started.elapsed().as_secs_f64(),
                set
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{step}: engine set stayed {names:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `n` small completions; returns how many each engine served (from the decision header).
async fn route(c: &TestClient, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut by_engine = BTreeMap::new();
    for i in 0..n {
        let r = send(c, completion_req(url, &format!("hello {i}"), 2, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let e = r.header("x-switchyard-engine").expect("decision header");
        *by_engine.entry(e.to_owned()).or_insert(0) += 1;
    }
    by_engine
}

/// A value of the router's `/metrics` (summed over label sets whose text contains `filter`).
async fn metric(c: &TestClient, url: &str, name: &str, filter: &str) -> f64 {
    let text = String::from_utf8_lossy(&get(c, url, "/metrics").await.body).into_owned();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_join_when_ready_and_leave_when_not_ready_or_deleted() {
    let pods = PodEngines::start(3, SimConfig::default()).await;
    let stub = ApiStub::start(NS).await;
    let (a, b, c) = (pods.name(0), pods.name(1), pods.name(2));
    // Before the router starts: pod a is Ready (its model from the `model` label); a pod of
    // another app is Ready too and must never become an engine.
    stub.apply(
        StubPod::new("vllm-a")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", MODEL),
    );
    stub.apply(
        StubPod::new("other-app")
            .ip("127.0.0.99")
            .ready(true)
            .without_label("app")
            .label("app", "web"),
    );
    let router = start_router(&stub, pods.port, "roundrobin").await;
    let url = router.url();
    let http = client();
    wait_for_engines(
        &http,
        &url,
        "router started, vllm-a Ready",
        std::slice::from_ref(&a),
    )
    .await;
    let first = stub.requests();
    println!("kube-rs asked the stub: {:?}", &first[..first.len().min(2)]);
    assert!(
        first[0].contains("/api/v1/namespaces/llm/pods?")
            && first[0].contains("labelSelector=app%3Dvllm"),
        "{first:?}"
    );

    // Pod b is created: pending without an IP, then running but not Ready: not an engine.
    stub.apply(StubPod::new("vllm-b").label("model", "short-name"));
    stub.apply(
        StubPod::new("vllm-b")
            .ip(&pods.ip(1))
            .label("model", "short-name"),
    );
    // A bookmark moves the watch's resourceVersion on; nothing else changes.
    stub.bookmark();
    // Pod c (no model label: its models come from its own /v1/models) becomes Ready.
    stub.apply(StubPod::new("vllm-c").ip(&pods.ip(2)).ready(true));
    wait_for_engines(
        &http,
        &url,
        "vllm-b pending/not Ready, vllm-c Ready",
        &[a.clone(), c.clone()],
    )
    .await;
    assert_eq!(
        engine_set(&http, &url).await[&c],
        vec![MODEL.to_owned()],
        "c's models from /v1/models"
    );

    // b becomes Ready: three engines, and round robin reaches every one of them. b's pod is
    // labelled with a short name (as production-stack's chart labels pods); the engine's own
    // /v1/models wins over it.
    stub.apply(
        StubPod::new("vllm-b")
            .ip(&pods.ip(1))
            .ready(true)
            .label("model", "short-name"),
    );
    wait_for_engines(
        &http,
        &url,
        "vllm-b Ready",
        &[a.clone(), b.clone(), c.clone()],
    )
    .await;
    assert_eq!(
        engine_set(&http, &url).await[&b],
        vec![MODEL.to_owned()],
        "b's models from its /v1/models, not its label"
    );
    // Each engine that joined at runtime has its own scrape loop: its figures get scraped.
    let deadline = Instant::now() + SAFETY;
    loop {
        let h = get(&http, &url, "/health").await.json();
        let ages: Vec<serde_json::Value> = h["engines"]
            .as_array()
            .expect("engines")
            .iter()
            .map(|e| e["stats_age_seconds"].clone())
            .collect();
        if ages.iter().all(|a| a.is_number()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "discovered engines never scraped: {ages:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spread = route(&http, &url, 9).await;
    println!("9 requests over the 3 engines: {spread:?}");
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        [a.clone(), b.clone(), c.clone()]
    );

    // a stops being Ready: it leaves, and traffic goes to b and c only.
    stub.apply(
        StubPod::new("vllm-a")
            .ip(&pods.ip(0))
            .ready(false)
            .label("model", MODEL),
    );
    wait_for_engines(&http, &url, "vllm-a not Ready", &[b.clone(), c.clone()]).await;
    let spread = route(&http, &url, 6).await;
    assert!(!spread.contains_key(&a), "{spread:?}");
    let healthy_a = format!("engine=\"{a}\"");
    assert_eq!(
        metric(&http, &url, "switchyard_engine_healthy", &healthy_a).await,
        0.0,
        "a gone engine's health gauge drops to 0"
    );

    // a is Ready again at the same IP: it comes back (a new entry under the same name).
    stub.apply(
        StubPod::new("vllm-a")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", MODEL),
    );
    wait_for_engines(
        &http,
        &url,
        "vllm-a Ready again",
        &[a.clone(), b.clone(), c.clone()],
    )
    .await;
    assert!(route(&http, &url, 6).await.contains_key(&a));
    assert_eq!(
        metric(&http, &url, "switchyard_engine_healthy", &healthy_a).await,
        1.0
    );

    // Only c remains (a deleted, b's label no longer matches the selector: DELETED for the watch).
    stub.delete("vllm-a");
    stub.apply(
        StubPod::new("vllm-b")
            .ip(&pods.ip(1))
            .ready(true)
            .without_label("app")
            .label("app", "retired"),
    );
    wait_for_engines(
        &http,
        &url,
        "vllm-a deleted, vllm-b out of the selector",
        std::slice::from_ref(&c),
    )
    .await;

    // A long stream on c; c is deleted (terminating first, then gone) while it runs.
    let before = pods.sims[2].counters();
    let resp = open(&http, completion_req(&url, "a long answer", 300, true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-switchyard-engine"], c.as_str());
    let mut body = resp.into_body();
    let mut text = String::new();
    while !text.contains("data: ") {
        let f = tokio::time::timeout(SAFETY, body.frame())
            .await
            .expect("first frame")
            .expect("frame")
            .expect("ok");
        text.push_str(&String::from_utf8_lossy(f.data_ref().expect("data")));
    }
    let mut terminating = StubPod::new("vllm-c").ip(&pods.ip(2)).ready(true);
    terminating.deleting = true;
    stub.apply(terminating);
    stub.delete("vllm-c");
    wait_for_engines(&http, &url, "vllm-c deleted while streaming", &[]).await;
    let c_sim = pods.sims[2].counters();
    assert_eq!(
        (c_sim.received, c_sim.completed, c_sim.cancelled),
        (before.received + 1, before.completed, before.cancelled),
        "the stream is still running on c when c has left"
    );
    let no_engine = get(&http, &url, "/health").await;
    assert_eq!(no_engine.status, StatusCode::SERVICE_UNAVAILABLE);
    while let Some(f) = tokio::time::timeout(SAFETY, body.frame())
        .await
        .expect("stream within the safety net")
    {
        text.push_str(&String::from_utf8_lossy(
            f.expect("frame").data_ref().map(|b| &b[..]).unwrap_or(b""),
        ));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream ends normally");
    let tokens = events.iter().filter(|e| e.contains("\"text\"")).count();
    assert_eq!(
        tokens, 300,
        "every token arrived, most of them after c left"
    );
    assert!(!text.contains("\"error\""), "no error event");
    let c_sim = pods.sims[2].counters();
    assert_eq!(
        (c_sim.completed, c_sim.cancelled),
        (before.completed + 1, before.cancelled)
    );
    println!("the stream on vllm-c finished after vllm-c left: {tokens} token events, then [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_breaks_500s_restarts_and_410_keep_the_engine_set_then_update_it() {
    let pods = PodEngines::start(4, SimConfig::instant()).await;
    let stub = ApiStub::start(NS).await;
    let names: Vec<String> = (0..4).map(|i| pods.name(i)).collect();
    let pod = |i: usize| {
        StubPod::new(&format!("vllm-{i}"))
            .ip(&pods.ip(i))
            .ready(true)
            .label("model", MODEL)
    };
    stub.apply(pod(0));
    stub.apply(pod(1));
    let router = start_router(&stub, pods.port, "roundrobin").await;
    let url = router.url();
    let http = client();
    wait_for_engines(&http, &url, "start", &names[..2]).await;
    // Full lists the router made (the stub's own log: metrics are shared by the routers of
    // every test in this process).
    let lists = || {
        stub.requests()
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count()
    };
    let lists_at_start = lists();

    // 1. The watch stream ends (a timeout, a load balancer): kube resumes from its last
    //    resourceVersion without listing again, and later changes arrive. A change the
    //    selector does not match moves the resourceVersion on unseen; the bookmark that
    //    follows tells the watcher, which resumes from there.
    let deadline = Instant::now() + SAFETY;
    while stub.open_watches() != 1 {
        assert!(Instant::now() < deadline, "kube-rs never opened a watch");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stub.apply(
        StubPod::new("web-0")
            .without_label("app")
            .label("app", "web"),
    );
    stub.bookmark();
    let bookmarked = stub.resource_version();
    let watches_before = stub
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    stub.break_watches();
    let rewatch = loop {
        let w = stub
            .requests()
            .into_iter()
            .filter(|r| r.contains("watch=true"))
            .nth(watches_before);
        if let Some(w) = w {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("resumed with: {rewatch}");
    stub.apply(pod(2));
    wait_for_engines(
        &http,
        &url,
        "watch stream closed and resumed, vllm-2 added",
        &names[..3],
    )
    .await;
    assert!(
        rewatch.ends_with(&format!("resourceVersion={bookmarked}")),
        "resumed from the bookmark's resourceVersion {bookmarked}"
    );
    assert_eq!(lists(), lists_at_start, "no relist for a closed stream");

    // 2. The API server answers 500 for a while: errors are counted, the engine set stays.
    let errors_before = metric(&http, &url, "switchyard_discovery_errors_total", "").await;
    stub.fail_next(4);
    stub.break_watches();
    let deadline = Instant::now() + SAFETY;
    while stub.failures_served() < 4 {
        assert!(Instant::now() < deadline, "the watcher did not retry");
        assert_eq!(
            engine_set(&http, &url).await.len(),
            3,
            "the engine set never shrinks on errors"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_engines(&http, &url, "after four 500s", &names[..3]).await;
    let errors = metric(&http, &url, "switchyard_discovery_errors_total", "").await - errors_before;
    println!("discovery errors counted during the 500s: {errors}");
    assert!(errors >= 4.0, "{errors}");
    stub.delete("vllm-1");
    wait_for_engines(
        &http,
        &url,
        "recovered, vllm-1 deleted",
        &[names[0].clone(), names[2].clone()],
    )
    .await;
    assert_eq!(route(&http, &url, 4).await.len(), 2);

    // 3. The API server restarts: connections refused for a while; meanwhile pods change and
    //    the history is compacted, so the watch from the old resourceVersion gets 410 Expired
    //    (an ERROR event) and kube lists again. Until that list completes the old set stays.
    let refused = "kind=\"watch_start\"";
    let errors_before = metric(&http, &url, "switchyard_discovery_errors_total", refused).await;
    stub.go_down().await;
    stub.delete("vllm-0");
    stub.apply(pod(3));
    stub.expire_history();
    let deadline = Instant::now() + SAFETY;
    while metric(&http, &url, "switchyard_discovery_errors_total", refused).await - errors_before
        < 2.0
    {
        assert!(
            Instant::now() < deadline,
            "no error while the API server is down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_engines(
        &http,
        &url,
        "API server down (connection refused)",
        &[names[0].clone(), names[2].clone()],
    )
    .await;
    assert_eq!(
        route(&http, &url, 4).await.len(),
        2,
        "routing goes on while the API server is down"
    );
    stub.come_up().await;
    wait_for_engines(
        &http,
        &url,
        "API server back, 410 Expired, relisted",
        &[names[2].clone(), names[3].clone()],
    )
    .await;
    assert!(lists() > lists_at_start, "a relist after 410");
    let expired = metric(
        &http,
        &url,
        "switchyard_discovery_errors_total",
        "kind=\"expired\"",
    )
    .await;
    println!("410 Expired watch events seen: {expired}");
    assert!(expired >= 1.0);

    // 4. Not what a real API server does, but survivable: a watch request answered HTTP 410.
    //    kube's watcher would retry the same expired version forever; the router starts a new
    //    watcher (a fresh list) instead.
    let lists_before = lists();
    stub.http_410_next_watches(1);
    stub.break_watches();
    let deadline = Instant::now() + SAFETY;
    while lists() <= lists_before {
        assert!(
            Instant::now() < deadline,
            "no relist after an HTTP 410 watch answer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stub.apply(pod(1));
    wait_for_engines(
        &http,
        &url,
        "after an HTTP 410 to a watch request, relisted, vllm-1 back",
        &[names[1].clone(), names[2].clone(), names[3].clone()],
    )
    .await;
    let spread = route(&http, &url, 6).await;
    println!("6 requests after all that: {spread:?}");
    assert_eq!(spread.len(), 3);
}

/// Models come from each engine's `/v1/models`; while an engine refuses it (an engine started
/// with an API key), the pod's model label stands in; without a label it is not routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_refuses_v1_models_is_routed_by_its_label_or_not_at_all() {
    let pods = PodEngines::start_with(0, 2, SimConfig::instant()).await;
    let stub = ApiStub::start(NS).await;
    let router = start_router(&stub, pods.port, "roundrobin").await;
    let (url, http) = (router.url(), client());
    // Locked engine 1 (no label) joins first, then locked engine 0 (labelled).
    stub.apply(StubPod::new("unlabelled").ip(&pods.ip(1)).ready(true));
    stub.apply(
        StubPod::new("labelled")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", MODEL),
    );
    wait_for_engines(
        &http,
        &url,
        "labelled pod, /v1/models refused",
        &[pods.name(0)],
    )
    .await;
    assert_eq!(
        engine_set(&http, &url).await[&pods.name(0)],
        vec![MODEL.to_owned()]
    );
    let r = send(&http, completion_req(&url, "hi", 2, false)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-switchyard-engine"), Some(pods.name(0).as_str()));
    // The unlabelled one has been asked (and refused) again and again: still not an engine.
    let deadline = Instant::now() + SAFETY;
    while pods.locked[1].models_asked() < 3 {
        assert!(
            Instant::now() < deadline,
            "the unlabelled engine is not asked again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_engines(
        &http,
        &url,
        "unlabelled pod asked 3 times, still out",
        &[pods.name(0)],
    )
    .await;
}

/// A pod's role: its `llm-d.ai/role` label, else its model label matched against the prefill
/// and decode labels; a relabelled pod changes role.
#[tokio::test]
async fn pods_take_their_role_from_llmd_role_else_their_model_label() {
    let pods = PodEngines::start(3, SimConfig::instant()).await;
    let stub = ApiStub::start(NS).await;
    let mut d = discovery(&stub, pods.port);
    d.role_labels = switchyard::engines::RoleLabels {
        prefill: vec!["llama-prefill".into()],
        decode: vec!["llama-decode".into()],
    };
    let mut cfg = RouterConfig {
        port: 0,
        discovery: ServiceDiscovery::K8s(Box::new(d)),
        decision_headers: true,
        engine_stats_interval: Duration::from_millis(100),
        health_probe_interval: Duration::from_millis(100),
        ..RouterConfig::default()
    };
    cfg.policy.dir = shipped_policies();
    cfg.policy.default_policy = "disaggregated_prefill_orchestrated".into();
    let router = switchyard::proxy::start(cfg, None)
        .await
        .expect("router starts");
    let (url, http) = (router.url(), client());
    stub.apply(
        StubPod::new("pre")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", "llama-prefill"),
    );
    stub.apply(
        StubPod::new("dec")
            .ip(&pods.ip(1))
            .ready(true)
            .label("llm-d.ai/role", "decode"),
    );
    stub.apply(
        StubPod::new("agg")
            .ip(&pods.ip(2))
            .ready(true)
            .label("model", "llama"),
    );
    let names: Vec<String> = (0..3).map(|i| pods.name(i)).collect();
    wait_for_engines(&http, &url, "three pods", &names).await;
    let roles = |h: serde_json::Value| -> BTreeMap<String, String> {
        h["engines"]
            .as_array()
            .expect("engines")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or_default().to_owned(),
                    e["role"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let want = |r: [&str; 3]| -> BTreeMap<String, String> {
        names
            .iter()
            .cloned()
            .zip(r.iter().map(|s| s.to_string()))
            .collect()
    };
    assert_eq!(
        roles(get(&http, &url, "/health").await.json()),
        want(["prefill", "decode", "aggregated"])
    );
    // A request of the disaggregated policy decodes on the decode pod.
    let r = send(&http, completion_req(&url, "hi", 2, false)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-switchyard-engine"), Some(names[1].as_str()));
    assert_eq!(
        r.header("x-switchyard-stage"),
        Some("decode_only"),
        "a short prompt skips prefill"
    );
    // llm-d's label overrides the model label: the prefill pod becomes a decode engine.
    stub.apply(
        StubPod::new("pre")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", "llama-prefill")
            .label("llm-d.ai/role", "decode"),
    );
    let deadline = Instant::now() + SAFETY;
    while roles(get(&http, &url, "/health").await.json())
        != want(["decode", "decode", "aggregated"])
    {
        assert!(
            Instant::now() < deadline,
            "the relabelled pod keeps its role"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The binary, configured by flags, finds the API server through a KUBECONFIG file (and the
/// namespace through its context), like `kubectl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_discovers_pods_through_a_kubeconfig() {
    let pods = PodEngines::start(2, SimConfig::instant()).await;
    let stub = ApiStub::start(NS).await;
    stub.apply(
        StubPod::new("vllm-0")
            .ip(&pods.ip(0))
            .ready(true)
            .label("model", MODEL),
    );
    let dir = std::env::temp_dir().join(format!("switchyard-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("config");
    std::fs::write(&kubeconfig, stub.kubeconfig_yaml()).expect("kubeconfig");
    let port = pods.port.to_string();
    let router = RouterProcess::spawn_with_env(
        &[
            "--service-discovery",
            "k8s",
            "--k8s-label-selector",
            "app=vllm",
            "--k8s-port",
            &port,
            "--routing-logic",
            "roundrobin",
            "--decision-headers",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().expect("path"))],
    );
    let http = client();
    wait_for_engines(&http, &router.url, "binary started", &[pods.name(0)]).await;
    stub.apply(StubPod::new("vllm-1").ip(&pods.ip(1)).ready(true));
    wait_for_engines(
        &http,
        &router.url,
        "vllm-1 Ready",
        &[pods.name(0), pods.name(1)],
    )
    .await;
    assert_eq!(route(&http, &router.url, 4).await.len(), 2);
    assert!(
        stub.requests()
            .iter()
            .all(|r| r.contains("/api/v1/namespaces/llm/pods"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Simulated pods that also publish KV events, all on common ports (HTTP, events, replay) at
/// 127.0.0.2, 127.0.0.3, … as pods of one Deployment do.
async fn kv_pods(n: usize) -> (Vec<switchyard::sim::SimHandle>, u16, u16, u16) {
    'attempt: for _ in 0..50 {
        let (mut http, mut events, mut replay) = (0u16, 0u16, 0u16);
        let mut sims: Vec<switchyard::sim::SimHandle> = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", 2 + i);
            let cfg = SimConfig {
                seed: i as u64 + 1,
                kv_events_endpoint: Some(format!("tcp://{ip}:{events}")),
                kv_events_replay_endpoint: Some(format!("tcp://{ip}:{replay}")),
                ..SimConfig::default()
            };
            let addr = std::net::SocketAddr::new(ip.parse().expect("ip"), http);
            let Ok(s) = switchyard::sim::start(cfg, addr).await else {
                for s in sims {
                    s.shutdown().await;
                }
                continue 'attempt;
            };
            let port_of = |e: &str| e.rsplit(':').next().and_then(|p| p.parse().ok());
            let p = s.kv_events().expect("the sim publishes KV events");
            http = s.addr().port();
            events = port_of(p.endpoint()).expect("events port");
            replay = p.replay_endpoint().and_then(port_of).expect("replay port");
            sims.push(s);
        }
        return (sims, http, events, replay);
    }
    panic!("no common free ports on 127.0.0.2..{}", 1 + n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_pods_kv_events_are_followed_at_the_pod_ip_and_port() {
    let (sims, http_port, events, replay) = kv_pods(2).await;
    let stub = ApiStub::start(NS).await;
    for (i, name) in ["vllm-0", "vllm-1"].into_iter().enumerate() {
        stub.apply(
            StubPod::new(name)
                .ip(&format!("127.0.0.{}", 2 + i))
                .ready(true)
                .label("model", MODEL),
        );
    }
    let mut cfg = RouterConfig {
        port: 0,
        discovery: ServiceDiscovery::K8s(Box::new(discovery(&stub, http_port))),
        ..RouterConfig::default()
    };
    cfg.policy.dir = shipped_policies();
    cfg.kv_events.k8s_ports = Some(switchyard::engines::kv_events::KvEventsPorts {
        events,
        replay: Some(replay),
    });
    let router = switchyard::proxy::start(cfg, None)
        .await
        .expect("router starts");
    let exact = std::sync::Arc::clone(&router.state.exact);
    eventually("both pods' KV views are live", || exact.live_engines() == 2).await;

    // A prompt served by pod 0 (straight to it): the blocks it stores reach the router's view.
    let before = exact.blocks();
    let c = client();
    let body = completion(&"a prompt of some length ".repeat(20), 1, false);
    let reply = post_json(&c, &sims[0].url(), "/v1/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    eventually("the stored blocks reach the exact view", || {
        exact.blocks() > before
    })
    .await;

    // The pod is deleted: its subscriber stops and its view goes.
    stub.delete("vllm-1");
    eventually("only pod 0's view is left", || exact.live_engines() == 1).await;
    router.shutdown(Duration::from_secs(5)).await;
    for s in sims {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_pods_say_where_they_publish_with_kv_events_discover() {
    // The pods publish on ports the router is not told: it asks each pod's
    // /kv_event_sources (`tcp://*:PORT`) and connects to the pod's IP at that port.
    let (sims, http_port, _, _) = kv_pods(2).await;
    let stub = ApiStub::start(NS).await;
    for (i, name) in ["vllm-0", "vllm-1"].into_iter().enumerate() {
        stub.apply(
            StubPod::new(name)
                .ip(&format!("127.0.0.{}", 2 + i))
                .ready(true)
                .label("model", MODEL),
        );
    }
    let mut cfg = RouterConfig {
        port: 0,
        discovery: ServiceDiscovery::K8s(Box::new(discovery(&stub, http_port))),
        ..RouterConfig::default()
    };
    cfg.policy.dir = shipped_policies();
    cfg.kv_events.discover = true;
    let router = switchyard::proxy::start(cfg, None)
        .await
        .expect("router starts");
    let exact = std::sync::Arc::clone(&router.state.exact);
    eventually("both pods' KV views are live", || exact.live_engines() == 2).await;
    let before = exact.blocks();
    let c = client();
    let body = completion(&"a prompt of some length ".repeat(20), 1, false);
    let reply = post_json(&c, &sims[1].url(), "/v1/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    eventually("the stored blocks reach the exact view", || {
        exact.blocks() > before
    })
    .await;
    stub.delete("vllm-1");
    eventually("only pod 0's view is left", || exact.live_engines() == 1).await;
    assert_eq!(router.state.kv_events.engines().len(), 1);
    router.shutdown(Duration::from_secs(5)).await;
    for s in sims {
        s.shutdown().await;
    }
}
