//! Response bodies: either a small body the router made, or an engine's body streamed through
//! frame by frame as the engine produces it. Nothing is buffered: the engine's body is polled
//! only when the client connection can take more, so a slow reader slows the engine's
//! connection (TCP backpressure) instead of growing a buffer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::errors::sse_error_event;
use super::telemetry::RequestRecord;
use crate::engines::InFlightGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the router sends.
pub enum RouterBody {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl RouterBody {
    pub fn full(b: impl Into<Bytes>) -> RouterBody {
        RouterBody::Full(Some(b.into()))
    }

    pub fn empty() -> RouterBody {
        RouterBody::Full(None)
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
        match self.get_mut() {
            RouterBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RouterBody::Upstream(u) => {
                if u.finished {
                    return Poll::Ready(None);
                }
                match Pin::new(&mut u.inner).poll_frame(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if !u.first_frame_seen {
                            u.first_frame_seen = true;
                            u.record.first_byte(Instant::now());
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(None) => {
                        u.finish("completed");
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(engine = %u.record.engine_name(), error = %e, "engine response broke mid-body");
                        u.finish("engine_error");
                        if u.sse {
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
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RouterBody::Full(b) => b.is_none(),
            RouterBody::Upstream(u) => u.finished || u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RouterBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RouterBody::Full(None) => SizeHint::with_exact(0),
            RouterBody::Upstream(u) if u.finished => SizeHint::with_exact(0),
            RouterBody::Upstream(u) => u.inner.size_hint(),
        }
    }
}
