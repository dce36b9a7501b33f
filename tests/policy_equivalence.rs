//! The shipped `load_balanced_kvaware.rhai` and `load_balanced_kvaware.toml` decide identically
//! (engine and tier) on generated engine states, including the rotation of ties over a
//! sequence of decisions. The shipped `.rhai` is a bare `??` chain of built-ins, which runs as
//! the equivalent built-in pipeline; the same chain in a form the interpreter must evaluate is
//! compared too.

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
        let (_dir, interpreted) = store_with(
            &[(
                "load_balanced_kvaware.rhai",
                "let pick = load_balance(8) ?? kv_lookup() ?? fallback();\npick\n",
            )],
            "load_balanced_kvaware",
        );
        prop_assert_eq!(&interpreted.status_json()["policies"][0]["execution"], "rhai");
        prop_assert_eq!(
            rhai.status_json()["policies"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["source"].as_str().is_some_and(|s| s.ends_with(".rhai")) && p["name"] == "load_balanced_kvaware"))
                .map(|p| p["execution"].clone()),
            Some(serde_json::json!("native"))
        );
        for s in &seq {
            let c = candidates(s);
            let req = request(s.prompt_tokens);
            let a = rhai.decide(&req, &c);
            let b = toml.decide(&req, &c);
            let i = interpreted.decide(&req, &c);
            prop_assert_eq!((a.engine, &*a.tier), (b.engine, &*b.tier), "state {:?}", s);
            prop_assert_eq!((i.engine, &*i.tier), (b.engine, &*b.tier), "interpreted, state {:?}", s);
            prop_assert_eq!(&*a.policy, "load_balanced_kvaware");
        }
    }
}
