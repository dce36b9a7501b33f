//! Response bodies: either a small body the router made, or an engine's body streamed through
//! frame by frame as the engine produces it. Nothing is buffered: the engine's body is polled
//! only when the client connection can take more, so a slow reader slows the engine's
//! connection (TCP backpressure) instead of growing a buffer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::conn::BusyGuard;
use super::errors::sse_error_event;
use super::telemetry::RequestRecord;
use crate::engines::InFlightGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the router sends.
pub struct RouterBody {
    kind: Kind,
    /// Keeps the client connection counted busy until the body ends (see `conn`).
    busy: Option<BusyGuard>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl RouterBody {
    pub fn full(b: impl Into<Bytes>) -> RouterBody {
        RouterBody {
            kind: Kind::Full(Some(b.into())),
            busy: None,
        }
    }

    pub fn upstream(u: UpstreamBody) -> RouterBody {
        RouterBody {
            kind: Kind::Upstream(Box::new(u)),
            busy: None,
        }
    }

    pub fn set_busy_guard(&mut self, g: BusyGuard) {
        self.busy = Some(g);
    }
}

/// An engine's response body in flight to the client.
pub struct UpstreamBody {
    inner: Incoming,
    /// Keeps the request counted in the engine's in-flight figure until the body ends or the
    /// client goes away (drop).
    guard: Option<InFlightGuard>,
    record: RequestRecord,
    /// An SSE stream ends with an error event (not a hang, not a silent cut) if the engine fails.
    sse: bool,
    first_frame_seen: bool,
    finished: bool,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        guard: InFlightGuard,
        record: RequestRecord,
        sse: bool,
    ) -> UpstreamBody {
        UpstreamBody {
            inner,
            guard: Some(guard),
            record,
            sse,
            first_frame_seen: false,
            finished: false,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        if !self.finished {
            self.finished = true;
            self.record.finish(outcome);
            self.guard = None;
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away before the end: the engine's connection is dropped with us,
        // which cancels the request on the engine.
        self.finish("client_disconnected");
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(u) => u.poll_frame(cx),
        };
        if matches!(polled, Poll::Ready(None)) {
            this.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.finished || u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(u) if u.finished => SizeHint::with_exact(0),
            Kind::Upstream(u) => u.inner.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if !self.first_frame_seen {
                    self.first_frame_seen = true;
                    self.record.first_byte(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.finish("completed");
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(engine = %self.record.engine_name(), error = %e, "engine response broke mid-body");
                self.finish("engine_error");
                if self.sse {
                    Poll::Ready(Some(Ok(Frame::data(sse_error_event(&format!(
                        "engine stream failed: {e}"
                    ))))))
                } else {
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
        }
    }
}
