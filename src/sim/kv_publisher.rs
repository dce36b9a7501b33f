//! The simulated engine's KV-event publisher, as vLLM 0.32's `ZmqEventPublisher`: a PUB socket
//! (bound, or connected to a router's bound SUB socket as vLLM does when its endpoint names a
//! host) sending `[topic, seq (8 bytes BE), payload]` with sequence numbers from 0, each payload
//! a msgpack `KVEventBatch` in the recent encoding (maps with a `type` tag, bytes block hashes,
//! the publisher's `data_parallel_rank`); and an optional ROUTER replay socket answering a start sequence
//! number with every buffered batch from it as `[identity, "", topic, seq, payload]`, then the
//! end-of-sequence marker `[identity, "", "", END_SEQ, ""]`. The replay buffer keeps the last
//! [`BUFFER_STEPS`] batches, as vLLM's does by default.
//!
//! [`CacheEvents`] calls (made with the cache lock held) only queue the event; a task batches
//! whatever is queued into one `KVEventBatch`, like vLLM's one batch per scheduler step.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::prelude::*;
use zeromq::{PubSocket, RouterSocket, ZmqMessage};

use super::cache_events::{CacheEvents, StoredBlocks};
use crate::engines::kv_events::encode::{Encoding, encode_batch};
use crate::engines::kv_events::wire::{
    BlockHash, BlockRemoved, BlockStored, END_SEQ, EventBatch, KvEvent,
};

/// Batches kept for replay (vLLM's `buffer_steps` default).
pub const BUFFER_STEPS: usize = 10_000;

/// Most events put in one batch.
const MAX_EVENTS_PER_BATCH: usize = 1024;

enum Msg {
    Event(KvEvent),
    /// Fault injection: the next `n` batches are buffered for replay but not published.
    LoseNext(usize),
    /// Sends these frames as they are (malformed-message tests).
    Raw(Vec<Bytes>),
    /// Ends the current batch: later events go in the next one.
    EndBatch,
    /// Publishes this payload as the next batch (malformed-payload tests).
    Payload(Bytes),
}

/// A running publisher; dropping it closes its sockets.
#[derive(Debug)]
pub struct KvPublisher {
    tx: mpsc::UnboundedSender<Msg>,
    endpoint: String,
    replay_endpoint: Option<String>,
    opts: PublishOptions,
    task: JoinHandle<()>,
}

impl Drop for KvPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error("{0:?} is not a tcp://HOST:PORT endpoint")]
    Endpoint(String),
    #[error("cannot bind {0}: {1}")]
    Bind(String, io::Error),
    #[error("zmq: {0}")]
    Zmq(#[from] zeromq::ZmqError),
}

/// Binds `tcp://HOST:PORT` (port 0: any free port) with SO_REUSEADDR, so that a restarted
/// publisher can take its port back at once.
fn listen(endpoint: &str) -> Result<std::net::TcpListener, PublisherError> {
    let addr: SocketAddr = endpoint
        .strip_prefix("tcp://")
        .and_then(|a| a.replace('*', "0.0.0.0").parse().ok())
        .ok_or_else(|| PublisherError::Endpoint(endpoint.to_owned()))?;
    let bind = || -> io::Result<std::net::TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(128)?.into_std()
    };
    bind().map_err(|e| PublisherError::Bind(endpoint.to_owned(), e))
}

/// How the PUB socket is set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// The topic frame of every message (vLLM's `topic`, `""` by default; llm-d's
    /// `kv@<pod-ip>@<model>`).
    pub topic: String,
    /// Connect the PUB socket to the endpoint instead of binding it.
    pub connect: bool,
    /// The data-parallel rank its batches carry.
    pub rank: u32,
}

impl KvPublisher {
    /// Binds the PUB socket at `endpoint` and the replay socket at `replay_endpoint`
    /// (`tcp://HOST:PORT`, port 0 for any) and starts publishing.
    pub async fn start(
        endpoint: &str,
        replay_endpoint: Option<&str>,
    ) -> Result<KvPublisher, PublisherError> {
        Self::start_with(endpoint, replay_endpoint, &PublishOptions::default()).await
    }

    /// [`KvPublisher::start`] with a topic, and the PUB socket connected if asked.
    pub async fn start_with(
        endpoint: &str,
        replay_endpoint: Option<&str>,
        opts: &PublishOptions,
    ) -> Result<KvPublisher, PublisherError> {
        let mut publisher = PubSocket::new();
        let bound = if opts.connect {
            publisher.connect(endpoint).await?;
            endpoint.to_owned()
        } else {
            publisher
                .bind_listener(listen(endpoint)?)
                .await?
                .to_string()
        };
        let (replay, replay_bound) = match replay_endpoint {
            Some(ep) => {
                let mut router = RouterSocket::new();
                let bound = router.bind_listener(listen(ep)?).await?;
                (Some(router), Some(bound.to_string()))
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let topic = Bytes::from(opts.topic.clone().into_bytes());
        let task = tokio::spawn(publish_loop(publisher, replay, rx, topic, opts.rank));
        Ok(KvPublisher {
            tx,
            endpoint: bound,
            replay_endpoint: replay_bound,
            opts: opts.clone(),
            task,
        })
    }

    /// The bound PUB endpoint, e.g. `tcp://127.0.0.1:40123` (the one connected to, when
    /// connected).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound replay endpoint, if any.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// What it was started with (topic, connected, rank).
    pub fn options(&self) -> &PublishOptions {
        &self.opts
    }

    /// Fault injection: the next `n` batches are numbered and kept for replay, but never
    /// published (a subscriber sees a sequence gap).
    pub fn lose_next_batches(&self, n: usize) {
        let _ = self.tx.send(Msg::LoseNext(n));
    }

    /// Publishes `frames` as one message, as they are (no sequence number is used).
    pub fn send_raw(&self, frames: Vec<Bytes>) {
        let _ = self.tx.send(Msg::Raw(frames));
    }

    /// Publishes `payload` as the next batch, numbered and buffered like any other (e.g. bytes
    /// that are not a `KVEventBatch`).
    pub fn send_payload(&self, payload: Bytes) {
        let _ = self.tx.send(Msg::Payload(payload));
    }

    /// Ends the current batch (as a scheduler step does): events queued after this call go in
    /// a later batch than those queued before it.
    pub fn end_batch(&self) {
        let _ = self.tx.send(Msg::EndBatch);
    }

    /// Queues one event (for the next batch).
    pub fn event(&self, event: KvEvent) {
        let _ = self.tx.send(Msg::Event(event));
    }
}

/// The engine's 64-bit block hash as vLLM's bytes hashes look on the wire.
fn hash_bytes(h: u64) -> BlockHash {
    BlockHash::Bytes(h.to_be_bytes().to_vec())
}

impl CacheEvents for KvPublisher {
    fn stored(&self, blocks: StoredBlocks) {
        self.event(KvEvent::Stored(BlockStored {
            block_hashes: blocks.block_hashes.iter().map(|h| hash_bytes(*h)).collect(),
            parent_block_hash: blocks.parent.map(hash_bytes),
            token_ids: blocks.token_ids,
            block_size: blocks.block_size,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: blocks.lora_name,
            ..BlockStored::default()
        }));
    }

    fn removed(&self, block_hashes: &[u64]) {
        self.event(KvEvent::Removed(BlockRemoved {
            block_hashes: block_hashes.iter().map(|h| hash_bytes(*h)).collect(),
            medium: Some("GPU".into()),
            group_idx: None,
        }));
    }

    fn cleared(&self) {
        self.event(KvEvent::Cleared);
    }
}

enum Next {
    Msg(Option<Msg>),
    Request(zeromq::ZmqResult<ZmqMessage>),
}

struct State {
    publisher: PubSocket,
    topic: Bytes,
    rank: u32,
    buffer: VecDeque<(u64, Bytes)>,
    next_seq: u64,
    lose: usize,
}

impl State {
    async fn publish(&mut self, events: Vec<KvEvent>) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let payload = Bytes::from(encode_batch(
            &EventBatch {
                ts,
                events,
                data_parallel_rank: Some(i64::from(self.rank)),
            },
            Encoding::Map,
        ));
        self.publish_payload(payload).await;
    }

    async fn publish_payload(&mut self, payload: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.lose > 0 {
            self.lose -= 1;
        } else {
            self.send(vec![
                self.topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ])
            .await;
        }
        if self.buffer.len() == BUFFER_STEPS {
            self.buffer.pop_front();
        }
        self.buffer.push_back((seq, payload));
    }

    /// Publishes the queued events as one batch, if any.
    async fn flush(&mut self, events: &mut Vec<KvEvent>) {
        if !events.is_empty() {
            self.publish(std::mem::take(events)).await;
        }
    }

    async fn send(&mut self, frames: Vec<Bytes>) {
        match ZmqMessage::try_from(frames) {
            Ok(m) => {
                if let Err(e) = self.publisher.send(m).await {
                    tracing::debug!("simulated engine KV-event publish: {e}");
                }
            }
            Err(e) => tracing::debug!("simulated engine KV-event message: {e}"),
        }
    }
}

async fn serve_replay(
    router: &mut RouterSocket,
    buffer: &VecDeque<(u64, Bytes)>,
    topic: &Bytes,
    request: ZmqMessage,
) {
    let frames = request.into_vec();
    let [identity, _, start] = frames.as_slice() else {
        tracing::debug!("invalid KV-event replay request: {} frames", frames.len());
        return;
    };
    let Ok(start) = <[u8; 8]>::try_from(&start[..]).map(u64::from_be_bytes) else {
        return;
    };
    let reply = |topic: Bytes, seq: Bytes, payload: Bytes| {
        ZmqMessage::try_from(vec![identity.clone(), Bytes::new(), topic, seq, payload])
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let seq = Bytes::copy_from_slice(&seq.to_be_bytes());
        if let Ok(m) = reply(topic.clone(), seq, payload.clone())
            && router.send(m).await.is_err()
        {
            return;
        }
    }
    if let Ok(m) = reply(Bytes::new(), Bytes::copy_from_slice(&END_SEQ), Bytes::new()) {
        let _ = router.send(m).await;
    }
}

async fn publish_loop(
    publisher: PubSocket,
    mut replay: Option<RouterSocket>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    topic: Bytes,
    rank: u32,
) {
    let mut st = State {
        publisher,
        topic,
        rank,
        buffer: VecDeque::new(),
        next_seq: 0,
        lose: 0,
    };
    loop {
        let request = async {
            match replay.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            msg = rx.recv() => Next::Msg(msg),
            request = request => Next::Request(request),
        };
        match next {
            Next::Msg(None) => return,
            Next::Msg(Some(msg)) => {
                let mut events = Vec::new();
                let mut next = Some(msg);
                while let Some(msg) = next.take() {
                    match msg {
                        Msg::Event(e) => events.push(e),
                        Msg::LoseNext(n) => {
                            st.flush(&mut events).await;
                            st.lose += n;
                        }
                        Msg::Raw(frames) => {
                            st.flush(&mut events).await;
                            st.send(frames).await;
                        }
                        Msg::EndBatch => st.flush(&mut events).await,
                        Msg::Payload(payload) => {
                            st.flush(&mut events).await;
                            st.publish_payload(payload).await;
                        }
                    }
                    if events.len() < MAX_EVENTS_PER_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                st.flush(&mut events).await;
            }
            Next::Request(Ok(m)) => {
                if let Some(router) = replay.as_mut() {
                    serve_replay(router, &st.buffer, &st.topic, m).await;
                }
            }
            Next::Request(Err(e)) => {
                tracing::debug!("simulated engine KV-event replay socket: {e}");
                replay = None;
            }
        }
    }
}
