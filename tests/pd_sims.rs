//! The router's P/D flow in front of simulated prefill and decode engines (`--kv-role`) over
//! loopback: one request through `disaggregated_prefill_orchestrated` reaches P as a prefill
//! leg and D with P's hand-off, D loads the prompt instead of computing it, and the client
//! sees an ordinary answer. Evidence is the engines' own counters.

mod common;

use common::{MODEL, client, send, start_router};
use serde_json::{Value, json};
use switchyard::sim::{self, KvRole, SimConfig, SimHandle};

async fn engine(role: KvRole) -> SimHandle {
    let cfg = SimConfig {
        kv_role: Some(role),
        enable_prompt_tokens_details: true,
        ..common::instant_sim()
    };
    sim::start(cfg, common::loopback()).await.unwrap()
}

/// About 2,000 stand-in tokens of unique text.
fn long_prompt(tag: &str) -> String {
    let mut s = format!("{tag}:");
    let mut i = 0u32;
    while s.len() < 8000 {
        s.push_str(&format!(" v{i}"));
        i += 1;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_prefilled_on_p_and_decoded_on_d_from_ps_blocks() {
    let p = engine(KvRole::Producer).await;
    let d = engine(KvRole::Consumer).await;
    let router = start_router(&[p.url(), d.url()], |c| {
        common::prefill_then_decode(c);
        c.decision_headers = true;
    })
    .await;
    let prompt = long_prompt("pd");
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "stream": false});
    let r = send(
        &client(),
        common::post(&router.url(), "/v1/completions", body.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-switchyard-stage"), Some("disaggregated"));
    assert_eq!(
        r.header("x-switchyard-engine"),
        Some(d.addr().to_string().as_str())
    );
    assert_eq!(
        r.header("x-switchyard-prefill-engine"),
        Some(p.addr().to_string().as_str())
    );
    let out: Value = r.json();
    assert_eq!(out["usage"]["completion_tokens"], 12);
    assert!(
        out.get("kv_transfer_params").is_none_or(Value::is_null),
        "{out}"
    );
    let prompt_tokens = out["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens >= 2000, "{prompt_tokens}");

    let (pk, dk) = (p.counters().kv, d.counters().kv);
    assert_eq!((pk.hand_offs, pk.hand_offs_read, pk.stale_reads), (1, 1, 0));
    assert_eq!(
        pk.prefill_computed_tokens, prompt_tokens,
        "P computed the prompt"
    );
    assert_eq!((dk.loads, dk.load_failures), (1, 0));
    assert_eq!(dk.tokens_received, prompt_tokens);
    assert_eq!(
        dk.prefill_computed_tokens, 1,
        "D computed only the last prompt token"
    );
    assert_eq!(p.counters().completed, 1);
    assert_eq!(d.counters().completed, 1);
    router.shutdown(std::time::Duration::from_millis(200)).await;
}
