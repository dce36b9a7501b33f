//! Per-connection limits that hyper does not enforce the way a router needs:
//!
//! - **header read timeout** (slowloris): the first request's headers must be complete within
//!   `header_read_timeout` of the connection being accepted, and a later keep-alive request's
//!   within `header_read_timeout` of its first byte (HTTP/1: on h2, bytes between requests may
//!   be control frames, so only the idle timeout applies after the first request);
//! - **idle timeout**: a keep-alive connection with no request in progress is closed after
//!   `idle_timeout` without activity;
//! - **connection cap**: at most `max_connections` client connections are served at once
//!   ([`ConnLimit`]); the open-file limit is raised to its hard limit at start
//!   ([`raise_nofile_limit`]) and the default cap derived from it ([`derive_max_connections`]).
//!
//! hyper's own HTTP/1 header timer also runs while a keep-alive connection waits for its next
//! request, which would make the idle timeout equal to the header timeout; so it is disabled
//! and both rules live here. [`WatchedIo`] notes when request bytes arrive; the service marks a
//! request in progress with a [`BusyGuard`] held until the response body ends. Either change
//! wakes the connection's watchdog ([`ConnActivity::changed`]), which then re-computes its
//! deadline: no deadline is ever later than the rules say, whatever the timing of the bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// When the pending request's headers started: the accept time for the first request, the
    /// first byte's arrival on an idle connection for later ones (0: none pending).
    head_started_ms: AtomicU64,
    last_activity_ms: AtomicU64,
    /// Wakes the watchdog when bytes arrive on an idle connection or the last request ends.
    changed: Notify,
    /// The client speaks h2 (prior knowledge): bytes on an idle h2 connection are as likely
    /// PING or WINDOW_UPDATE frames as a request, so after the first request only the idle
    /// timeout applies (hyper hands over a stream only once its headers are complete).
    http2: std::sync::atomic::AtomicBool,
    /// Polls of the connection's task so far (see [`PollCounted`]).
    polls: AtomicU64,
}

impl ConnActivity {
    /// The activity of a connection accepted now: its first request's header deadline runs
    /// from this moment.
    pub fn new() -> Arc<ConnActivity> {
        let a = ConnActivity::default();
        let now = now_ms();
        a.last_activity_ms.store(now, Ordering::Relaxed);
        a.head_started_ms.store(now, Ordering::Relaxed);
        Arc::new(a)
    }

    /// Completes when the connection's state changed since the last call (a permit is kept if
    /// nobody was waiting), so the watchdog re-computes its deadline.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Marks a request in progress (its headers are complete) until the guard drops.
    pub fn begin(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(0, Ordering::Relaxed);
        BusyGuard {
            activity: Arc::clone(self),
        }
    }

    /// How many times the connection's task has polled the connection: lets a response body
    /// tell a new poll of its task from hyper polling it again within the same one.
    pub fn poll_epoch(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    fn saw_bytes(&self) {
        if self.busy.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
            && self.head_started_ms.load(Ordering::Relaxed) == 0
            && self
                .head_started_ms
                .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Idle until now: the watchdog may be asleep until the idle deadline.
            self.changed.notify_one();
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

impl BusyGuard {
    /// The connection's [`ConnActivity::poll_epoch`].
    pub fn poll_epoch(&self) -> u64 {
        self.activity.poll_epoch()
    }
}

/// A connection future that counts its polls in its [`ConnActivity`].
pub struct PollCounted<F> {
    inner: Pin<Box<F>>,
    activity: Arc<ConnActivity>,
}

impl<F> PollCounted<F> {
    pub fn new(inner: F, activity: Arc<ConnActivity>) -> PollCounted<F> {
        PollCounted {
            inner: Box::pin(inner),
            activity,
        }
    }

    pub fn inner(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<F: std::future::Future> std::future::Future for PollCounted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.activity.polls.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.activity
            .last_activity_ms
            .store(now_ms(), Ordering::Relaxed);
        if self.activity.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Idle from now on: the idle deadline starts.
            self.activity.changed.notify_one();
        }
    }
}

/// The cap on client connections served at once.
#[derive(Debug)]
pub struct ConnLimit {
    max: usize,
    slots: Arc<Semaphore>,
}

/// One served client connection's place under the cap; freed when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        metrics::gauge!("switchyard_client_connections").decrement(1.0);
    }
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        metrics::gauge!("switchyard_client_connections_max").set(max as f64);
        ConnLimit {
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// A slot for a new connection, or `None` at the cap (the connection is then closed at once
    /// and counted in `switchyard_client_connections_refused_total`).
    pub fn try_admit(&self) -> Option<ConnSlot> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("switchyard_client_connections").increment(1.0);
                Some(ConnSlot { _permit: permit })
            }
            Err(_) => {
                metrics::counter!("switchyard_client_connections_refused_total").increment(1);
                None
            }
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Client connections being served now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Raises the soft open-file limit (RLIMIT_NOFILE) to the hard limit and returns the soft limit
/// now in effect (`None` if it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// The default connection cap for an open-file limit: the limit less a reserve for engine
/// connections, the listener, logs and policy files: a quarter of the limit, at most 4096.
pub fn derive_max_connections(nofile: u64) -> usize {
    let reserve = (nofile / 4).min(4096);
    usize::try_from(nofile - reserve)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// The first bytes of the h2 connection preface (`PRI * HTTP/2.0...`).
const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// A socket that reports incoming bytes to its [`ConnActivity`].
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    /// The connection's first bytes, until there are enough to tell h2 from HTTP/1.
    sniffed: Option<([u8; 4], usize)>,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>) -> WatchedIo<T> {
        WatchedIo {
            inner,
            activity,
            sniffed: Some(([0; 4], 0)),
        }
    }

    fn sniff(&mut self, bytes: &[u8]) {
        let Some((buf, len)) = &mut self.sniffed else {
            return;
        };
        let take = bytes.len().min(buf.len() - *len);
        buf[*len..*len + take].copy_from_slice(&bytes[..take]);
        *len += take;
        if *len == buf.len() {
            if buf == H2_PREFACE_START {
                self.activity.http2.store(true, Ordering::Relaxed);
            }
            self.sniffed = None;
        }
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
            if self.sniffed.is_some() {
                self.sniff(&buf.filled()[before..]);
            }
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
        drop(a.begin()); // a first request served: idle from now on
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

    #[test]
    fn first_request_header_deadline_runs_from_accept() {
        let a = ConnActivity::new();
        let long = Duration::from_secs(100);
        // No byte yet, yet the header deadline (not the idle one) applies.
        assert_eq!(
            a.check(Duration::ZERO, long),
            Err("request headers not received in time")
        );
        let wait = a.check(long, Duration::from_secs(1000)).unwrap();
        assert!(wait <= long, "next check in {wait:?}");
    }

    #[tokio::test]
    async fn bytes_on_an_idle_connection_and_request_ends_wake_the_watchdog() {
        let a = ConnActivity::new();
        drop(a.begin());
        // The end of the request left a permit.
        tokio::time::timeout(Duration::from_secs(5), a.changed())
            .await
            .expect("request end notifies");
        a.saw_bytes();
        tokio::time::timeout(Duration::from_secs(5), a.changed())
            .await
            .expect("first byte on an idle connection notifies");
        // Further bytes of the same head do not.
        a.saw_bytes();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), a.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn h2_is_recognised_by_its_preface_even_byte_by_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (bytes, h2) in [
            (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], true),
            (&b"POST / HTTP/1.1\r\n"[..], false),
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            let a = ConnActivity::new();
            let mut io = WatchedIo::new(server, Arc::clone(&a));
            for b in bytes {
                client.write_all(&[*b]).await.unwrap();
                let mut one = [0u8; 1];
                io.read_exact(&mut one).await.unwrap();
            }
            assert_eq!(a.http2.load(Ordering::Relaxed), h2);
            // After a first request, bytes on an idle h2 connection start no header deadline.
            drop(a.begin());
            a.saw_bytes();
            assert_eq!(a.head_started_ms.load(Ordering::Relaxed) == 0, h2);
        }
    }

    #[test]
    fn connection_cap_and_its_default() {
        let l = ConnLimit::new(2);
        let (a, b) = (l.try_admit(), l.try_admit());
        assert!(a.is_some() && b.is_some());
        assert!(l.try_admit().is_none(), "the third is refused");
        assert_eq!(l.open(), 2);
        drop(a);
        assert!(l.try_admit().is_some(), "a freed slot is reused");
        assert_eq!(derive_max_connections(1024), 768);
        assert_eq!(derive_max_connections(20_000), 15_904);
        assert_eq!(derive_max_connections(1 << 20), (1 << 20) - 4096);
        assert_eq!(derive_max_connections(0), 1);
    }
}
