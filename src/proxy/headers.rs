//! The headers the router changes on the way through: hop-by-hop headers are dropped both
//! ways, the client's address is appended to `X-Forwarded-For` towards engines, and engines'
//! `x-switchyard-*` headers are replaced by the router's own decision headers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine hashed removals.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    let named = connection_named(h);
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// A hop-by-hop header, `Connection` (which may name others) or `Upgrade`.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    HOP_BY_HOP.contains(n) || n == header::UPGRADE
}

/// The header names a `Connection` header lists (no allocation when there is none).
fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The client's address, handed to each request by the connection that read it, with its IP
/// already formatted for `X-Forwarded-For` (once per connection, not per request).
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: std::net::SocketAddr,
    ip_text: HeaderValue,
}

impl ClientAddr {
    pub fn new(addr: std::net::SocketAddr) -> ClientAddr {
        let ip_text = HeaderValue::from_maybe_shared(bytes::Bytes::from(addr.ip().to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        ClientAddr { addr, ip_text }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers sent to the engine: the client's, less hop-by-hop ones, `Host` (set from the
/// engine's URL) and `Content-Length` (set from the body); `Authorization` is kept. As reverse
/// proxies do, the client's address is appended to `X-Forwarded-For` and `X-Forwarded-Proto`
/// says the scheme the client used (`http`: the router does not terminate TLS).
pub fn upstream_headers(
    client: &HeaderMap,
    request_id: &HeaderValue,
    client_addr: Option<&ClientAddr>,
) -> HeaderMap {
    // Built in one pass (no clone, then removals): sized for the router's three headers.
    let named = if client.contains_key(header::CONNECTION) {
        connection_named(client)
    } else {
        Vec::new()
    };
    let dropped = |n: &HeaderName| {
        is_hop_by_hop(n)
            || n == header::HOST
            || n == header::CONTENT_LENGTH
            || n == header::EXPECT
            || named.contains(n)
    };
    let mut h = HeaderMap::with_capacity(client.keys_len() + 3);
    let mut prior_xff = false;
    for (name, value) in client {
        if name == super::X_REQUEST_ID || name == X_FORWARDED_PROTO || dropped(name) {
            continue;
        }
        if name == X_FORWARDED_FOR && client_addr.is_some() {
            prior_xff = true;
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    h.insert(super::X_REQUEST_ID.clone(), request_id.clone());
    if let Some(addr) = client_addr {
        let value = if prior_xff {
            let mut v: Vec<u8> = Vec::new();
            for prior in client.get_all(&X_FORWARDED_FOR) {
                if prior.to_str().is_ok() {
                    v.extend_from_slice(prior.as_bytes());
                    v.extend_from_slice(b", ");
                }
            }
            v.extend_from_slice(addr.ip_text.as_bytes());
            HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
        } else {
            Some(addr.ip_text.clone())
        };
        if let Some(v) = value {
            h.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    h
}

/// Removes `x-switchyard-*` headers from an engine's response: only the router sets those.
pub fn strip_router_headers(h: &mut HeaderMap) {
    let theirs: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with("x-switchyard-"))
        .cloned()
        .collect();
    for n in theirs {
        h.remove(n);
    }
}

/// The decision headers (`--decision-headers`): `x-switchyard-policy`, `-tier`, `-engine`,
/// and `x-switchyard-kv` (`exact`, `partial` or `approximate`: the source of the chosen
/// engine's prefix match, [`crate::policy::KvSource`]) when a tier of the decision computed prefix matches; absent when none did.
pub fn add_decision_headers(
    h: &mut HeaderMap,
    policy: &str,
    tier: &str,
    engine: &str,
    kv: Option<&'static str>,
) {
    for (name, v) in [
        ("x-switchyard-policy", policy),
        ("x-switchyard-tier", tier),
        ("x-switchyard-engine", engine),
    ] {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    if let Some(kv) = kv {
        h.insert(
            HeaderName::from_static("x-switchyard-kv"),
            HeaderValue::from_static(kv),
        );
    }
}

/// `x-switchyard-stage` (`disaggregated` or `decode_only`) and, with a prefill leg,
/// `x-switchyard-prefill-engine` and `x-switchyard-prefill-tier`.
pub fn add_stage_headers(h: &mut HeaderMap, prefill: Option<(&str, &str)>) {
    let stage = if prefill.is_some() {
        "disaggregated"
    } else {
        "decode_only"
    };
    h.insert(
        HeaderName::from_static("x-switchyard-stage"),
        HeaderValue::from_static(stage),
    );
    if let Some((engine, tier)) = prefill {
        for (name, v) in [
            ("x-switchyard-prefill-engine", engine),
            ("x-switchyard-prefill-tier", tier),
        ] {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
    }
}

/// `x-switchyard-queue-ms`: how long the request waited in the router's queue, in
/// milliseconds (0: admitted at once).
pub fn add_queue_header(h: &mut HeaderMap, waited: std::time::Duration) {
    h.insert(
        HeaderName::from_static("x-switchyard-queue-ms"),
        HeaderValue::from(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(header::HOST, HeaderValue::from_static("router"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let out = upstream_headers(
            &h,
            &HeaderValue::from_static("rid"),
            Some(&ClientAddr::new(([127, 0, 0, 9], 5000).into())),
        );
        assert_eq!(out["x-forwarded-for"], "203.0.113.7, 127.0.0.9");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert!(out.get("x-secret").is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::TRANSFER_ENCODING).is_none());
        assert!(out.get(header::HOST).is_none());
        assert_eq!(out[header::AUTHORIZATION], "Bearer k");
        assert_eq!(out["x-request-id"], "rid");
        let out = upstream_headers(
            &HeaderMap::new(),
            &HeaderValue::from_static("r"),
            Some(&ClientAddr::new(([127, 0, 0, 1], 5000).into())),
        );
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn engine_set_router_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("x-switchyard-engine", HeaderValue::from_static("forged"));
        h.insert("x-switchyard-kv", HeaderValue::from_static("exact"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        strip_router_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-other"], "kept");
    }
}
