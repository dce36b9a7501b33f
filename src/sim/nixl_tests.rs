//! The connector's parameters and the hand-off's shape.

use super::*;
use serde_json::json;

fn params(v: serde_json::Value) -> TransferParams {
    serde_json::from_value(v).unwrap()
}

#[test]
fn the_routers_p_leg_parameters_ask_for_a_prefill() {
    // Rule 1 of the protocol, as the router sends it.
    let p = params(json!({
        "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null
    }));
    assert_eq!(p.leg(), Leg::Prefill);
    assert_eq!(params(json!({})).leg(), Leg::None);
    assert_eq!(params(json!({"do_remote_decode": false})).leg(), Leg::None);
}

#[test]
fn a_d_leg_needs_every_remote_field_and_some_blocks() {
    let full = json!({
        "do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [[4, 5]], "remote_engine_id": "e", "remote_request_id": "r",
        "remote_host": "127.0.0.1", "remote_port": 9, "remote_num_tokens": 20,
        "tp_size": 1, "transfer_mode": "pull"
    });
    assert_eq!(
        params(full.clone()).leg(),
        Leg::Decode(RemoteBlocks {
            engine_id: "e".into(),
            request_id: "r".into(),
            block_ids: json!([[4, 5]]),
            host: "127.0.0.1".into(),
            port: 9,
            num_tokens: Some(20),
            prefill_cached_tokens: None,
        })
    );
    for missing in [
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
        "remote_block_ids",
    ] {
        let mut v = full.clone();
        v.as_object_mut().unwrap().remove(missing);
        assert_eq!(params(v).leg(), Leg::None, "without {missing}");
    }
    let mut v = full;
    v["remote_block_ids"] = json!([]);
    assert_eq!(params(v).leg(), Leg::None);
}

#[test]
fn a_hand_off_has_vllm_032s_fields_in_pull_mode() {
    let h = HandOff::new(
        "0a1b2c3d-0000-4000-8000-000000000000",
        "cmpl-1",
        "127.0.0.1:8100".parse().unwrap(),
        vec![7, 8, 9],
        40,
        32,
    );
    assert_eq!(
        serde_json::to_value(&h).unwrap(),
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": [[7, 8, 9]],
            "remote_engine_id": "0a1b2c3d-0000-4000-8000-000000000000",
            "remote_request_id": "cmpl-1",
            "remote_host": "127.0.0.1",
            "remote_port": 8100,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": 40,
            "remote_blocks_expiry_time": null,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": 32
        })
    );
    // Field order as vLLM 0.32's (tests/fixtures/vllm-0.32.0/pd/completions_json.json).
    let text = serde_json::to_string(&h).unwrap();
    let keys: Vec<&str> = text
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|k| {
            k.starts_with("remote_")
                || k.starts_with("do_")
                || k.ends_with("_size")
                || *k == "transfer_mode"
        })
        .collect();
    assert_eq!(
        keys,
        [
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
            "remote_prefill_cached_tokens"
        ]
    );
    // D reads it back as a D leg naming the same blocks.
    let back = params(serde_json::to_value(&h).unwrap());
    let Leg::Decode(remote) = back.leg() else {
        panic!("not a D leg");
    };
    assert_eq!(flat_block_ids(&remote.block_ids), Some(vec![7, 8, 9]));
}

#[test]
fn block_ids_are_read_per_group_or_flat() {
    assert_eq!(flat_block_ids(&json!([[1, 2], [3]])), Some(vec![1, 2, 3]));
    assert_eq!(flat_block_ids(&json!([1, 2])), Some(vec![1, 2]));
    assert_eq!(flat_block_ids(&json!(["x"])), None);
    assert_eq!(flat_block_ids(&json!({"a": 1})), None);
}

#[test]
fn engine_ids_are_uuid_shaped_and_differ() {
    let (a, b) = (new_engine_id(), new_engine_id());
    assert_ne!(a, b);
    let parts: Vec<usize> = a.split('-').map(str::len).collect();
    assert_eq!(parts, vec![8, 4, 4, 4, 12], "{a}");
    assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
}
