//! Replay requests to an engine's replay socket (vLLM's ROUTER): one DEALER connection per
//! request, the batches from a start sequence number, up to the end-of-sequence marker.
//!
//! The DEALER sends `["", start (8 bytes BE)]`. vLLM 0.32's `ZmqEventPublisher._service_replay`
//! answers each buffered batch with `seq >= start` as `[identity, "", topic, seq, payload]` and
//! ends with `[identity, "", "", END_SEQ, ""]`; the DEALER receives them without the identity,
//! as 4 frames. Earlier releases (and the sim) answer `["", seq, payload]` and
//! `["", END_SEQ, ""]`. Both are read: 4 frames `["", topic, seq, payload]`, 3 frames
//! `[delimiter or topic, seq, payload]` (either way the last two are the sequence number and
//! the payload), or 2 frames `[seq, payload]`.

use std::time::Duration;

use bytes::Bytes;

use super::wire::{self, END_SEQ};
use super::zmtp::{self, Limits, Received, SocketType, ZmtpError};

/// Most batches accepted from one replay (vLLM buffers 10,000 by default).
pub const MAX_REPLAY_BATCHES: usize = 200_000;

/// Why a replay brought nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("timed out")]
    Timeout,
    #[error("zmtp: {0}")]
    Zmtp(#[from] ZmtpError),
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// One reply message: a batch, or the end of the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Batch(u64, Bytes),
    End,
}

/// Reads one reply message (see the module's description of the shapes).
pub fn parse_reply(frames: &[Bytes]) -> Result<Reply, ReplayError> {
    let (seq, payload) = match frames {
        [empty, _topic, seq, payload] if empty.is_empty() => (seq, payload),
        [_, seq, payload] | [seq, payload] => (seq, payload),
        other => return Err(ReplayError::Malformed(format!("{} frames", other.len()))),
    };
    if seq[..] == END_SEQ {
        return Ok(Reply::End);
    }
    let seq = wire::decode_seq(seq).map_err(|e| ReplayError::Malformed(e.to_string()))?;
    Ok(Reply::Batch(seq, payload.clone()))
}

/// Asks the replay socket at `endpoint` for every buffered batch from `from`: (seq, payload)
/// in the order sent, up to the end-of-sequence marker. Each reply is bounded by `limits`; an
/// oversized one fails the replay (a batch is missing).
pub async fn fetch_replay(
    endpoint: &str,
    from: u64,
    timeout: Duration,
    limits: &Limits,
) -> Result<Vec<(u64, Bytes)>, ReplayError> {
    tokio::time::timeout(timeout, async {
        let mut dealer = zmtp::connect(endpoint, SocketType::Dealer, limits).await?;
        dealer.send(&[&[][..], &from.to_be_bytes()[..]]).await?;
        let mut out = Vec::new();
        loop {
            let frames = match dealer.recv().await? {
                Received::Message(frames) => frames,
                Received::Oversized { bytes, .. } => {
                    return Err(ReplayError::Malformed(format!(
                        "a reply of {bytes} bytes, over the cap of {}",
                        limits.max_message_bytes
                    )));
                }
            };
            match parse_reply(&frames)? {
                Reply::End => return Ok(out),
                Reply::Batch(seq, payload) => out.push((seq, payload)),
            }
            if out.len() > MAX_REPLAY_BATCHES {
                return Err(ReplayError::Malformed("too many batches".into()));
            }
        }
    })
    .await
    .map_err(|_| ReplayError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: &[&[u8]]) -> Vec<Bytes> {
        v.iter().map(|f| Bytes::copy_from_slice(f)).collect()
    }

    #[test]
    fn replies_with_and_without_the_topic_and_both_end_markers() {
        let seq = 7u64.to_be_bytes();
        for frames in [
            b(&[b"", b"kv@1.2.3.4@m", &seq, b"P"]),
            b(&[b"", b"", &seq, b"P"]),
            b(&[b"", &seq, b"P"]),
            b(&[&seq, b"P"]),
        ] {
            assert_eq!(
                parse_reply(&frames).unwrap(),
                Reply::Batch(7, Bytes::from_static(b"P")),
                "{frames:?}"
            );
        }
        for end in [b(&[b"", b"", &END_SEQ, b""]), b(&[b"", &END_SEQ, b""])] {
            assert_eq!(parse_reply(&end).unwrap(), Reply::End);
        }
        for bad in [
            b(&[b"x"]),
            b(&[b"", b"t", b"short", b"P"]),
            b(&[b"x", b"t", &seq, b"P"]),
            b(&[b"", b"", b"", &seq, b"P"]),
        ] {
            assert!(parse_reply(&bad).is_err(), "{bad:?}");
        }
    }
}
