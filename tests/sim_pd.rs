//! The simulated engine as a prefill (P) and a decode (D) engine of vLLM's NixlConnector
//! (pull mode), over loopback: P's hand-off, its lease, D's load over P's side channel, and
//! D's answers when the load fails. Evidence is the engines' own counters (prompt tokens
//! computed by prefill steps, tokens received), not wall-clock time.

mod common;

use common::{MODEL, client, completion, get, instant_sim, post_json, stream};
use serde_json::{Value, json};
use switchyard::sim::{self, KvLoadFailurePolicy, KvRole, SimConfig, SimHandle};

/// 8,000 bytes: 2,000 stand-in tokens, 125 blocks of 16.
fn long_prompt(tag: &str) -> String {
    let mut s = format!("{tag}: ");
    let mut i = 0u32;
    while s.len() < 8000 {
        s.push_str(&format!("w{i} "));
        i += 1;
    }
    s.truncate(8000);
    s
}

const PROMPT_TOKENS: u64 = 2000;

async fn engine(role: Option<KvRole>, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = SimConfig {
        kv_role: role,
        enable_prompt_tokens_details: true,
        ..instant_sim()
    };
    tweak(&mut cfg);
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The P leg as the router sends it (rules 1–3 of the protocol).
fn p_leg(prompt: &str) -> Value {
    json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null
        }
    })
}

/// The D leg: the client's body plus P's `kv_transfer_params` verbatim.
fn d_leg(prompt: &str, max_tokens: usize, stream: bool, kv: &Value) -> Value {
    json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
        "kv_transfer_params": kv
    })
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Runs the P leg on `p`; returns P's `kv_transfer_params`.
async fn hand_off(p: &SimHandle, prompt: &str) -> Value {
    let c = client();
    let r = post_json(&c, &p.url(), "/v1/completions", p_leg(prompt)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 1);
    body["kv_transfer_params"].clone()
}

#[tokio::test]
async fn d_decodes_from_ps_blocks_without_prefilling_them() {
    let p = engine(Some(KvRole::Producer), |_| {}).await;
    let d = engine(Some(KvRole::Consumer), |_| {}).await;
    let alone = engine(Some(KvRole::Consumer), |_| {}).await;
    let c = client();
    let prompt = long_prompt("a");

    let p_req = http::Request::post(format!("{}/v1/completions", p.url()))
        .header("content-type", "application/json")
        .header("x-request-id", "req-7")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            p_leg(&prompt).to_string(),
        )))
        .unwrap();
    let r = common::send(&c, p_req).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    let kv = body["kv_transfer_params"].clone();
    assert_eq!(body["id"], "cmpl-req-7");
    assert_eq!(body["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(
        body["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0, "created_cache_tokens": null, "multimodal_tokens": null})
    );
    let blocks = kv["remote_block_ids"][0].as_array().expect("one group");
    assert_eq!(blocks.len(), 125);
    let engine_id = kv["remote_engine_id"].as_str().unwrap();
    assert_eq!(engine_id.len(), 36, "uuid-shaped: {engine_id}");
    // vLLM's internal request id: `cmpl-<X-Request-Id>-0-<8 hex>`.
    let rid = kv["remote_request_id"].as_str().unwrap();
    assert!(rid.starts_with("cmpl-req-7-0-") && rid.len() == 21, "{rid}");
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["remote_port"], p.addr().port());
    assert_eq!(kv["remote_num_tokens"], PROMPT_TOKENS);
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(
        (
            kv["tp_size"].clone(),
            kv["dcp_size"].clone(),
            kv["pp_size"].clone()
        ),
        (json!(1), json!(1), json!(1))
    );
    assert_eq!(kv["remote_blocks_expiry_time"], Value::Null);
    assert_eq!(kv["transfer_mode"], "pull");
    assert_eq!(kv["remote_prefill_cached_tokens"], 0);
    assert_eq!(kv.as_object().unwrap().len(), 14, "{kv}");
    // P holds the 125 blocks: they count against its KV memory.
    let m = metrics(&p.url()).await;
    assert_eq!(metric(&m, "switchyard_sim:kv_hand_offs_held"), 1.0);
    assert!(metric(&m, "vllm:kv_cache_usage_perc") > 0.0, "{m}");
    assert_eq!(p.counters().kv.hand_offs, 1);

    let r = post_json(
        &c,
        &d.url(),
        "/v1/completions",
        d_leg(&prompt, 20, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let out = r.json();
    assert_eq!(out["usage"]["completion_tokens"], 20);
    // As vLLM 0.32's D: P's own cache hit (`remote_prefill_cached_tokens`), not what D loaded.
    assert_eq!(
        out["usage"]["prompt_tokens_details"]["cached_tokens"],
        kv["remote_prefill_cached_tokens"]
    );
    assert_eq!(
        out["kv_transfer_params"],
        Value::Null,
        "D hands nothing off"
    );
    let dk = d.counters().kv;
    assert_eq!((dk.loads, dk.load_failures), (1, 0));
    assert_eq!(dk.tokens_received, PROMPT_TOKENS);
    assert_eq!(
        dk.prefill_computed_tokens, 1,
        "only the last prompt token is computed, to sample the first"
    );
    // P released the blocks when D read them.
    let pk = p.counters().kv;
    assert_eq!((pk.hand_offs_read, pk.hand_offs_expired), (1, 0));
    let m = metrics(&p.url()).await;
    assert_eq!(metric(&m, "switchyard_sim:kv_hand_offs_held"), 0.0);
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), 0.0);
    let m = metrics(&d.url()).await;
    assert_eq!(
        metric(
            &m,
            "vllm:prompt_tokens_by_source_total{model_name=\"switchyard-sim\",engine=\"0\",source=\"external_kv_transfer\"}"
        ),
        PROMPT_TOKENS as f64
    );

    // The same request on an engine alone prefills the whole prompt.
    let r = post_json(
        &c,
        &alone.url(),
        "/v1/completions",
        completion(&prompt, 20, false),
    )
    .await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(alone.counters().kv.prefill_computed_tokens, PROMPT_TOKENS);

    // A hand-off read again is served (vLLM 0.32's D reads the freed blocks); P counts it.
    let r = post_json(&c, &p.url(), "/sim/nixl/read", read_of(&kv)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["num_tokens"], PROMPT_TOKENS);
    assert_eq!(p.counters().kv.stale_reads, 1);
    let m = metrics(&p.url()).await;
    assert_eq!(
        metric(&m, "vllm:nixl_num_notifications_after_expiry_total"),
        1.0
    );
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), 0.0);
    // One P never made is not.
    let mut other = read_of(&kv);
    other["remote_request_id"] = json!("cmpl-never-0-00000000");
    let r = post_json(&c, &p.url(), "/sim/nixl/read", other).await;
    assert_eq!(r.status, 404);
    let mut other = read_of(&kv);
    other["remote_engine_id"] = json!("another-engine");
    let r = post_json(&c, &p.url(), "/sim/nixl/read", other).await;
    assert_eq!(r.status, 404);
}

/// D's read of hand-off `kv` on P's side channel.
fn read_of(kv: &Value) -> Value {
    json!({
        "remote_engine_id": kv["remote_engine_id"], "remote_request_id": kv["remote_request_id"],
        "remote_block_ids": kv["remote_block_ids"]
    })
}

async fn metrics(url: &str) -> String {
    String::from_utf8(get(&client(), url, "/metrics").await.body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_hand_off_read_twice_is_served_and_one_p_never_made_fails_or_recomputes() {
    let p = engine(Some(KvRole::Producer), |_| {}).await;
    let d = engine(Some(KvRole::Consumer), |_| {}).await;
    let d_fail = engine(Some(KvRole::Both), |_| {}).await;
    let d_recompute = engine(Some(KvRole::Consumer), |c| {
        c.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
    })
    .await;
    let c = client();
    let prompt = long_prompt("b");
    let kv = hand_off(&p, &prompt).await;
    let r = post_json(
        &c,
        &d.url(),
        "/v1/completions",
        d_leg(&prompt, 4, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200);
    // The same hand-off again, on another D: served as vLLM 0.32 serves it (`handoff_reused`).
    let r = post_json(
        &c,
        &d_fail.url(),
        "/v1/completions",
        d_leg(&prompt, 4, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(d_fail.counters().kv.prefill_computed_tokens, 1);
    let pk = p.counters().kv;
    assert_eq!((pk.hand_offs_read, pk.stale_reads), (1, 1));

    // A hand-off P never made: vLLM's default policy, `fail`, fails the request.
    let mut bogus = kv.clone();
    bogus["remote_request_id"] = json!("cmpl-never-0-00000000");
    let r = post_json(
        &c,
        &d_fail.url(),
        "/v1/completions",
        d_leg(&prompt, 4, false, &bogus),
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json(),
        json!({"error": {"message": "Internal server error", "type": "InternalServerError",
                          "param": null, "code": 500}})
    );
    assert_eq!(d_fail.counters().kv.load_failures, 1);
    // Streamed: the headers are sent, then an error event.
    let s = stream(
        &c,
        common::post(
            &d_fail.url(),
            "/v1/completions",
            d_leg(&prompt, 4, true, &bogus).to_string(),
        ),
    )
    .await;
    assert_eq!(s.status, 200);
    let events = s.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].contains("\"Internal server error\""),
        "{events:?}"
    );
    assert_eq!(events[1], "[DONE]");
    assert_eq!(
        d_fail.counters().kv.prefill_computed_tokens,
        1,
        "nothing computed"
    );

    // `recompute`: D computes the whole prompt itself.
    let r = post_json(
        &c,
        &d_recompute.url(),
        "/v1/completions",
        d_leg(&prompt, 4, false, &bogus),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    let k = d_recompute.counters().kv;
    assert_eq!((k.loads, k.load_failures, k.tokens_received), (0, 1, 0));
    assert_eq!(k.prefill_computed_tokens, PROMPT_TOKENS);
    let m = metrics(&d_recompute.url()).await;
    assert_eq!(metric(&m, "vllm:nixl_num_failed_transfers_total"), 1.0);
}

#[tokio::test]
async fn an_expired_lease_releases_ps_blocks_and_a_late_d_reads_them_stale() {
    // A lease of 0.2 simulated s at time_scale 0 is 0.2 s of wall time.
    let p = engine(Some(KvRole::Producer), |c| c.kv_lease_seconds = 0.2).await;
    let d = engine(Some(KvRole::Consumer), |c| {
        c.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
    })
    .await;
    let c = client();
    let prompt = long_prompt("c");
    let kv = hand_off(&p, &prompt).await;
    // Sampling /metrics sweeps the leases: wait until P has dropped the hand-off.
    let url = p.url();
    let mut held = 1.0;
    let deadline = std::time::Instant::now() + common::SAFETY;
    while held > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ended"
        );
        held = metric(&metrics(&url).await, "switchyard_sim:kv_hand_offs_held");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&metrics(&url).await, "vllm:kv_cache_usage_perc"),
        0.0
    );
    let pk = p.counters().kv;
    assert_eq!((pk.hand_offs_expired, pk.hand_offs_read), (1, 0));
    assert!(metrics(&url).await.contains(
        "vllm:nixl_num_kv_expired_reqs_total{model_name=\"switchyard-sim\",engine=\"0\"} 1.0"
    ));

    let r = post_json(
        &c,
        &d.url(),
        "/v1/completions",
        d_leg(&prompt, 4, false, &kv),
    )
    .await;
    // vLLM 0.32 (`lease_expired`): D reads the released blocks without noticing; only P
    // counts it.
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let k = d.counters().kv;
    assert_eq!((k.loads, k.load_failures), (1, 0));
    assert_eq!(k.prefill_computed_tokens, 1);
    assert_eq!(p.counters().kv.stale_reads, 1);
}

#[tokio::test]
async fn a_dead_p_fails_the_load() {
    let p = engine(Some(KvRole::Producer), |_| {}).await;
    let d_fail = engine(Some(KvRole::Consumer), |_| {}).await;
    let d = engine(Some(KvRole::Consumer), |c| {
        c.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
    })
    .await;
    let prompt = long_prompt("d");
    let kv = hand_off(&p, &prompt).await;
    p.shutdown().await;
    let r = post_json(
        &client(),
        &d.url(),
        "/v1/completions",
        d_leg(&prompt, 2, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200);
    let k = d.counters().kv;
    assert_eq!((k.loads, k.load_failures), (0, 1));
    assert_eq!(k.prefill_computed_tokens, PROMPT_TOKENS);
    // vLLM's default policy (`p_gone`): 500 before any byte.
    let body = d_leg(&prompt, 2, false, &kv);
    let r = post_json(&client(), &d_fail.url(), "/v1/completions", body).await;
    assert_eq!(r.status, 500);
    assert_eq!(d_fail.counters().kv.load_failures, 1);
}

#[tokio::test]
async fn chat_p_legs_hand_off_and_engines_without_a_role_ignore_the_parameters() {
    let p = engine(Some(KvRole::Both), |_| {}).await;
    let plain = engine(None, |_| {}).await;
    let c = client();
    let chat = |kv: Value| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt("e")}],
               "max_completion_tokens": 1, "stream": false, "kv_transfer_params": kv})
    };
    let router_p = p_leg("")["kv_transfer_params"].clone();
    let r = post_json(&c, &p.url(), "/v1/chat/completions", chat(router_p.clone())).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    let rid = body["kv_transfer_params"]["remote_request_id"]
        .as_str()
        .unwrap();
    let id = body["id"].as_str().unwrap();
    assert!(
        rid.starts_with(&format!("{id}-")) && rid.len() == id.len() + 9,
        "{rid}"
    );
    assert_eq!(
        body["kv_transfer_params"]["remote_num_tokens"],
        body["usage"]["prompt_tokens"]
    );

    // No KV connector: an ordinary answer, nothing held, no side channel.
    let r = post_json(&c, &plain.url(), "/v1/chat/completions", chat(router_p)).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert!(body.get("kv_transfer_params").is_none(), "{body}");
    assert!(body["usage"].get("prompt_tokens_details").is_some());
    assert_eq!(plain.counters().kv.hand_offs, 0);
    let r = post_json(&c, &plain.url(), "/sim/nixl/read", json!({})).await;
    assert_eq!(r.status, 404);
}

/// The sim's P and D answers against real vLLM 0.32's recorded bytes
/// (`tests/fixtures/vllm-0.32.0/pd/completions_json.json`): the same hand-off fields, the same
/// `prompt_tokens_details`, the same request-id shapes.
#[tokio::test]
async fn the_hand_off_and_usage_have_the_recorded_vllm_shapes() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vllm-0.32.0/pd/completions_json.json");
    let fixture: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let body = |i: usize| -> Value {
        let b = fixture["exchanges"][i]["response"]["body"]
            .as_str()
            .unwrap();
        serde_json::from_str(b).unwrap()
    };
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let (real_p, real_d) = (body(0), body(1));

    let p = engine(Some(KvRole::Producer), |_| {}).await;
    let d = engine(Some(KvRole::Consumer), |_| {}).await;
    let prompt = long_prompt("f");
    let kv = hand_off(&p, &prompt).await;
    assert_eq!(keys(&kv), keys(&real_p["kv_transfer_params"]));
    let c = client();
    let out = post_json(
        &c,
        &d.url(),
        "/v1/completions",
        d_leg(&prompt, 3, false, &kv),
    )
    .await;
    let out = out.json();
    let real_kv = &real_p["kv_transfer_params"];
    for k in [
        "tp_size",
        "dcp_size",
        "pp_size",
        "transfer_mode",
        "do_remote_prefill",
    ] {
        assert_eq!(kv[k], real_kv[k], "{k}");
    }
    assert_eq!(
        keys(&out["usage"]["prompt_tokens_details"]),
        keys(&real_d["usage"]["prompt_tokens_details"])
    );
    assert_eq!(out["kv_transfer_params"], real_d["kv_transfer_params"]);
    // `cmpl-<X-Request-Id>-0-<8 hex>` in both.
    fn shape(s: &str) -> (usize, String) {
        let tail: Vec<&str> = s.rsplitn(3, '-').collect();
        (tail[0].len(), tail[1].to_owned())
    }
    assert_eq!(
        shape(kv["remote_request_id"].as_str().unwrap()),
        shape(
            real_p["kv_transfer_params"]["remote_request_id"]
                .as_str()
                .unwrap()
        )
    );
}
