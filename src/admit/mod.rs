//! Admission: between the request parse and the candidates, who a request belongs to (its
//! [`Tenant`]), how critical it is ([`Priority`]), and whether it may go on now: per-tenant
//! rate limits ([`rate_limit`]).
//!
//! Request → parse → admit (tenant, limits, queue) → candidates → policy → forward. This
//! module never imports the proxy (the proxy calls it) nor a leaf.

use std::sync::Arc;

pub mod rate_limit;

/// Who a request belongs to: the value of the tenant header, else a hash of the bearer token,
/// else the one anonymous tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(pub Arc<str>);

/// A request's criticality (the Gateway API Inference Extension's names), ordered so that
/// `Critical` comes first (is served first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    Critical,
    Standard,
    Sheddable,
}

impl Priority {
    /// `critical`, `standard` or `sheddable`, in any case; `None` for anything else.
    pub fn from_header(value: &str) -> Option<Priority> {
        let v = value.trim();
        if v.eq_ignore_ascii_case("critical") {
            Some(Priority::Critical)
        } else if v.eq_ignore_ascii_case("standard") {
            Some(Priority::Standard)
        } else if v.eq_ignore_ascii_case("sheddable") {
            Some(Priority::Sheddable)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_parses_its_names_in_any_case_and_orders_critical_first() {
        assert_eq!(Priority::from_header("Critical"), Some(Priority::Critical));
        assert_eq!(Priority::from_header("STANDARD"), Some(Priority::Standard));
        assert_eq!(
            Priority::from_header("sheddable"),
            Some(Priority::Sheddable)
        );
        assert_eq!(Priority::from_header("urgent"), None);
        assert_eq!(Priority::from_header(""), None);
        for p in [Priority::Critical, Priority::Standard, Priority::Sheddable] {
            assert_eq!(Priority::from_header(p.as_str()), Some(p));
        }
        assert!(Priority::Critical < Priority::Standard);
        assert!(Priority::Standard < Priority::Sheddable);
    }
}
