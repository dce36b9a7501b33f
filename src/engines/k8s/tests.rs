use super::*;

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_pods_role_comes_from_llmd_label_else_its_model_label() {
    let labels = RoleLabels {
        prefill: vec!["llama-prefill".into()],
        decode: vec!["llama-decode".into()],
    };
    let with = |l: serde_json::Value| {
        PodView::from_pod(
            &pod(serde_json::json!({"metadata": {"name": "p", "labels": l}})),
            Some("model"),
        )
    };
    assert_eq!(
        with(serde_json::json!({"model": "llama-prefill"})).role(&labels),
        Role::Prefill
    );
    assert_eq!(
        with(serde_json::json!({"model": "llama-decode"})).role(&labels),
        Role::Decode
    );
    assert_eq!(
        with(serde_json::json!({"model": "llama"})).role(&labels),
        Role::Aggregated
    );
    let llmd = with(serde_json::json!({"model": "llama-prefill", "llm-d.ai/role": "decode"}));
    assert_eq!(llmd.role(&labels), Role::Decode, "llm-d's label decides");
    assert_eq!(
        with(serde_json::json!({"llm-d.ai/role": "both"})).role(&labels),
        Role::Aggregated
    );
}

#[test]
fn a_pod_is_an_engine_when_ready_not_deleting_and_with_an_ip() {
    let ready = pod(serde_json::json!({
        "metadata": {"name": "vllm-0", "labels": {"app": "vllm", "model": "llama"}},
        "status": {"podIP": "10.1.2.3", "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True"}]}
    }));
    let v = PodView::from_pod(&ready, Some("model"));
    assert_eq!(v.model.as_deref(), Some("llama"));
    assert_eq!(v.engine_url(8000).as_deref(), Some("http://10.1.2.3:8000"));
    assert_eq!(PodView::from_pod(&ready, None).model, None);
    assert_eq!(PodView::from_pod(&ready, Some("other")).model, None);

    let not_ready = pod(serde_json::json!({
        "metadata": {"name": "vllm-1"},
        "status": {"podIP": "10.1.2.4", "conditions": [{"type": "Ready", "status": "False"}]}
    }));
    assert_eq!(PodView::from_pod(&not_ready, None).engine_url(8000), None);

    let no_ip = pod(serde_json::json!({
        "metadata": {"name": "vllm-2"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    }));
    assert_eq!(PodView::from_pod(&no_ip, None).engine_url(8000), None);

    let deleting = pod(serde_json::json!({
        "metadata": {"name": "vllm-3", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"podIP": "10.1.2.5", "conditions": [{"type": "Ready", "status": "True"}]}
    }));
    assert_eq!(PodView::from_pod(&deleting, None).engine_url(8000), None);

    let v6 = pod(serde_json::json!({
        "metadata": {"name": "vllm-4"},
        "status": {"podIP": "fd00::7", "conditions": [{"type": "Ready", "status": "True"}]}
    }));
    assert_eq!(
        PodView::from_pod(&v6, None).engine_url(8000).as_deref(),
        Some("http://[fd00::7]:8000")
    );
}

#[test]
fn backoff_doubles_up_to_the_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
    let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
    let within = |d: Duration, ms: f64| {
        let s = d.as_secs_f64() * 1000.0;
        s >= ms * 0.8 - 1e-6 && s <= ms * 1.2 + 1e-6
    };
    assert!(within(d[0], 100.0) && within(d[1], 200.0), "{d:?}");
    assert!(within(d[2], 350.0) && within(d[3], 350.0), "{d:?}");
    b.reset();
    assert!(within(b.next_delay(), 100.0));
}

#[tokio::test]
async fn an_https_api_server_gets_a_tls_client() {
    // The TLS stack (rustls with ring) is usable: building a client for an https URL does
    // not need a process-wide crypto provider installed by hand.
    let cfg = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    assert!(kube::Client::try_from(cfg).is_ok());
}
