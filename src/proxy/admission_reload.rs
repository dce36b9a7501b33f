//! The config file's admission settings, reloaded with it: the rate limits and the tenant
//! weights of the router's queue.

use std::sync::Arc;

use crate::policy::SettingsLoader;

/// The config file's loader, also re-reading its `[[rate_limit]]` tables into `limiter` and
/// its `[tenant_weights]` into the queues on every reload (a file whose tables are invalid
/// leaves those in effect, logged).
pub(super) fn reload_admission_too(
    loader: Option<SettingsLoader>,
    config_file: Option<std::path::PathBuf>,
    limiter: &Arc<crate::admit::rate_limit::RateLimiter>,
    holds: Option<&Arc<crate::admit::hold::Holds>>,
) -> Option<SettingsLoader> {
    let (load, path) = (loader?, config_file);
    let Some(path) = path else {
        return Some(load);
    };
    let limiter = Arc::clone(limiter);
    let holds = holds.cloned();
    Some(Arc::new(move || {
        let file = crate::config::load_file(&path);
        match file
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|f| crate::config::rate_limit_rules(f).map_err(|e| e.to_string()))
        {
            Ok(rules) => {
                limiter.update(rules);
                tracing::info!("rate limits reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "rate limits not reloaded; the previous ones stay")
            }
        }
        if let (Some(holds), Ok(f)) = (&holds, &file) {
            match crate::config::tenant_weights(f) {
                Ok(weights) => {
                    holds.set_weights(weights);
                    tracing::info!("tenant weights reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "tenant weights not reloaded; the previous ones stay")
                }
            }
        }
        load()
    }))
}
