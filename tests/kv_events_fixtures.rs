//! vLLM KV-event payloads written by an independent encoder (Python msgspec with structs that
//! mirror vLLM's, `tests/fixtures/kv_events/gen_kv_events.py`) decode to what the generator
//! says, in every encoding; malformed ones are typed errors.

use std::path::PathBuf;

use serde_json::{Value, json};
use switchyard::engines::kv_events::encode::{Encoding, encode_batch};
use switchyard::engines::kv_events::wire::{BlockHash, EventBatch, KvEvent, decode_batch};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kv_events")
}

fn hash(h: &BlockHash) -> Value {
    match h {
        BlockHash::Int(i) => json!({ "int": serde_json::Number::from_i128(*i) }),
        BlockHash::Bytes(b) => {
            json!({ "bytes": b.iter().map(|x| format!("{x:02x}")).collect::<String>() })
        }
    }
}

fn plain(v: &rmpv::Value) -> Value {
    match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => json!(b),
        rmpv::Value::Integer(i) => i.as_i64().map_or_else(|| json!(i.as_u64()), |n| json!(n)),
        rmpv::Value::String(s) => json!(s.as_str()),
        rmpv::Value::Array(a) => Value::Array(a.iter().map(plain).collect()),
        other => json!(other.to_string()),
    }
}

fn as_json(b: &EventBatch) -> Value {
    let events: Vec<Value> = b
        .events
        .iter()
        .map(|e| match e {
            KvEvent::Stored(s) => json!({
                "type": "BlockStored",
                "block_hashes": s.block_hashes.iter().map(hash).collect::<Vec<_>>(),
                "parent_block_hash": s.parent_block_hash.as_ref().map(hash),
                "token_ids": s.token_ids,
                "block_size": s.block_size,
                "lora_id": s.lora_id,
                "medium": s.medium,
                "lora_name": s.lora_name,
                "extra_keys": s.extra_keys.as_ref().map(|k| k.iter().map(|x| x.as_ref().map_or(Value::Null, plain)).collect::<Vec<_>>()),
                "group_idx": s.group_idx,
                "kv_cache_spec_kind": s.kv_cache_spec_kind,
                "kv_cache_spec_sliding_window": s.kv_cache_spec_sliding_window,
            }),
            KvEvent::Removed(r) => json!({
                "type": "BlockRemoved",
                "block_hashes": r.block_hashes.iter().map(hash).collect::<Vec<_>>(),
                "medium": r.medium,
                "group_idx": r.group_idx,
            }),
            KvEvent::Cleared => json!({ "type": "AllBlocksCleared" }),
            KvEvent::Unknown(tag) => json!({ "type": "unknown", "tag": tag }),
        })
        .collect();
    json!({ "ts": b.ts, "data_parallel_rank": b.data_parallel_rank, "events": events })
}

#[test]
fn every_fixture_decodes_to_what_the_independent_encoder_wrote() {
    let expected: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(dir().join("expected.json")).expect("expected.json"),
    )
    .expect("expected.json is JSON");
    let on_disk = std::fs::read_dir(dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "bin")
        })
        .count();
    assert_eq!(on_disk, expected.len(), "every .bin is in expected.json");
    assert!(expected.len() >= 15);
    for (file, want) in &expected {
        let payload = std::fs::read(dir().join(file)).expect(file);
        let got = decode_batch(&payload);
        if want.get("error").is_some() {
            assert!(got.is_err(), "{file} must not decode: {got:?}");
            continue;
        }
        let batch = got.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(&as_json(&batch), want, "{file}");
        // Our encoder writes what decodes to the same batch, in both encodings.
        for enc in [Encoding::Map, Encoding::Array] {
            assert_eq!(decode_batch(&encode_batch(&batch, enc)).unwrap(), batch);
        }
    }
}

#[test]
fn the_encoder_writes_what_msgspec_writes() {
    // The current structs, map-encoded: byte for byte (msgspec's field order and
    // omit_defaults). The array-like fixtures come from older struct versions with fewer
    // fields, which the encoder (current fields only) does not reproduce.
    for (file, enc) in [
        ("new_map_bytes_hashes_all_fields.bin", Encoding::Map),
        ("new_map_int_hashes_defaults_omitted.bin", Encoding::Map),
        ("new_map_empty_batch.bin", Encoding::Map),
    ] {
        let payload = std::fs::read(dir().join(file)).unwrap();
        let batch = decode_batch(&payload).unwrap();
        assert_eq!(encode_batch(&batch, enc), payload, "{file}");
    }
}
