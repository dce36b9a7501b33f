//! Decision, script-error and reload counters, read back through a Prometheus recorder
//! installed for this test binary.

mod policy_support;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use policy_support::*;

fn recorder() -> &'static PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install recorder")
    })
}

/// The value of the sample whose line contains every one of `parts`.
fn sample(text: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn counters() {
    let h = recorder();
    let pipeline = r#"
[[tier]]
name = "broken"
script = 'throw "always"'

[[tier]]
builtin = "load_balance"
threshold = 2

[[tier]]
builtin = "fallback"
"#;
    let (dir, store) = store_with(&[("metered.toml", pipeline)], "metered");
    for _ in 0..5 {
        store.decide(&request(1), &queues(&[4.0, 0.0]));
    }
    for _ in 0..3 {
        store.decide(&request(1), &queues(&[1.0, 0.0]));
    }
    let text = h.render();
    assert_eq!(
        sample(
            &text,
            &[
                "switchyard_routing_decisions_total{",
                "policy=\"metered\"",
                "tier=\"load_balance\"",
                "engine=\"e1:8000\""
            ]
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &[
                "switchyard_routing_decisions_total{",
                "policy=\"metered\"",
                "tier=\"fallback\"",
                "engine=\"e1:8000\""
            ]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &[
                "switchyard_policy_script_errors_total{",
                "policy=\"metered\"",
                "tier=\"broken\""
            ]
        ),
        Some(8.0),
        "{text}"
    );

    dir.write("metered.toml", "[[tier]]\nbuiltin = \"nope\"\n");
    assert!(!store.reload_now().is_ok());
    dir.write("metered.toml", pipeline);
    assert!(store.reload_now().is_ok());
    let text = h.render();
    assert!(
        sample(
            &text,
            &["switchyard_policy_reloads_total{", "result=\"error\""]
        ) >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            &["switchyard_policy_reloads_total{", "result=\"ok\""]
        ) >= Some(1.0),
        "{text}"
    );
}
