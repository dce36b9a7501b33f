//! The shipped `load_balanced_kvaware.rhai` and `load_balanced_kvaware.toml` decide identically
//! (engine and tier) on generated engine states, including the rotation of ties over a
//! sequence of decisions.

mod policy_support;

use policy_support::*;
use proptest::prelude::*;
use switchyard::engines::Candidate;
use switchyard::policy::PolicyStore;

#[derive(Debug, Clone)]
struct State {
    /// (queue, in_flight, matched blocks, stale) per engine.
    engines: Vec<(u8, u8, u8, bool)>,
    prompt_tokens: usize,
}

fn state() -> impl Strategy<Value = State> {
    (
        prop::collection::vec((0u8..20, 0u8..4, 0u8..8, any::<bool>()), 1..10),
        0usize..160,
    )
        .prop_map(|(engines, prompt_tokens)| State {
            engines,
            prompt_tokens,
        })
}

fn candidates(s: &State) -> Vec<Candidate> {
    s.engines
        .iter()
        .enumerate()
        .map(|(i, &(q, f, blocks, stale))| {
            let mut c = cand(i as u32, f64::from(q), u64::from(f), 0);
            c.prefix_match_tokens = (usize::from(blocks) * 16).min(s.prompt_tokens / 16 * 16);
            c.load.stale = stale;
            c
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn rhai_and_toml_decide_identically(seq in prop::collection::vec(state(), 1..12)) {
        let rhai = PolicyStore::new(settings(&shipped_dir(), "load_balanced_kvaware.rhai"), 16)
            .expect("rhai store");
        let toml = PolicyStore::new(settings(&shipped_dir(), "load_balanced_kvaware.toml"), 16)
            .expect("toml store");
        for s in &seq {
            let c = candidates(s);
            let req = request(s.prompt_tokens);
            let a = rhai.decide(&req, &c);
            let b = toml.decide(&req, &c);
            prop_assert_eq!((a.engine, &*a.tier), (b.engine, &*b.tier), "state {:?}", s);
            prop_assert_eq!(&*a.policy, "load_balanced_kvaware");
        }
    }
}
