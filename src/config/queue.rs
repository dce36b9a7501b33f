//! The router-side queue's settings (`--engine-queue-limit`, `--max-queued`,
//! `--queue-timeout`) and the config file's `[tenant_weights]` table (hot-reloaded with it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{ConfigError, FileConfig, ServeArgs, invalid, secs};
use crate::admit::Tenant;

/// The queue's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// An engine is sent a request only while its estimated waiting queue, counting the
    /// request, stays below this (1: only into a free running slot); 0: the router never holds
    /// requests (the default).
    pub engine_queue_limit: u32,
    /// Requests that may wait in the router at once, all models together.
    pub max_queued: usize,
    /// How long a request may wait in the router.
    pub queue_timeout: Duration,
    /// Deficit-round-robin weights per tenant (default 1).
    pub tenant_weights: HashMap<Tenant, u32>,
}

impl Default for QueueSettings {
    fn default() -> QueueSettings {
        QueueSettings {
            engine_queue_limit: 0,
            max_queued: 1024,
            queue_timeout: Duration::from_secs(60),
            tenant_weights: HashMap::new(),
        }
    }
}

impl QueueSettings {
    /// Whether the router holds requests at all.
    pub fn enabled(&self) -> bool {
        self.engine_queue_limit > 0
    }
}

/// The queue settings from the flags over the file over the defaults.
pub(super) fn queue_settings(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<QueueSettings, ConfigError> {
    let d = QueueSettings::default();
    Ok(QueueSettings {
        engine_queue_limit: args
            .engine_queue_limit
            .or(file.engine_queue_limit)
            .unwrap_or(d.engine_queue_limit),
        max_queued: args.max_queued.or(file.max_queued).unwrap_or(d.max_queued),
        queue_timeout: secs(
            "queue_timeout",
            args.queue_timeout,
            file.queue_timeout,
            d.queue_timeout,
        )?,
        tenant_weights: tenant_weights(file)?,
    })
}

/// The file's `[tenant_weights]`: `"tenant" = weight`, each at least 1 (used at start and when
/// the file changes).
pub fn tenant_weights(file: &FileConfig) -> Result<HashMap<Tenant, u32>, ConfigError> {
    let mut weights = HashMap::with_capacity(file.tenant_weights.len());
    for (tenant, &weight) in &file.tenant_weights {
        if weight == 0 {
            return Err(invalid(
                "tenant_weights",
                format!("tenant {tenant:?}: the weight must be at least 1"),
            ));
        }
        if tenant.is_empty() || tenant.len() > crate::admit::tenant::MAX_TENANT_CHARS {
            return Err(invalid(
                "tenant_weights",
                format!(
                    "tenant {tenant:?}: a tenant's name has 1 to {} characters",
                    crate::admit::tenant::MAX_TENANT_CHARS
                ),
            ));
        }
        weights.insert(Tenant(Arc::from(tenant.as_str())), weight);
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::super::RouterConfig;
    use super::super::tests::args;
    use super::*;

    fn resolve(text: &str, flags: &[&str]) -> Result<RouterConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, text).unwrap();
        let mut all = vec!["--config", file.to_str().unwrap()];
        all.extend_from_slice(flags);
        RouterConfig::resolve(&args(&all)).map_err(|e| e.to_string())
    }

    #[test]
    fn the_queue_is_off_by_default_and_flags_win_over_the_file() {
        let c = resolve("", &[]).unwrap();
        assert!(!c.queue.enabled());
        assert_eq!(c.queue, QueueSettings::default());
        let c = resolve(
            "engine_queue_limit = 4\nmax_queued = 10\nqueue_timeout = 2.5\n\
             [tenant_weights]\n\"gold\" = 4\n\"bronze\" = 1\n",
            &["--max-queued", "20"],
        )
        .unwrap();
        assert!(c.queue.enabled());
        assert_eq!(c.queue.engine_queue_limit, 4);
        assert_eq!(c.queue.max_queued, 20);
        assert_eq!(c.queue.queue_timeout, Duration::from_millis(2500));
        assert_eq!(c.queue.tenant_weights[&Tenant(Arc::from("gold"))], 4);
        assert_eq!(c.queue.tenant_weights.len(), 2);
    }

    #[test]
    fn bad_queue_settings_name_the_setting() {
        let e = resolve("[tenant_weights]\n\"gold\" = 0\n", &[]).unwrap_err();
        assert_eq!(
            e,
            "tenant_weights: tenant \"gold\": the weight must be at least 1"
        );
        let e = resolve("queue_timeout = 0\n", &[]).unwrap_err();
        assert!(e.starts_with("queue_timeout: must be a positive"), "{e}");
    }
}
