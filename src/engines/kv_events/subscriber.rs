//! One engine's KV-event subscriber: a task that follows the engine's PUB socket, recovers
//! missed batches from its replay socket, and keeps the engine's view in the exact index.
//!
//! **Sequence.** Batches carry consecutive sequence numbers from 0 (vLLM's publisher counts
//! from 0 at each start). A batch with the expected number is applied. A jump forward is a gap:
//! the missing batches are asked from the replay socket (DEALER to vLLM's ROUTER, from the
//! first missing number); if they all come back, nothing was lost. Without a replay socket, or
//! if the replay does not cover the gap (or fails, or times out), the view is dropped (cleared,
//! not live) and rebuilt from the stream. A number lower than expected is a duplicate of a
//! batch already replayed, else the engine restarted: the view is dropped and followed anew.
//! After the connection was lost, the first batch must be the expected one; anything else
//! means the engine may have restarted meanwhile, and the view is dropped too.
//!
//! **Complete and partial** ([`super::completeness`]). A view is complete when it has
//! followed the engine since a point where the engine's cache state was known: its first batch
//! (sequence 0, received live or by replay), or an `AllBlocksCleared`. A view that starts
//! mid-stream (the router started after the engine and no replay reaches back to 0, or after
//! a dropped view) is partial: it knows for certain the blocks stored since it started, and is
//! used at once; it becomes complete once the engine has stored its cache capacity in blocks
//! since then (or, capacity unknown, after [`SubscriberOptions::rebuild_after_batches`]
//! batches) and the view knows of no block the engine holds that it cannot key.
//!
//! **Anchoring.** A run stored under a parent block the view does not know (cached before the
//! join: a chat template's opening block, typically) is keyed if the router recently sent the
//! engine a request that holds it ([`crate::prefix::exact::anchor`]): the router notes its
//! requests on the request path, the search runs here, as the batch is applied.
//!
//! **Live** = connected and in sequence; then the view is used as partial or complete
//! ([`ViewState`]). While not live, `kv_lookup` uses the approximate index for this engine.
//!
//! **Catch-up on connect.** With a replay socket, the subscriber asks it for everything from
//! sequence 0 as soon as it (re)connects: an engine that stored blocks before the router
//! subscribed and then went idle (or whose first batches went out before the subscription
//! reached it) is complete at once, and an empty buffer means the engine has published nothing.
//! Without a replay socket, the view waits for the engine's next batch.
//!
//! Malformed messages are counted and skipped (their sequence number still counts as
//! received: replaying them would give the same bytes). Nothing here can stop routing: the
//! task only writes the engine's view.

use std::sync::Arc;

use bytes::Bytes;

use super::completeness::{BatchEffect, Completeness};
use super::ingest;
use super::metrics::StreamMetrics;
use super::replay::fetch_replay;
use super::wire::{self, EventBatch};
use super::zmtp::{self, Received, SocketType};
use super::{CacheCapacity, KvEndpoints, SubscriberOptions};
use crate::prefix::exact::{ExactIndex, ViewState};

/// The follower of one engine's stream.
pub(super) struct Stream {
    engine: u32,
    /// The engine's data-parallel rank this stream is (each rank publishes its own).
    rank: u32,
    endpoints: KvEndpoints,
    index: Arc<ExactIndex>,
    opts: SubscriberOptions,
    m: StreamMetrics,
    /// The next sequence number; `None` before the first batch and after a drop.
    expected: Option<u64>,
    /// Batches below `expected` and at least this were replayed ahead of the live stream:
    /// their live copies are duplicates.
    dup_floor: Option<u64>,
    /// Whether the view is complete, or how far from it.
    completeness: Completeness,
    /// The engine's cache capacity in blocks, when its `/metrics` says.
    capacity: CacheCapacity,
    connected: bool,
    /// The connection was lost since the last batch.
    reconnected: bool,
    /// Scratch space for engine hashes.
    keys: Vec<u64>,
}

impl Stream {
    /// A follower of the stream of `engine`'s data-parallel rank `rank` (the engine named
    /// `name` in metrics), not connected yet. The rank's view must exist.
    pub(super) fn new(
        engine: u32,
        rank: u32,
        name: &str,
        endpoints: KvEndpoints,
        index: Arc<ExactIndex>,
        opts: SubscriberOptions,
        capacity: CacheCapacity,
    ) -> Stream {
        let m = StreamMetrics::new(name);
        m.set_state(ViewState::Off);
        Stream {
            engine,
            rank,
            endpoints,
            index,
            m,
            opts,
            expected: None,
            dup_floor: None,
            completeness: Completeness::partial(),
            capacity,
            connected: false,
            reconnected: false,
            keys: Vec::new(),
        }
    }

    /// A message over the size cap was dropped (its batch, if it was one, is lost: the next
    /// batch reveals the gap).
    pub(super) fn oversized(&self, bytes: u64) {
        self.m.oversized.increment(1);
        tracing::warn!(
            engine = self.engine,
            bytes,
            cap = self.opts.limits.max_message_bytes,
            "KV-event message over the size cap dropped"
        );
    }

    fn set_live(&self) {
        let live = self.connected && !self.reconnected && self.expected.is_some();
        let state = match (live, self.completeness.is_complete()) {
            (false, _) => ViewState::Off,
            (true, true) => ViewState::Complete,
            (true, false) => ViewState::Partial,
        };
        self.index
            .update_rank(self.engine, self.rank, |v| v.set_state(state));
        self.m.set_state(state);
    }

    pub(super) fn disconnected(&mut self) {
        if self.connected {
            self.connected = false;
            self.reconnected = true;
            self.set_live();
        }
    }

    pub(super) fn connected(&mut self) {
        self.connected = true;
    }

    /// Drops the view: cleared, not live, following anew.
    fn drop_view(&mut self) {
        self.index.update_rank(self.engine, self.rank, |v| {
            v.clear();
            v.set_live(false);
        });
        self.expected = None;
        self.dup_floor = None;
        self.completeness = Completeness::partial();
        self.m.set_state(ViewState::Off);
        self.m.unkeyed.set(0.0);
    }

    pub(super) async fn on_frames(&mut self, frames: &[Bytes]) {
        let (seq, payload) = match wire::split_frames(frames) {
            Ok(f) => (f.seq, frames[2].clone()),
            Err(e) => {
                self.m.malformed.increment(1);
                tracing::debug!(engine = self.engine, error = %e, "malformed KV-event message skipped");
                return;
            }
        };
        let reconnected = std::mem::take(&mut self.reconnected);
        match self.expected {
            Some(e) if seq == e => {
                // The live stream is in order: once it reaches `expected`, nothing older can
                // be a copy of a replayed batch any more.
                self.dup_floor = None;
                self.apply(seq, &payload);
            }
            None => self.resync(seq, payload).await,
            Some(_) if reconnected => {
                // The engine may have restarted while the connection was down.
                self.m.restarts.increment(1);
                self.drop_view();
                self.resync(seq, payload).await;
            }
            Some(e) if seq > e => self.recover_gap(e, seq, payload).await,
            Some(_) if self.dup_floor.is_some_and(|f| seq >= f) => {}
            Some(_) => {
                self.m.restarts.increment(1);
                tracing::info!(
                    engine = self.engine,
                    seq,
                    "KV-event sequence went back: the engine restarted"
                );
                self.drop_view();
                self.resync(seq, payload).await;
            }
        }
        self.set_live();
    }

    /// On (re)connecting, with a replay socket: catches up at once instead of waiting for the
    /// next live batch, which an idle engine may not publish for a long time (and the first
    /// batches of a fresh engine can be published before the subscription reaches it). A
    /// buffer that starts at sequence 0 is the engine's whole history, so the view is complete;
    /// an empty one means the engine has published nothing yet (its cache holds no blocks).
    /// A buffer that no longer reaches back to 0 leaves the view as it is: the next live batch
    /// resynchronises it.
    pub(super) async fn catch_up(&mut self) {
        let Some(replay) = self.endpoints.replay.clone() else {
            return;
        };
        if self.expected.is_some() && !self.reconnected {
            return;
        }
        let batches = match fetch_replay(&replay, 0, self.opts.replay_timeout, &self.opts.limits)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.m.replays_failed.increment(1);
                tracing::debug!(engine = self.engine, error = %e, "KV-event catch-up replay failed; waiting for the stream");
                return;
            }
        };
        self.m.replays_ok.increment(1);
        let whole = batches.first().is_none_or(|b| b.0 == 0) && is_contiguous(&batches);
        if !whole {
            return;
        }
        self.reconnected = false;
        self.index
            .update_rank(self.engine, self.rank, |v| v.clear());
        self.completeness = Completeness::Complete;
        self.expected = Some(0);
        // Live copies of the replayed batches may still be queued on the subscription.
        self.dup_floor = Some(0);
        for (s, p) in &batches {
            self.apply(*s, p);
        }
        self.set_live();
    }

    /// Missing `expected..seq`: replays them, or drops the view.
    async fn recover_gap(&mut self, expected: u64, seq: u64, payload: Bytes) {
        self.m.gaps.increment(1);
        tracing::debug!(engine = self.engine, expected, seq, "KV-event gap");
        if let Some(replay) = self.endpoints.replay.clone() {
            match fetch_replay(
                &replay,
                expected,
                self.opts.replay_timeout,
                &self.opts.limits,
            )
            .await
            {
                Ok(batches) => {
                    let covers = batches.first().map(|b| b.0) == Some(expected)
                        && is_contiguous(&batches)
                        && batches.last().is_some_and(|b| b.0 + 1 >= seq);
                    if covers {
                        self.m.replays_ok.increment(1);
                        for (s, p) in &batches {
                            self.apply(*s, p);
                        }
                        self.dup_floor = Some(seq);
                        if self.expected == Some(seq) {
                            self.apply(seq, &payload);
                        }
                        return;
                    }
                    tracing::info!(
                        engine = self.engine,
                        expected,
                        "KV-event replay does not reach back to the gap: dropping the view"
                    );
                }
                Err(e) => {
                    tracing::info!(engine = self.engine, error = %e, "KV-event replay failed: dropping the view");
                }
            }
            self.m.replays_failed.increment(1);
        }
        self.drop_view();
        self.resync(seq, payload).await;
    }

    /// Starts following at `seq` (first batch, or after a drop): with a replay socket, from the
    /// engine's first batch if its buffer still holds it.
    async fn resync(&mut self, seq: u64, payload: Bytes) {
        let mut run: Vec<(u64, Bytes)> = Vec::new();
        if seq != 0
            && let Some(replay) = self.endpoints.replay.clone()
        {
            match fetch_replay(&replay, 0, self.opts.replay_timeout, &self.opts.limits).await {
                Ok(batches) => {
                    self.m.replays_ok.increment(1);
                    run = batches;
                }
                Err(e) => {
                    self.m.replays_failed.increment(1);
                    tracing::info!(engine = self.engine, error = %e, "KV-event replay failed");
                }
            }
        }
        if run.last().is_none_or(|b| b.0 < seq) {
            run.push((seq, payload));
        } else {
            self.dup_floor = Some(seq);
        }
        // Keep the contiguous tail: what follows the last break in the numbering.
        let start = (1..run.len())
            .rev()
            .find(|&i| run[i].0 != run[i - 1].0 + 1)
            .unwrap_or(0);
        let first = run[start].0;
        self.index
            .update_rank(self.engine, self.rank, |v| v.clear());
        self.completeness = Completeness::starting_at(first);
        self.expected = Some(first);
        for (s, p) in &run[start..] {
            self.apply(*s, p);
        }
    }

    /// Applies one batch in sequence.
    fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.expected = Some(seq + 1);
        self.m.batches.increment(1);
        let effect = match wire::decode_batch(payload) {
            Ok(batch) => self.apply_batch(&batch),
            Err(e) => {
                self.m.malformed.increment(1);
                tracing::debug!(engine = self.engine, seq, error = %e, "malformed KV-event batch skipped");
                BatchEffect::default()
            }
        };
        let was_complete = self.completeness.is_complete();
        self.completeness.after_batch(
            effect,
            self.capacity.blocks(),
            self.opts.rebuild_after_batches,
        );
        if !was_complete && self.completeness.is_complete() {
            tracing::info!(engine = self.engine, seq, "KV-event view complete");
        }
        self.m.index_bytes.set(self.index.accounted_bytes() as f64);
        self.m.index_blocks.set(self.index.blocks() as f64);
    }

    /// Applies the events; what they did, for completeness.
    fn apply_batch(&mut self, batch: &EventBatch) -> BatchEffect {
        let Some(a) =
            ingest::apply_batch_to_rank(&self.index, self.engine, self.rank, batch, &mut self.keys)
        else {
            return BatchEffect::default();
        };
        let m = &self.m;
        m.stored.increment(a.stored);
        m.removed.increment(a.removed);
        m.cleared.increment(a.cleared);
        m.unknown.increment(a.unknown);
        m.unanchored.increment(a.unanchored_blocks);
        m.anchored.increment(a.anchored_blocks);
        m.unknown_removals.increment(a.unknown_removals);
        m.other_groups.increment(a.other_groups);
        m.malformed.increment(a.bad_events);
        m.unkeyed.set(a.unkeyed_blocks as f64);
        BatchEffect {
            stored_blocks: a.stored_gpu_blocks,
            cleared: a.cleared > 0,
            unkeyed: a.unkeyed_blocks,
        }
    }
}

fn is_contiguous(batches: &[(u64, Bytes)]) -> bool {
    batches.windows(2).all(|w| w[1].0 == w[0].0 + 1)
}

/// What one subscriber follows: one data-parallel rank of an engine.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub engine: u32,
    pub rank: u32,
    /// The metric label.
    pub name: Arc<str>,
    pub endpoints: KvEndpoints,
    /// The topic prefix to subscribe to (vLLM's `topic`; "" for all).
    pub topic: String,
    /// Where the engine's cache capacity is read.
    pub capacity: CacheCapacity,
}

impl Target {
    /// Rank 0 of `engine`, subscribed to every topic.
    pub fn rank0(
        engine: u32,
        name: &str,
        endpoints: KvEndpoints,
        capacity: CacheCapacity,
    ) -> Target {
        Target {
            engine,
            rank: 0,
            name: Arc::from(name),
            endpoints,
            topic: String::new(),
            capacity,
        }
    }
}

/// Follows `target` until aborted: connects (retrying with backoff), follows the stream, and
/// reconnects when it breaks.
pub(super) async fn run(target: Target, index: Arc<ExactIndex>, opts: SubscriberOptions) {
    let Target {
        engine,
        rank,
        name,
        endpoints,
        topic,
        capacity,
    } = target;
    index.add_rank(engine, rank);
    let mut stream = Stream::new(engine, rank, &name, endpoints, index, opts, capacity);
    let mut backoff = stream.opts.reconnect_min;
    loop {
        let connect = async {
            let mut sub = zmtp::connect(
                &stream.endpoints.events,
                SocketType::Sub,
                &stream.opts.limits,
            )
            .await?;
            sub.subscribe(topic.as_bytes()).await?;
            Ok::<_, zmtp::ZmtpError>(sub)
        };
        let mut sub = match connect.await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::debug!(engine, rank, error = %e, endpoint = %stream.endpoints.events, "KV-event subscriber cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(stream.opts.reconnect_max);
                continue;
            }
        };
        backoff = stream.opts.reconnect_min;
        stream.connected();
        stream.catch_up().await;
        loop {
            match sub.recv().await {
                Ok(Received::Message(frames)) => stream.on_frames(&frames).await,
                Ok(Received::Oversized { bytes, .. }) => stream.oversized(bytes),
                Err(e) => {
                    tracing::debug!(engine, rank, error = %e, "KV-event subscription lost; reconnecting");
                    break;
                }
            }
        }
        stream.disconnected();
        tokio::time::sleep(backoff).await;
    }
}
