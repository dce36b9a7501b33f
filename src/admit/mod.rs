//! Admission: between the request parse and the candidates, who a request belongs to (its
//! [`Tenant`]), how critical it is ([`Priority`]), and whether and when it may go to an engine
//! (request → parse → admit → candidates → policy → forward):
//!
//! - [`tenant`]: a request's tenant (the tenant header, else a hash of its API key) and
//!   priority (the priority header);
//! - [`rate_limit`]: per-tenant request and token rate limits, with OpenAI's headers;
//! - [`queue`]: the router-side queue. While no engine can take a request it waits here,
//!   released in priority order and fair across tenants (deficit round robin by estimated
//!   tokens); bounded in length and in time; sheddable requests are refused at saturation.
//! - [`hold`]: one queue per model whose room is its engines' room below
//!   `--engine-queue-limit`, released as engines change.
//!
//! This module never imports the proxy (the proxy calls it) nor a leaf.

use std::sync::Arc;

pub mod hold;
pub mod queue;
pub mod rate_limit;
pub mod tenant;

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
