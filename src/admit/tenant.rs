//! Who a request belongs to and how critical it is, from its headers: the tenant header
//! (`--tenant-header`), else a hash of the bearer token (the API key itself never appears in
//! a label or a log), else the one anonymous tenant; the priority header (`--priority-header`,
//! default `x-priority`: `critical`, `standard`, `sheddable`), else standard.

use std::sync::Arc;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};

use super::{Priority, Tenant};

/// The priority header when none is configured (the Gateway API Inference Extension's names
/// as values).
pub const DEFAULT_PRIORITY_HEADER: &str = "x-priority";
pub use crate::request::admission::ANONYMOUS;
/// The longest tenant header value taken as it is; a longer one is hashed like a key.
pub const MAX_TENANT_CHARS: usize = 128;

/// Reads a request's tenant and priority.
#[derive(Debug, Clone)]
pub struct Identify {
    /// `--tenant-header`: its value names the tenant.
    pub tenant_header: Option<HeaderName>,
    /// `--priority-header`.
    pub priority_header: HeaderName,
}

impl Default for Identify {
    fn default() -> Identify {
        Identify {
            tenant_header: None,
            priority_header: HeaderName::from_static(DEFAULT_PRIORITY_HEADER),
        }
    }
}

impl Identify {
    /// The request's tenant.
    pub fn tenant(&self, headers: &HeaderMap) -> Tenant {
        if let Some(v) = self
            .tenant_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            return if v.chars().count() <= MAX_TENANT_CHARS {
                Tenant(Arc::from(v))
            } else {
                hashed("tenant", v.as_bytes())
            };
        }
        match headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .filter(|t| !t.is_empty())
        {
            Some(token) => hashed("key", token),
            None => Tenant(Arc::from(ANONYMOUS)),
        }
    }

    /// The request's priority: the header's, else standard (an unknown value too).
    pub fn priority(&self, headers: &HeaderMap) -> Priority {
        headers
            .get(&self.priority_header)
            .and_then(|v| v.to_str().ok())
            .and_then(Priority::from_header)
            .unwrap_or(Priority::Standard)
    }
}

/// `prefix-<16 hex digits>`: a stable name for a secret or an overlong value.
fn hashed(prefix: &str, bytes: &[u8]) -> Tenant {
    let h = xxhash_rust::xxh3::xxh3_64(bytes);
    Tenant(Arc::from(format!("{prefix}-{h:016x}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn the_tenant_header_then_the_key_hash_then_anonymous() {
        let id = Identify {
            tenant_header: Some(HeaderName::from_static("x-tenant")),
            ..Identify::default()
        };
        let h = headers(&[("x-tenant", " team-a "), ("authorization", "Bearer sk-1")]);
        assert_eq!(&*id.tenant(&h).0, "team-a");
        let key = id.tenant(&headers(&[("authorization", "Bearer sk-1")]));
        assert!(key.0.starts_with("key-") && key.0.len() == 20, "{key:?}");
        assert!(!key.0.contains("sk-1"), "the key never shows");
        assert_eq!(
            key,
            id.tenant(&headers(&[("authorization", "Bearer sk-1")]))
        );
        assert_ne!(
            key,
            id.tenant(&headers(&[("authorization", "Bearer sk-2")]))
        );
        assert_eq!(&*id.tenant(&HeaderMap::new()).0, ANONYMOUS);
        assert_eq!(
            &*id.tenant(&headers(&[("authorization", "Basic x")])).0,
            ANONYMOUS
        );
        let long = "t".repeat(200);
        assert!(
            id.tenant(&headers(&[("x-tenant", &long)]))
                .0
                .starts_with("tenant-")
        );
        // Without a tenant header configured, the header is not read.
        let plain = Identify::default();
        assert_eq!(
            &*plain.tenant(&headers(&[("x-tenant", "team-a")])).0,
            ANONYMOUS
        );
    }

    #[test]
    fn the_priority_header_else_standard() {
        let id = Identify::default();
        assert_eq!(
            id.priority(&headers(&[("x-priority", "Critical")])),
            Priority::Critical
        );
        assert_eq!(
            id.priority(&headers(&[("x-priority", "sheddable")])),
            Priority::Sheddable
        );
        assert_eq!(
            id.priority(&headers(&[("x-priority", "urgent")])),
            Priority::Standard
        );
        assert_eq!(id.priority(&HeaderMap::new()), Priority::Standard);
    }
}
