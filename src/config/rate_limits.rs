//! The `[[rate_limit]]` tables of the config file (no flags: a list of tables), validated
//! into the rules the rate limiter applies (used at start and when the file changes).

use super::{ConfigError, FileConfig, invalid};
use crate::admit::rate_limit::RateLimitRules;

/// The file's rate-limit rules, validated: positive numbers, at least one limit per rule, no
/// tenant named twice.
pub fn rate_limit_rules(file: &FileConfig) -> Result<RateLimitRules, ConfigError> {
    RateLimitRules::new(&file.rate_limit).map_err(|e| invalid("rate_limit", e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::super::tests::args;
    use super::super::{RouterConfig, load_file};
    use crate::admit::Tenant;

    fn resolve(text: &str) -> Result<RouterConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, text).unwrap();
        RouterConfig::resolve(&args(&["--config", file.to_str().unwrap()]))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rate_limit_tables_resolve_into_the_configs_rules() {
        assert!(
            RouterConfig::resolve(&args(&[]))
                .unwrap()
                .rate_limits
                .is_empty()
        );
        let c = resolve(
            "[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minute = 60\ntokens_per_minute = 100000\n\
             [[rate_limit]]\ntenant = \"*\"\ntokens_per_minute = 5000\n",
        )
        .unwrap();
        let t1 = c.rate_limits.for_tenant(&Tenant(Arc::from("t1"))).unwrap();
        assert_eq!(t1.requests_per_minute.map(|n| n.get()), Some(60));
        assert_eq!(t1.tokens_per_minute.map(|n| n.get()), Some(100_000));
        let other = c.rate_limits.for_tenant(&Tenant(Arc::from("t9"))).unwrap();
        assert_eq!(
            (
                other.requests_per_minute,
                other.tokens_per_minute.map(|n| n.get())
            ),
            (None, Some(5000))
        );
    }

    #[test]
    fn invalid_rate_limits_name_the_setting_and_the_tenant() {
        let e = resolve("[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minute = 0\n").unwrap_err();
        assert_eq!(
            e,
            "rate_limit: [[rate_limit]] #1 (tenant \"t1\"): requests_per_minute must be at least 1"
        );
        let e = resolve("[[rate_limit]]\ntenant = \"t1\"\n").unwrap_err();
        assert!(
            e.starts_with("rate_limit: [[rate_limit]] #1 (tenant \"t1\"): sets no limit"),
            "{e}"
        );
        let e = resolve(
            "[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minute = 1\n\
             [[rate_limit]]\ntenant = \"t1\"\ntokens_per_minute = 1\n",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "rate_limit: tenant \"t1\" has two rules: [[rate_limit]] #1 and #2"
        );
        let e = resolve("[[rate_limit]]\ntenant = \"t1\"\nrequests_per_minut = 1\n").unwrap_err();
        assert!(e.contains("requests_per_minut"), "{e}");
    }

    #[test]
    fn the_example_configs_rate_limits_parse_once_uncommented() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/switchyard.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        assert!(
            load_file(&example).unwrap().rate_limit.is_empty(),
            "commented out"
        );
        let mut uncommented = String::new();
        let mut in_block = false;
        for line in text.lines() {
            if line.starts_with("# [[rate_limit]]") {
                in_block = true;
            }
            if in_block && !line.starts_with('#') {
                in_block = false;
            }
            match line.strip_prefix("# ") {
                Some(rest) if in_block => uncommented.push_str(rest),
                _ => uncommented.push_str(line),
            }
            uncommented.push('\n');
        }
        let c = resolve(&uncommented).unwrap();
        assert!(
            c.rate_limits
                .for_tenant(&Tenant(Arc::from("team-a")))
                .is_some()
        );
        assert!(
            c.rate_limits
                .for_tenant(&Tenant(Arc::from("anyone")))
                .is_some()
        );
    }
}
