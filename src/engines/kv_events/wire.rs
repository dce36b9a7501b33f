//! vLLM's KV-cache events on the wire: the ZMQ frames and the msgpack `KVEventBatch`.
//!
//! Verified against vLLM's `vllm/distributed/kv_events.py` (the `ZmqEventPublisher`, the
//! msgspec structs `EventBatch`/`KVEventBatch`, `BlockStored`, `BlockRemoved`,
//! `AllBlocksCleared`), in both encodings vLLM has shipped:
//!
//! - **array-like** (early releases, `array_like=True`): a batch is `[ts, events,
//!   data_parallel_rank?]`, an event `["BlockStored", block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
//!   kv_cache_spec_kind, kv_cache_spec_sliding_window]` (the tag first, then the fields in
//!   declaration order; old releases stop after `lora_id`, and trailing fields left at their
//!   default are omitted);
//! - **map** (recent releases): `{"ts", "events", "data_parallel_rank"?}`, each event a map
//!   with its class name under `"type"` and its fields by name (those at their default
//!   omitted).
//!
//! Block hashes are vLLM's `ExternalBlockHash`: an int (older releases, and the builtin hash)
//! or bytes (sha256-based hashes). Unknown fields are ignored; an unknown event type decodes as
//! [`KvEvent::Unknown`]; anything else malformed is a [`WireError`].
//!
//! Frames: the PUB socket sends `[topic, seq as 8 bytes big-endian, payload]`. The replay
//! socket (ROUTER) takes `[identity, "", start seq (8 bytes BE)]` (a DEALER sends `["", start]`)
//! and answers every buffered batch with `seq >= start` as `["", seq, payload]`, then the
//! end-of-sequence marker `["", -1 as 8 bytes BE, ""]`.

use rmpv::ValueRef;

/// The replay socket's end-of-sequence marker: -1 as a signed 8-byte big-endian integer.
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// The deepest nesting accepted in a payload (a batch is 4 levels deep; `extra_keys` more).
const MAX_DEPTH: usize = 32;

/// A block hash as vLLM publishes it (`ExternalBlockHash = bytes | int`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlockHash {
    Int(i128),
    Bytes(Vec<u8>),
}

impl BlockHash {
    /// A 64-bit key for the engine's hash: an int as its low 64 bits, bytes through xxh3.
    /// Only used to find a block again (removals, parents), never compared across engines.
    pub fn key(&self) -> u64 {
        match self {
            BlockHash::Int(i) => *i as u64,
            BlockHash::Bytes(b) => xxhash_rust::xxh3::xxh3_64(b),
        }
    }
}

/// `BlockStored`: blocks the engine computed and cached.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    pub block_hashes: Vec<BlockHash>,
    pub parent_block_hash: Option<BlockHash>,
    /// The token ids of all the blocks, concatenated.
    pub token_ids: Vec<u32>,
    pub block_size: usize,
    /// Deprecated by vLLM in favour of `lora_name`.
    pub lora_id: Option<i64>,
    /// `"GPU"`, `"CPU"`, ...; `None` in releases that predate it (the GPU).
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// Per block, the extra keys of vLLM's hash (multimodal ids, LoRA name, cache salt).
    pub extra_keys: Option<Vec<Option<rmpv::Value>>>,
    /// The KV-cache group (hybrid models have several).
    pub group_idx: Option<u32>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<u64>,
}

/// `BlockRemoved`: blocks evicted from `medium`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    pub block_hashes: Vec<BlockHash>,
    pub medium: Option<String>,
    pub group_idx: Option<u32>,
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    Stored(BlockStored),
    Removed(BlockRemoved),
    /// `AllBlocksCleared`: the engine dropped its whole cache.
    Cleared,
    /// An event type this router does not know (its tag).
    Unknown(String),
}

impl KvEvent {
    /// The event's type name, as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            KvEvent::Stored(_) => "BlockStored",
            KvEvent::Removed(_) => "BlockRemoved",
            KvEvent::Cleared => "AllBlocksCleared",
            KvEvent::Unknown(_) => "unknown",
        }
    }
}

/// `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Seconds since the epoch when the engine made the batch.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

/// Why a frame or payload could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("expected 3 frames [topic, seq, payload], got {0}")]
    FrameCount(usize),
    #[error("the sequence frame is {0} bytes, not 8")]
    SeqLength(usize),
    #[error("not msgpack: {0}")]
    Msgpack(String),
    #[error("{0} bytes after the batch")]
    TrailingBytes(usize),
    #[error("{what}: expected {expected}")]
    Shape {
        what: &'static str,
        expected: &'static str,
    },
    #[error("{event}.{field}: {problem}")]
    Field {
        event: &'static str,
        field: &'static str,
        problem: &'static str,
    },
}

/// One published message: `[topic, seq, payload]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frames<'a> {
    pub topic: &'a [u8],
    pub seq: u64,
    pub payload: &'a [u8],
}

/// Splits a PUB message into its three frames.
pub fn split_frames<B: AsRef<[u8]>>(frames: &[B]) -> Result<Frames<'_>, WireError> {
    let [topic, seq, payload] = frames else {
        return Err(WireError::FrameCount(frames.len()));
    };
    Ok(Frames {
        topic: topic.as_ref(),
        seq: decode_seq(seq.as_ref())?,
        payload: payload.as_ref(),
    })
}

/// An 8-byte big-endian sequence number (vLLM's are non-negative; see [`END_SEQ`]).
pub fn decode_seq(bytes: &[u8]) -> Result<u64, WireError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| WireError::SeqLength(bytes.len()))?;
    Ok(u64::from_be_bytes(arr))
}

/// Decodes a `KVEventBatch` payload in either encoding.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, WireError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| WireError::Msgpack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(WireError::TrailingBytes(rd.len()));
    }
    let fields = Fields::of(&value).ok_or(WireError::Shape {
        what: "batch",
        expected: "a map or an array",
    })?;
    const B: &str = "EventBatch";
    let ts = match fields.get("ts", 0) {
        Some(v) => as_f64(v).ok_or_else(|| field(B, "ts", "not a number"))?,
        None => return Err(field(B, "ts", "missing")),
    };
    let events = match fields.get("events", 1) {
        Some(ValueRef::Array(items)) => items
            .iter()
            .map(decode_event)
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(field(B, "events", "not an array")),
        None => return Err(field(B, "events", "missing")),
    };
    let data_parallel_rank = opt(&fields, B, "data_parallel_rank", 2, as_i64, "not an int")?;
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

fn field(event: &'static str, field: &'static str, problem: &'static str) -> WireError {
    WireError::Field {
        event,
        field,
        problem,
    }
}

/// A struct's fields: by name (map encoding) or by position (array-like encoding, where
/// position 0 of an event is its tag, so event fields start at 1).
enum Fields<'v, 'a> {
    Map(&'v [(ValueRef<'a>, ValueRef<'a>)]),
    Array(&'v [ValueRef<'a>]),
}

impl<'v, 'a> Fields<'v, 'a> {
    fn of(value: &'v ValueRef<'a>) -> Option<Fields<'v, 'a>> {
        match value {
            ValueRef::Map(m) => Some(Fields::Map(m)),
            ValueRef::Array(a) => Some(Fields::Array(a)),
            _ => None,
        }
    }

    /// The field `name` (map) or at `index` (array); `None` when absent.
    fn get(&self, name: &str, index: usize) -> Option<&'v ValueRef<'a>> {
        match self {
            Fields::Map(m) => m
                .iter()
                .find(|(k, _)| matches!(k, ValueRef::String(s) if s.as_str() == Some(name)))
                .map(|(_, v)| v),
            Fields::Array(a) => a.get(index),
        }
    }
}

/// An optional field: absent or nil is `None`.
fn opt<'a, T>(
    fields: &Fields<'_, 'a>,
    event: &'static str,
    name: &'static str,
    index: usize,
    conv: impl Fn(&ValueRef<'a>) -> Option<T>,
    problem: &'static str,
) -> Result<Option<T>, WireError> {
    match fields.get(name, index) {
        None | Some(ValueRef::Nil) => Ok(None),
        Some(v) => conv(v).map(Some).ok_or_else(|| field(event, name, problem)),
    }
}

fn as_f64(v: &ValueRef<'_>) -> Option<f64> {
    match v {
        ValueRef::F64(f) => Some(*f),
        ValueRef::F32(f) => Some(f64::from(*f)),
        ValueRef::Integer(i) => i.as_f64(),
        _ => None,
    }
}

fn as_i64(v: &ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => i.as_i64(),
        _ => None,
    }
}

fn as_u64(v: &ValueRef<'_>) -> Option<u64> {
    match v {
        ValueRef::Integer(i) => i.as_u64(),
        _ => None,
    }
}

fn as_u32(v: &ValueRef<'_>) -> Option<u32> {
    as_u64(v).and_then(|n| u32::try_from(n).ok())
}

fn as_string(v: &ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::String(s) => s.as_str().map(str::to_owned),
        _ => None,
    }
}

fn as_hash(v: &ValueRef<'_>) -> Option<BlockHash> {
    match v {
        ValueRef::Integer(i) => i
            .as_i64()
            .map(i128::from)
            .or_else(|| i.as_u64().map(i128::from))
            .map(BlockHash::Int),
        ValueRef::Binary(b) => Some(BlockHash::Bytes(b.to_vec())),
        _ => None,
    }
}

fn hashes(
    fields: &Fields<'_, '_>,
    event: &'static str,
    index: usize,
) -> Result<Vec<BlockHash>, WireError> {
    match fields.get("block_hashes", index) {
        Some(ValueRef::Array(items)) => items
            .iter()
            .map(|v| as_hash(v).ok_or_else(|| field(event, "block_hashes", "not an int or bytes")))
            .collect(),
        Some(_) => Err(field(event, "block_hashes", "not an array")),
        None => Err(field(event, "block_hashes", "missing")),
    }
}

/// The event's tag and fields.
fn tagged<'v, 'a>(value: &'v ValueRef<'a>) -> Result<(&'v str, Fields<'v, 'a>), WireError> {
    let fields = Fields::of(value).ok_or(WireError::Shape {
        what: "event",
        expected: "a map or an array",
    })?;
    let tag = match &fields {
        Fields::Map(_) => fields.get("type", 0),
        Fields::Array(a) => a.first(),
    };
    match tag {
        Some(ValueRef::String(s)) => match s.as_str() {
            Some(t) => Ok((t, fields)),
            None => Err(field("event", "type", "not UTF-8")),
        },
        _ => Err(field("event", "type", "missing (no tag string)")),
    }
}

fn decode_event(value: &ValueRef<'_>) -> Result<KvEvent, WireError> {
    let (tag, f) = tagged(value)?;
    match tag {
        "BlockStored" => {
            const E: &str = "BlockStored";
            let token_ids = match f.get("token_ids", 3) {
                Some(ValueRef::Array(items)) => items
                    .iter()
                    .map(|v| as_u32(v).ok_or_else(|| field(E, "token_ids", "not a u32")))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(_) => return Err(field(E, "token_ids", "not an array")),
                None => return Err(field(E, "token_ids", "missing")),
            };
            let block_size = match f.get("block_size", 4) {
                Some(ValueRef::Integer(i)) => i.as_u64(),
                // The first releases sent `num_toks_per_block`, a list, in this position.
                Some(ValueRef::Array(a)) => a.first().and_then(as_u64),
                _ => None,
            }
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| field(E, "block_size", "missing or not a positive int"))?;
            let extra_keys = match f.get("extra_keys", 8) {
                None | Some(ValueRef::Nil) => None,
                Some(ValueRef::Array(items)) => Some(
                    items
                        .iter()
                        .map(|v| match v {
                            ValueRef::Nil => None,
                            v => Some(v.to_owned()),
                        })
                        .collect(),
                ),
                Some(_) => return Err(field(E, "extra_keys", "not an array")),
            };
            Ok(KvEvent::Stored(BlockStored {
                block_hashes: hashes(&f, E, 1)?,
                parent_block_hash: opt(&f, E, "parent_block_hash", 2, as_hash, "not a hash")?,
                token_ids,
                block_size,
                lora_id: opt(&f, E, "lora_id", 5, as_i64, "not an int")?,
                medium: opt(&f, E, "medium", 6, as_string, "not a string")?,
                lora_name: opt(&f, E, "lora_name", 7, as_string, "not a string")?,
                extra_keys,
                group_idx: opt(&f, E, "group_idx", 9, as_u32, "not a u32")?,
                kv_cache_spec_kind: opt(
                    &f,
                    E,
                    "kv_cache_spec_kind",
                    10,
                    as_string,
                    "not a string",
                )?,
                kv_cache_spec_sliding_window: opt(
                    &f,
                    E,
                    "kv_cache_spec_sliding_window",
                    11,
                    as_u64,
                    "not an int",
                )?,
            }))
        }
        "BlockRemoved" => {
            const E: &str = "BlockRemoved";
            Ok(KvEvent::Removed(BlockRemoved {
                block_hashes: hashes(&f, E, 1)?,
                medium: opt(&f, E, "medium", 2, as_string, "not a string")?,
                group_idx: opt(&f, E, "group_idx", 3, as_u32, "not a u32")?,
            }))
        }
        "AllBlocksCleared" => Ok(KvEvent::Cleared),
        other => Ok(KvEvent::Unknown(other.to_owned())),
    }
}
