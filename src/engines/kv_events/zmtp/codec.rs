//! ZMTP 3.0 on the wire: the greeting, commands (`READY`, `ERROR`, `PING`/`PONG`) and frames,
//! read with every size bounded.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{SocketType, ZmtpError};

/// Most frames in one message; a message with more is dropped (vLLM sends 3, replies 4).
pub const MAX_FRAMES: usize = 16;

/// Largest command accepted (a `READY` with a few properties, a `PING`).
pub const MAX_COMMAND_BYTES: u64 = 4096;

const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// Our greeting: signature, version 3.0, the NULL mechanism, not a server.
pub fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks the peer's greeting: ZMTP 3.x with the NULL mechanism.
pub fn check_greeting(g: &[u8; 64]) -> Result<(), ZmtpError> {
    if g[0] != 0xFF || g[9] & 0x01 != 0x01 {
        return Err(ZmtpError::Protocol("not a ZMTP greeting".into()));
    }
    if g[10] < 3 {
        return Err(ZmtpError::Protocol(format!(
            "ZMTP {}.{} is not supported (3.x is)",
            g[10], g[11]
        )));
    }
    let mech = &g[12..32];
    let name_end = mech.iter().position(|&b| b == 0).unwrap_or(mech.len());
    if &mech[..name_end] != b"NULL" {
        return Err(ZmtpError::Protocol(format!(
            "security mechanism {:?} is not supported (NULL is)",
            String::from_utf8_lossy(&mech[..name_end])
        )));
    }
    Ok(())
}

/// Appends one frame (header and body) to `out`.
pub fn put_frame(out: &mut Vec<u8>, flags: u8, body: &[u8]) {
    if body.len() > 255 {
        out.push(flags | LONG);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    } else {
        out.push(flags);
        out.push(body.len() as u8);
    }
    out.extend_from_slice(body);
}

/// A message's frames, encoded.
pub fn encode_message<B: AsRef<[u8]>>(frames: &[B]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames.iter().map(|f| f.as_ref().len() + 9).sum());
    for (i, f) in frames.iter().enumerate() {
        let more = if i + 1 < frames.len() { MORE } else { 0 };
        put_frame(&mut out, more, f.as_ref());
    }
    out
}

/// A command frame: `name` and its body.
pub fn encode_command(name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + name.len() + data.len());
    body.push(name.len() as u8);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = Vec::new();
    put_frame(&mut out, COMMAND, &body);
    out
}

/// Our `READY`: the socket type (no identity: the ROUTER makes one).
pub fn ready(ours: SocketType) -> Vec<u8> {
    let mut props = Vec::new();
    let name = b"Socket-Type";
    props.push(name.len() as u8);
    props.extend_from_slice(name);
    props.extend_from_slice(&(ours.name().len() as u32).to_be_bytes());
    props.extend_from_slice(ours.name().as_bytes());
    encode_command("READY", &props)
}

/// A command as received: its name and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: Vec<u8>,
    pub data: Bytes,
}

impl Command {
    fn parse(body: Bytes) -> Result<Command, ZmtpError> {
        let n = *body
            .first()
            .ok_or_else(|| ZmtpError::Protocol("empty command".into()))? as usize;
        if body.len() < 1 + n {
            return Err(ZmtpError::Protocol("truncated command name".into()));
        }
        Ok(Command {
            name: body[1..1 + n].to_vec(),
            data: body.slice(1 + n..),
        })
    }

    /// The `Socket-Type` property of a `READY` (the properties checked for shape).
    pub fn ready_socket_type(&self) -> Result<Vec<u8>, ZmtpError> {
        let bad = || ZmtpError::Protocol("malformed READY properties".into());
        let mut rest = &self.data[..];
        let mut socket_type = None;
        while !rest.is_empty() {
            let n = rest[0] as usize;
            let name = rest.get(1..1 + n).ok_or_else(bad)?;
            let len: [u8; 4] = rest
                .get(1 + n..5 + n)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(bad)?;
            let len = u32::from_be_bytes(len) as usize;
            let value = rest.get(5 + n..5 + n + len).ok_or_else(bad)?;
            if name.eq_ignore_ascii_case(b"Socket-Type") {
                socket_type = Some(value.to_vec());
            }
            rest = &rest[5 + n + len..];
        }
        socket_type.ok_or_else(|| ZmtpError::Protocol("READY without Socket-Type".into()))
    }
}

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub more: bool,
    pub command: bool,
    pub size: u64,
}

pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, ZmtpError> {
    let flags = r.read_u8().await?;
    if flags & !(MORE | LONG | COMMAND) != 0 {
        return Err(ZmtpError::Protocol(format!("frame flags {flags:#04x}")));
    }
    let size = if flags & LONG != 0 {
        r.read_u64().await?
    } else {
        u64::from(r.read_u8().await?)
    };
    Ok(Header {
        more: flags & MORE != 0,
        command: flags & COMMAND != 0,
        size,
    })
}

/// Frames up to this size are allocated at once; larger ones grow with the bytes that arrive.
const FIRST_ALLOCATION: usize = 64 << 10;

/// Reads `size` bytes into a buffer (the caller bounded `size`). The buffer grows (doubling)
/// as bytes arrive, so a peer that announces a large frame and sends little costs little.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, size: u64) -> Result<Bytes, ZmtpError> {
    let size = size as usize;
    if size <= FIRST_ALLOCATION {
        let mut buf = BytesMut::zeroed(size);
        r.read_exact(&mut buf).await?;
        return Ok(buf.freeze());
    }
    let mut buf = BytesMut::with_capacity(FIRST_ALLOCATION);
    while buf.len() < size {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(size - buf.len()));
        }
        let room = (buf.capacity() - buf.len()).min(size - buf.len());
        let n = (&mut *r).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(buf.freeze())
}

/// Reads past `size` bytes without keeping them (8 KiB at a time).
pub async fn discard<R: AsyncRead + Unpin>(r: &mut R, size: u64) -> Result<(), ZmtpError> {
    let copied = tokio::io::copy(&mut r.take(size), &mut tokio::io::sink()).await?;
    if copied < size {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// What one read brought.
#[derive(Debug)]
pub enum Read {
    Message(Vec<Bytes>),
    /// A message dropped whole: over the size cap or [`MAX_FRAMES`]. Its first frame (the
    /// topic, on a PUB socket) if it was within the cap, and the bytes it announced.
    Dropped {
        first: Option<Bytes>,
        bytes: u64,
    },
    Command(Command),
}

/// Reads the next message or command, keeping at most `max_bytes` of frame bodies.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, max_bytes: usize) -> Result<Read, ZmtpError> {
    let h = read_header(r).await?;
    if h.command {
        if h.more {
            return Err(ZmtpError::Protocol("a command with the MORE flag".into()));
        }
        if h.size > MAX_COMMAND_BYTES {
            return Err(ZmtpError::Protocol(format!(
                "a command of {} bytes (at most {MAX_COMMAND_BYTES})",
                h.size
            )));
        }
        return Ok(Read::Command(Command::parse(read_body(r, h.size).await?)?));
    }
    let mut frames = Vec::new();
    let mut first = None;
    let mut total: u64 = 0;
    let mut dropped = false;
    let mut h = h;
    loop {
        total = total.saturating_add(h.size);
        if !dropped && (total > max_bytes as u64 || frames.len() >= MAX_FRAMES) {
            dropped = true;
            first = frames.into_iter().next();
            frames = Vec::new();
        }
        if dropped {
            discard(r, h.size).await?;
        } else {
            frames.push(read_body(r, h.size).await?);
        }
        if !h.more {
            break;
        }
        h = read_header(r).await?;
        if h.command {
            return Err(ZmtpError::Protocol(
                "a command inside a multipart message".into(),
            ));
        }
    }
    Ok(if dropped {
        Read::Dropped {
            first,
            bytes: total,
        }
    } else {
        Read::Message(frames)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8], cap: usize) -> Vec<Read> {
        let mut r = bytes;
        let mut out = Vec::new();
        while !r.is_empty() {
            out.push(read(&mut r, cap).await.unwrap());
        }
        out
    }

    fn frames(r: &Read) -> Vec<&[u8]> {
        match r {
            Read::Message(f) => f.iter().map(|b| &b[..]).collect(),
            other => panic!("not a message: {other:?}"),
        }
    }

    #[tokio::test]
    async fn short_and_long_frames_round_trip() {
        let big = vec![7u8; 300];
        let wire = encode_message(&[&b"topic"[..], &[0, 0, 0, 0, 0, 0, 0, 1], &big]);
        assert_eq!(&wire[..7], b"\x01\x05topic");
        assert_eq!(wire[17], 0x02, "the last frame is long and has no MORE");
        let got = read_all(&wire, 1 << 20).await;
        assert_eq!(
            frames(&got[0]),
            vec![&b"topic"[..], &[0, 0, 0, 0, 0, 0, 0, 1], &big[..]]
        );
    }

    #[tokio::test]
    async fn an_oversized_message_is_dropped_whole_and_the_next_one_read() {
        let mut wire = encode_message(&[&b"kv@a@m"[..], &[1u8; 8], &vec![0u8; 5000]]);
        wire.extend(encode_message(&[&b"kv@a@m"[..], &[2u8; 8], b"ok"]));
        let got = read_all(&wire, 1000).await;
        match &got[0] {
            Read::Dropped { first, bytes } => {
                assert_eq!(first.as_deref(), Some(&b"kv@a@m"[..]));
                assert_eq!(*bytes, 5014);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(frames(&got[1])[2], b"ok");
        // Crossing the cap in an early frame drops the later (small) ones too.
        let wire = encode_message(&[&vec![0u8; 2000][..], b"a", b"b"]);
        let got = read_all(&wire, 1000).await;
        assert!(matches!(
            got[0],
            Read::Dropped {
                first: None,
                bytes: 2002
            }
        ));
    }

    #[tokio::test]
    async fn large_frames_within_the_cap_are_read_as_they_arrive() {
        let big: Vec<u8> = (0..(1 << 20) + 3).map(|i| i as u8).collect();
        let wire = encode_message(&[&big[..]]);
        let got = read_all(&wire, 2 << 20).await;
        assert_eq!(frames(&got[0]), vec![&big[..]]);
        // Announced, not sent: an error, and only what arrived was held.
        let mut r = &wire[..wire.len() - 1];
        assert!(matches!(read(&mut r, 2 << 20).await, Err(ZmtpError::Io(_))));
    }

    #[tokio::test]
    async fn too_many_frames_drop_the_message() {
        let many: Vec<&[u8]> = vec![b""; MAX_FRAMES + 1];
        let got = read_all(&encode_message(&many), 1 << 20).await;
        assert!(matches!(got[0], Read::Dropped { bytes: 0, .. }));
    }

    #[tokio::test]
    async fn a_frame_announcing_more_than_it_sends_is_an_error() {
        let mut wire = vec![0x02];
        wire.extend_from_slice(&(1u64 << 40).to_be_bytes());
        wire.extend_from_slice(&[0u8; 100]);
        let mut r = &wire[..];
        // Over the cap: discarded as it comes, then the stream ends early.
        assert!(matches!(read(&mut r, 1000).await, Err(ZmtpError::Io(_))));
    }

    #[tokio::test]
    async fn commands_are_parsed_and_bounded() {
        let wire = ready(SocketType::Sub);
        let mut r = &wire[..];
        let Read::Command(c) = read(&mut r, 10).await.unwrap() else {
            panic!()
        };
        assert_eq!(c.name, b"READY");
        assert_eq!(c.ready_socket_type().unwrap(), b"SUB");
        let mut big = vec![0x06];
        big.extend_from_slice(&(MAX_COMMAND_BYTES + 1).to_be_bytes());
        let mut r = &big[..];
        assert!(matches!(
            read(&mut r, 10).await,
            Err(ZmtpError::Protocol(_))
        ));
        let mut bad_flags = &[0x40u8, 0][..];
        assert!(read(&mut bad_flags, 10).await.is_err());
    }

    #[test]
    fn greetings_are_checked() {
        let g = greeting();
        assert!(check_greeting(&g).is_ok());
        let mut v2 = g;
        v2[10] = 2;
        assert!(check_greeting(&v2).is_err());
        let mut curve = g;
        curve[12..17].copy_from_slice(b"CURVE");
        assert!(check_greeting(&curve).is_err());
        let mut http = g;
        http[0] = b'G';
        assert!(check_greeting(&http).is_err());
    }
}
