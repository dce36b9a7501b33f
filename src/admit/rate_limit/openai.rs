//! What a client sees of the rate limits, in OpenAI's shapes: the `x-ratelimit-*` headers
//! (on every answer of a limited tenant), and on a refusal a 429 with `Retry-After` and an
//! OpenAI error body (`type` `requests` or `tokens`, `code` `rate_limit_exceeded`).
//!
//! OpenAI's rate-limit guide documents the headers, with the sample values
//! `x-ratelimit-reset-requests: 1s` and `x-ratelimit-reset-tokens: 6m0s` ("the time until
//! the rate limit resets to its initial state"): Go's duration notation, written here to the
//! millisecond, rounded up.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::gcra::LimitStatus;

pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
pub const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Which limit refused a request; OpenAI's error `type` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    /// `requests` or `tokens`: the error's `type`, and a label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }

    /// OpenAI's name of the limit in its messages.
    fn per_min(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests per min (RPM)",
            LimitKind::Tokens => "tokens per min (TPM)",
        }
    }
}

/// The state of a tenant's limits, for the `x-ratelimit-*` headers: `None` where the tenant
/// has no such limit (both `None`: no rule applies, no header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub requests: Option<LimitStatus>,
    pub tokens: Option<LimitStatus>,
}

impl RateLimitHeaders {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Writes (replacing) `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the
    /// limits that apply.
    pub fn write_to(&self, headers: &mut HeaderMap) {
        let sets = [
            (
                self.requests,
                [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
            ),
            (self.tokens, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]),
        ];
        for (status, [limit, remaining, reset]) in sets {
            let Some(s) = status else { continue };
            headers.insert(limit, HeaderValue::from(s.limit));
            headers.insert(remaining, HeaderValue::from(s.remaining));
            if let Ok(v) = HeaderValue::from_str(&format_reset(s.reset)) {
                headers.insert(reset, v);
            }
        }
    }

    pub fn to_header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.write_to(&mut headers);
        headers
    }
}

/// A refused request: answer it with [`Limited::status`] (429), [`Limited::header_map`] and
/// [`Limited::error_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit that refused (of two that both refuse, the one that frees up last).
    pub which: LimitKind,
    /// How long until the request would be allowed (for a request larger than its token
    /// limit: until the bucket is full, though it will not fit even then).
    pub retry_after: Duration,
    /// The limits' state, unchanged by the refused request.
    pub headers: RateLimitHeaders,
    /// What the request asked of `which`: 1 request, or its tokens.
    pub requested: u64,
    /// More tokens than the tenant's limit per minute: never allowed as it is.
    pub too_large: bool,
}

impl Limited {
    pub fn status(&self) -> StatusCode {
        StatusCode::TOO_MANY_REQUESTS
    }

    /// `Retry-After`: whole seconds, rounded up.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }

    /// The `x-ratelimit-*` headers and `Retry-After`.
    pub fn header_map(&self) -> HeaderMap {
        let mut headers = self.headers.to_header_map();
        headers.insert(RETRY_AFTER, HeaderValue::from(self.retry_after_secs()));
        headers
    }

    /// OpenAI's message, e.g. "Rate limit reached on tokens per min (TPM): Limit 10000, Used
    /// 9856, Requested 500. Please try again in 2.136s."
    pub fn message(&self) -> String {
        let status = match self.which {
            LimitKind::Requests => self.headers.requests,
            LimitKind::Tokens => self.headers.tokens,
        };
        let (limit, remaining) = status.map_or((0, 0), |s| (s.limit, s.remaining));
        let mut m = String::new();
        if self.too_large {
            let _ = write!(
                m,
                "Request too large on {}: Limit {limit}, Requested {}. The input or output \
                 tokens must be reduced in order to run successfully.",
                self.which.per_min(),
                self.requested
            );
        } else {
            let _ = write!(
                m,
                "Rate limit reached on {}: Limit {limit}, Used {}, Requested {}. Please try \
                 again in {}.",
                self.which.per_min(),
                limit.saturating_sub(remaining),
                self.requested,
                format_reset(self.retry_after)
            );
        }
        m
    }

    /// `{"error": {"message", "type": "requests"|"tokens", "param": null, "code":
    /// "rate_limit_exceeded"}}`.
    pub fn error_body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.message(),
                "type": self.which.as_str(),
                "param": null,
                "code": "rate_limit_exceeded",
            }
        });
        Bytes::from(v.to_string())
    }
}

/// A duration in Go's notation, as OpenAI writes its reset headers, to the millisecond
/// rounded up: `0s`, `7ms`, `1s`, `17.28s`, `1m0s`, `6m0s`, `1h0m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis() + u128::from(!d.as_nanos().is_multiple_of(1_000_000));
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h{m}m");
    } else if m > 0 {
        let _ = write!(out, "{m}m");
    }
    let _ = write!(out, "{s}");
    if frac > 0 {
        let digits = format!("{frac:03}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_written_in_gos_duration_notation_rounded_up_to_the_millisecond() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ms"),
            (Duration::from_micros(6400), "7ms"),
            (Duration::from_millis(12), "12ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(17_280), "17.28s"),
            (Duration::from_millis(2_245), "2.245s"),
            (Duration::from_millis(2_000_100), "33m20.1s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3725), "1h2m5s"),
        ];
        for (d, text) in cases {
            assert_eq!(format_reset(d), text, "{d:?}");
        }
    }

    fn status(limit: u64, remaining: u64, reset_ms: u64) -> LimitStatus {
        LimitStatus {
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
        }
    }

    #[test]
    fn headers_name_only_the_limits_that_apply() {
        let h = RateLimitHeaders {
            requests: Some(status(60, 59, 1000)),
            tokens: None,
        }
        .to_header_map();
        assert_eq!(h.len(), 3);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1s");
        let h = RateLimitHeaders {
            requests: Some(status(60, 59, 1000)),
            tokens: Some(status(150_000, 149_984, 6)),
        }
        .to_header_map();
        assert_eq!(h.len(), 6);
        assert_eq!(h["x-ratelimit-limit-tokens"], "150000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "149984");
        assert_eq!(h["x-ratelimit-reset-tokens"], "6ms");
        assert!(RateLimitHeaders::default().to_header_map().is_empty());
    }

    #[test]
    fn a_refusal_is_a_429_with_retry_after_in_whole_seconds_and_openais_error() {
        let l = Limited {
            which: LimitKind::Tokens,
            retry_after: Duration::from_millis(2_136),
            headers: RateLimitHeaders {
                requests: Some(status(60, 40, 20_000)),
                tokens: Some(status(10_000, 144, 59_136)),
            },
            requested: 500,
            too_large: false,
        };
        assert_eq!(l.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = l.header_map();
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "144");
        assert_eq!(h["x-ratelimit-reset-tokens"], "59.136s");
        assert_eq!(h.len(), 7);
        let body: serde_json::Value = serde_json::from_slice(&l.error_body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "Rate limit reached on tokens per min (TPM): Limit 10000, Used 9856, \
                            Requested 500. Please try again in 2.136s.",
                "type": "tokens",
                "param": null,
                "code": "rate_limit_exceeded",
            }})
        );
        let whole = Limited {
            which: LimitKind::Requests,
            retry_after: Duration::from_secs(1),
            requested: 1,
            ..l
        };
        assert_eq!(whole.header_map()["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(&whole.error_body()).unwrap();
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(
            body["error"]["message"],
            "Rate limit reached on requests per min (RPM): Limit 60, Used 20, Requested 1. \
             Please try again in 1s."
        );
        let large = Limited {
            requested: 15_000,
            too_large: true,
            ..l
        };
        assert_eq!(
            large.message(),
            "Request too large on tokens per min (TPM): Limit 10000, Requested 15000. The input \
             or output tokens must be reduced in order to run successfully."
        );
    }
}
