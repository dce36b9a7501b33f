//! Semantics of each built-in: decisions, passes, ties (which must rotate), no candidates, one
//! candidate, and missing or stale stats.

mod policy_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use policy_support::*;
use switchyard::engines::{Candidate, ScrapedStats};
use switchyard::policy::builtins::{self, Arg, Builtin, BuiltinSpec, PolicyState};

/// The built-in `name` with these arguments, bound by the table.
fn builtin(name: &str, args: &[Arg<'_>]) -> Builtin {
    let args: Vec<Option<Arg<'_>>> = args.iter().copied().map(Some).collect();
    BuiltinSpec::find(name)
        .expect("a built-in")
        .bind(&args)
        .expect("valid arguments")
}

fn counts(picks: impl Iterator<Item = Option<usize>>) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for p in picks {
        *m.entry(p.expect("decides")).or_default() += 1;
    }
    m
}

#[test]
fn load_balance_threshold_and_rotating_ties() {
    let st = PolicyState::default();
    // Spread 7 < 8: pass.
    assert_eq!(
        builtins::load_balance(&queues(&[7.0, 0.0, 3.0]), 8.0, &st),
        None
    );
    // Spread exactly 8: the least queued.
    assert_eq!(
        builtins::load_balance(&queues(&[8.0, 0.0, 3.0]), 8.0, &st),
        Some(1)
    );
    // Two engines tie for least: they alternate, the first is not always chosen.
    let c = queues(&[9.0, 0.0, 0.0, 4.0]);
    let m = counts((0..100).map(|_| builtins::load_balance(&c, 8.0, &st)));
    assert_eq!(m.get(&1), Some(&50));
    assert_eq!(m.get(&2), Some(&50));
    // No candidates, one candidate.
    assert_eq!(builtins::load_balance(&[], 8.0, &st), None);
    assert_eq!(builtins::load_balance(&queues(&[30.0]), 8.0, &st), None);
    assert_eq!(builtins::load_balance(&queues(&[30.0]), 0.0, &st), Some(0));
}

#[test]
fn kv_lookup_minimum_and_ties() {
    let st = PolicyState::default();
    let mk = |matches: &[usize], qs: &[f64]| -> Vec<Candidate> {
        matches
            .iter()
            .zip(qs)
            .enumerate()
            .map(|(i, (&m, &q))| cand(i as u32, q, 0, m))
            .collect()
    };
    // 100-token prompt, default minimum 0.5: 64 matched decides, 48 passes.
    let c = mk(&[16, 64, 0], &[0.0, 0.0, 0.0]);
    assert_eq!(builtins::kv_lookup(&c, 100, 0.5, &st), Some(1));
    let c = mk(&[16, 48, 0], &[0.0, 0.0, 0.0]);
    assert_eq!(builtins::kv_lookup(&c, 100, 0.5, &st), None);
    // Any non-zero match with minimum 0; never a zero match.
    assert_eq!(builtins::kv_lookup(&c, 100, 0.0, &st), Some(1));
    let c = mk(&[0, 0], &[0.0, 0.0]);
    assert_eq!(builtins::kv_lookup(&c, 100, 0.0, &st), None);
    // Ties go to the less loaded; equal load rotates.
    let c = mk(&[64, 64, 64], &[3.0, 1.0, 1.0]);
    let m = counts((0..10).map(|_| builtins::kv_lookup(&c, 100, 0.5, &st)));
    assert_eq!(
        (m.get(&1), m.get(&2), m.get(&0)),
        (Some(&5), Some(&5), None)
    );
    // In-flight breaks queue ties.
    let mut c = mk(&[64, 64], &[1.0, 1.0]);
    c[0].load.in_flight = 2;
    assert_eq!(builtins::kv_lookup(&c, 100, 0.5, &st), Some(1));
    // Short prompt: 16 of 20 tokens matched is enough.
    let c = mk(&[16], &[0.0]);
    assert_eq!(builtins::kv_lookup(&c, 20, 0.5, &st), Some(0));
    assert_eq!(builtins::kv_lookup(&[], 20, 0.5, &st), None);
}

#[test]
fn least_loaded_orders_by_queue_then_in_flight_and_rotates() {
    let st = PolicyState::default();
    let mut c = queues(&[2.0, 1.0, 1.0, 1.0]);
    c[1].load.in_flight = 1;
    let m = counts((0..100).map(|_| builtins::least_loaded(&c, &st)));
    assert_eq!((m.get(&2), m.get(&3), m.len()), (Some(&50), Some(&50), 2));
    let c = queues(&[0.0, 0.0, 0.0]);
    let m = counts((0..300).map(|_| builtins::least_loaded(&c, &st)));
    assert!(m.values().all(|&n| n == 100), "{m:?}");
    assert_eq!(builtins::least_loaded(&[], &st), None);
    assert_eq!(builtins::least_loaded(&queues(&[5.0]), &st), Some(0));
    // fallback is least_loaded under another name.
    let req = request(1);
    let c = queues(&[4.0, 2.0, 3.0]);
    assert_eq!(builtin("fallback", &[]).run(&req, &c, &st), Some(1));
    assert_eq!(builtin("least_loaded", &[]).run(&req, &c, &st), Some(1));
    assert_eq!(builtin("fallback", &[]).run(&req, &[], &st), None);
}

#[test]
fn missing_or_stale_stats_use_the_freshest_queue_estimate() {
    let st = PolicyState::default();
    // Never scraped: the queue is the router's own in-flight count.
    let a = engine(0);
    let b = engine(1);
    let _g1 = a.begin_request();
    let _g2 = a.begin_request();
    let _g3 = b.begin_request();
    // A third engine scraped long ago (stale) with a big queue.
    let c = engine(2);
    c.set_stats(ScrapedStats {
        running: 10.0,
        waiting: 5.0,
        scraped_at: Some(Instant::now()),
        ..Default::default()
    });
    c.mark_stats_stale("connection refused".into());
    let cands: Vec<Candidate> = [&a, &b, &c]
        .iter()
        .map(|e| Candidate {
            engine: Arc::clone(e),
            load: e.snapshot(),
            prefix_match_tokens: 0,
        })
        .collect();
    assert!(cands[0].load.stale && cands[0].load.stats_age_secs.is_none());
    assert!(cands[2].load.stale);
    assert_eq!(cands[0].load.queue, 2.0);
    assert_eq!(builtins::least_loaded(&cands, &st), Some(1));
    assert_eq!(builtins::load_balance(&cands, 8.0, &st), Some(1));
    assert_eq!(builtins::load_balance(&cands, 20.0, &st), None);
}

#[test]
fn round_robin_in_url_order() {
    let st = PolicyState::default();
    let mut c = queues(&[0.0, 0.0, 0.0]);
    c.reverse(); // e2, e1, e0
    let picks: Vec<usize> = (0..6)
        .map(|_| builtins::round_robin(&c, &st).expect("decides"))
        .collect();
    assert_eq!(picks, vec![2, 1, 0, 2, 1, 0]);
    assert_eq!(builtins::round_robin(&[], &st), None);
    assert_eq!(builtins::round_robin(&queues(&[1.0]), &st), Some(0));
}

#[test]
fn random_and_power_of_two() {
    let c = queues(&[0.0, 0.0, 0.0, 0.0]);
    let m = counts((0..400).map(|_| builtins::random(&c)));
    assert_eq!(m.len(), 4);
    assert_eq!(builtins::random(&[]), None);
    assert_eq!(builtins::power_of_two(&[]), None);
    assert_eq!(builtins::power_of_two(&queues(&[9.0])), Some(0));
    // With two candidates both are always compared: the less loaded wins.
    let c = queues(&[9.0, 1.0]);
    assert!((0..50).all(|_| builtins::power_of_two(&c) == Some(1)));
    // The most loaded of many is never chosen.
    let c = queues(&[1.0, 2.0, 3.0, 99.0]);
    assert!((0..200).all(|_| builtins::power_of_two(&c) != Some(3)));
}

fn session_owner(cands: &[Candidate], key: &str) -> String {
    let i = builtins::session_hash(cands, Some(key.as_bytes())).expect("decides");
    cands[i].engine.name.to_string()
}

#[test]
fn session_hash_key_sources() {
    let st = PolicyState::default();
    let c = queues(&[0.0, 0.0, 0.0]);
    assert_eq!(builtins::session_hash(&c, None), None);
    assert_eq!(builtins::session_hash(&c, Some(b"")), None);
    assert_eq!(builtins::session_hash(&[], Some(b"k")), None);
    assert_eq!(builtins::session_hash(&queues(&[3.0]), Some(b"k")), Some(0));
    let mut req = request(1);
    assert_eq!(builtin("session_hash", &[]).run(&req, &c, &st), None);
    req.session_key = Some("user-1".into());
    let by_key = builtin("session_hash", &[]).run(&req, &c, &st);
    assert_eq!(by_key, builtins::session_hash(&c, Some(b"user-1")));
    let hdr = builtin("session_hash", &[Arg::Str("X-Conversation")]);
    assert_eq!(hdr.run(&req, &c, &st), None, "header absent: pass");
    req.headers
        .insert("X-Conversation", http::HeaderValue::from_static("user-1"));
    assert_eq!(hdr.run(&req, &c, &st), by_key);
    // Stable across calls and candidate order (it hashes names, not positions).
    let mut rev = c.clone();
    rev.reverse();
    for k in ["a", "b", "c", "d"] {
        assert_eq!(session_owner(&c, k), session_owner(&rev, k));
    }
}

#[test]
fn session_hash_moves_only_what_it_must() {
    const KEYS: usize = 10_000;
    let ten: Vec<Candidate> = (0..10).map(|i| cand(i, 0.0, 0, 0)).collect();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("session-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| session_owner(&ten, k)).collect();

    // Removing an engine moves exactly the sessions it had.
    let removed = ten[3].engine.name.to_string();
    let nine: Vec<Candidate> = ten
        .iter()
        .filter(|c| *c.engine.name != *removed)
        .cloned()
        .collect();
    let mut had = 0;
    for (k, owner) in keys.iter().zip(&before) {
        let now = session_owner(&nine, k);
        if *owner == removed {
            had += 1;
        } else {
            assert_eq!(&now, owner, "{k} moved though its engine stayed");
        }
    }
    assert!(
        (700..1300).contains(&had),
        "removed engine held {had} sessions"
    );

    // Adding an eleventh moves about 1/11 of them, all to the new engine.
    let mut eleven = ten.clone();
    eleven.push(cand(10, 0.0, 0, 0));
    let added = eleven[10].engine.name.to_string();
    let mut moved = 0;
    for (k, owner) in keys.iter().zip(&before) {
        let now = session_owner(&eleven, k);
        if now != *owner {
            assert_eq!(now, added);
            moved += 1;
        }
    }
    let expected = KEYS / 11;
    assert!(
        moved > expected * 7 / 10 && moved < expected * 13 / 10,
        "moved {moved}, expected about {expected}"
    );
}

/// Candidates with these prefix matches, router in-flight prompt tokens and queues.
fn costed(matches: &[usize], in_flight_tokens: &[u64], qs: &[f64]) -> Vec<Candidate> {
    matches
        .iter()
        .zip(in_flight_tokens)
        .zip(qs)
        .enumerate()
        .map(|(i, ((&m, &t), &q))| {
            let mut c = cand(i as u32, q, 0, m);
            c.load.in_flight_tokens = t;
            c
        })
        .collect()
}

#[test]
fn min_cost_weighs_prefill_left_against_load() {
    let st = PolicyState::default();
    // A 10,000-token prompt. Engine 0 holds 8,000 of it but has 6,000 tokens in flight;
    // engine 1 holds nothing and is idle; engine 2 holds 4,000 with 1,000 in flight.
    // Costs (1, 1): 2,000 + 6,000 = 8,000; 10,000; 6,000 + 1,000 = 7,000 → engine 2.
    let c = costed(&[8000, 0, 4000], &[6000, 0, 1000], &[0.0, 0.0, 0.0]);
    assert_eq!(
        builtins::min_cost(&c, &[8000, 0, 4000], 10_000, 1.0, 1.0, &st),
        Some(2)
    );
    // Prefill weighs 4×: 8,000 + 6,000 = 14,000; 40,000; 24,000 + 1,000 → engine 0.
    assert_eq!(
        builtins::min_cost(&c, &[8000, 0, 4000], 10_000, 4.0, 1.0, &st),
        Some(0)
    );
    // Load only: the engine with the fewest tokens in flight, whatever it caches.
    assert_eq!(
        builtins::min_cost(&c, &[8000, 0, 4000], 10_000, 0.0, 1.0, &st),
        Some(1)
    );
    // Prefill only: the longest match, as kv_lookup with no minimum.
    assert_eq!(
        builtins::min_cost(&c, &[8000, 0, 4000], 10_000, 1.0, 0.0, &st),
        Some(0)
    );
    // A match longer than the prompt (a stale estimate) costs nothing, never less than 0.
    assert_eq!(
        builtins::min_cost(&c, &[12_000, 0, 4000], 10_000, 1.0, 1.0, &st),
        Some(0)
    );
    // Equal costs go to the smaller queue, then rotate.
    let c = costed(&[0, 0, 0], &[0, 0, 0], &[3.0, 1.0, 1.0]);
    let m = counts((0..10).map(|_| builtins::min_cost(&c, &[0, 0, 0], 100, 1.0, 1.0, &st)));
    assert_eq!(
        (m.get(&1), m.get(&2), m.get(&0)),
        (Some(&5), Some(&5), None)
    );
    // Weights of 0 × infinity are no cost, not NaN: still a decision.
    let c = costed(&[0, 100], &[0, 0], &[0.0, 0.0]);
    assert_eq!(
        builtins::min_cost(&c, &[0, 100], 100, f64::INFINITY, 1.0, &st),
        Some(1)
    );
    // No candidates: pass; one: it.
    assert_eq!(builtins::min_cost(&[], &[], 100, 1.0, 1.0, &st), None);
    assert_eq!(
        builtins::min_cost(&queues(&[50.0]), &[], 100, 1.0, 1.0, &st),
        Some(0)
    );
}

#[test]
fn min_cost_through_the_table_binds_its_two_weights() {
    let st = PolicyState::default();
    let req = request(1000);
    // Engine 0 holds the whole prompt but is busy with 3,000 in-flight tokens; engine 1 is idle.
    let c = costed(&[1000, 0], &[3000, 0], &[0.0, 0.0]);
    let defaults = builtin("min_cost", &[]);
    assert_eq!(
        (defaults.args().number(0), defaults.args().number(1)),
        (Some(1.0), Some(1.0))
    );
    // (1, 1): 0 + 3,000 against 1,000 + 0 → engine 1.
    assert_eq!(defaults.run(&req, &c, &st), Some(1));
    // (4, 1): 3,000 against 4,000 → engine 0.
    let heavy = builtin("min_cost", &[Arg::Number(4.0), Arg::Number(1.0)]);
    assert_eq!(heavy.run(&req, &c, &st), Some(0));
    let spec = BuiltinSpec::find("min_cost").expect("a built-in");
    assert_eq!(
        spec.bind(&[Some(Arg::Number(1.0)), Some(Arg::Number(-1.0))])
            .unwrap_err()
            .to_string(),
        "`load_weight` must be a number ≥ 0"
    );
}
