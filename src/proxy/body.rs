//! Response bodies: either a small body the router made, or an engine's body streamed through
//! as the engine produces it, frames that are ready together relayed in one write
//! ([`Coalesced`], at most [`super::coalesce::COALESCE_MAX_BYTES`] joined). Nothing else is
//! buffered: the engine's body is polled only when the client connection can take more, so a
//! slow reader slows the engine's connection (TCP backpressure) instead of growing a buffer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::coalesce::Coalesced;
use super::conn::BusyGuard;
use super::handoff::AnswerRewrite;
use super::telemetry::RequestRecord;
use crate::engines::InFlightGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest engine error body relayed to a client (the last attempt's 5xx); a larger one is
/// replaced by the router's own 502.
pub const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
/// Longest wait for an engine error body to end (less if `--first-byte-timeout` is shorter).
pub const ERROR_BODY_TIME_LIMIT: Duration = Duration::from_secs(10);

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error("no request body byte received for {0:?}")]
    Stalled(Duration),
    #[error("could not read the request body: {0}")]
    Broken(BoxError),
}

/// Why an engine's error body was not relayed.
#[derive(Debug, thiserror::Error)]
pub enum ErrorBodyError {
    #[error("its error body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("its error body did not end within {0:?}")]
    TooSlow(Duration),
    #[error("its error body broke: {0}")]
    Broken(BoxError),
}

/// How [`collect_capped`] stopped early.
enum Cut {
    TooLarge,
    TimedOut,
    Broken(BoxError),
}

/// Reads a whole body, at most `limit` bytes, each frame within `idle` of the previous one and
/// all of it before `deadline`. One frame is kept as it came; more are gathered into one buffer
/// as they arrive (reserved from `expected`, e.g. a `Content-Length`), so a large body is never
/// held twice.
async fn collect_capped<B>(
    mut body: B,
    limit: usize,
    idle: Duration,
    deadline: Option<tokio::time::Instant>,
    expected: usize,
) -> Result<Bytes, Cut>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0usize;
    loop {
        let mut until = tokio::time::Instant::now() + idle;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => return Err(Cut::TimedOut),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Cut::Broken(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(Cut::TooLarge);
        }
        if data.is_empty() {
            continue;
        }
        if first.is_none() && buf.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(f) = first.take() {
            buf.reserve(expected.max(len).min(limit));
            buf.extend_from_slice(&f);
        }
        buf.extend_from_slice(&data);
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Reads a client's request body, at most `limit` bytes. `idle` is the body read timeout: the
/// longest wait for the next frame, counted from the last one received (or from the end of the
/// headers), so a slow but steady upload is never cut while a stalled one is. `expected` (the
/// `Content-Length`, or 0) sizes the buffer up front.
pub async fn read_request_body<B>(
    body: B,
    limit: usize,
    idle: Duration,
    expected: usize,
) -> Result<Bytes, BodyReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    collect_capped(body, limit, idle, None, expected)
        .await
        .map_err(|c| match c {
            Cut::TooLarge => BodyReadError::TooLarge(limit),
            Cut::TimedOut => BodyReadError::Stalled(idle),
            Cut::Broken(e) => BodyReadError::Broken(e),
        })
}

/// Reads an engine's error body if it is at most `limit` bytes and complete within `within`;
/// stops reading (and drops the engine's connection) as soon as either is exceeded.
pub async fn read_error_body<B>(
    body: B,
    limit: usize,
    within: Duration,
) -> Result<Bytes, ErrorBodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let deadline = tokio::time::Instant::now() + within;
    collect_capped(body, limit, within, Some(deadline), 0)
        .await
        .map_err(|c| match c {
            Cut::TooLarge => ErrorBodyError::TooLarge(limit),
            Cut::TimedOut => ErrorBodyError::TooSlow(within),
            Cut::Broken(e) => ErrorBodyError::Broken(e),
        })
}

/// The body of every response the router sends.
pub struct RouterBody {
    kind: Kind,
    /// Keeps the client connection counted busy until the body ends (see `conn`).
    busy: Option<BusyGuard>,
    /// The body is polled by the connection's own task (HTTP/1): its poll epoch lets the
    /// relay yield to gather a burst of engine frames (see `coalesce`).
    polled_by_conn_task: bool,
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
            polled_by_conn_task: false,
        }
    }

    pub fn upstream(u: UpstreamBody) -> RouterBody {
        RouterBody {
            kind: Kind::Upstream(Box::new(u)),
            busy: None,
            polled_by_conn_task: false,
        }
    }

    pub fn set_busy_guard(&mut self, g: BusyGuard) {
        self.busy = Some(g);
    }

    /// Marks the body as polled by the task that polls its connection (HTTP/1; on h2 hyper
    /// polls each response body in a task of its own).
    pub fn set_polled_by_conn_task(&mut self) {
        self.polled_by_conn_task = true;
    }
}

/// An engine's response body in flight to the client.
pub struct UpstreamBody {
    inner: Coalesced<Incoming>,
    /// Keeps the request counted in the engine's in-flight figure until the body ends or the
    /// client goes away (drop).
    guard: Option<InFlightGuard>,
    record: RequestRecord,
    /// An SSE stream ends with an error event (not a hang, not a silent cut) if the engine fails.
    sse: bool,
    first_frame_seen: bool,
    finished: bool,
    /// A disaggregated request's decode answer is rewritten on its way (see `handoff`).
    rewrite: Option<AnswerRewrite>,
    /// The last bytes relayed, for the usage a traced request's span reports.
    usage: Option<super::usage::UsageTail>,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        guard: InFlightGuard,
        record: RequestRecord,
        sse: bool,
    ) -> UpstreamBody {
        UpstreamBody {
            inner: Coalesced::new(inner),
            guard: Some(guard),
            sse,
            first_frame_seen: false,
            finished: false,
            rewrite: None,
            usage: record.wants_usage().then(super::usage::UsageTail::default),
            record,
        }
    }

    /// This body, rewritten on its way by `r` (its length is then unknown in advance).
    pub fn with_rewrite(mut self, r: AnswerRewrite) -> UpstreamBody {
        self.rewrite = Some(r);
        self
    }

    /// The engine's body has nothing more to give (its declared length all relayed).
    fn engine_body_done(&self) -> bool {
        self.inner.is_end_stream() || self.inner.size_hint().exact() == Some(0)
    }

    fn finish(&mut self, outcome: &'static str) {
        if !self.finished {
            self.finished = true;
            if let Some(usage) = self.usage.take().and_then(|t| t.usage()) {
                self.record
                    .usage(usage.prompt_tokens, usage.completion_tokens);
            }
            self.record.finish(outcome);
            self.guard = None;
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away before the end: the engine's connection is dropped with us,
        // which cancels the request on the engine. (A body whose declared length was all
        // relayed is dropped by hyper without a last poll: that one completed.)
        let outcome = if self.engine_body_done() {
            "completed"
        } else {
            "client_disconnected"
        };
        self.finish(outcome);
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
            Kind::Upstream(u) => {
                let epoch = match &this.busy {
                    Some(b) if this.polled_by_conn_task => Some(b.poll_epoch()),
                    _ => None,
                };
                u.poll_frame(cx, epoch)
            }
        };
        if matches!(polled, Poll::Ready(None)) {
            this.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.finished || (u.inner.is_end_stream() && u.rewrite.is_none()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(u) if u.finished => SizeHint::with_exact(0),
            Kind::Upstream(u) if u.rewrite.is_some() => SizeHint::default(),
            Kind::Upstream(u) => u.inner.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        epoch: Option<u64>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            return match self.inner.poll_next(cx, epoch) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(mut frame))) => {
                    if !self.first_frame_seen {
                        self.first_frame_seen = true;
                        self.record.first_byte(Instant::now());
                    }
                    let done = self.engine_body_done();
                    if let Some(r) = &mut self.rewrite
                        && let Some(data) = frame.data_mut()
                    {
                        let mut out = r.feed(std::mem::take(data));
                        if done {
                            let rest = r.finish();
                            if !rest.is_empty() {
                                let mut joined = BytesMut::from(&out[..]);
                                joined.extend_from_slice(&rest);
                                out = joined.freeze();
                            }
                        }
                        if out.is_empty() && !done {
                            continue;
                        }
                        *data = out;
                    }
                    if let (Some(tail), Some(data)) = (&mut self.usage, frame.data_ref()) {
                        tail.push(data);
                    }
                    // A body of known length ends with its last frame: hyper then stops
                    // polling (no `Ready(None)` follows) and drops the body, which must not
                    // count as a client that went away.
                    if done {
                        self.finish("completed");
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    self.finish("completed");
                    match self.rewrite.as_mut().map(AnswerRewrite::finish) {
                        Some(rest) if !rest.is_empty() => Poll::Ready(Some(Ok(Frame::data(rest)))),
                        _ => Poll::Ready(None),
                    }
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
            };
        }
    }
}

/// An SSE event carrying an error, sent when a stream breaks after it started.
pub fn sse_error_event(message: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": "api_error", "param": null, "code": "upstream_stream_error" }
    });
    Bytes::from(format!("data: {v}\n\ndata: [DONE]\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body yielding `chunks`, then either ending or stalling forever.
    struct Script {
        chunks: std::collections::VecDeque<Bytes>,
        stall: bool,
    }

    impl Script {
        fn new(chunks: &[&'static [u8]], stall: bool) -> Script {
            Script {
                chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
                stall,
            }
        }
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn request_body_is_whole_bounded_and_timed() {
        let b = read_request_body(Script::new(&[b"ab", b"", b"cd"], false), 4, LONG, 0).await;
        assert_eq!(b.unwrap(), "abcd");
        let b = read_request_body(Script::new(&[b"ab", b"cde"], false), 4, LONG, 0).await;
        assert!(matches!(b, Err(BodyReadError::TooLarge(4))));
        let b = read_request_body(Script::new(&[b"ab"], true), 4, SHORT, 0).await;
        assert!(matches!(b, Err(BodyReadError::Stalled(d)) if d == SHORT));
    }

    #[tokio::test]
    async fn error_body_is_cut_at_its_cap_or_time_limit() {
        let b = read_error_body(Script::new(&[b"{}"], false), 4, LONG).await;
        assert_eq!(b.unwrap(), "{}");
        let b = read_error_body(Script::new(&[b"abc", b"de"], true), 4, LONG).await;
        assert!(matches!(b, Err(ErrorBodyError::TooLarge(4))));
        let b = read_error_body(Script::new(&[b"a"], true), 4, SHORT).await;
        assert!(matches!(b, Err(ErrorBodyError::TooSlow(_))));
    }
}
