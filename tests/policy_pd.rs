//! Disaggregated policies as files: `[[decode.tier]]` / `[[prefill.tier]]` pipelines, the
//! decider built-ins, what scripts see in each stage, and the mistakes a file can make.

mod policy_support;

use policy_support::*;
use switchyard::engines::Candidate;
use switchyard::policy::{
    DecodeChoice, Handoff, KvMatches, PolicyStore, PrefillChoice, PrefixMatcher,
};
use switchyard::request::RequestInfo;

/// Prefix matches as the candidates carry them.
struct Given;

impl PrefixMatcher for Given {
    fn matches(&self, req: &RequestInfo, cands: &[Candidate]) -> KvMatches {
        KvMatches {
            tokens: cands.iter().map(|c| c.prefix_match_tokens).collect(),
            sources: Vec::new(),
            prompt_tokens: req.prompt_tokens(),
        }
    }
}

const BUILTIN_FORM: &str = r#"
handoff = "nixl"
[[decode.tier]]
builtin = "load_balance"
threshold = 8
[[decode.tier]]
builtin = "kv_lookup"
[[decode.tier]]
builtin = "fallback"
[[prefill.tier]]
builtin = "skip_prefill"
min_uncached = 256
[[prefill.tier]]
builtin = "kv_lookup"
[[prefill.tier]]
builtin = "least_loaded"
"#;

const SCRIPT_FORM: &str = r#"
[[decode.tier]]
script = "load_balance(8) ?? kv_lookup() ?? fallback()"
[[prefill.tier]]
script = "skip_prefill(256) ?? kv_lookup() ?? least_loaded()"
"#;

/// The prefill decision's engine index, or `None` for no prefill leg.
fn prefill(
    store: &PolicyStore,
    req: &RequestInfo,
    p: &[Candidate],
    d: &Candidate,
) -> Option<usize> {
    let choice = DecodeChoice::new(Some(&Given), req, d);
    match store.decide_prefill(req, p, &Given, &choice) {
        PrefillChoice::Engine(d) => Some(d.engine),
        PrefillChoice::Skip { .. } => None,
    }
}

#[test]
fn the_script_form_and_the_builtin_form_decide_alike() {
    let (_d1, a) = store_with(&[("pd.toml", BUILTIN_FORM)], "pd");
    let (_d2, b) = store_with(&[("pd.toml", SCRIPT_FORM)], "pd");
    assert_eq!(a.handoff_for("m"), Some(Handoff::Nixl));
    assert_eq!(
        b.handoff_for("m"),
        Some(Handoff::Nixl),
        "nixl is the default hand-off"
    );
    let req = request(1000);
    // Decode: the queue spread decides, else the longest cached prefix.
    let spread = vec![cand(1, 12.0, 0, 900), cand(2, 1.0, 0, 0)];
    let cached = vec![cand(1, 2.0, 0, 900), cand(2, 1.0, 0, 0)];
    for store in [&a, &b] {
        assert_eq!(store.decide_decode(&req, &spread, &Given).engine, 1);
        let d = store.decide_decode(&req, &cached, &Given);
        assert_eq!((d.engine, &*d.tier), (0, "kv_lookup"));
    }
    // Prefill: skipped when the decode engine holds all but fewer than 256 tokens; else the
    // prefill engine holding most of the prompt; else the least loaded.
    let p = vec![
        cand(10, 3.0, 0, 0),
        cand(11, 0.0, 0, 700),
        cand(12, 0.0, 0, 0),
    ];
    let warm_decode = cand(1, 0.0, 0, 800); // 200 uncached
    let cold_decode = cand(2, 0.0, 0, 100); // 900 uncached
    for store in [&a, &b] {
        assert_eq!(prefill(store, &req, &p, &warm_decode), None);
        assert_eq!(prefill(store, &req, &p, &cold_decode), Some(1));
        let no_match = vec![cand(10, 3.0, 0, 0), cand(12, 0.0, 0, 0)];
        assert_eq!(prefill(store, &req, &no_match, &cold_decode), Some(1));
        assert_eq!(
            prefill(store, &req, &[], &cold_decode),
            None,
            "no prefill engine"
        );
    }
    // An aggregated policy has no hand-off, and its prefill decision is always "none".
    let (_d3, agg) = store_with(
        &[("rr.toml", "[[tier]]\nbuiltin = \"round_robin\"\n")],
        "rr",
    );
    assert_eq!(agg.handoff_for("m"), None);
    assert_eq!(prefill(&agg, &req, &p, &cold_decode), None);
}

#[test]
fn scripts_see_the_stage_the_decode_engine_and_its_uncached_tokens() {
    let policy = r#"
handoff = "shared_store"
[[decode.tier]]
script = "if request.stage == \"decode\" && request.decode_engine == () { engines[engines.len() - 1] } else { () }"
[[prefill.tier]]
script = """
if request.stage != "prefill" { throw "wrong stage" }
if request.decode_uncached_tokens < 512 { no_prefill() }
else { engines.filter(|e| e.role == "aggregated" && e.name != request.decode_engine)[0] }
"""
"#;
    let (_d, store) = store_with(&[("pd.toml", policy)], "pd");
    assert_eq!(store.handoff_for("m"), Some(Handoff::SharedStore));
    let req = request(1000);
    let d = store.decide_decode(&req, &[cand(1, 0.0, 0, 0), cand(2, 0.0, 0, 0)], &Given);
    assert_eq!((d.engine, &*d.tier), (1, "script1"));
    let p = vec![cand(3, 0.0, 0, 0), cand(4, 0.0, 0, 0)];
    assert_eq!(
        prefill(&store, &req, &p, &cand(2, 0.0, 0, 600)),
        None,
        "400 uncached"
    );
    assert_eq!(
        prefill(&store, &req, &p, &cand(2, 0.0, 0, 0)),
        Some(0),
        "1000 uncached"
    );
    let status = store.status_json();
    let pd = status["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "pd"))
        .expect("listed");
    assert_eq!(pd["tiers"], serde_json::json!(["script1"]));
    assert_eq!(pd["prefill_tiers"], serde_json::json!(["script1"]));
    assert_eq!(pd["handoff"], "shared_store");
}

#[test]
fn the_deciders_pass_outside_a_prefill_pipeline() {
    let (_d, store) = store_with(
        &[(
            "agg.toml",
            "[[tier]]\nbuiltin = \"no_prefill\"\n[[tier]]\nbuiltin = \"skip_prefill\"\nmin_uncached = 1e9\n[[tier]]\nbuiltin = \"round_robin\"\n",
        )],
        "agg",
    );
    let d = store.decide(&request(100), &queues(&[0.0, 0.0]));
    assert_eq!(&*d.tier, "round_robin");
    assert!(d.engine < 2);
}

#[test]
fn mistakes_in_a_disaggregated_policy_name_file_line_and_column() {
    let cases: &[(&str, &str)] = &[
        (
            "[[tier]]\nbuiltin = \"fallback\"\n[[decode.tier]]\nbuiltin = \"fallback\"\n[[prefill.tier]]\nbuiltin = \"fallback\"\n",
            "bad.toml:1:1: a disaggregated policy has `[[decode.tier]]` and `[[prefill.tier]]`, not `[[tier]]`",
        ),
        (
            "[[decode.tier]]\nbuiltin = \"fallback\"\n",
            "bad.toml:1:1: a disaggregated policy needs `[[prefill.tier]]` tables",
        ),
        (
            "handoff = \"mooncake\"\n[[decode.tier]]\nbuiltin = \"fallback\"\n[[prefill.tier]]\nbuiltin = \"fallback\"\n",
            "bad.toml:1:11: `handoff` must be \"nixl\" (vLLM's NixlConnector) or \"shared_store\" (LMCache)",
        ),
        (
            "[[decode.tier]]\nbuiltin = \"fallback\"\n[[prefill.tier]]\nbuiltin = \"skip_prefill\"\n",
            "bad.toml:4:11: `skip_prefill` needs `min_uncached` (uncached prompt tokens worth a prefill leg, e.g. 256)",
        ),
        (
            "[[decode.tier]]\nbuiltin = \"fallback\"\n[prefill]\nteir = 1\n",
            "bad.toml:4:1: unknown key `prefill.teir` (expected `prefill.tier`)",
        ),
    ];
    for (text, want) in cases {
        let dir = temp_dir();
        dir.write("bad.toml", text);
        let diags = PolicyStore::check_dir(dir.path());
        let shown: Vec<String> = diags
            .iter()
            .map(|d| {
                let s = d.to_string();
                s.rsplit_once('/')
                    .map_or(s.clone(), |(_, tail)| tail.to_owned())
            })
            .collect();
        assert!(
            shown.iter().any(|s| s == want),
            "{text}\nwanted {want}\ngot {shown:?}"
        );
    }
}
