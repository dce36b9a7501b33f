//! Who a request belongs to and how critical it is: set by the proxy from the request's
//! headers (the admit module's tenant reader), then possibly by the policies directory's
//! `admission.rhai`, before rate limits and the router's queue see them; routing scripts read
//! them as `request.tenant` and `request.priority`.

use std::sync::Arc;

/// Who a request belongs to: the value of the tenant header, else a hash of the bearer token,
/// else the one anonymous tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(pub Arc<str>);

/// A request's criticality, in the Gateway API Inference Extension's names. Ordered so that
/// `Critical` comes first (is served first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Queued ahead of everything else and never shed.
    Critical,
    /// The default.
    Standard,
    /// Refused at once when it would have to wait.
    Sheddable,
}

impl Priority {
    /// Parses a header value, `critical`, `standard` or `sheddable` in any case.
    pub fn from_header(value: &str) -> Option<Priority> {
        let value = value.trim();
        [Priority::Critical, Priority::Standard, Priority::Sheddable]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(value))
    }

    /// The lower-case name (`critical`, `standard`, `sheddable`), as in the header and in
    /// metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }
}

/// A request's tenant and priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub tenant: Tenant,
    pub priority: Priority,
}

impl Default for Admission {
    /// The anonymous tenant, standard priority.
    fn default() -> Admission {
        Admission {
            tenant: Tenant(Arc::from(ANONYMOUS)),
            priority: Priority::Standard,
        }
    }
}

/// The tenant of requests with neither a tenant header nor a bearer token.
pub const ANONYMOUS: &str = "anonymous";

#[cfg(test)]
mod tests {
    use super::Priority;

    #[test]
    fn priority_parses_the_header_in_any_case_and_nothing_else() {
        assert_eq!(Priority::from_header("critical"), Some(Priority::Critical));
        assert_eq!(Priority::from_header("Standard"), Some(Priority::Standard));
        assert_eq!(
            Priority::from_header(" SHEDDABLE "),
            Some(Priority::Sheddable)
        );
        assert_eq!(Priority::from_header("high"), None);
        assert_eq!(Priority::from_header(""), None);
        assert!(Priority::Critical < Priority::Standard);
        assert!(Priority::Standard < Priority::Sheddable);
        for p in [Priority::Critical, Priority::Standard, Priority::Sheddable] {
            assert_eq!(Priority::from_header(p.as_str()), Some(p));
        }
    }
}
