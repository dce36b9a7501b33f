//! Tracing through the real `switchyard` binary (its flags and the standard `OTEL_*`
//! variables), and tracing off: the client's trace context passes through untouched.

mod common;
mod otel_support;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use common::{client, send, start_router};
use otel_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_off_passes_the_clients_trace_context_through_untouched() {
    let engine = StubEngine::start(Arc::new(AtomicUsize::new(0))).await;
    let router = start_router(std::slice::from_ref(&engine.url), |_| {}).await;
    assert!(!router.state.otel.is_on());
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(&client(), completion(Some(&tp), "off", &router.url())).await;
    assert_eq!(r.status, 200);
    let r = send(&client(), completion(None, "off-2", &router.url())).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        engine.seen(),
        vec![(Some(tp), Some("vendor=abc".to_owned())), (None, None)]
    );
}

/// The binary, configured only by the standard variables: spans arrive under the service name
/// the environment gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_honours_the_standard_otel_variables() {
    let collector = Collector::start().await;
    let router = common::RouterProcess::spawn_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
            ("OTEL_SERVICE_NAME", "edge-router"),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ],
    );
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(&client(), completion(Some(&tp), "req-env", &router.url)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    collector
        .wait_for("the binary's spans", |s| {
            of_trace(s, CLIENT_TRACE).iter().any(is_server)
        })
        .await;
    assert!(collector.services().iter().all(|s| s == "edge-router"));
}

/// The flags: the sample ratio decides for a request without a parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_the_endpoint_and_ratio_flags() {
    let collector = Collector::start().await;
    let router = common::RouterProcess::spawn_with_env(
        &[
            "--otlp-endpoint",
            &collector.url,
            "--otlp-sample-ratio",
            "0",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "20")],
    );
    let c = client();
    // Not sampled (ratio 0, no parent), then sampled (a sampled parent).
    assert_eq!(
        send(&c, completion(None, "f0", &router.url)).await.status,
        200
    );
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    assert_eq!(
        send(&c, completion(Some(&tp), "f1", &router.url))
            .await
            .status,
        200
    );
    let spans = collector
        .wait_for("the sampled request's spans", |s| {
            of_trace(s, CLIENT_TRACE).iter().any(is_server)
        })
        .await;
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == CLIENT_TRACE),
        "{spans:#?}"
    );
    assert!(collector.services().iter().all(|s| s == "switchyard"));
}
