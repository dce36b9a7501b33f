//! The prefill/decode settings: `static_model_labels` (one model label per static backend),
//! `prefill_model_labels` and `decode_model_labels` (which labels make an engine a prefill or
//! a decode engine; production-stack's flags), and `prefill_timeout`.

use std::time::Duration;

use super::{Backend, ConfigError, FileConfig, ServeArgs, invalid, secs};
use crate::engines::RoleLabels;

/// Trimmed, non-empty values of a comma-separated list.
fn list(v: Option<&Vec<String>>) -> Vec<String> {
    v.map(|v| {
        v.iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Gives each static backend its label and returns the role labels. With static backends a
/// prefill or decode label that no backend carries is an error (a configuration that would
/// silently not disaggregate).
pub(super) fn roles_from(
    args: &ServeArgs,
    file: &FileConfig,
    backends: &mut [Backend],
    dynamic: bool,
) -> Result<RoleLabels, ConfigError> {
    let raw = args
        .static_model_labels
        .as_ref()
        .or(file.static_model_labels.as_ref());
    let roles = RoleLabels {
        prefill: list(
            args.prefill_model_labels
                .as_ref()
                .or(file.prefill_model_labels.as_ref()),
        ),
        decode: list(
            args.decode_model_labels
                .as_ref()
                .or(file.decode_model_labels.as_ref()),
        ),
    };
    if let Some(both) = roles.prefill.iter().find(|l| roles.decode.contains(l)) {
        return Err(invalid(
            "prefill_model_labels",
            format!("{both:?} is also a decode_model_labels value: a label names one role"),
        ));
    }
    if let Some(raw) = raw {
        if dynamic {
            return Err(invalid(
                "static_model_labels",
                "not used with service_discovery = k8s (the pods' model label is matched instead)",
            ));
        }
        let labels: Vec<String> = raw.iter().map(|s| s.trim().to_owned()).collect();
        if labels.len() != backends.len() {
            return Err(invalid(
                "static_model_labels",
                format!(
                    "{} labels for {} backends: give one per static_backends entry, in the same order",
                    labels.len(),
                    backends.len()
                ),
            ));
        }
        for (b, l) in backends.iter_mut().zip(labels) {
            b.label = (!l.is_empty()).then_some(l);
        }
    }
    if !dynamic && !backends.is_empty() {
        for (setting, wanted) in [
            ("prefill_model_labels", &roles.prefill),
            ("decode_model_labels", &roles.decode),
        ] {
            if let Some(l) = wanted
                .iter()
                .find(|l| !backends.iter().any(|b| b.label.as_ref() == Some(*l)))
            {
                return Err(invalid(
                    setting,
                    format!("{l:?} is the label of no static backend (set static_model_labels)"),
                ));
            }
        }
        if roles.prefill.is_empty() != roles.decode.is_empty() {
            let (given, missing) = if roles.prefill.is_empty() {
                ("decode_model_labels", "prefill_model_labels")
            } else {
                ("prefill_model_labels", "decode_model_labels")
            };
            return Err(invalid(
                missing,
                format!("required with {given}: disaggregation needs both pools"),
            ));
        }
    }
    Ok(roles)
}

/// `prefill_timeout`: the flag, else the file, else the first-byte timeout.
pub(super) fn prefill_timeout(
    args: &ServeArgs,
    file: &FileConfig,
    first_byte_timeout: Duration,
) -> Result<Duration, ConfigError> {
    secs(
        "prefill_timeout",
        args.prefill_timeout,
        file.prefill_timeout,
        first_byte_timeout,
    )
}
