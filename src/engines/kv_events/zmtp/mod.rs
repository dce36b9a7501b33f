//! A small ZMTP 3.0 transport (ZeroMQ's wire protocol, NULL security mechanism) for the
//! router's subscribing side: SUB over a connected TCP stream or an accepted one, and DEALER
//! for replay requests. See <https://rfc.zeromq.org/spec/23/> (ZMTP 3.0) and
//! <https://rfc.zeromq.org/spec/37/> (3.1).
//!
//! **Why our own.** The pure-Rust `zeromq` crate reads every frame whole whatever its size (it
//! has no maximum message size), so one hostile or broken publisher can make the router
//! allocate gigabytes; libzmq (which has `ZMQ_MAXMSGSIZE`) would bring a C dependency and
//! its own I/O threads, and it closes the connection on an oversized message where we want to
//! keep following the engine. The part of ZMTP a subscriber needs is small: a 64-byte greeting,
//! one `READY` command each way, and length-prefixed frames. The sim's publisher and the tests
//! keep using the `zeromq` crate (and real libzmq through pyzmq) as peers.
//!
//! **Bounded.** A message whose frames add up to more than [`Limits::max_message_bytes`] is
//! read past and dropped: the frame that crosses the cap and every later frame of the message
//! are discarded in 8 KiB chunks as they arrive (never buffered), the frames already read are
//! freed, and the connection stays up ([`Received::Oversized`]). So are messages of more than
//! [`MAX_FRAMES`] frames. A frame within the cap is buffered as its bytes arrive (a peer that
//! announces 16 MiB and sends nothing costs 64 KiB). Commands are at most
//! [`MAX_COMMAND_BYTES`]. The greeting and the
//! `READY` exchange must finish within [`Limits::handshake_timeout`].
//!
//! **Version.** We announce ZMTP 3.0, so that peers (libzmq 4.x, the `zeromq` crate) take
//! subscriptions as messages `\x01<prefix>` (3.1 peers talking to a 3.0 peer do too). We
//! accept peers announcing 3.x and answer a 3.1 `PING` with a `PONG`.

mod codec;
mod conn;

pub use codec::{MAX_COMMAND_BYTES, MAX_FRAMES};
pub use conn::{Connection, Received, connect};

use std::time::Duration;

/// The ZMQ socket types this transport speaks, and the peers each accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    Sub,
    Dealer,
}

impl SocketType {
    pub fn name(self) -> &'static str {
        match self {
            SocketType::Sub => "SUB",
            SocketType::Dealer => "DEALER",
        }
    }

    /// The peer socket types ZMQ allows for this one.
    fn accepts(self, peer: &[u8]) -> bool {
        let ok: &[&[u8]] = match self {
            SocketType::Sub => &[b"PUB", b"XPUB"],
            SocketType::Dealer => &[b"ROUTER", b"DEALER", b"REP"],
        };
        ok.contains(&peer)
    }
}

/// The bounds of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (all its frames) kept; larger ones are read past and dropped.
    pub max_message_bytes: usize,
    /// Most time for the greeting and `READY` exchange.
    pub handshake_timeout: Duration,
}

/// The default cap on a KV-event message: 16 MiB. A vLLM batch is one scheduler step's
/// events: a `BlockStored` costs at most 5 bytes per token id plus 34 per block hash (sha256),
/// about 7 bytes per cached token at block size 16, so 16 MiB holds some 2.4 million tokens
/// stored in one step: far beyond a step's token budget (`max_num_batched_tokens`, 8k–64k
/// typically; a whole 1M-token context is about 7 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection could not be made or went down.
#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    #[error("{0:?} is not a tcp://HOST:PORT endpoint")]
    Endpoint(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the peer is a {peer} socket, which a {ours} socket cannot talk to")]
    SocketType { ours: &'static str, peer: String },
    #[error("the peer refused the handshake: {0}")]
    Refused(String),
}

/// The `host:port` of a `tcp://HOST:PORT` endpoint (`[v6]:port` kept as is).
pub fn tcp_address(endpoint: &str) -> Result<&str, ZmtpError> {
    endpoint
        .strip_prefix("tcp://")
        .filter(|a| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        })
        .ok_or_else(|| ZmtpError::Endpoint(endpoint.to_owned()))
}

#[cfg(test)]
mod tests;
