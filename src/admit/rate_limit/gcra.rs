//! One limit's bucket, kept as GCRA (the generic cell rate algorithm): a bucket of `limit`
//! units refilled continuously at `limit` per minute, stored as a single number, the moment
//! it is full again. Taking `n` units pushes that moment `n / limit` minutes later; a take
//! that would push it more than a minute past now is refused.
//!
//! Time is counted in nanoseconds × `limit` since the bucket's creation, so a unit is exactly
//! 60·10⁹ of these and nothing is rounded: a bucket gives exactly `limit` units a minute
//! whatever the limit.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// The window every limit is counted over.
pub const WINDOW: Duration = Duration::from_secs(60);
const WINDOW_NANOS: u128 = 60_000_000_000;

/// One limit's state as a client sees it: OpenAI's `x-ratelimit-limit-*`,
/// `x-ratelimit-remaining-*` and `x-ratelimit-reset-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStatus {
    /// Units per minute.
    pub limit: u64,
    /// Units that may still be taken now.
    pub remaining: u64,
    /// Time until the bucket is full again (the limit "resets to its initial state"), rounded
    /// up to the nanosecond.
    pub reset: Duration,
}

/// A refused take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// How long until the take would fit (for a take larger than the limit: until the bucket
    /// is full, though it will not fit even then), rounded up to the nanosecond.
    pub wait: Duration,
    /// More units than the limit: never fits.
    pub too_large: bool,
    /// The state, unchanged by the refused take.
    pub status: LimitStatus,
}

/// One limit's bucket for one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    origin: Instant,
    limit: NonZeroU64,
    /// When the bucket is full again, in nanoseconds × limit since `origin`.
    full: u128,
}

impl Bucket {
    /// A full bucket of `limit` units a minute.
    pub fn full(limit: NonZeroU64, now: Instant) -> Bucket {
        Bucket {
            origin: now,
            limit,
            full: 0,
        }
    }

    /// `now` in the bucket's units (an instant before its creation counts as its creation).
    fn at(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.origin)
            .as_nanos()
            .saturating_mul(u128::from(self.limit.get()))
    }

    /// How far from full at `now`, in the bucket's units.
    fn backlog(&self, now: Instant) -> u128 {
        self.full.saturating_sub(self.at(now))
    }

    /// Full at `now`: the same as a fresh bucket, so it may be forgotten.
    pub fn is_full(&self, now: Instant) -> bool {
        self.backlog(now) == 0
    }

    /// When the bucket is full again.
    pub fn full_at(&self) -> Instant {
        self.origin + self.duration_of(self.full)
    }

    /// The state at `now` without taking anything.
    pub fn status(&self, now: Instant) -> LimitStatus {
        self.status_at(self.backlog(now))
    }

    /// Takes `n` units at `now` if they fit, returning the state after the take; else
    /// returns why not, taking nothing.
    #[cfg(test)]
    pub fn take(&mut self, n: u64, now: Instant) -> Result<LimitStatus, Refusal> {
        let (next, status) = self.try_take(n, now)?;
        *self = next;
        Ok(status)
    }

    /// Whether `n` units fit at `now`: the bucket after the take and its state, leaving this
    /// one as it is.
    pub fn try_take(&self, n: u64, now: Instant) -> Result<(Bucket, LimitStatus), Refusal> {
        let backlog = self.backlog(now);
        if n > self.limit.get() {
            return Err(Refusal {
                wait: self.duration_of(backlog),
                too_large: true,
                status: self.status_at(backlog),
            });
        }
        let after = backlog + u128::from(n) * WINDOW_NANOS;
        let window = self.window();
        if after > window {
            return Err(Refusal {
                wait: self.duration_of(after - window),
                too_large: false,
                status: self.status_at(backlog),
            });
        }
        let next = Bucket {
            full: self.at(now).saturating_add(after),
            ..*self
        };
        Ok((next, self.status_at(after)))
    }

    fn window(&self) -> u128 {
        WINDOW_NANOS * u128::from(self.limit.get())
    }

    fn status_at(&self, backlog: u128) -> LimitStatus {
        let free = self.window().saturating_sub(backlog);
        LimitStatus {
            limit: self.limit.get(),
            remaining: u64::try_from(free / WINDOW_NANOS).unwrap_or(u64::MAX),
            reset: self.duration_of(backlog),
        }
    }

    /// Bucket units to time, rounded up to the nanosecond.
    fn duration_of(&self, units: u128) -> Duration {
        let nanos = units.div_ceil(u128::from(self.limit.get()));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(v: u64) -> NonZeroU64 {
        NonZeroU64::new(v).unwrap()
    }

    #[test]
    fn a_full_bucket_gives_its_limit_then_refuses_with_the_wait_for_one_unit() {
        let t0 = Instant::now();
        let mut b = Bucket::full(nz(60), t0);
        let status = |remaining, reset| LimitStatus {
            limit: 60,
            remaining,
            reset,
        };
        assert_eq!(b.status(t0), status(60, Duration::ZERO));
        for i in 1..=60u64 {
            let s = b.take(1, t0).unwrap();
            assert_eq!(s, status(60 - i, Duration::from_secs(i)));
        }
        let r = b.take(1, t0).unwrap_err();
        assert_eq!(r.wait, Duration::from_secs(1));
        assert!(!r.too_large);
        assert_eq!(r.status, status(0, WINDOW));
        // Refilled at one unit per second.
        let later = t0 + Duration::from_millis(2500);
        assert_eq!(b.status(later).remaining, 2);
        let r = b.take(3, later).unwrap_err();
        assert_eq!(r.wait, Duration::from_millis(500));
        assert_eq!(b.take(2, later).unwrap().remaining, 0);
        // 57.5 s from full, then 2 s more.
        let full = later + Duration::from_millis(59_500);
        assert_eq!(b.full_at(), full);
        assert!(!b.is_full(full - Duration::from_nanos(1)));
        assert!(b.is_full(full));
    }

    #[test]
    fn limits_that_do_not_divide_the_minute_give_exactly_their_limit() {
        let t0 = Instant::now();
        for (limit, step) in [(7u64, 1u64), (13, 2), (999_983, 1), (150_000, 16)] {
            let mut b = Bucket::full(nz(limit), t0);
            let mut taken = 0;
            let r = loop {
                match b.take(step, t0) {
                    Ok(s) => {
                        taken += step;
                        assert_eq!(s.remaining, limit - taken, "{limit}");
                    }
                    Err(r) => break r,
                }
            };
            assert_eq!(taken, limit / step * step, "{limit}");
            assert_eq!(r.status.remaining, limit - taken, "{limit}");
            // A whole minute later the bucket is full again, not a nanosecond before.
            let full = t0 + WINDOW * u32::try_from(taken).unwrap() / u32::try_from(limit).unwrap();
            let after = full + Duration::from_nanos(1);
            assert!(b.is_full(after), "{limit}");
            assert_eq!(b.status(after).remaining, limit, "{limit}");
        }
        let mut b = Bucket::full(nz(7), t0);
        assert_eq!(b.take(7, t0).unwrap().remaining, 0);
        assert!(b.take(1, t0).is_err());
    }

    #[test]
    fn more_than_the_limit_never_fits_and_says_so() {
        let t0 = Instant::now();
        let mut b = Bucket::full(nz(100), t0);
        let r = b.take(101, t0).unwrap_err();
        assert!(r.too_large);
        assert_eq!(r.wait, Duration::ZERO);
        assert_eq!(r.status.remaining, 100);
        assert_eq!(b.take(0, t0).unwrap().remaining, 100, "nothing taken");
        assert!(b.is_full(t0));
    }
}
