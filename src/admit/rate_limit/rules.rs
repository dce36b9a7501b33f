//! The `[[rate_limit]]` tables of the config file, and the validated rule set the limiter
//! applies: which limits hold for which tenant.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

use serde::Deserialize;

use crate::admit::Tenant;

/// The tenant value of a rule that applies to every tenant without a rule of its own, each
/// tenant separately.
pub const EVERY_TENANT: &str = "*";

/// One `[[rate_limit]]` table as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    /// The tenant, or `"*"`: every tenant without a rule of its own, each separately.
    pub tenant: String,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute: the prompt estimate plus `max_tokens` of each request.
    pub tokens_per_minute: Option<u64>,
}

/// The limits that apply to one tenant: either or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    pub requests_per_minute: Option<NonZeroU64>,
    pub tokens_per_minute: Option<NonZeroU64>,
}

/// Why the `[[rate_limit]]` tables are refused; `index` counts the tables from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("[[rate_limit]] #{index}: tenant must not be empty (use \"*\" for every tenant)")]
    EmptyTenant { index: usize },
    #[error("[[rate_limit]] #{index} (tenant {tenant:?}): {field} must be at least 1")]
    Zero {
        index: usize,
        tenant: String,
        field: &'static str,
    },
    #[error(
        "[[rate_limit]] #{index} (tenant {tenant:?}): sets no limit (requests_per_minute, tokens_per_minute or both)"
    )]
    NoLimit { index: usize, tenant: String },
    #[error("tenant {tenant:?} has two rules: [[rate_limit]] #{first} and #{second}")]
    Duplicate {
        tenant: String,
        first: usize,
        second: usize,
    },
}

/// The validated rules: at most one per tenant, and at most one for every other tenant (`"*"`).
/// A tenant's own rule wins over `"*"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitRules {
    specific: HashMap<Tenant, Limits>,
    every_tenant: Option<Limits>,
}

impl RateLimitRules {
    /// Validates the config file's tables: every number positive, at least one limit per
    /// rule, no tenant named twice.
    pub fn new(rules: &[RateLimitRule]) -> Result<RateLimitRules, RuleError> {
        let mut out = RateLimitRules::default();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let index = i + 1;
            let tenant = rule.tenant.as_str();
            if tenant.is_empty() {
                return Err(RuleError::EmptyTenant { index });
            }
            let positive = |value: Option<u64>, field: &'static str| match value {
                None => Ok(None),
                Some(v) => NonZeroU64::new(v).map(Some).ok_or_else(|| RuleError::Zero {
                    index,
                    tenant: tenant.to_owned(),
                    field,
                }),
            };
            let limits = Limits {
                requests_per_minute: positive(rule.requests_per_minute, "requests_per_minute")?,
                tokens_per_minute: positive(rule.tokens_per_minute, "tokens_per_minute")?,
            };
            if limits.requests_per_minute.is_none() && limits.tokens_per_minute.is_none() {
                return Err(RuleError::NoLimit {
                    index,
                    tenant: tenant.to_owned(),
                });
            }
            if let Some(&first) = seen.get(tenant) {
                return Err(RuleError::Duplicate {
                    tenant: tenant.to_owned(),
                    first,
                    second: index,
                });
            }
            seen.insert(tenant, index);
            if tenant == EVERY_TENANT {
                out.every_tenant = Some(limits);
            } else {
                out.specific.insert(Tenant(Arc::from(tenant)), limits);
            }
        }
        Ok(out)
    }

    /// No rule at all: every request is allowed.
    pub fn is_empty(&self) -> bool {
        self.specific.is_empty() && self.every_tenant.is_none()
    }

    /// The limits of `tenant`: its own rule, else the `"*"` rule, else none.
    pub fn for_tenant(&self, tenant: &Tenant) -> Option<Limits> {
        self.specific.get(tenant).copied().or(self.every_tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tenant: &str, rpm: Option<u64>, tpm: Option<u64>) -> RateLimitRule {
        RateLimitRule {
            tenant: tenant.into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    fn t(name: &str) -> Tenant {
        Tenant(Arc::from(name))
    }

    fn nz(v: u64) -> Option<NonZeroU64> {
        NonZeroU64::new(v)
    }

    #[test]
    fn a_tenants_own_rule_wins_over_every_tenant() {
        let rules = RateLimitRules::new(&[rule("*", Some(10), None), rule("t1", None, Some(5000))])
            .unwrap();
        assert_eq!(
            rules.for_tenant(&t("t1")),
            Some(Limits {
                requests_per_minute: None,
                tokens_per_minute: nz(5000)
            })
        );
        assert_eq!(
            rules.for_tenant(&t("t2")),
            Some(Limits {
                requests_per_minute: nz(10),
                tokens_per_minute: None
            })
        );
        let only = RateLimitRules::new(&[rule("t1", Some(1), Some(2))]).unwrap();
        assert_eq!(only.for_tenant(&t("t2")), None);
        assert!(RateLimitRules::new(&[]).unwrap().is_empty());
        assert!(!only.is_empty());
    }

    #[test]
    fn zero_limits_no_limit_empty_tenants_and_duplicates_are_refused_by_name() {
        let e = RateLimitRules::new(&[rule("t1", Some(0), None)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[[rate_limit]] #1 (tenant \"t1\"): requests_per_minute must be at least 1"
        );
        let e = RateLimitRules::new(&[rule("a", Some(1), None), rule("b", Some(1), Some(0))])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "[[rate_limit]] #2 (tenant \"b\"): tokens_per_minute must be at least 1"
        );
        let e = RateLimitRules::new(&[rule("t1", None, None)]).unwrap_err();
        assert!(matches!(e, RuleError::NoLimit { index: 1, .. }), "{e}");
        let e = RateLimitRules::new(&[rule("", Some(1), None)]).unwrap_err();
        assert_eq!(e, RuleError::EmptyTenant { index: 1 });
        let e = RateLimitRules::new(&[
            rule("t1", Some(1), None),
            rule("*", Some(1), None),
            rule("t1", None, Some(9)),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant \"t1\" has two rules: [[rate_limit]] #1 and #3"
        );
        let e =
            RateLimitRules::new(&[rule("*", Some(1), None), rule("*", Some(2), None)]).unwrap_err();
        assert!(
            e.to_string().starts_with("tenant \"*\" has two rules"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_in_a_table_are_refused() {
        #[derive(Deserialize)]
        struct File {
            rate_limit: Vec<RateLimitRule>,
        }
        let f: File = toml::from_str(
            "[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minute = 60\ntokens_per_minute = 100000\n",
        )
        .unwrap();
        assert_eq!(f.rate_limit, [rule("t1", Some(60), Some(100_000))]);
        let e = toml::from_str::<File>("[[rate_limit]]\ntenant = \"t1\"\nrpm = 60\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("rpm"), "{e}");
        assert!(
            toml::from_str::<File>("[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minute = -1\n")
                .is_err()
        );
    }
}
