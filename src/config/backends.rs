//! The static backends: `static_backends` (http:// URLs without a path) and `static_models`
//! (one model per backend, or one for all).

use super::{ConfigError, invalid};

/// One backend engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub url: String,
    pub models: Vec<String>,
    /// Its model label (`static_model_labels`), which names its role.
    pub label: Option<String>,
}

pub(super) fn backends_from(
    urls: &[String],
    models: Option<&[String]>,
) -> Result<Vec<Backend>, ConfigError> {
    let urls: Vec<String> = urls
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    for u in &urls {
        let uri: http::Uri = u
            .parse()
            .map_err(|e| invalid("static_backends", format!("{u:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(invalid(
                "static_backends",
                format!("{u:?} must be an http:// URL with a host"),
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid(
                "static_backends",
                format!("{u:?} must not have a path"),
            ));
        }
    }
    let models: Vec<String> = models
        .unwrap_or_default()
        .iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    if urls.is_empty() {
        if !models.is_empty() {
            return Err(invalid("static_models", "given without static_backends"));
        }
        return Ok(Vec::new());
    }
    let per_backend: Vec<String> = match models.len() {
        0 => {
            return Err(invalid(
                "static_models",
                "required with static_backends (one model per backend, or one for all)",
            ));
        }
        1 => vec![models[0].clone(); urls.len()],
        n if n == urls.len() => models,
        n => {
            return Err(invalid(
                "static_models",
                format!(
                    "{n} models for {} backends: give one per backend, or one for all",
                    urls.len()
                ),
            ));
        }
    };
    Ok(urls
        .into_iter()
        .zip(per_backend)
        .map(|(url, m)| Backend {
            url,
            models: vec![m],
            label: None,
        })
        .collect())
}
