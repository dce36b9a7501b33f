//! The two ends of a prefill/decode hand-off over HTTP: P's side channel
//! (`POST /sim/nixl/read`, [`read`]) and D's load of a hand-off before it queues its request
//! ([`load_remote`]).
//!
//! Where vLLM's D pulls the blocks when its scheduler admits the request (renewing P's lease
//! by heartbeats while the request waits), the simulated D reads them when the request
//! arrives, then waits the modelled transfer time before queuing it: P's blocks are released
//! as soon as D has the request.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::super::Engine;
use super::super::leases::ReleaseError;
use super::super::metrics::inc;
use super::super::nixl::{ReadAnswer, ReadError, ReadRequest, RemoteBlocks, flat_block_ids};
use super::super::scheduler::Job;
use super::{SimBody, error, json_response};

/// Largest read request accepted (block ids of a 128K-token prompt fit many times over).
const MAX_READ_BYTES: usize = 1 << 20;
/// How long D waits for P's side channel.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// P: D reads a hand-off; its blocks are released. 404 when it is unknown (another engine's,
/// never made, expired or already read), 400 when the body or its block ids do not match.
pub(super) async fn read(engine: &Engine, req: Request<Incoming>) -> Response<SimBody> {
    let body = match Limited::new(req.into_body(), MAX_READ_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let read: ReadRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if read.remote_engine_id != engine.kv.engine_id {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no engine {} here", read.remote_engine_id),
        );
    }
    let Some(blocks) = flat_block_ids(&read.remote_block_ids) else {
        return error(
            StatusCode::BAD_REQUEST,
            "remote_block_ids must be a list of block ids or of lists of them",
        );
    };
    match engine
        .sched
        .release_hand_off(&read.remote_request_id, &blocks)
    {
        Ok((num_tokens, num_blocks)) => {
            let answer = ReadAnswer {
                remote_request_id: read.remote_request_id,
                num_tokens,
                num_blocks,
            };
            match serde_json::to_vec(&answer) {
                Ok(b) => json_response(StatusCode::OK, b),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        Err(e @ ReleaseError::Unknown(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ ReleaseError::OtherBlocks(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// D: reads `remote`'s blocks from P and makes `job` (not yet queued) start from them, after
/// the modelled transfer time. On failure the request computes its prompt itself; the error
/// is returned for the failure policy to decide.
pub(super) async fn load_remote(
    engine: &Engine,
    job: &mut Job,
    remote: &RemoteBlocks,
) -> Result<(), ReadError> {
    let stats = &engine.sched.stats;
    let Some(client) = &engine.kv.client else {
        return Err(ReadError::NoConnector);
    };
    let answer = match super::super::nixl::read_remote(client, remote, READ_TIMEOUT).await {
        Ok(a) => a,
        Err(e) => {
            inc(&stats.kv_load_failures, 1);
            tracing::warn!(
                remote_engine_id = %remote.engine_id,
                remote_request_id = %remote.request_id,
                "KV load failed: {e}"
            );
            return Err(e);
        }
    };
    let tokens = answer.num_tokens.min(job.prompt_tokens());
    inc(&stats.kv_loads, 1);
    let ms = tokens as f64 * engine.kv.ms_per_token;
    let wall = ms * job.scheduler().time_scale() / 1000.0;
    if wall.is_finite() && wall > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wall)).await;
    }
    job.loaded_from_remote(tokens);
    Ok(())
}
