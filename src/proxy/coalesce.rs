//! Coalescing of an engine's ready body frames into one write to the client.
//!
//! An engine streams one SSE event per write; hyper's client hands the router one frame at a
//! time through a one-slot channel filled by the engine connection's own task, and hyper's
//! server writes (one `writev`, a full pass through the loopback or network stack) whenever the
//! body has nothing more ready. Relayed as they come, a burst of N events costs N writes, and
//! the writes were most of the router's CPU on a streamed response (perf, `benches/proxy.sh`
//! burst mode: ~2/3 under `writev`).
//!
//! [`Coalesced`] keeps what is ready and, while frames arrive in a burst (less than
//! [`BURST_GAP`] after the previous one), yields to the scheduler once so that the engine
//! connection's task can hand over the next frame it already has, then relays everything
//! gathered as one frame: one write. It stops gathering at the first yield that brings nothing,
//! at [`COALESCE_MAX_BYTES`], or when the first held byte has waited [`MAX_HOLD`]. A frame that
//! arrives alone (the previous one is older than [`BURST_GAP`], as when an engine paces its
//! tokens) is relayed at once, without a yield: no timer ever holds a frame back. The bytes
//! are relayed unchanged and in order; an end, an error or trailers after held bytes are
//! relayed after them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// The largest frame made by joining engine frames (a single larger frame passes as it is).
pub const COALESCE_MAX_BYTES: usize = 16 * 1024;
/// Frames closer together than this are a burst, worth a yield to gather the next one.
pub const BURST_GAP: Duration = Duration::from_micros(200);
/// The longest the first held byte waits while a burst is being gathered.
pub const MAX_HOLD: Duration = Duration::from_millis(1);

/// What the inner body said after bytes that are still held.
enum After<E> {
    End,
    Error(E),
    Trailers(HeaderMap),
}

/// A body whose ready frames are relayed together (see the module doc).
pub struct Coalesced<B: Body> {
    inner: B,
    /// The first held frame, kept as it came if nothing joins it.
    first: Option<Bytes>,
    /// Held frames joined, once there are two or more.
    joined: BytesMut,
    /// When the first held byte arrived.
    held_since: Option<Instant>,
    /// When the last data frame arrived from the inner body.
    last_frame: Option<Instant>,
    /// Data frames seen so far.
    frames: u64,
    /// Worth a yield: the last yield brought a frame, or the last frame came in a burst (or no
    /// yield was tried yet on this body).
    yield_pays: bool,
    /// Frames arrived since the last yield (or since holding began).
    progress: bool,
    /// The poll epoch of the yield in progress.
    yielded_at: Option<u64>,
    after: Option<After<B::Error>>,
    done: bool,
}

// Nothing is pinned structurally: the inner body is `Unpin` and is polled through `Pin::new`.
impl<B: Body + Unpin> Unpin for Coalesced<B> {}

impl<B: Body<Data = Bytes> + Unpin> Coalesced<B> {
    pub fn new(inner: B) -> Coalesced<B> {
        Coalesced {
            inner,
            first: None,
            joined: BytesMut::new(),
            held_since: None,
            last_frame: None,
            frames: 0,
            yield_pays: true,
            progress: false,
            yielded_at: None,
            after: None,
            done: false,
        }
    }

    fn held_len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.len()
    }

    fn hold(&mut self, data: Bytes, now: Instant) {
        match self.first.take() {
            None if self.joined.is_empty() => {
                self.first = Some(data);
                self.held_since = Some(now);
            }
            first => {
                if let Some(f) = first {
                    self.joined
                        .reserve((f.len() + data.len()).clamp(4096, COALESCE_MAX_BYTES));
                    self.joined.extend_from_slice(&f);
                }
                self.joined.extend_from_slice(&data);
            }
        }
    }

    fn take_held(&mut self) -> Option<Bytes> {
        self.held_since = None;
        match self.first.take() {
            Some(f) => Some(f),
            None if self.joined.is_empty() => None,
            None => Some(self.joined.split().freeze()),
        }
    }

    /// True once the inner body ended and everything was relayed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: Body<Data = Bytes> + Unpin> Coalesced<B> {
    /// Polls for the next frame to relay. `epoch` counts the polls of the task that polls this
    /// body (see [`super::conn::ConnActivity::poll_epoch`]); without it no yield is tried (a
    /// yield must tell its own task's next poll from hyper polling the body again within the
    /// same one), and ready frames are still joined.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        epoch: Option<u64>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self;
        if let Some(after) = this.after.take() {
            return Poll::Ready(match after {
                After::End => {
                    this.done = true;
                    None
                }
                After::Error(e) => Some(Err(e)),
                After::Trailers(t) => Some(Ok(Frame::trailers(t))),
            });
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            let after = match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => {
                        let now = Instant::now();
                        if this.last_frame.is_some_and(|t| now - t < BURST_GAP) {
                            this.yield_pays = true;
                        }
                        this.last_frame = Some(now);
                        this.frames += 1;
                        if this.held_len() > 0 && this.held_len() + data.len() > COALESCE_MAX_BYTES
                        {
                            // Full: relay what is held; this frame starts the next batch.
                            let out = this.take_held().unwrap_or_default();
                            this.hold(data, now);
                            this.progress = true;
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        this.hold(data, now);
                        this.progress = true;
                        if this.held_len() >= COALESCE_MAX_BYTES {
                            let out = this.take_held().unwrap_or_default();
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        continue;
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => After::Trailers(t),
                        Err(_) => continue,
                    },
                },
                Poll::Ready(Some(Err(e))) => After::Error(e),
                Poll::Ready(None) => After::End,
                Poll::Pending => {
                    if this.held_len() == 0 {
                        this.yielded_at = None;
                        return Poll::Pending;
                    }
                    if this.yielded_at.is_some() && this.yielded_at == epoch {
                        // Polled again within the poll that yielded: the wake stands.
                        return Poll::Pending;
                    }
                    if this.yielded_at.is_some() && !this.progress {
                        // The last yield brought nothing: not worth another until frames come
                        // in a burst again.
                        this.yield_pays = false;
                    }
                    let gathering = epoch.is_some()
                        && this.frames > 1
                        && this.yield_pays
                        && this.progress
                        && this.held_since.is_some_and(|t| t.elapsed() < MAX_HOLD);
                    if gathering {
                        // Let the engine connection's task (woken when we took its frame) run
                        // first: it may have the next frame already read.
                        this.progress = false;
                        this.yielded_at = epoch;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    this.yielded_at = None;
                    let out = this.take_held().unwrap_or_default();
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            };
            // The inner body ended, failed or sent trailers: held bytes go first.
            return match this.take_held() {
                Some(b) => {
                    this.after = Some(after);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => Poll::Ready(match after {
                    After::End => {
                        this.done = true;
                        None
                    }
                    After::Error(e) => Some(Err(e)),
                    After::Trailers(t) => Some(Ok(Frame::trailers(t))),
                }),
            };
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Coalesced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.get_mut().poll_next(cx, None)
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.held_len() == 0 && self.after.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held_len() as u64;
        let inner = self.inner.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + held);
        if let Some(u) = inner.upper() {
            h.set_upper(u + held);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    enum Step {
        Data(Bytes),
        Wait,
        End,
        Fail,
        Trailers,
    }

    /// A body that plays `steps` (`Wait`: one `Pending`), then stays pending.
    struct Script(VecDeque<Step>);

    impl Body for Script {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            match self.0.pop_front() {
                Some(Step::Data(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Some(Step::Wait) | None => Poll::Pending,
                Some(Step::End) => Poll::Ready(None),
                Some(Step::Fail) => Poll::Ready(Some(Err("broke"))),
                Some(Step::Trailers) => Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new())))),
            }
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn data(s: &str) -> Step {
        Step::Data(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn body(steps: Vec<Step>) -> Coalesced<Script> {
        Coalesced::new(Script(steps.into()))
    }

    /// What one poll gives: `"data:.."`, `"end"`, `"error"`, `"trailers"` or `"pending"`.
    fn poll(b: &mut Coalesced<Script>, cx: &mut Context<'_>, epoch: Option<u64>) -> String {
        match b.poll_next(cx, epoch) {
            Poll::Pending => "pending".into(),
            Poll::Ready(None) => "end".into(),
            Poll::Ready(Some(Err(_))) => "error".into(),
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => "trailers".into(),
            Poll::Ready(Some(Ok(f))) => {
                let d = f.into_data().unwrap_or_default();
                format!("data:{}", String::from_utf8_lossy(&d))
            }
        }
    }

    fn waker() -> (Arc<CountWakes>, Waker) {
        let w = Arc::new(CountWakes(AtomicUsize::new(0)));
        (w.clone(), Waker::from(w))
    }

    #[test]
    fn ready_frames_are_joined_and_what_follows_them_comes_after() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let mut b = body(vec![data("a"), data("b"), data("c"), Step::Wait, data("d")]);
        assert_eq!(poll(&mut b, &mut cx, None), "data:abc");
        assert_eq!(poll(&mut b, &mut cx, None), "data:d");
        assert_eq!(poll(&mut b, &mut cx, None), "pending");
        for (last, then) in [
            (Step::End, "end"),
            (Step::Fail, "error"),
            (Step::Trailers, "trailers"),
        ] {
            let mut b = body(vec![data("a"), data("b"), last]);
            assert_eq!(poll(&mut b, &mut cx, None), "data:ab");
            assert_eq!(poll(&mut b, &mut cx, None), then);
        }
        let mut b = body(vec![data("a"), Step::End]);
        assert_eq!(poll(&mut b, &mut cx, None), "data:a");
        assert!(!b.is_end_stream(), "the end is still to come");
        assert_eq!(poll(&mut b, &mut cx, None), "end");
        assert!(b.is_end_stream());
    }

    #[test]
    fn joined_frames_never_pass_the_bound() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let k = "x".repeat(COALESCE_MAX_BYTES / 3 + 1);
        let big = "y".repeat(COALESCE_MAX_BYTES + 1);
        let mut b = body(vec![
            data(&k),
            data(&k),
            data(&k),
            data(&big),
            data("z"),
            Step::End,
        ]);
        let mut sizes = Vec::new();
        loop {
            match poll(&mut b, &mut cx, None).as_str() {
                "end" => break,
                d => sizes.push(d.len() - "data:".len()),
            }
        }
        // Two of the three fit; the third starts the next batch; a frame over the bound alone
        // passes whole.
        assert_eq!(sizes, vec![2 * k.len(), k.len(), big.len(), 1]);
    }

    #[test]
    fn a_burst_is_gathered_across_yields_and_a_lone_frame_is_not_held() {
        let (wakes, w) = waker();
        let mut cx = Context::from_waker(&w);
        let mut b = body(vec![
            data("a"),
            Step::Wait,
            data("b"),
            Step::Wait,
            Step::Wait,
            data("c"),
            Step::Wait,
            Step::Wait,
            data("d"),
        ]);
        // The first frame of a body is relayed at once.
        assert_eq!(poll(&mut b, &mut cx, Some(1)), "data:a");
        // The second is held for a yield, which wakes the task...
        assert_eq!(poll(&mut b, &mut cx, Some(2)), "pending");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        // ...and stays held if polled again within the same task poll.
        assert_eq!(poll(&mut b, &mut cx, Some(2)), "pending");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        // The yield brought a frame: one more yield.
        assert_eq!(poll(&mut b, &mut cx, Some(3)), "pending");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        // That one brought nothing: what was gathered goes, as one frame.
        assert_eq!(poll(&mut b, &mut cx, Some(4)), "data:bc");
        // Without an epoch nothing waits.
        assert_eq!(poll(&mut b, &mut cx, None), "data:d");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
    }
}
