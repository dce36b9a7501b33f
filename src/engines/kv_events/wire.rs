//! vLLM's KV-cache events on the wire: the ZMQ frames and the msgpack `KVEventBatch`.
//!
//! Verified against vLLM's `vllm/distributed/kv_events.py` (the `ZmqEventPublisher`, the
//! msgspec structs `EventBatch`/`KVEventBatch`, `BlockStored`, `BlockRemoved`,
//! `AllBlocksCleared`) at two revisions, commit `b4e69e0a` (array-like, int hashes, no
//! `medium`) and commit `0181ea31` (maps, `ExternalBlockHash`, `lora_name`, `extra_keys`,
//! `group_idx`, `kv_cache_spec_*`, `data_parallel_rank`), in both encodings vLLM has shipped:
//!
//! - **array-like** (early releases, `array_like=True`): a batch is `[ts, events,
//!   data_parallel_rank?]`, an event `["BlockStored", block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
//!   kv_cache_spec_kind, kv_cache_spec_sliding_window]` (the tag first, then the fields in
//!   declaration order; msgspec writes them all, and older releases have fewer: the first
//!   stop after `lora_id`, so missing trailing fields are taken as unset);
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
//! and answers every buffered batch with `seq >= start`, then the end-of-sequence marker (-1 as
//! 8 bytes BE): as `["", topic, seq, payload]` and `["", "", -1, ""]` in vLLM 0.32, as
//! `["", seq, payload]` and `["", -1, ""]` before (both read by the replay client).

use super::msgpack::{ReadError, Reader, Tok};

/// The replay socket's end-of-sequence marker: -1 as a signed 8-byte big-endian integer.
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

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

impl From<ReadError> for WireError {
    fn from(e: ReadError) -> WireError {
        WireError::Msgpack(e.0)
    }
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
    let mut rd = Reader { buf: payload };
    let mut ts = None;
    let mut events = None;
    let mut data_parallel_rank = None;
    const B: &str = "EventBatch";
    let fields = fields(&mut rd, "batch")?;
    for at in 0..fields.len() {
        let Some(index) = fields.field(&mut rd, at, &["ts", "events", "data_parallel_rank"])?
        else {
            continue;
        };
        let tok = rd.next()?;
        match index {
            0 => ts = Some(as_f64(tok).ok_or_else(|| field(B, "ts", "not a number"))?),
            1 => {
                let Tok::Array(n) = tok else {
                    return Err(field(B, "events", "not an array"));
                };
                let mut v = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    v.push(decode_event(&mut rd)?);
                }
                events = Some(v);
            }
            2 => data_parallel_rank = opt(tok, B, "data_parallel_rank", as_i64, "not an int")?,
            _ => rd.skip(tok)?,
        }
    }
    if !rd.buf.is_empty() {
        return Err(WireError::TrailingBytes(rd.buf.len()));
    }
    Ok(EventBatch {
        ts: ts.ok_or_else(|| field(B, "ts", "missing"))?,
        events: events.ok_or_else(|| field(B, "events", "missing"))?,
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

/// A struct's fields: `len` pairs (map encoding, fields by name) or `len` items (array-like
/// encoding, fields by position).
struct Fields {
    map: bool,
    len: usize,
    /// Positions before the first field (an event's tag in array-like encoding).
    skip: usize,
}

fn fields(rd: &mut Reader<'_>, what: &'static str) -> Result<Fields, WireError> {
    match rd.next()? {
        Tok::Map(len) => Ok(Fields {
            map: true,
            len,
            skip: 0,
        }),
        Tok::Array(len) => Ok(Fields {
            map: false,
            len,
            skip: 0,
        }),
        _ => Err(WireError::Shape {
            what,
            expected: "a map or an array",
        }),
    }
}

impl Fields {
    fn len(&self) -> usize {
        self.len
    }

    /// Positions the reader on the value of field `at` and returns its index in `names`, or
    /// `None` (value skipped) for an unknown name or a position past `names`.
    fn field(
        &self,
        rd: &mut Reader<'_>,
        at: usize,
        names: &[&str],
    ) -> Result<Option<usize>, WireError> {
        if self.map {
            let key = rd.next()?;
            let index = match key {
                Tok::Str(k) => names.iter().position(|n| n.as_bytes() == k),
                _ => None,
            };
            if index.is_none() {
                let v = rd.next()?;
                rd.skip(v)?;
            }
            Ok(index)
        } else {
            let index = at.checked_sub(self.skip).filter(|i| *i < names.len());
            if index.is_none() {
                let v = rd.next()?;
                rd.skip(v)?;
            }
            Ok(index)
        }
    }
}

/// An optional field: nil is `None`.
fn opt<'a, T>(
    tok: Tok<'a>,
    event: &'static str,
    name: &'static str,
    conv: impl Fn(Tok<'a>) -> Option<T>,
    problem: &'static str,
) -> Result<Option<T>, WireError> {
    match tok {
        Tok::Nil => Ok(None),
        t => conv(t).map(Some).ok_or_else(|| field(event, name, problem)),
    }
}

fn as_f64(t: Tok<'_>) -> Option<f64> {
    match t {
        Tok::Float(f) => Some(f),
        Tok::Int(i) => Some(i as f64),
        _ => None,
    }
}

fn as_i64(t: Tok<'_>) -> Option<i64> {
    match t {
        Tok::Int(i) => i64::try_from(i).ok(),
        _ => None,
    }
}

fn as_u64(t: Tok<'_>) -> Option<u64> {
    match t {
        Tok::Int(i) => u64::try_from(i).ok(),
        _ => None,
    }
}

fn as_u32(t: Tok<'_>) -> Option<u32> {
    match t {
        Tok::Int(i) => u32::try_from(i).ok(),
        _ => None,
    }
}

fn as_string(t: Tok<'_>) -> Option<String> {
    match t {
        Tok::Str(s) => std::str::from_utf8(s).ok().map(str::to_owned),
        _ => None,
    }
}

fn as_hash(t: Tok<'_>) -> Option<BlockHash> {
    match t {
        Tok::Int(i) => Some(BlockHash::Int(i)),
        Tok::Bin(b) => Some(BlockHash::Bytes(b.to_vec())),
        _ => None,
    }
}

fn hashes(
    rd: &mut Reader<'_>,
    tok: Tok<'_>,
    event: &'static str,
) -> Result<Vec<BlockHash>, WireError> {
    let Tok::Array(n) = tok else {
        return Err(field(event, "block_hashes", "not an array"));
    };
    let mut v = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let t = rd.next()?;
        v.push(as_hash(t).ok_or_else(|| field(event, "block_hashes", "not an int or bytes"))?);
    }
    Ok(v)
}

const STORED: [&str; 11] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];
const REMOVED: [&str; 3] = ["block_hashes", "medium", "group_idx"];

/// The event's tag: the first item (array-like), or the `"type"` entry wherever it is in the
/// map (looked up ahead, the reader left where it was).
fn tag<'a>(rd: &mut Reader<'a>, f: &Fields) -> Result<&'a [u8], WireError> {
    let missing = || field("event", "type", "missing (no tag string)");
    if !f.map {
        if f.len == 0 {
            return Err(missing());
        }
        return match rd.next()? {
            Tok::Str(t) => Ok(t),
            _ => Err(missing()),
        };
    }
    let mut ahead = *rd;
    for _ in 0..f.len {
        let k = ahead.next()?;
        let v = ahead.next()?;
        match (k, v) {
            (Tok::Str(b"type"), Tok::Str(t)) => return Ok(t),
            (_, v) => ahead.skip(v)?,
        }
    }
    Err(missing())
}

fn decode_event(rd: &mut Reader<'_>) -> Result<KvEvent, WireError> {
    let mut f = fields(rd, "event")?;
    let tag = tag(rd, &f)?;
    if !f.map {
        f.skip = 1;
    }
    let start = if f.map { 0 } else { 1 };
    match tag {
        b"BlockStored" => {
            const E: &str = "BlockStored";
            let mut s = BlockStored::default();
            let (mut have_hashes, mut have_tokens, mut have_size) = (false, false, false);
            for at in start..f.len() {
                let Some(i) = f.field(rd, at, &STORED)? else {
                    continue;
                };
                let tok = rd.next()?;
                match i {
                    0 => {
                        s.block_hashes = hashes(rd, tok, E)?;
                        have_hashes = true;
                    }
                    1 => s.parent_block_hash = opt(tok, E, STORED[1], as_hash, "not a hash")?,
                    2 => {
                        let Tok::Array(n) = tok else {
                            return Err(field(E, "token_ids", "not an array"));
                        };
                        s.token_ids.reserve(n.min(1 << 20));
                        for _ in 0..n {
                            let t = rd.next()?;
                            s.token_ids
                                .push(as_u32(t).ok_or_else(|| field(E, "token_ids", "not a u32"))?);
                        }
                        have_tokens = true;
                    }
                    3 => {
                        let size = match tok {
                            Tok::Int(_) => as_u64(tok),
                            // The first releases sent `num_toks_per_block`, a list, here.
                            Tok::Array(n) => {
                                let mut first = None;
                                for k in 0..n {
                                    let t = rd.next()?;
                                    if k == 0 {
                                        first = as_u64(t);
                                    }
                                    rd.skip(t)?;
                                }
                                first
                            }
                            other => {
                                rd.skip(other)?;
                                None
                            }
                        };
                        s.block_size = size
                            .and_then(|n| usize::try_from(n).ok())
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                field(E, "block_size", "missing or not a positive int")
                            })?;
                        have_size = true;
                    }
                    4 => s.lora_id = opt(tok, E, STORED[4], as_i64, "not an int")?,
                    5 => s.medium = opt(tok, E, STORED[5], as_string, "not a string")?,
                    6 => s.lora_name = opt(tok, E, STORED[6], as_string, "not a string")?,
                    7 => {
                        s.extra_keys = match tok {
                            Tok::Nil => None,
                            Tok::Array(n) => {
                                let mut keys = Vec::with_capacity(n.min(4096));
                                for _ in 0..n {
                                    let v = rd.value()?;
                                    keys.push((!v.is_nil()).then_some(v));
                                }
                                Some(keys)
                            }
                            _ => return Err(field(E, "extra_keys", "not an array")),
                        }
                    }
                    8 => s.group_idx = opt(tok, E, STORED[8], as_u32, "not a u32")?,
                    9 => s.kv_cache_spec_kind = opt(tok, E, STORED[9], as_string, "not a string")?,
                    _ => {
                        s.kv_cache_spec_sliding_window =
                            opt(tok, E, STORED[10], as_u64, "not an int")?
                    }
                }
            }
            for (have, name) in [
                (have_hashes, "block_hashes"),
                (have_tokens, "token_ids"),
                (have_size, "block_size"),
            ] {
                if !have {
                    return Err(field(E, name, "missing"));
                }
            }
            Ok(KvEvent::Stored(s))
        }
        b"BlockRemoved" => {
            const E: &str = "BlockRemoved";
            let mut r = BlockRemoved::default();
            let mut have_hashes = false;
            for at in start..f.len() {
                let Some(i) = f.field(rd, at, &REMOVED)? else {
                    continue;
                };
                let tok = rd.next()?;
                match i {
                    0 => {
                        r.block_hashes = hashes(rd, tok, E)?;
                        have_hashes = true;
                    }
                    1 => r.medium = opt(tok, E, REMOVED[1], as_string, "not a string")?,
                    _ => r.group_idx = opt(tok, E, REMOVED[2], as_u32, "not a u32")?,
                }
            }
            if !have_hashes {
                return Err(field(E, "block_hashes", "missing"));
            }
            Ok(KvEvent::Removed(r))
        }
        other => {
            for at in start..f.len() {
                f.field(rd, at, &[])?;
            }
            Ok(match other {
                b"AllBlocksCleared" => KvEvent::Cleared,
                t => KvEvent::Unknown(String::from_utf8_lossy(t).into_owned()),
            })
        }
    }
}
