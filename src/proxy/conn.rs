//! Per-connection limits that hyper does not enforce the way a router needs:
//!
//! - **header read timeout** (slowloris): once the first byte of a request arrives on an idle
//!   connection, its headers must be complete within `header_read_timeout`;
//! - **idle timeout**: a keep-alive connection with no request in progress is closed after
//!   `idle_timeout` without activity.
//!
//! hyper's own HTTP/1 header timer also runs while a keep-alive connection waits for its next
//! request, which would make the idle timeout equal to the header timeout; so it is disabled
//! and both rules live here. [`WatchedIo`] notes when request bytes arrive; the service marks a
//! request in progress with a [`BusyGuard`] held until the response body ends.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1 so that 0 can mean "not set".
    epoch().elapsed().as_millis() as u64 + 1
}

/// Activity of one client connection.
#[derive(Debug, Default)]
pub struct ConnActivity {
    busy: AtomicUsize,
    /// When the current request's first byte arrived on an idle connection (0: none pending).
    head_started_ms: AtomicU64,
    last_activity_ms: AtomicU64,
}

impl ConnActivity {
    pub fn new() -> Arc<ConnActivity> {
        let a = ConnActivity::default();
        a.last_activity_ms.store(now_ms(), Ordering::Relaxed);
        Arc::new(a)
    }

    /// Marks a request in progress (its headers are complete) until the guard drops.
    pub fn begin(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(0, Ordering::Relaxed);
        BusyGuard {
            activity: Arc::clone(self),
        }
    }

    fn saw_bytes(&self) {
        if self.busy.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            self.head_started_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// When to look again, or `Err(reason)` if the connection must be closed now.
    pub fn check(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Duration, &'static str> {
        let now = now_ms();
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Ok(idle_timeout.min(header_timeout));
        }
        let head = self.head_started_ms.load(Ordering::Relaxed);
        if head != 0 {
            let waited = Duration::from_millis(now.saturating_sub(head));
            return if waited >= header_timeout {
                Err("request headers not received in time")
            } else {
                Ok(header_timeout - waited)
            };
        }
        let idle = Duration::from_millis(
            now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)),
        );
        if idle >= idle_timeout {
            Err("idle")
        } else {
            Ok(idle_timeout - idle)
        }
    }
}

/// Keeps a connection counted busy while a request is in progress.
#[derive(Debug)]
pub struct BusyGuard {
    activity: Arc<ConnActivity>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.activity
            .last_activity_ms
            .store(now_ms(), Ordering::Relaxed);
        self.activity.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that reports incoming bytes to its [`ConnActivity`].
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>) -> WatchedIo<T> {
        WatchedIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.saw_bytes();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_and_header_deadlines() {
        let a = ConnActivity::new();
        let long = Duration::from_secs(100);
        assert!(a.check(long, long).is_ok());
        assert_eq!(a.check(long, Duration::ZERO), Err("idle"));
        a.saw_bytes();
        assert_eq!(
            a.check(Duration::ZERO, long),
            Err("request headers not received in time")
        );
        let g = a.begin();
        assert!(
            a.check(Duration::ZERO, Duration::ZERO).is_ok(),
            "busy connections are never cut"
        );
        drop(g);
        assert!(
            a.check(Duration::ZERO, long).is_ok(),
            "headers complete: no header deadline"
        );
    }
}
