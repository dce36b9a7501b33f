//! The simulated engine as a prefill (P) or decode (D) engine of vLLM 0.32's NixlConnector in
//! pull mode (`vllm/distributed/kv_transfer/kv_connector/v1/nixl/pull_scheduler.py`):
//!
//! * the engine's role ([`KvRole`], `--kv-role`) and what it does when a load fails
//!   ([`KvLoadFailurePolicy`], vLLM's `kv_load_failure_policy`);
//! * a request's `kv_transfer_params` ([`TransferParams`]): `do_remote_decode` makes it a P
//!   leg, `do_remote_prefill` with the remote fields a D leg;
//! * the hand-off a P leg answers with ([`HandOff`], vLLM's `request_finished` dict);
//! * the side channel D reads P's blocks over: `POST /sim/nixl/read` ([`ReadRequest`],
//!   [`ReadAnswer`]; the sim's stand-in for NIXL's handshake and RDMA read), and D's client
//!   of it ([`read_remote`]).
//!
//! The blocks P holds and their leases are in `leases.rs`, kept by the engine loop's state.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};

use crate::upstream::HttpClient;

/// The route P answers D's reads on.
pub const READ_PATH: &str = "/sim/nixl/read";

/// The engine's KV-transfer role (vLLM's `kv_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvRole {
    /// Prefill engine: hands off the KV blocks of `do_remote_decode` requests.
    #[value(name = "producer", alias = "kv_producer")]
    Producer,
    /// Decode engine: loads the KV blocks of `do_remote_prefill` requests from P.
    #[value(name = "consumer", alias = "kv_consumer")]
    Consumer,
    /// Both.
    #[value(name = "both", alias = "kv_both")]
    Both,
}

/// What D does when it cannot load a hand-off's blocks (vLLM's `kv_load_failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvLoadFailurePolicy {
    /// The request fails (500 `Internal server error`; in a stream, an error event): vLLM
    /// 0.32's default.
    #[default]
    Fail,
    /// The request computes its prompt itself.
    Recompute,
}

/// The `kv_transfer_params` of a request, as far as the connector reads them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TransferParams {
    #[serde(default)]
    pub do_remote_decode: Option<bool>,
    #[serde(default)]
    pub do_remote_prefill: Option<bool>,
    #[serde(default)]
    pub remote_engine_id: Option<String>,
    #[serde(default)]
    pub remote_request_id: Option<String>,
    #[serde(default)]
    pub remote_block_ids: Option<serde_json::Value>,
    #[serde(default)]
    pub remote_host: Option<String>,
    #[serde(default)]
    pub remote_port: Option<u16>,
    #[serde(default)]
    pub remote_num_tokens: Option<usize>,
    #[serde(default)]
    pub remote_prefill_cached_tokens: Option<usize>,
}

/// What a request asks of the connector.
#[derive(Debug, Clone, PartialEq)]
pub enum Leg {
    /// No hand-off either way.
    None,
    /// A P leg: prefill, answer, and hold the blocks for D.
    Prefill,
    /// A D leg: load the prompt's KV from P, then decode.
    Decode(RemoteBlocks),
}

/// Where a D leg's blocks are.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBlocks {
    pub engine_id: String,
    pub request_id: String,
    pub block_ids: serde_json::Value,
    pub host: String,
    pub port: u16,
    /// Tokens P computed (`remote_num_tokens`; absent: the whole prompt).
    pub num_tokens: Option<usize>,
    /// P's own prefix-cache hit (`remote_prefill_cached_tokens`), which D reports as its
    /// `cached_tokens`.
    pub prefill_cached_tokens: Option<usize>,
}

impl TransferParams {
    /// The leg these parameters ask for. A `do_remote_prefill` without every remote field is
    /// no D leg (vLLM logs "Got invalid KVTransferParams" and computes the prompt).
    pub fn leg(&self) -> Leg {
        if self.do_remote_decode == Some(true) {
            return Leg::Prefill;
        }
        if self.do_remote_prefill != Some(true) {
            return Leg::None;
        }
        let has_blocks = self
            .remote_block_ids
            .as_ref()
            .is_some_and(|b| !b.is_null() && b.as_array().is_none_or(|a| !a.is_empty()));
        match (
            &self.remote_engine_id,
            &self.remote_request_id,
            &self.remote_host,
            self.remote_port,
            has_blocks,
        ) {
            (Some(e), Some(r), Some(h), Some(p), true) => Leg::Decode(RemoteBlocks {
                engine_id: e.clone(),
                request_id: r.clone(),
                block_ids: self.remote_block_ids.clone().unwrap_or_default(),
                host: h.clone(),
                port: p,
                num_tokens: self.remote_num_tokens,
                prefill_cached_tokens: self.remote_prefill_cached_tokens,
            }),
            _ => Leg::None,
        }
    }
}

/// The `kv_transfer_params` of P's answer: vLLM 0.32's `request_finished` dict (pull mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HandOff {
    pub do_remote_prefill: bool,
    pub do_remote_decode: bool,
    /// One list per KV-cache group (one group: full attention).
    pub remote_block_ids: Vec<Vec<u32>>,
    pub remote_engine_id: String,
    pub remote_request_id: String,
    pub remote_host: String,
    pub remote_port: u16,
    pub tp_size: u32,
    pub dcp_size: u32,
    pub pp_size: u32,
    /// Tokens P computed (the prompt).
    pub remote_num_tokens: usize,
    /// Set by vLLM on D's own blocks only; null on P.
    pub remote_blocks_expiry_time: Option<f64>,
    pub transfer_mode: String,
    /// P's own prefix-cache hit of the prompt (vLLM's scheduler adds it last).
    pub remote_prefill_cached_tokens: usize,
}

impl HandOff {
    /// P's hand-off of `blocks` holding `num_tokens` computed tokens of `request_id`, of which
    /// `cached_tokens` were found in P's prefix cache.
    pub fn new(
        engine_id: &str,
        request_id: &str,
        addr: std::net::SocketAddr,
        blocks: Vec<u32>,
        num_tokens: usize,
        cached_tokens: usize,
    ) -> HandOff {
        HandOff {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_block_ids: vec![blocks],
            remote_engine_id: engine_id.to_owned(),
            remote_request_id: request_id.to_owned(),
            remote_host: addr.ip().to_string(),
            remote_port: addr.port(),
            tp_size: 1,
            dcp_size: 1,
            pp_size: 1,
            remote_num_tokens: num_tokens,
            remote_blocks_expiry_time: None,
            transfer_mode: "pull".to_owned(),
            remote_prefill_cached_tokens: cached_tokens,
        }
    }
}

/// D's read of a hand-off (`POST /sim/nixl/read`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadRequest {
    pub remote_engine_id: String,
    pub remote_request_id: String,
    /// As in the hand-off (checked against the blocks P holds).
    pub remote_block_ids: serde_json::Value,
}

/// P's answer to a read: the blocks are released on P (a hand-off read again, or after its
/// lease, is answered too: D cannot tell, as with vLLM 0.32).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadAnswer {
    pub remote_request_id: String,
    /// Tokens whose KV the blocks hold.
    pub num_tokens: usize,
    pub num_blocks: usize,
}

/// Why D could not load a hand-off.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("bad side-channel address {0}")]
    Url(String),
    #[error("reading the hand-off from {0}: {1}")]
    Unreachable(String, String),
    #[error("the prefill engine answered {0} (a hand-off it never made)")]
    Status(http::StatusCode),
    #[error("the prefill engine's answer: {0}")]
    Answer(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the engine has no KV connector (no --kv-role)")]
    NoConnector,
}

/// Largest read answer accepted.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Reads `remote`'s blocks from P over its side channel; on success P has released them.
pub async fn read_remote(
    client: &HttpClient,
    remote: &RemoteBlocks,
    timeout: Duration,
) -> Result<ReadAnswer, ReadError> {
    let host = if remote.host.contains(':') {
        format!("[{}]", remote.host)
    } else {
        remote.host.clone()
    };
    let url = format!("http://{host}:{}{READ_PATH}", remote.port);
    let uri: http::Uri = url.parse().map_err(|_| ReadError::Url(url.clone()))?;
    let body = ReadRequest {
        remote_engine_id: remote.engine_id.clone(),
        remote_request_id: remote.request_id.clone(),
        remote_block_ids: remote.block_ids.clone(),
    };
    let body = serde_json::to_vec(&body).map_err(|e| ReadError::Answer(e.to_string()))?;
    let req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ReadError::Url(e.to_string()))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| ReadError::Unreachable(url.clone(), e.to_string()))?;
        if !resp.status().is_success() {
            return Err(ReadError::Status(resp.status()));
        }
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| ReadError::Answer(e.to_string()))?
            .to_bytes();
        serde_json::from_slice::<ReadAnswer>(&bytes).map_err(|e| ReadError::Answer(e.to_string()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
}

/// The block ids of a hand-off's `remote_block_ids` (one list per group, or a flat list as in
/// 2025 releases), flattened; `None` if it is neither.
pub fn flat_block_ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for x in v.as_array()? {
        match x {
            serde_json::Value::Array(group) => {
                for id in group {
                    out.push(u32::try_from(id.as_u64()?).ok()?);
                }
            }
            id => out.push(u32::try_from(id.as_u64()?).ok()?),
        }
    }
    Some(out)
}

/// A stable, uuid-shaped engine id from 128 random bits (vLLM's `engine_id` is a uuid4).
pub fn new_engine_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
#[path = "nixl_tests.rs"]
mod tests;
