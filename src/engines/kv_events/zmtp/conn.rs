//! One ZMTP connection: the handshake, then messages in (bounded) and out.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::codec::{self, Read};
use super::{Limits, SocketType, ZmtpError, tcp_address};

/// A ZMTP 3.0 connection after its handshake.
#[derive(Debug)]
pub struct Connection {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    max_message_bytes: usize,
    peer: SocketAddr,
}

/// What [`Connection::recv`] brought.
#[derive(Debug)]
pub enum Received {
    Message(Vec<Bytes>),
    /// A message over the cap (or of too many frames), read past and dropped: its first frame
    /// if that was within the cap, and its announced size.
    Oversized {
        first: Option<Bytes>,
        bytes: u64,
    },
}

/// Connects to `endpoint` (`tcp://HOST:PORT`) as a `kind` socket.
pub async fn connect(
    endpoint: &str,
    kind: SocketType,
    limits: &Limits,
) -> Result<Connection, ZmtpError> {
    let addr = tcp_address(endpoint)?;
    let stream = tokio::time::timeout(limits.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ZmtpError::HandshakeTimeout)??;
    Connection::handshake(stream, kind, limits).await
}

impl Connection {
    /// Greets the peer on `stream` (connected or accepted) and exchanges `READY` as a `kind`
    /// socket, within the handshake timeout.
    pub async fn handshake(
        stream: TcpStream,
        kind: SocketType,
        limits: &Limits,
    ) -> Result<Connection, ZmtpError> {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr()?;
        let (rd, wr) = stream.into_split();
        let mut c = Connection {
            rd: BufReader::with_capacity(8192, rd),
            wr,
            max_message_bytes: limits.max_message_bytes,
            peer,
        };
        tokio::time::timeout(limits.handshake_timeout, c.greet(kind))
            .await
            .map_err(|_| ZmtpError::HandshakeTimeout)??;
        Ok(c)
    }

    async fn greet(&mut self, kind: SocketType) -> Result<(), ZmtpError> {
        // The whole greeting at once: libzmq sends its own in parts, but only waits for ours
        // after its first 10 or 11 bytes, which it sends without waiting.
        self.wr.write_all(&codec::greeting()).await?;
        let mut theirs = [0u8; 64];
        self.rd.read_exact(&mut theirs).await?;
        codec::check_greeting(&theirs)?;
        self.wr.write_all(&codec::ready(kind)).await?;
        let Read::Command(cmd) = codec::read(&mut self.rd, 0).await? else {
            return Err(ZmtpError::Protocol("a message before READY".into()));
        };
        match &cmd.name[..] {
            b"READY" => {
                let peer = cmd.ready_socket_type()?;
                if !kind.accepts(&peer) {
                    return Err(ZmtpError::SocketType {
                        ours: kind.name(),
                        peer: String::from_utf8_lossy(&peer).into_owned(),
                    });
                }
                Ok(())
            }
            b"ERROR" => {
                let reason = cmd.data.get(1..).unwrap_or_default();
                Err(ZmtpError::Refused(
                    String::from_utf8_lossy(reason).into_owned(),
                ))
            }
            other => Err(ZmtpError::Protocol(format!(
                "{:?} before READY",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Subscribes to messages whose first frame starts with `prefix` (`b""`: all), in the
    /// ZMTP 3.0 form: a message `\x01<prefix>`.
    pub async fn subscribe(&mut self, prefix: &[u8]) -> Result<(), ZmtpError> {
        let mut body = Vec::with_capacity(1 + prefix.len());
        body.push(1);
        body.extend_from_slice(prefix);
        self.send(&[body]).await
    }

    /// Sends one message.
    pub async fn send<B: AsRef<[u8]>>(&mut self, frames: &[B]) -> Result<(), ZmtpError> {
        self.wr.write_all(&codec::encode_message(frames)).await?;
        Ok(())
    }

    /// The next message (answering `PING`s and skipping other commands meanwhile). An error
    /// ends the connection.
    pub async fn recv(&mut self) -> Result<Received, ZmtpError> {
        loop {
            match codec::read(&mut self.rd, self.max_message_bytes).await? {
                Read::Message(frames) => return Ok(Received::Message(frames)),
                Read::Dropped { first, bytes } => return Ok(Received::Oversized { first, bytes }),
                Read::Command(cmd) if cmd.name == b"PING" => {
                    // PING: TTL (2 bytes) and a context that PONG echoes.
                    let context = cmd.data.get(2..).unwrap_or_default();
                    self.wr
                        .write_all(&codec::encode_command("PONG", context))
                        .await?;
                }
                Read::Command(cmd) if cmd.name == b"ERROR" => {
                    return Err(ZmtpError::Refused(
                        String::from_utf8_lossy(cmd.data.get(1..).unwrap_or_default()).into_owned(),
                    ));
                }
                Read::Command(_) => {}
            }
        }
    }
}
