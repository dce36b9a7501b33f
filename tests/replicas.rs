//! Router replicas agree: several routers in front of the same engines make the same
//! `session_hash` decisions whatever the order in which they learned the engines, because the
//! rendezvous hash runs over engine names (`host:port`), not over registry positions.

mod common;
mod k8s_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use k8s_support::{ApiStub, PodEngines, StubPod};
use switchyard::config::RouterConfig;
use switchyard::engines::discovery::ServiceDiscovery;
use switchyard::engines::k8s::K8sDiscovery;
use switchyard::sim::SimConfig;

const KEYS: usize = 200;

/// The engine and tier a router picks for a completion carrying `x-user-id: key`.
async fn decide(c: &TestClient, url: &str, key: &str) -> (String, String) {
    let req = Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-user-id", key)
        .body(Full::new(Bytes::from(
            completion("hello", 1, false).to_string(),
        )))
        .expect("request");
    let r = send(c, req).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (
        r.header("x-switchyard-engine")
            .expect("engine header")
            .to_owned(),
        r.header("x-switchyard-tier")
            .expect("tier header")
            .to_owned(),
    )
}

/// Asks every router about `KEYS` session keys; asserts they agree and prints the figures.
async fn assert_agreement(label: &str, urls: &[String]) -> BTreeMap<String, usize> {
    let c = client();
    let mut agree = 0;
    let mut per_engine: BTreeMap<String, usize> = BTreeMap::new();
    let mut disagreements = Vec::new();
    for k in 0..KEYS {
        let key = format!("user-{k}");
        let mut picks = Vec::new();
        for url in urls {
            let (engine, tier) = decide(&c, url, &key).await;
            assert_eq!(tier, "session_hash", "decided by the session tier");
            picks.push(engine);
        }
        if picks.iter().all(|p| *p == picks[0]) {
            agree += 1;
            *per_engine.entry(picks[0].clone()).or_insert(0) += 1;
        } else {
            disagreements.push((key, picks));
        }
    }
    println!(
        "{label}: {agree}/{KEYS} session keys agree across {} routers; keys per engine: {per_engine:?}",
        urls.len()
    );
    assert!(
        disagreements.is_empty(),
        "{} keys disagree, e.g. {:?}",
        disagreements.len(),
        &disagreements[..disagreements.len().min(5)]
    );
    per_engine
}

/// Three router processes (the real binary) with the same static backends in three orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_router_processes_agree_on_sessions_whatever_the_backend_order() {
    let sims = start_sims(3, instant_sim()).await;
    let u = urls(&sims);
    let orders = [
        [u[0].clone(), u[1].clone(), u[2].clone()],
        [u[2].clone(), u[0].clone(), u[1].clone()],
        [u[1].clone(), u[2].clone(), u[0].clone()],
    ];
    let policies = shipped_policies();
    let routers: Vec<RouterProcess> = orders
        .iter()
        .map(|order| {
            RouterProcess::spawn(&[
                "--static-backends",
                &order.join(","),
                "--static-models",
                MODEL,
                "--routing-logic",
                "session",
                "--session-key",
                "x-user-id",
                "--decision-headers",
                "--policies-dir",
                policies.to_str().expect("path"),
            ])
        })
        .collect();
    for (r, order) in routers.iter().zip(&orders) {
        println!(
            "router {} learned the engines in the order {order:?}",
            r.url
        );
    }
    let router_urls: Vec<String> = routers.iter().map(|r| r.url.clone()).collect();
    let per_engine =
        assert_agreement("three router processes, static backends", &router_urls).await;
    assert_eq!(per_engine.len(), 3, "every engine holds some sessions");
}

/// Two routers discovering the same pods in opposite orders (each from its own API server
/// stub), and a third configured statically with the pods' URLs: same decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_in_different_orders_routers_agree_on_sessions() {
    let pods = PodEngines::start(4, SimConfig::instant()).await;
    let (stub_a, stub_b) = (ApiStub::start("llm").await, ApiStub::start("llm").await);
    let mut cfg = RouterConfig {
        port: 0,
        decision_headers: true,
        session_key: Some("x-user-id".into()),
        ..RouterConfig::default()
    };
    cfg.policy.dir = shipped_policies();
    cfg.policy.default_policy = "session".into();
    let discovered = |stub: &ApiStub| {
        let mut c = cfg.clone();
        c.discovery = ServiceDiscovery::K8s(Box::new(K8sDiscovery {
            namespace: Some("llm".into()),
            label_selector: Some("app=vllm".into()),
            port: pods.port,
            kube_config: Some(stub.kube_config()),
            ..K8sDiscovery::default()
        }));
        c
    };
    let ra = switchyard::proxy::start(discovered(&stub_a), None)
        .await
        .expect("router a");
    let rb = switchyard::proxy::start(discovered(&stub_b), None)
        .await
        .expect("router b");
    // Pods appear one at a time, in opposite orders for the two routers.
    for i in 0..4 {
        for (stub, router, pod) in [(&stub_a, &ra, i), (&stub_b, &rb, 3 - i)] {
            stub.apply(
                StubPod::new(&format!("vllm-{pod}"))
                    .ip(&pods.ip(pod))
                    .ready(true)
                    .label("model", MODEL),
            );
            let deadline = Instant::now() + SAFETY;
            while router.state.registry.all().len() < i + 1 {
                assert!(Instant::now() < deadline, "pod {pod} not discovered");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let order = |r: &switchyard::proxy::RunningRouter| -> Vec<String> {
        r.state
            .registry
            .all()
            .iter()
            .map(|e| e.name.to_string())
            .collect()
    };
    let mut c_urls: Vec<String> = (0..4).map(|i| format!("http://{}", pods.name(i))).collect();
    c_urls.swap(0, 2);
    let mut static_cfg = RouterConfig::for_backends(&c_urls, MODEL);
    static_cfg.decision_headers = true;
    static_cfg.session_key = Some("x-user-id".into());
    static_cfg.policy = cfg.policy.clone();
    let rc = switchyard::proxy::start(static_cfg, None)
        .await
        .expect("router c");
    println!("router a learned {:?}", order(&ra));
    println!("router b learned {:?}", order(&rb));
    println!("router c (static) has {:?}", order(&rc));
    assert_ne!(
        order(&ra),
        order(&rb),
        "the routers learned the pods in different orders"
    );
    let per_engine = assert_agreement(
        "two discovering routers and one static",
        &[ra.url(), rb.url(), rc.url()],
    )
    .await;
    assert_eq!(per_engine.len(), 4);
}
