//! The policies shipped in `policies/`: they load cleanly and behave as documented.

mod policy_support;

use policy_support::*;
use switchyard::policy::PolicyStore;

#[test]
fn shipped_policies_check_clean() {
    let diags = PolicyStore::check_dir(&shipped_dir());
    assert!(
        diags.is_empty(),
        "{}",
        diags
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn shipped(name: &str) -> std::sync::Arc<PolicyStore> {
    PolicyStore::new(settings(&shipped_dir(), name), 16).expect("shipped store")
}

#[test]
fn default_pipeline_tiers() {
    for name in ["load_balanced_kvaware", "load_balanced_kvaware.rhai"] {
        let s = shipped(name);
        let req = request(100);
        // Spread 10 >= 8: least queued.
        let mut c = queues(&[10.0, 0.0, 5.0]);
        c[0].prefix_match_tokens = 96;
        let d = s.decide(&req, &c);
        assert_eq!((d.engine, &*d.tier), (1, "load_balance"), "{name}");
        // Balanced: the cache holder (96 of 100 tokens).
        let mut c = queues(&[3.0, 0.0, 5.0]);
        c[2].prefix_match_tokens = 96;
        let d = s.decide(&req, &c);
        assert_eq!((d.engine, &*d.tier), (2, "kv_lookup"), "{name}");
        // Match under half the prompt: least loaded.
        c[2].prefix_match_tokens = 32;
        let d = s.decide(&req, &c);
        assert_eq!((d.engine, &*d.tier), (1, "fallback"), "{name}");
        assert_eq!(&*d.policy, "load_balanced_kvaware");
    }
}

#[test]
fn lowest_kv_usage_example() {
    let s = shipped("lowest_kv_usage");
    let req = request(10);
    let mut c = queues(&[1.0, 2.0, 9.0, 3.0]);
    for (e, kv) in c.iter_mut().zip([0.9, 0.4, 0.1, 0.5]) {
        e.load.kv_usage = kv;
    }
    let d = s.decide(&req, &c);
    assert_eq!((d.engine, &*d.tier), (1, "lowest_kv_usage"));
    // Nobody under 4 queued: fallback.
    let mut c = queues(&[7.0, 5.0, 9.0]);
    c[1].load.kv_usage = 0.9;
    let d = s.decide(&req, &c);
    assert_eq!((d.engine, &*d.tier), (1, "fallback"));
    // Stale stats do not count.
    let mut c = queues(&[1.0, 2.0]);
    c[0].load.stale = true;
    c[0].load.kv_usage = 0.0;
    c[1].load.kv_usage = 0.8;
    assert_eq!(s.decide(&req, &c).engine, 1);
}

#[test]
fn long_prompt_sessions_example() {
    let s = shipped("long_prompt_sessions");
    let c = queues(&[5.0, 0.0, 5.0, 5.0]);
    let mut long = request(2000);
    long.session_key = Some("user-42".into());
    let first = s.decide(&long, &c);
    assert_eq!(&*first.tier, "session_hash");
    for _ in 0..5 {
        assert_eq!(s.decide(&long, &c).engine, first.engine);
    }
    let mut short = request(10);
    short.session_key = Some("user-42".into());
    let d = s.decide(&short, &c);
    assert_eq!((d.engine, &*d.tier), (1, "least_loaded"));
    long.session_key = None;
    let d = s.decide(&long, &c);
    assert_eq!((d.engine, &*d.tier), (1, "least_loaded"));
}

#[test]
fn kvaware_matches_production_stack_rule() {
    let s = shipped("kvaware");
    let mut c = queues(&[0.0, 9.0, 0.0]);
    // 3000-token prompt, 1200 matched: 1800 left to prefill <= 2000: the cache holder.
    c[1].prefix_match_tokens = 1200;
    let d = s.decide(&request(3000), &c);
    assert_eq!((d.engine, &*d.tier), (1, "kvaware"));
    // 4000-token prompt: 2800 left > 2000: session, else least loaded.
    let d = s.decide(&request(4000), &c);
    assert_eq!(&*d.tier, "least_loaded");
    let mut r = request(4000);
    r.session_key = Some("s".into());
    assert_eq!(&*s.decide(&r, &c).tier, "session_hash");
    // Short prompt: any match counts.
    c[1].prefix_match_tokens = 16;
    assert_eq!(s.decide(&request(100), &c).engine, 1);
}

#[test]
fn prefixaware_roundrobin_least_loaded_session() {
    let s = shipped("prefixaware");
    let mut c = queues(&[0.0, 9.0, 0.0]);
    c[1].prefix_match_tokens = 16;
    let d = s.decide(&request(1000), &c);
    assert_eq!((d.engine, &*d.tier), (1, "kv_lookup"));
    c[1].prefix_match_tokens = 0;
    assert_eq!(&*s.decide(&request(1000), &c).tier, "random");

    let s = shipped("roundrobin");
    let c = queues(&[5.0, 0.0, 3.0]);
    let picks: Vec<usize> = (0..6).map(|_| s.decide(&request(1), &c).engine).collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);

    let s = shipped("least_loaded");
    assert_eq!(s.decide(&request(1), &c).engine, 1);

    let s = shipped("session");
    assert_eq!(&*s.decide(&request(1), &c).tier, "least_loaded");
    let mut r = request(1);
    r.session_key = Some("abc".into());
    assert_eq!(&*s.decide(&r, &c).tier, "session_hash");
}
