//! The limiter's behaviour at explicit instants: no sleeps, no wall clock.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use super::*;

fn t(name: &str) -> Tenant {
    Tenant(Arc::from(name))
}

fn rules(list: &[(&str, Option<u64>, Option<u64>)]) -> RateLimitRules {
    let list: Vec<RateLimitRule> = list
        .iter()
        .map(|&(tenant, rpm, tpm)| RateLimitRule {
            tenant: tenant.into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        })
        .collect();
    RateLimitRules::new(&list).unwrap()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn allowed(d: Decision) -> RateLimitHeaders {
    match d {
        Decision::Allowed { headers } => headers,
        Decision::Limited(l) => panic!("limited: {}", l.message()),
    }
}

fn limited(d: Decision) -> Limited {
    match d {
        Decision::Limited(l) => l,
        Decision::Allowed { headers } => panic!("allowed: {headers:?}"),
    }
}

fn status(limit: u64, remaining: u64, reset: Duration) -> Option<LimitStatus> {
    Some(LimitStatus {
        limit,
        remaining,
        reset,
    })
}

#[test]
fn requests_per_minute_allows_the_limit_then_refuses_until_one_request_has_refilled() {
    let rl = RateLimiter::new(rules(&[("t1", Some(3), None)]));
    let (t1, t0) = (t("t1"), Instant::now());
    for (remaining, reset) in [(2, 20.0), (1, 40.0), (0, 60.0)] {
        let h = allowed(rl.check(&t1, 500, t0));
        assert_eq!(h.requests, status(3, remaining, secs(reset)));
        assert_eq!(h.tokens, None, "no token limit, no token headers");
    }
    let l = limited(rl.check(&t1, 500, t0 + secs(5.0)));
    assert_eq!(l.which, LimitKind::Requests);
    assert_eq!(l.retry_after, secs(15.0));
    assert_eq!(l.retry_after_secs(), 15);
    assert_eq!((l.requested, l.too_large), (1, false));
    assert_eq!(l.headers.requests, status(3, 0, secs(55.0)));
    let h = l.header_map();
    assert_eq!(h["retry-after"], "15");
    assert_eq!(h["x-ratelimit-limit-requests"], "3");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-reset-requests"], "55s");
    // A nanosecond early is still too early; at 20 s one request has refilled.
    let l = limited(rl.check(&t1, 1, t0 + secs(20.0) - Duration::from_nanos(1)));
    assert_eq!(l.retry_after, Duration::from_nanos(1));
    assert_eq!(l.retry_after_secs(), 1, "Retry-After rounds up");
    let h = allowed(rl.check(&t1, 1, t0 + secs(20.0)));
    assert_eq!(h.requests, status(3, 0, secs(60.0)));
    // After a quiet minute the tenant is back to its full limit.
    let h = allowed(rl.check(&t1, 1, t0 + secs(80.0)));
    assert_eq!(h.requests, status(3, 2, secs(20.0)));
}

#[test]
fn tokens_per_minute_counts_each_requests_tokens_and_refills_continuously() {
    let rl = RateLimiter::new(rules(&[("t1", None, Some(1000))]));
    let (t1, t0) = (t("t1"), Instant::now());
    let h = allowed(rl.check(&t1, 400, t0));
    assert_eq!(h.tokens, status(1000, 600, secs(24.0)));
    assert_eq!(h.requests, None);
    assert_eq!(
        allowed(rl.check(&t1, 400, t0)).tokens,
        status(1000, 200, secs(48.0))
    );
    let l = limited(rl.check(&t1, 400, t0));
    assert_eq!(
        (l.which, l.requested, l.too_large),
        (LimitKind::Tokens, 400, false)
    );
    assert_eq!(l.retry_after, secs(12.0));
    assert_eq!(l.headers.tokens, status(1000, 200, secs(48.0)));
    let body: serde_json::Value = serde_json::from_slice(&l.error_body()).unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        body["error"]["message"],
        "Rate limit reached on tokens per min (TPM): Limit 1000, Used 800, Requested 400. \
         Please try again in 12s."
    );
    // What is left still fits; 6 s later 100 tokens have refilled.
    assert_eq!(
        allowed(rl.check(&t1, 200, t0)).tokens,
        status(1000, 0, secs(60.0))
    );
    assert!(matches!(
        rl.check(&t1, 100, t0 + secs(5.9)),
        Decision::Limited(_)
    ));
    assert_eq!(
        allowed(rl.check(&t1, 100, t0 + secs(6.0))).tokens,
        status(1000, 0, secs(60.0))
    );
}

#[test]
fn a_refused_request_takes_from_neither_limit_and_the_later_limit_is_named() {
    let rl = RateLimiter::new(rules(&[("t1", Some(2), Some(100))]));
    let (t1, t0) = (t("t1"), Instant::now());
    // More tokens than the limit: refused at once, whatever the wait, and says so.
    let l = limited(rl.check(&t1, 101, t0));
    assert!(l.too_large);
    assert_eq!((l.which, l.requested), (LimitKind::Tokens, 101));
    assert!(
        l.message()
            .starts_with("Request too large on tokens per min (TPM): Limit 100, Requested 101.")
    );
    // Neither the request nor any token was taken.
    let h = allowed(rl.check(&t1, 90, t0));
    assert_eq!(h.requests, status(2, 1, secs(30.0)));
    assert_eq!(h.tokens, status(100, 10, secs(54.0)));
    // Tokens refuse (wait 6 s for 10 more); requests would fit: the request is not taken.
    let l = limited(rl.check(&t1, 20, t0));
    assert_eq!((l.which, l.retry_after), (LimitKind::Tokens, secs(6.0)));
    assert_eq!(l.headers.requests, status(2, 1, secs(30.0)));
    let h = allowed(rl.check(&t1, 10, t0));
    assert_eq!(h.requests, status(2, 0, secs(60.0)));
    assert_eq!(h.tokens, status(100, 0, secs(60.0)));
    // Both refuse: requests free up in 30 s, 50 tokens in 30 s, 60 tokens in 36 s.
    let l = limited(rl.check(&t1, 60, t0));
    assert_eq!((l.which, l.retry_after), (LimitKind::Tokens, secs(36.0)));
    let l = limited(rl.check(&t1, 10, t0));
    assert_eq!((l.which, l.retry_after), (LimitKind::Requests, secs(30.0)));
    assert_eq!(
        l.header_map().len(),
        7,
        "both limits' headers and Retry-After"
    );
}

#[test]
fn every_tenant_rule_limits_each_tenant_separately_and_a_tenants_own_rule_wins() {
    let rl = RateLimiter::new(rules(&[("*", Some(1), None), ("vip", Some(3), None)]));
    let t0 = Instant::now();
    for name in ["a", "b", "c"] {
        let h = allowed(rl.check(&t(name), 1, t0));
        assert_eq!(h.requests, status(1, 0, secs(60.0)), "{name}");
    }
    for name in ["a", "b", "c"] {
        assert!(
            matches!(rl.check(&t(name), 1, t0), Decision::Limited(_)),
            "{name}"
        );
    }
    for remaining in [2, 1, 0] {
        assert_eq!(
            allowed(rl.check(&t("vip"), 1, t0))
                .requests
                .map(|s| s.remaining),
            Some(remaining)
        );
    }
    assert!(matches!(rl.check(&t("vip"), 1, t0), Decision::Limited(_)));
    assert_eq!(rl.tenants(), 4);
    // Without a "*" rule, other tenants are not limited and leave no state.
    let rl = RateLimiter::new(rules(&[("vip", Some(1), None)]));
    for _ in 0..5 {
        assert!(allowed(rl.check(&t("other"), 1_000_000, t0)).is_empty());
    }
    assert_eq!(rl.tenants(), 0);
}

#[test]
fn update_keeps_the_state_of_unchanged_rules_and_starts_changed_ones_fresh() {
    let rl = RateLimiter::new(rules(&[("*", Some(1), None), ("t1", Some(2), None)]));
    let t0 = Instant::now();
    let use_up = |name: &str, n: usize| {
        for _ in 0..n {
            allowed(rl.check(&t(name), 1, t0));
        }
        assert!(
            matches!(rl.check(&t(name), 1, t0), Decision::Limited(_)),
            "{name}"
        );
    };
    use_up("t1", 2);
    use_up("a", 1);
    use_up("b", 1);
    // Same numbers for everyone, plus a new tenant's rule: all state kept.
    rl.update(rules(&[
        ("*", Some(1), None),
        ("t1", Some(2), None),
        ("t2", Some(5), None),
    ]));
    for name in ["t1", "a", "b"] {
        assert!(
            matches!(rl.check(&t(name), 1, t0), Decision::Limited(_)),
            "{name} kept"
        );
    }
    assert_eq!(rl.tenants(), 3);
    // t1's rule changes: t1 starts fresh under it; "*" tenants keep theirs.
    rl.update(rules(&[("*", Some(1), None), ("t1", Some(3), None)]));
    assert_eq!(rl.tenants(), 2, "t1's old state is dropped at once");
    use_up("t1", 3);
    assert!(matches!(rl.check(&t("a"), 1, t0), Decision::Limited(_)));
    // A token limit added to "*": a and b start fresh.
    rl.update(rules(&[("*", Some(1), Some(1000)), ("t1", Some(3), None)]));
    let h = allowed(rl.check(&t("a"), 10, t0));
    assert_eq!(h.tokens, status(1000, 990, secs(0.6)));
    assert!(
        matches!(rl.check(&t("t1"), 1, t0), Decision::Limited(_)),
        "t1 kept"
    );
    // Rules removed: no limit, no headers, no state left behind.
    rl.update(RateLimitRules::default());
    assert_eq!(rl.tenants(), 0);
    assert!(allowed(rl.check(&t("t1"), 1, t0)).is_empty());
    assert!(rl.rules().is_empty());
}

#[test]
fn a_check_that_raced_an_update_still_starts_a_changed_rule_fresh() {
    let rl = RateLimiter::new(rules(&[("t1", Some(1), None)]));
    let t0 = Instant::now();
    allowed(rl.check(&t("t1"), 1, t0));
    // The rules swapped but the old slot not yet swept (a check between the two steps).
    rl.rules.store(Arc::new(rules(&[("t1", Some(2), None)])));
    let h = allowed(rl.check(&t("t1"), 1, t0));
    assert_eq!(h.requests, status(2, 1, secs(30.0)));
}

#[test]
fn tenant_state_stays_within_the_bound_forgetting_idle_tenants_first() {
    let rl = RateLimiter::with_max_tenants(rules(&[("*", Some(60), None)]), 100);
    assert_eq!(rl.max_tenants(), 100);
    let t0 = Instant::now();
    for i in 0..1000 {
        allowed(rl.check(&t(&format!("u{i}")), 1, t0));
        assert!(rl.tenants() <= 100);
    }
    assert_eq!(rl.tenants(), 100);
    assert_eq!(
        rl.evicted(),
        900,
        "all were busy: each newcomer evicted one"
    );
    // A minute later every bucket is full again: newcomers take idle tenants' places, which
    // loses nothing and is not counted.
    let later = t0 + secs(61.0);
    for i in 0..50 {
        allowed(rl.check(&t(&format!("v{i}")), 1, later));
    }
    assert_eq!(rl.evicted(), 900);
    assert_eq!(rl.tenants(), 50, "the idle ones were all swept at once");

    // At the bound with everyone busy, the tenant nearest to full is the one forgotten.
    let rl = RateLimiter::with_max_tenants(rules(&[("*", Some(60), None)]), 2);
    for _ in 0..5 {
        allowed(rl.check(&t("busy"), 1, t0));
    }
    allowed(rl.check(&t("light"), 1, t0));
    allowed(rl.check(&t("new"), 1, t0));
    assert_eq!(rl.evicted(), 1);
    let remaining = |name: &str| {
        allowed(rl.check(&t(name), 1, t0))
            .requests
            .map(|s| s.remaining)
    };
    assert_eq!(remaining("busy"), Some(54), "kept");
    assert_eq!(remaining("light"), Some(59), "forgotten: fresh");
}

#[test]
fn many_shards_still_respect_the_bound() {
    let rl = RateLimiter::with_max_tenants(rules(&[("*", Some(10), Some(10_000))]), 20_000);
    let max = rl.max_tenants();
    assert!((20_000..20_000 + 64).contains(&max), "{max}");
    let t0 = Instant::now();
    for i in 0..50_000 {
        allowed(rl.check(&t(&format!("u{i}")), 100, t0));
    }
    assert!(rl.tenants() <= max, "{} > {max}", rl.tenants());
    assert!(
        rl.tenants() > max / 2,
        "shards fill evenly enough: {}",
        rl.tenants()
    );
    assert_eq!(rl.evicted(), 50_000 - rl.tenants() as u64);
    let d = RateLimiter::new(RateLimitRules::default());
    assert!((DEFAULT_MAX_TENANTS..DEFAULT_MAX_TENANTS + 64).contains(&d.max_tenants()));
}

/// Runs `per_thread` checks on each of 4 threads, the i-th at `at(i)`; returns how many
/// were allowed for each tenant of `tenants` (thread j uses tenant j % len).
fn hammer(
    rl: &RateLimiter,
    tenants: &[Tenant],
    per_thread: u32,
    tokens: u64,
    at: impl Fn(u32) -> Instant + Sync,
) -> Vec<u64> {
    let counts: Vec<AtomicU64> = tenants.iter().map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for j in 0..4 {
            let (counts, at) = (&counts, &at);
            s.spawn(move || {
                let k = j % tenants.len();
                for i in 0..per_thread {
                    if let Decision::Allowed { .. } = rl.check(&tenants[k], tokens, at(i)) {
                        counts[k].fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    counts.into_iter().map(AtomicU64::into_inner).collect()
}

#[test]
fn threads_hammering_one_tenant_never_get_past_its_limit() {
    let t0 = Instant::now();
    let one = [t("t1")];
    let rl = RateLimiter::new(rules(&[("t1", Some(100), None)]));
    assert_eq!(hammer(&rl, &one, 500, 1, |_| t0), [100]);
    let rl = RateLimiter::new(rules(&[("t1", None, Some(1000))]));
    assert_eq!(hammer(&rl, &one, 500, 7, |_| t0), [142], "floor(1000 / 7)");
    // Time moving on (each thread's clock its own, interleaved): over 6 s at most the limit
    // plus 6 s of refill.
    let rl = RateLimiter::new(rules(&[("t1", Some(60), None)]));
    let got = hammer(&rl, &one, 600, 1, |i| {
        t0 + Duration::from_millis(10 * u64::from(i))
    })[0];
    assert!((60..=66).contains(&got), "{got}");
    // "*": each tenant gets exactly its own limit.
    let rl = RateLimiter::new(rules(&[("*", Some(50), None)]));
    assert_eq!(hammer(&rl, &[t("a"), t("b")], 500, 1, |_| t0), [50, 50]);
}
