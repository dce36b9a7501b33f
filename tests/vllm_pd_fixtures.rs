//! The prefill/decode hand-off as real vLLM 0.32.0 sends it: bytes recorded from a P engine
//! and D engines running NixlConnector on CPU (`examples/real_vllm/record_pd_fixtures.py`; see
//! `tests/fixtures/vllm-0.32.0/pd/README.md`). These tests only read the files: they pin the
//! facts the router's P/D code relies on (what P's answer carries, what D wants, what D's usage
//! says, what D answers when the hand-off is stale or its P is gone).

use std::path::PathBuf;

use serde_json::{Map, Value};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm-0.32.0/pd")
}

/// The vLLM KV-cache block size the engines ran with (`--block-size 32`).
const BLOCK_SIZE: u64 = 32;
/// P's NIXL side channel (`VLLM_NIXL_SIDE_CHANNEL_HOST` / `_PORT` of the recording).
const P_SIDE_CHANNEL: (&str, u64) = ("127.0.0.1", 5690);

/// Every scenario with a P/D pair recorded as the router sends it.
const PAIRED: &[&str] = &[
    "completions_json",
    "completions_sse",
    "chat_json",
    "chat_sse",
    "p_prefix_hit",
    "handoff_reused",
];

/// The fields of P's `kv_transfer_params` in vLLM 0.32 (pull mode), all of them.
const HANDOFF_FIELDS: &[&str] = &[
    "do_remote_prefill",
    "do_remote_decode",
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
    "tp_size",
    "dcp_size",
    "pp_size",
    "remote_num_tokens",
    "remote_blocks_expiry_time",
    "transfer_mode",
    "remote_prefill_cached_tokens",
];

/// One recorded HTTP exchange.
struct Exchange {
    engine: String,
    note: String,
    path: String,
    request_id: Option<String>,
    request: Value,
    status: u64,
    content_type: String,
    body: String,
    counters: Value,
    /// Seconds from sending the request to the end of the answer (reset requests: 0).
    elapsed_s: f64,
}

impl Exchange {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{} {}: body is not JSON: {e}", self.engine, self.note))
    }

    fn is_p_leg(&self) -> bool {
        self.request["kv_transfer_params"]["do_remote_decode"] == Value::Bool(true)
    }

    fn is_d_leg(&self) -> bool {
        self.request["kv_transfer_params"]["do_remote_prefill"] == Value::Bool(true)
    }

    fn is_sse(&self) -> bool {
        self.content_type.starts_with("text/event-stream")
    }

    fn counter(&self, engine: &str, name: &str) -> u64 {
        self.counters[engine][name].as_u64().unwrap_or(0)
    }
}

fn scenario(name: &str) -> Vec<Exchange> {
    let path = dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(doc["vllm_version"], "0.32.0", "{name}");
    doc["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let req = &x["request"];
            let body = req["body"].as_str().unwrap();
            Exchange {
                engine: x["engine"].as_str().unwrap().to_owned(),
                note: x["note"].as_str().unwrap().to_owned(),
                path: req["path"].as_str().unwrap().to_owned(),
                request_id: req["headers"]["X-Request-Id"].as_str().map(str::to_owned),
                request: if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(body).unwrap()
                },
                status: x["response"]["status"].as_u64().unwrap(),
                content_type: x["response"]["headers"]["content-type"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                body: x["response"]["body"].as_str().unwrap().to_owned(),
                counters: x["counters_delta"].clone(),
                elapsed_s: x["elapsed_s"].as_f64().unwrap_or(0.0),
            }
        })
        .collect()
}

/// The `data:` payloads of an SSE body, checking vLLM's framing on the way: every event is one
/// `data: ` line followed by a blank line, and the last one is `[DONE]`.
fn sse_events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "SSE body must end with [DONE]"
    );
    let mut out = Vec::new();
    for event in body.split_terminator("\n\n") {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data line: {event:?}"));
        assert!(!data.contains('\n'), "one line per event");
        if data != "[DONE]" {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

/// What the client would read from an answer: its text, finish reason and final usage.
struct Answer {
    text: String,
    finish_reason: Value,
    usage: Value,
    /// Whether any object of the answer has a `kv_transfer_params` that is not null.
    carries_handoff: bool,
}

fn choice_text(choice: &Value) -> &str {
    choice["text"]
        .as_str()
        .or_else(|| choice["message"]["content"].as_str())
        .or_else(|| choice["delta"]["content"].as_str())
        .unwrap_or("")
}

fn answer(x: &Exchange) -> Answer {
    let has = |v: &Value| v.get("kv_transfer_params").is_some_and(|p| !p.is_null());
    if x.is_sse() {
        let events = sse_events(&x.body);
        let mut text = String::new();
        let mut finish_reason = Value::Null;
        for e in &events {
            for c in e["choices"].as_array().unwrap() {
                text.push_str(choice_text(c));
                if !c["finish_reason"].is_null() {
                    finish_reason = c["finish_reason"].clone();
                }
            }
        }
        let last = events.last().unwrap();
        assert_eq!(
            last["choices"],
            Value::Array(vec![]),
            "usage comes alone, last"
        );
        Answer {
            text,
            finish_reason,
            usage: last["usage"].clone(),
            carries_handoff: events.iter().any(has),
        }
    } else {
        let v = x.json();
        let c = &v["choices"][0];
        Answer {
            text: choice_text(c).to_owned(),
            finish_reason: c["finish_reason"].clone(),
            usage: v["usage"].clone(),
            carries_handoff: has(&v),
        }
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// P legs with the D leg that followed each (the next exchange to D with P's hand-off).
fn pairs(name: &str) -> Vec<(Exchange, Exchange)> {
    let mut out = Vec::new();
    let mut pending: Option<Exchange> = None;
    for x in scenario(name) {
        if x.engine == "P" && x.is_p_leg() {
            pending = Some(x);
        } else if x.is_d_leg()
            && let Some(p) = pending.take()
        {
            out.push((p, x));
        }
    }
    out
}

fn all_p_legs() -> Vec<Exchange> {
    let mut names = PAIRED.to_vec();
    names.extend(["lease_expired", "p_gone"]);
    names
        .iter()
        .flat_map(|n| scenario(n))
        .filter(Exchange::is_p_leg)
        .collect()
}

#[test]
fn p_answers_an_ordinary_one_token_completion_with_a_top_level_handoff() {
    let legs = all_p_legs();
    assert_eq!(legs.len(), 9);
    let mut engine_ids = Vec::new();
    for x in &legs {
        assert_eq!(x.status, 200, "{}", x.note);
        assert_eq!(x.content_type, "application/json");
        let v = x.json();
        let expected_object = if x.path == "/v1/chat/completions" {
            "chat.completion"
        } else {
            "text_completion"
        };
        assert_eq!(v["object"], expected_object);
        let a = answer(x);
        assert_eq!(a.finish_reason, "length");
        assert_eq!(u(&a.usage["completion_tokens"]), 1);

        let kv = v["kv_transfer_params"]
            .as_object()
            .expect("top-level kv_transfer_params");
        let mut keys: Vec<&str> = kv.keys().map(String::as_str).collect();
        let mut want = HANDOFF_FIELDS.to_vec();
        keys.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys, want, "exactly vLLM 0.32's hand-off fields");

        assert_eq!(kv["do_remote_prefill"], true);
        assert_eq!(kv["do_remote_decode"], false);
        assert_eq!(kv["transfer_mode"], "pull");
        assert_eq!(kv["remote_host"], P_SIDE_CHANNEL.0);
        assert_eq!(u(&kv["remote_port"]), P_SIDE_CHANNEL.1);
        assert_eq!(
            (u(&kv["tp_size"]), u(&kv["dcp_size"]), u(&kv["pp_size"])),
            (1, 1, 1)
        );
        assert!(kv["remote_blocks_expiry_time"].is_null(), "null on P");

        // P computed the whole prompt: remote_num_tokens is its prompt length.
        let prompt_tokens = u(&a.usage["prompt_tokens"]);
        assert_eq!(u(&kv["remote_num_tokens"]), prompt_tokens);
        // P's own prefix-cache hits, as its usage reports them.
        assert_eq!(
            kv["remote_prefill_cached_tokens"],
            a.usage["prompt_tokens_details"]["cached_tokens"]
        );

        // One list of block ids per KV-cache group (one group: full attention), covering the
        // prompt, the last block partial.
        let groups = kv["remote_block_ids"].as_array().unwrap();
        assert_eq!(groups.len(), 1);
        let blocks: Vec<u64> = groups[0].as_array().unwrap().iter().map(u).collect();
        assert_eq!(blocks.len() as u64, prompt_tokens.div_ceil(BLOCK_SIZE));

        // remote_request_id is vLLM's internal id of P's request: the response id (built from
        // X-Request-Id) plus suffixes; it is not the X-Request-Id itself.
        let id = v["id"].as_str().unwrap();
        let rid = x.request_id.as_deref().unwrap();
        assert!(
            id.ends_with(rid),
            "response id {id} from X-Request-Id {rid}"
        );
        let remote_request_id = kv["remote_request_id"].as_str().unwrap();
        assert!(
            remote_request_id.starts_with(&format!("{id}-")),
            "{remote_request_id}"
        );
        assert_ne!(remote_request_id, id);

        let engine_id = kv["remote_engine_id"].as_str().unwrap();
        assert_eq!(engine_id.len(), 36, "a UUID: {engine_id}");
        engine_ids.push(engine_id.to_owned());
    }
    engine_ids.dedup();
    assert_eq!(engine_ids.len(), 1, "one P engine, one engine id");
}

#[test]
fn p_without_kv_transfer_params_answers_as_any_engine_with_a_null_handoff() {
    let xs = scenario("p_without_params");
    assert_eq!(xs.len(), 2);
    for x in &xs {
        assert!(x.request.get("kv_transfer_params").is_none());
        assert_eq!(x.status, 200);
        let v = x.json();
        assert!(v["kv_transfer_params"].is_null(), "key present, null");
        let a = answer(x);
        assert_eq!(a.finish_reason, "length");
        assert_eq!(
            u(&a.usage["completion_tokens"]),
            u(&x.request["max_tokens"])
        );
    }
}

/// The recording followed the router's rules 1 and 3: checks the fixtures, not vLLM, so that
/// the other tests read what a router would have sent.
#[test]
fn legs_were_sent_as_the_router_sends_them() {
    for name in PAIRED {
        let ps = pairs(name);
        assert!(!ps.is_empty(), "{name}");
        for (p, d) in &ps {
            assert_eq!(p.path, d.path);
            assert_eq!(p.request_id, d.request_id, "same X-Request-Id on both legs");
            let pb = p.request.as_object().unwrap();
            assert_eq!(pb["stream"], false);
            assert_eq!(pb["max_tokens"], 1);
            for gone in ["stream_options", "min_tokens", "min_completion_tokens"] {
                assert!(!pb.contains_key(gone), "{gone} on the P leg");
            }
            if let Some(m) = pb.get("max_completion_tokens") {
                assert_eq!(m, 1);
            }
            // D: the client's body plus P's kv_transfer_params verbatim.
            assert_eq!(
                d.request["kv_transfer_params"],
                p.json()["kv_transfer_params"]
            );
            let mut client: Map<String, Value> = d.request.as_object().unwrap().clone();
            client.remove("kv_transfer_params");
            for (k, v) in &client {
                if !matches!(
                    k.as_str(),
                    "stream"
                        | "stream_options"
                        | "max_tokens"
                        | "max_completion_tokens"
                        | "min_tokens"
                        | "min_completion_tokens"
                ) {
                    assert_eq!(pb.get(k), Some(v), "{name}: {k} differs between the legs");
                }
            }
        }
    }
}

#[test]
fn d_loads_the_prompt_from_p_and_answers_the_whole_request_itself() {
    for name in [
        "completions_json",
        "completions_sse",
        "chat_json",
        "chat_sse",
    ] {
        let ps = pairs(name);
        assert_eq!(ps.len(), 1, "{name}");
        let (p, d) = &ps[0];
        assert_eq!(d.status, 200, "{name}");
        let pa = answer(p);
        let da = answer(d);
        assert_eq!(da.finish_reason, "length");
        assert_eq!(da.usage["prompt_tokens"], pa.usage["prompt_tokens"]);
        // D generates every token the client asked for, the first one included (it is the
        // token P sampled: greedy decoding): the router relays D's answer, P's token is not
        // part of it.
        let asked = d
            .request
            .get("max_completion_tokens")
            .unwrap_or(&d.request["max_tokens"]);
        assert_eq!(da.usage["completion_tokens"], *asked);
        assert!(
            da.text.starts_with(&pa.text),
            "{name}: {:?} then {:?}",
            pa.text,
            da.text
        );
        // D answers under the same id as P (both from X-Request-Id).
        let d_id = if d.is_sse() {
            sse_events(&d.body)[0]["id"].clone()
        } else {
            d.json()["id"].clone()
        };
        assert_eq!(d_id, p.json()["id"]);

        // One NIXL read on D: D took every prompt token P computed either from P (vLLM's
        // external prefix cache hits) or, where it had them, from its own prefix cache (in
        // chat_sse the system prompt's first block, cached by chat_json's reference).
        let kv = &p.json()["kv_transfer_params"];
        assert_eq!(d.counter("D", "nixl_xfer_time_seconds_count"), 1, "{name}");
        assert_eq!(d.counter("D", "nixl_num_failed_transfers_total"), 0);
        let from_p = d.counter("D", "external_prefix_cache_hits_total");
        let from_d = d.counter("D", "prefix_cache_hits_total");
        assert!(from_p > 0, "{name}");
        assert_eq!(from_p + from_d, u(&kv["remote_num_tokens"]), "{name}");

        // The KV D read was the prompt's: a cold D computing the prompt itself writes the same.
        let reference = scenario(name).into_iter().last().unwrap();
        assert!(reference.note.starts_with("reference"));
        assert_eq!(answer(&reference).text, da.text, "{name}");
    }
}

#[test]
fn d_reports_ps_prefix_cache_hits_as_cached_tokens_not_the_transferred_tokens() {
    let mut hits_seen = 0;
    for name in PAIRED {
        for (p, d) in pairs(name) {
            if d.status != 200 {
                continue;
            }
            let kv = p.json()["kv_transfer_params"].clone();
            let pa = answer(&p);
            let da = answer(&d);
            let p_cached = u(&pa.usage["prompt_tokens_details"]["cached_tokens"]);
            assert_eq!(u(&kv["remote_prefill_cached_tokens"]), p_cached);
            // vLLM 0.32 already does what the router's usage rewrite does: D's cached_tokens
            // is P's value (remote_prefill_cached_tokens), in JSON and in the SSE usage chunk.
            assert_eq!(
                u(&da.usage["prompt_tokens_details"]["cached_tokens"]),
                p_cached,
                "{name} {}",
                d.note
            );
            if p_cached > 0 {
                hits_seen += 1;
                assert!(p_cached < u(&kv["remote_num_tokens"]));
            }
        }
    }
    assert!(
        hits_seen >= 2,
        "the recording has D legs whose P hit its own cache"
    );
    // The second identical request: P had the prompt's full blocks cached.
    let ps = pairs("p_prefix_hit");
    let (p2, d2) = &ps[1];
    let full_blocks = u(&answer(p2).usage["prompt_tokens"]) / BLOCK_SIZE * BLOCK_SIZE;
    assert_eq!(
        u(&answer(p2).usage["prompt_tokens_details"]["cached_tokens"]),
        full_blocks
    );
    assert_eq!(
        u(&answer(d2).usage["prompt_tokens_details"]["cached_tokens"]),
        full_blocks
    );
}

#[test]
fn d_answers_never_carry_a_handoff() {
    for name in PAIRED.iter().chain(&["lease_expired", "p_gone"]) {
        for x in scenario(name) {
            if x.engine.starts_with('D') && x.status == 200 && !x.request.is_null() {
                let a = answer(&x);
                assert!(!a.carries_handoff, "{name}: {}", x.note);
                if x.is_sse() {
                    assert!(
                        !x.body.contains("kv_transfer_params"),
                        "SSE chunks have no key"
                    );
                } else {
                    // The key is there, null, as in any vLLM answer.
                    assert!(x.json()["kv_transfer_params"].is_null());
                }
            }
        }
    }
}

#[test]
fn d_streams_as_any_engine_with_usage_last() {
    for name in ["completions_sse", "chat_sse"] {
        let (_, d) = pairs(name).into_iter().next().unwrap();
        assert!(d.is_sse());
        assert_eq!(d.content_type, "text/event-stream; charset=utf-8");
        let events = sse_events(&d.body);
        let usage = &events.last().unwrap()["usage"];
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    }
}

#[test]
fn a_reused_or_expired_handoff_is_served_without_any_sign_of_it() {
    // The same hand-off given to D three times: D reads P's blocks again each time (P has
    // released them after the first read) and answers 200 as if nothing were wrong.
    let xs = scenario("handoff_reused");
    let d_legs: Vec<&Exchange> = xs.iter().filter(|x| x.is_d_leg()).collect();
    assert_eq!(d_legs.len(), 3);
    for d in &d_legs {
        assert_eq!(d.status, 200, "{}", d.note);
        assert_eq!(answer(d).finish_reason, "length");
    }
    // The read after D's cache was reset went to P again.
    assert_eq!(d_legs[2].counter("D", "nixl_xfer_time_seconds_count"), 1);

    // A hand-off used after P's lease ran out (P freed the blocks): D still answers 200.
    let xs = scenario("lease_expired");
    let d = xs.iter().find(|x| x.is_d_leg()).unwrap();
    assert_eq!(d.status, 200);
    assert_eq!(d.counter("D", "nixl_xfer_time_seconds_count"), 1);
    assert_eq!(d.counter("D", "nixl_num_failed_transfers_total"), 0);
}

#[test]
fn when_p_is_gone_d_fails_with_500_or_recomputes_as_configured() {
    let xs = scenario("p_gone");
    let d = xs.iter().find(|x| x.engine == "D" && x.is_d_leg()).unwrap();
    // D (kv_load_failure_policy "fail", vLLM's default, already connected to P): a plain 500
    // before any byte, no retry inside vLLM; the JSON error says nothing about P.
    assert_eq!(d.status, 500);
    assert_eq!(d.content_type, "application/json");
    let e = d.json();
    assert_eq!(e["error"]["code"], 500);
    assert_eq!(e["error"]["type"], "InternalServerError");
    assert!(d.counter("D", "nixl_num_failed_transfers_total") >= 1);
    // D itself is fine afterwards.
    let after = xs
        .iter()
        .find(|x| x.note.starts_with("an ordinary request"))
        .unwrap();
    assert_eq!(after.status, 200);

    // D2 (kv_load_failure_policy "recompute", never connected to P): the handshake with the
    // dead P times out (vLLM waits 5 s), then D2 computes the prompt itself and answers 200,
    // the same text as a D that never had a hand-off, with no cached tokens.
    let d2 = xs.iter().find(|x| x.engine == "D2").unwrap();
    assert!(d2.is_d_leg());
    assert_eq!(d2.status, 200);
    assert!(d2.counter("D2", "nixl_num_failed_transfers_total") >= 1);
    assert_eq!(d2.counter("D2", "nixl_xfer_time_seconds_count"), 0);
    assert!(d2.elapsed_s >= 5.0, "{}", d2.elapsed_s);
    let a = answer(d2);
    assert_eq!(u(&a.usage["prompt_tokens_details"]["cached_tokens"]), 0);
    let reference = xs.last().unwrap();
    assert!(reference.note.starts_with("reference"));
    assert_eq!(a.text, answer(reference).text);
}
