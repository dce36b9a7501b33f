//! The policy settings: `routing_logic`, `policies_dir`, the per-model `[policies]`,
//! `script_time_budget` and `imbalanced_threshold`.

use std::path::{Path, PathBuf};

use super::{ConfigError, FileConfig, ServeArgs, invalid, secs};
use crate::policy::PolicySettings;

/// The policies directory: `explicit` (`policies_dir`), which must exist; else `./policies` if
/// it exists; else the built-in policies, written once per process into a private read-only
/// directory (with `imbalanced_threshold` applied; see [`crate::policy::shipped`]).
pub fn resolve_policies_dir(
    explicit: Option<&Path>,
    imbalanced_threshold: Option<u32>,
) -> Result<PathBuf, ConfigError> {
    use crate::policy::shipped;
    let dir = match explicit {
        Some(dir) => {
            if !dir.exists() {
                return Err(invalid(
                    "policies_dir",
                    format!("directory {} does not exist", dir.display()),
                ));
            }
            if !dir.is_dir() {
                return Err(invalid(
                    "policies_dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
            dir.to_owned()
        }
        None if Path::new(shipped::DEFAULT_DIR).is_dir() => PathBuf::from(shipped::DEFAULT_DIR),
        None => {
            return shipped::builtin_dir(imbalanced_threshold)
                .map_err(|e| invalid("policies_dir", format!("built-in policies: {e}")));
        }
    };
    if let Some(n) = imbalanced_threshold {
        return Err(invalid(
            "imbalanced_threshold",
            format!(
                "sets the threshold of the built-in load_balanced_kvaware policy, but the policies \
                 come from the directory {}: write load_balance({n}) in its \
                 load_balanced_kvaware.rhai instead (hot-reloaded), or give no policies directory",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// The policy settings from flags over the file, validated (used at start and when the file
/// changes).
pub fn policy_settings(args: &ServeArgs, file: &FileConfig) -> Result<PolicySettings, ConfigError> {
    let d = PolicySettings::default();
    let default_policy = args
        .routing_logic
        .clone()
        .or(file.routing_logic.clone())
        .unwrap_or(d.default_policy);
    let imbalanced_threshold = args.imbalanced_threshold.or(file.imbalanced_threshold);
    if let Some(n) = imbalanced_threshold {
        if !matches!(
            default_policy.as_str(),
            "load_balanced_kvaware" | "load_balanced_kvaware.rhai" | "load_balanced_kvaware.toml"
        ) {
            return Err(invalid(
                "imbalanced_threshold",
                format!(
                    "applies only with routing_logic = load_balanced_kvaware, not {default_policy:?}"
                ),
            ));
        }
        if n == 0 {
            return Err(invalid("imbalanced_threshold", "must be at least 1"));
        }
    }
    let explicit_dir = args.policies_dir.clone().or(file.policies_dir.clone());
    let settings = PolicySettings {
        dir: resolve_policies_dir(explicit_dir.as_deref(), imbalanced_threshold)?,
        default_policy,
        per_model: file.policies.clone(),
        script_time_budget: secs(
            "script_time_budget",
            args.script_time_budget,
            file.script_time_budget,
            d.script_time_budget,
        )?,
    };
    if settings.default_policy.is_empty() {
        return Err(invalid("routing_logic", "must name a policy"));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::RouterConfig;
    use super::super::tests::args;
    use super::*;

    #[test]
    fn script_time_budget_in_seconds() {
        let c = RouterConfig::resolve(&args(&[])).unwrap();
        assert_eq!(c.policy.script_time_budget, Duration::from_millis(5));
        let c = RouterConfig::resolve(&args(&["--script-time-budget", "0.02"])).unwrap();
        assert_eq!(c.policy.script_time_budget, Duration::from_millis(20));
        for bad in ["0", "-1", "inf"] {
            let e = RouterConfig::resolve(&args(&[&format!("--script-time-budget={bad}")]))
                .unwrap_err();
            assert!(e.to_string().starts_with("script_time_budget:"), "{e}");
        }
        let file: FileConfig = toml::from_str("script_time_budget = 0.001").unwrap();
        let p = policy_settings(&args(&[]), &file).unwrap();
        assert_eq!(p.script_time_budget, Duration::from_millis(1));
        let p = policy_settings(&args(&["--script-time-budget", "0.002"]), &file).unwrap();
        assert_eq!(p.script_time_budget, Duration::from_millis(2));
    }
}
