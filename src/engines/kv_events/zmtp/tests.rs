//! The connection against byte-level peers on loopback: what it sends, what it accepts, and
//! the bounds.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::codec::{self, encode_message, greeting};
use super::*;

const SAFETY: Duration = Duration::from_secs(10);

/// A peer's READY naming `socket_type`.
fn ready_of(socket_type: &str) -> Vec<u8> {
    let mut props = vec![11];
    props.extend_from_slice(b"Socket-Type");
    props.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    props.extend_from_slice(socket_type.as_bytes());
    codec::encode_command("READY", &props)
}

/// A listener and its `tcp://` endpoint.
async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = format!("tcp://{}", l.local_addr().unwrap());
    (l, ep)
}

/// Accepts, greets, sends `ready`, and reads the other side's greeting and READY.
async fn peer_handshake(l: &TcpListener, ready: &[u8]) -> (TcpStream, Vec<u8>) {
    let (mut s, _) = l.accept().await.unwrap();
    s.write_all(&greeting()).await.unwrap();
    let mut theirs = [0u8; 64];
    s.read_exact(&mut theirs).await.unwrap();
    assert_eq!(theirs, greeting(), "ZMTP 3.0, NULL, not a server");
    s.write_all(ready).await.unwrap();
    let cmd = match codec::read(&mut s, 0).await.unwrap() {
        codec::Read::Command(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(cmd.name, b"READY");
    (s, cmd.ready_socket_type().unwrap())
}

fn limits(max: usize) -> Limits {
    Limits {
        max_message_bytes: max,
        handshake_timeout: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn a_sub_subscribes_in_the_3_0_form_and_skips_oversized_messages_on_one_connection() {
    let (l, ep) = listener().await;
    let peer = tokio::spawn(async move {
        let (mut s, kind) = peer_handshake(&l, &ready_of("PUB")).await;
        assert_eq!(kind, b"SUB");
        // The subscription to everything: a one-frame message "\x01".
        let mut sub = [0u8; 3];
        s.read_exact(&mut sub).await.unwrap();
        assert_eq!(sub, [0x00, 0x01, 0x01]);
        let mut out = encode_message(&[&b"t"[..], &[0u8; 8], &vec![9u8; 1 << 20]]);
        out.extend(codec::encode_command("PING", b"\x00\x0aabc"));
        out.extend(encode_message(&[&b"t"[..], &[1u8; 8], b"small"]));
        s.write_all(&out).await.unwrap();
        // The PONG echoes the context.
        let pong = match codec::read(&mut s, 0).await.unwrap() {
            codec::Read::Command(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (pong.name.as_slice(), &pong.data[..]),
            (&b"PONG"[..], &b"abc"[..])
        );
        s
    });
    let mut sub = tokio::time::timeout(SAFETY, async {
        let mut c = connect(&ep, SocketType::Sub, &limits(4096)).await.unwrap();
        c.subscribe(b"").await.unwrap();
        c
    })
    .await
    .unwrap();
    match sub.recv().await.unwrap() {
        Received::Oversized { first, bytes } => {
            assert_eq!(first.as_deref(), Some(&b"t"[..]));
            assert_eq!(bytes, 1 + 8 + (1 << 20));
        }
        other => panic!("{other:?}"),
    }
    match sub.recv().await.unwrap() {
        Received::Message(f) => assert_eq!(f[2], &b"small"[..]),
        other => panic!("{other:?}"),
    }
    let _peer = peer.await.unwrap();
}

#[tokio::test]
async fn a_dealer_sends_its_request_and_reads_replies() {
    let (l, ep) = listener().await;
    let peer = tokio::spawn(async move {
        let (mut s, kind) = peer_handshake(&l, &ready_of("ROUTER")).await;
        assert_eq!(kind, b"DEALER");
        let req = match codec::read(&mut s, 1024).await.unwrap() {
            codec::Read::Message(f) => f,
            other => panic!("{other:?}"),
        };
        s.write_all(&encode_message(&[&b""[..], b"reply"]))
            .await
            .unwrap();
        req
    });
    let mut d = connect(&ep, SocketType::Dealer, &limits(4096))
        .await
        .unwrap();
    d.send(&[&b""[..], &7u64.to_be_bytes()]).await.unwrap();
    match d.recv().await.unwrap() {
        Received::Message(f) => assert_eq!(f, vec![&b""[..], &b"reply"[..]]),
        other => panic!("{other:?}"),
    }
    assert_eq!(peer.await.unwrap(), vec![&b""[..], &7u64.to_be_bytes()[..]]);
}

#[tokio::test]
async fn a_silent_peer_times_the_handshake_out() {
    let (l, ep) = listener().await;
    let peer = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        // Holds the connection open and says nothing.
        tokio::time::sleep(SAFETY).await;
        drop(s);
    });
    let started = std::time::Instant::now();
    let e = connect(&ep, SocketType::Sub, &limits(4096))
        .await
        .unwrap_err();
    assert!(matches!(e, ZmtpError::HandshakeTimeout), "{e}");
    assert!(started.elapsed() < SAFETY);
    peer.abort();
}

#[tokio::test]
async fn wrong_peers_are_refused() {
    for (ready, want) in [
        (ready_of("REQ"), "REQ socket"),
        (codec::encode_command("ERROR", b"\x06denied"), "denied"),
        (encode_message(&[b"data"]), "before READY"),
    ] {
        let (l, ep) = listener().await;
        let peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&greeting()).await.unwrap();
            let mut theirs = [0u8; 64];
            s.read_exact(&mut theirs).await.unwrap();
            s.write_all(&ready).await.unwrap();
            s
        });
        let e = connect(&ep, SocketType::Sub, &limits(4096))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        let _ = peer.await;
    }
    // A peer speaking ZMTP 2.0.
    let (l, ep) = listener().await;
    let peer = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut g = greeting();
        g[10] = 2;
        s.write_all(&g).await.unwrap();
        s
    });
    let e = connect(&ep, SocketType::Sub, &limits(4096))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ZMTP 2.0"), "{e}");
    let _ = peer.await;
    assert!(matches!(
        connect("udp://x:1", SocketType::Sub, &limits(1)).await,
        Err(ZmtpError::Endpoint(_))
    ));
}
