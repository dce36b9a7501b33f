//! The encoder of [`super::wire`]'s batches, as msgspec writes them (`omit_defaults=True`):
//! used by the simulated engine's publisher and by tests.

use rmp::encode as w;

use super::wire::{BlockHash, BlockRemoved, BlockStored, EventBatch, KvEvent};

/// Which of vLLM's encodings to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Structs as maps with a `"type"` tag (recent vLLM releases).
    Map,
    /// Structs as arrays with the tag first (`array_like=True`, early releases).
    Array,
}

// Writes into a `Vec<u8>` cannot fail: the results of the `rmp::encode` calls below are
// discarded on purpose.

fn str(out: &mut Vec<u8>, s: &str) {
    let _ = w::write_str(out, s);
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => str(out, s),
        None => nil(out),
    }
}

fn nil(out: &mut Vec<u8>) {
    let _ = w::write_nil(out);
}

fn int(out: &mut Vec<u8>, i: i128) {
    if i >= 0 {
        let _ = w::write_uint(out, i as u64);
    } else {
        let _ = w::write_sint(out, i as i64);
    }
}

fn opt_int(out: &mut Vec<u8>, i: Option<i128>) {
    match i {
        Some(i) => int(out, i),
        None => nil(out),
    }
}

fn hash(out: &mut Vec<u8>, h: &BlockHash) {
    match h {
        BlockHash::Int(i) => int(out, *i),
        BlockHash::Bytes(b) => {
            let _ = w::write_bin(out, b);
        }
    }
}

fn hashes(out: &mut Vec<u8>, hs: &[BlockHash]) {
    let _ = w::write_array_len(out, hs.len() as u32);
    for h in hs {
        hash(out, h);
    }
}

fn extra_keys(out: &mut Vec<u8>, keys: &Option<Vec<Option<rmpv::Value>>>) {
    match keys {
        None => nil(out),
        Some(keys) => {
            let _ = w::write_array_len(out, keys.len() as u32);
            for k in keys {
                match k {
                    Some(v) => {
                        let _ = rmpv::encode::write_value(out, v);
                    }
                    None => nil(out),
                }
            }
        }
    }
}

/// Encodes `batch` as vLLM's publisher does (`msgspec.msgpack.Encoder().encode(batch)`).
pub fn encode_batch(batch: &EventBatch, encoding: Encoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + batch.events.len() * 128);
    let dp = batch.data_parallel_rank.is_some();
    match encoding {
        Encoding::Map => {
            let _ = w::write_map_len(&mut out, 2 + u32::from(dp));
            str(&mut out, "ts");
        }
        Encoding::Array => {
            let _ = w::write_array_len(&mut out, 2 + u32::from(dp));
        }
    }
    let _ = w::write_f64(&mut out, batch.ts);
    if encoding == Encoding::Map {
        str(&mut out, "events");
    }
    let _ = w::write_array_len(&mut out, batch.events.len() as u32);
    for e in &batch.events {
        encode_event(&mut out, e, encoding);
    }
    if let Some(rank) = batch.data_parallel_rank {
        if encoding == Encoding::Map {
            str(&mut out, "data_parallel_rank");
        }
        int(&mut out, i128::from(rank));
    }
    out
}

/// A struct's fields in declaration order: name, whether it has a default (omitted when at
/// it), whether it is at its default, and its writer.
type Field<'a> = (&'static str, bool, bool, Box<dyn Fn(&mut Vec<u8>) + 'a>);

fn write_struct(out: &mut Vec<u8>, tag: &str, fields: Vec<Field<'_>>, encoding: Encoding) {
    match encoding {
        Encoding::Map => {
            let kept: Vec<&Field<'_>> = fields.iter().filter(|f| !(f.1 && f.2)).collect();
            let _ = w::write_map_len(out, 1 + kept.len() as u32);
            str(out, "type");
            str(out, tag);
            for (name, _, _, write) in kept {
                str(out, name);
                write(out);
            }
        }
        Encoding::Array => {
            // Trailing fields at their default are omitted.
            let len = fields
                .iter()
                .rposition(|f| !(f.1 && f.2))
                .map_or(0, |i| i + 1);
            let _ = w::write_array_len(out, 1 + len as u32);
            str(out, tag);
            for (_, _, _, write) in &fields[..len] {
                write(out);
            }
        }
    }
}

fn encode_event(out: &mut Vec<u8>, event: &KvEvent, encoding: Encoding) {
    match event {
        KvEvent::Stored(s) => encode_stored(out, s, encoding),
        KvEvent::Removed(r) => encode_removed(out, r, encoding),
        KvEvent::Cleared => write_struct(out, "AllBlocksCleared", Vec::new(), encoding),
        KvEvent::Unknown(tag) => write_struct(out, tag, Vec::new(), encoding),
    }
}

fn encode_stored(out: &mut Vec<u8>, s: &BlockStored, encoding: Encoding) {
    let fields: Vec<Field<'_>> = vec![
        (
            "block_hashes",
            false,
            false,
            Box::new(|o| hashes(o, &s.block_hashes)),
        ),
        (
            "parent_block_hash",
            false,
            false,
            Box::new(|o| match &s.parent_block_hash {
                Some(h) => hash(o, h),
                None => nil(o),
            }),
        ),
        (
            "token_ids",
            false,
            false,
            Box::new(|o| {
                let _ = w::write_array_len(o, s.token_ids.len() as u32);
                for t in &s.token_ids {
                    let _ = w::write_uint(o, u64::from(*t));
                }
            }),
        ),
        (
            "block_size",
            false,
            false,
            Box::new(|o| int(o, s.block_size as i128)),
        ),
        (
            "lora_id",
            false,
            false,
            Box::new(|o| opt_int(o, s.lora_id.map(i128::from))),
        ),
        (
            "medium",
            false,
            false,
            Box::new(|o| opt_str(o, s.medium.as_deref())),
        ),
        (
            "lora_name",
            false,
            false,
            Box::new(|o| opt_str(o, s.lora_name.as_deref())),
        ),
        (
            "extra_keys",
            true,
            s.extra_keys.is_none(),
            Box::new(|o| extra_keys(o, &s.extra_keys)),
        ),
        (
            "group_idx",
            true,
            s.group_idx.is_none(),
            Box::new(|o| opt_int(o, s.group_idx.map(i128::from))),
        ),
        (
            "kv_cache_spec_kind",
            true,
            s.kv_cache_spec_kind.is_none(),
            Box::new(|o| opt_str(o, s.kv_cache_spec_kind.as_deref())),
        ),
        (
            "kv_cache_spec_sliding_window",
            true,
            s.kv_cache_spec_sliding_window.is_none(),
            Box::new(|o| opt_int(o, s.kv_cache_spec_sliding_window.map(i128::from))),
        ),
    ];
    write_struct(out, "BlockStored", fields, encoding);
}

fn encode_removed(out: &mut Vec<u8>, r: &BlockRemoved, encoding: Encoding) {
    let fields: Vec<Field<'_>> = vec![
        (
            "block_hashes",
            false,
            false,
            Box::new(|o| hashes(o, &r.block_hashes)),
        ),
        (
            "medium",
            false,
            false,
            Box::new(|o| opt_str(o, r.medium.as_deref())),
        ),
        (
            "group_idx",
            true,
            r.group_idx.is_none(),
            Box::new(|o| opt_int(o, r.group_idx.map(i128::from))),
        ),
    ];
    write_struct(out, "BlockRemoved", fields, encoding);
}

#[cfg(test)]
mod tests {
    use super::super::wire::{WireError, decode_batch};
    use super::*;

    fn sample() -> EventBatch {
        EventBatch {
            ts: 1.5,
            events: vec![
                KvEvent::Stored(BlockStored {
                    block_hashes: vec![BlockHash::Bytes(vec![1; 32]), BlockHash::Int(-5)],
                    parent_block_hash: Some(BlockHash::Int(u64::MAX as i128)),
                    token_ids: (0..8).collect(),
                    block_size: 4,
                    lora_id: Some(3),
                    medium: Some("GPU".into()),
                    lora_name: Some("sql".into()),
                    extra_keys: Some(vec![None, Some(rmpv::Value::from("salt"))]),
                    group_idx: Some(1),
                    kv_cache_spec_kind: Some("full_attention".into()),
                    kv_cache_spec_sliding_window: None,
                }),
                KvEvent::Stored(BlockStored {
                    block_hashes: vec![BlockHash::Int(7)],
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 4,
                    ..BlockStored::default()
                }),
                KvEvent::Removed(BlockRemoved {
                    block_hashes: vec![BlockHash::Int(7)],
                    medium: None,
                    group_idx: None,
                }),
                KvEvent::Cleared,
                KvEvent::Unknown("BlockMoved".into()),
            ],
            data_parallel_rank: Some(2),
        }
    }

    #[test]
    fn both_encodings_round_trip() {
        for enc in [Encoding::Map, Encoding::Array] {
            let b = sample();
            assert_eq!(decode_batch(&encode_batch(&b, enc)).unwrap(), b, "{enc:?}");
            let plain = EventBatch {
                data_parallel_rank: None,
                ..sample()
            };
            assert_eq!(decode_batch(&encode_batch(&plain, enc)).unwrap(), plain);
        }
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let good = encode_batch(&sample(), Encoding::Map);
        assert!(matches!(
            decode_batch(&good[..good.len() - 3]),
            Err(WireError::Msgpack(_))
        ));
        let mut extra = good.clone();
        extra.push(0xc0);
        assert_eq!(decode_batch(&extra), Err(WireError::TrailingBytes(1)));
        assert!(matches!(
            decode_batch(&[0x05]),
            Err(WireError::Shape { .. })
        ));
        assert!(decode_batch(&[]).is_err());
    }
}
