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

/// The script of issue 8: one operation is a native call over a 4000-element array, so the
/// operation limit alone let it run for seconds per request.
const RUNAWAY: &str = "let a = []; a.pad(4000, 7); loop { if a.contains(8) {} }";

fn errors_by_reason(text: &str, policy: &str, reason: &str) -> f64 {
    sample(
        text,
        &[
            "switchyard_policy_script_errors_total{",
            &format!("policy=\"{policy}\""),
            &format!("reason=\"{reason}\""),
        ],
    )
    .unwrap_or(0.0)
}

#[test]
fn the_time_budget_stops_a_runaway_script_and_is_the_reason_counted() {
    let h = recorder();
    let dir = temp_dir();
    dir.write("runaway.rhai", RUNAWAY);
    let mut st = settings(dir.path(), "runaway");
    st.script_time_budget = std::time::Duration::from_millis(5);
    let store = switchyard::policy::PolicyStore::new(st, 16).expect("store");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let d = store.decide(&request(1), &queues(&[2.0, 1.0]));
        eprintln!("runaway decision: {:?}", started.elapsed());
        assert_eq!((d.engine, &*d.tier), (1, "default"));
    }
    let text = h.render();
    // Stopped by the clock, not by the operation limit.
    assert_eq!(
        errors_by_reason(&text, "runaway", "time_budget"),
        3.0,
        "{text}"
    );
    assert_eq!(
        errors_by_reason(&text, "runaway", "operations"),
        0.0,
        "{text}"
    );
}

#[test]
fn script_errors_are_counted_by_reason() {
    let h = recorder();
    let pipeline = r#"
[[tier]]
name = "spin"
script = "let x = 0; loop { x += 1; }"

[[tier]]
name = "throws"
script = 'throw "boom"'

[[tier]]
name = "number"
script = "42"

[[tier]]
name = "grow"
script = 'let s = "xx"; loop { s += s; }'

[[tier]]
builtin = "fallback"
"#;
    let dir = temp_dir();
    dir.write("reasons.toml", pipeline);
    // A budget the operation limit always beats.
    let mut st = settings(dir.path(), "reasons");
    st.script_time_budget = std::time::Duration::from_secs(60);
    let store = switchyard::policy::PolicyStore::new(st, 16).expect("store");
    store.decide(&request(1), &queues(&[2.0, 1.0]));
    let text = h.render();
    for (tier, reason) in [
        ("spin", "operations"),
        ("throws", "runtime_error"),
        ("number", "bad_result"),
        ("grow", "limit"),
    ] {
        assert_eq!(
            sample(
                &text,
                &[
                    "switchyard_policy_script_errors_total{",
                    "policy=\"reasons\"",
                    &format!("tier=\"{tier}\""),
                    &format!("reason=\"{reason}\""),
                ]
            ),
            Some(1.0),
            "{tier}: {text}"
        );
    }
}
