//! Prefix matches are computed only when a tier needs them, at most once per decision: a
//! policy whose earlier tier decides never asks for them (so a request is never tokenized for
//! nothing), and the decision says where the chosen engine's match came from.

mod policy_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use policy_support::*;
use switchyard::engines::Candidate;
use switchyard::policy::{KvMatches, KvSource, PrefixMatcher};
use switchyard::request::RequestInfo;

/// Engine 1 holds 96 exact tokens; the others nothing (approximate). Counts its calls.
struct Matcher(AtomicUsize);

impl PrefixMatcher for Matcher {
    fn matches(&self, _: &RequestInfo, cands: &[Candidate]) -> KvMatches {
        self.0.fetch_add(1, Ordering::Relaxed);
        let exact = |c: &Candidate| c.engine.id == 1;
        KvMatches {
            tokens: cands
                .iter()
                .map(|c| if exact(c) { 96 } else { 0 })
                .collect(),
            sources: cands
                .iter()
                .map(|c| {
                    if exact(c) {
                        KvSource::Exact
                    } else {
                        KvSource::Approximate
                    }
                })
                .collect(),
            prompt_tokens: 100,
        }
    }
}

fn matcher() -> Matcher {
    Matcher(AtomicUsize::new(0))
}

const CHAIN: &str = "load_balance(8) ?? kv_lookup() ?? fallback()";

#[test]
fn an_earlier_tier_deciding_computes_no_match_native_or_interpreted() {
    // The same chain as a native pipeline, and in a form the interpreter must evaluate.
    let interpreted = format!("let pick = {CHAIN};\npick\n");
    for (name, src) in [
        ("native.rhai", CHAIN),
        ("interp.rhai", interpreted.as_str()),
    ] {
        let (_dir, store) = store_with(&[(name, src)], name);
        let m = matcher();
        // Queues 20 apart: load_balance decides.
        let d = store.decide_with(&request(100), &queues(&[20.0, 0.0, 0.0]), &m);
        assert_eq!(&*d.tier, "load_balance", "{name}");
        assert_eq!(d.kv, None, "{name}: no tier needed matches");
        assert_eq!(m.0.load(Ordering::Relaxed), 0, "{name}: matcher called");
        // Balanced queues: kv_lookup decides, on the matcher's figures, asked once.
        let d = store.decide_with(&request(100), &queues(&[1.0, 1.0, 1.0]), &m);
        assert_eq!((&*d.tier, d.engine), ("kv_lookup", 1), "{name}");
        assert_eq!(d.kv, Some(KvSource::Exact), "{name}");
        assert_eq!(m.0.load(Ordering::Relaxed), 1, "{name}");
        // kv_lookup passes (no match covers half the prompt): fallback decides, but the
        // matches were computed, so the decision reports the chosen engine's source.
        let m = Matcher(AtomicUsize::new(0));
        struct Nothing<'a>(&'a Matcher);
        impl PrefixMatcher for Nothing<'_> {
            fn matches(&self, r: &RequestInfo, c: &[Candidate]) -> KvMatches {
                let mut k = self.0.matches(r, c);
                k.tokens.iter_mut().for_each(|t| *t = 0);
                k
            }
        }
        let d = store.decide_with(&request(100), &queues(&[1.0, 0.0, 1.0]), &Nothing(&m));
        assert_eq!((&*d.tier, d.engine), ("fallback", 1), "{name}");
        assert_eq!(d.kv, Some(KvSource::Exact), "{name}");
    }
}

#[test]
fn a_script_reading_matches_many_times_computes_them_once_and_sees_their_source() {
    let script = r#"
let best = ();
for e in engines {
    if e.prefix_match > 0 && (best == () || e.prefix_match > best.prefix_match) { best = e; }
}
if best == () || best.kv_source != "exact" || request.prompt_tokens != 100 { return (); }
kv_lookup(0.9) ?? best
"#;
    let (_dir, store) = store_with(&[("s.rhai", script)], "s");
    let m = matcher();
    let d = store.decide_with(&request(3), &queues(&[0.0, 0.0, 0.0]), &m);
    // kv_lookup(0.9) decides: 96 of the 100 tokens is at least 90%.
    assert_eq!(d.engine, 1);
    assert_eq!(d.kv, Some(KvSource::Exact));
    assert_eq!(m.0.load(Ordering::Relaxed), 1);
    // A script that never reads matches computes none; `request.prompt_tokens` is then the
    // stand-in estimate.
    let (_dir, store) = store_with(
        &[(
            "t.rhai",
            "if request.prompt_tokens == 3 { engines[2] } else { () }",
        )],
        "t",
    );
    let d = store.decide_with(&request(3), &queues(&[0.0, 0.0, 0.0]), &m);
    assert_eq!((d.engine, d.kv), (2, None));
    assert_eq!(m.0.load(Ordering::Relaxed), 1);
}

/// A matcher as slow as tokenizing a very long prompt.
struct Slow;

impl PrefixMatcher for Slow {
    fn matches(&self, _: &RequestInfo, cands: &[Candidate]) -> KvMatches {
        std::thread::sleep(std::time::Duration::from_millis(60));
        KvMatches {
            tokens: vec![0; cands.len()],
            sources: vec![KvSource::Approximate; cands.len()],
            prompt_tokens: 100,
        }
    }
}

#[test]
fn computing_matches_does_not_count_against_the_script_time_budget() {
    let dir = temp_dir();
    dir.write(
        "slow.rhai",
        "let m = 0;\nfor e in engines { m += e.prefix_match; }\nfor i in 0..50 { m += i; }\nengines[2]\n",
    );
    let mut s = settings(dir.path(), "slow");
    s.script_time_budget = std::time::Duration::from_millis(20);
    let store = switchyard::policy::PolicyStore::new(s, 16).expect("store");
    let d = store.decide_with(&request(100), &queues(&[0.0, 0.0, 0.0]), &Slow);
    assert_eq!(
        (d.engine, &*d.tier, d.kv),
        (2, "slow", Some(KvSource::Approximate)),
        "the script ran to its end although matching took longer than its budget"
    );
}
