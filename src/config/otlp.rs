//! OpenTelemetry trace export settings: `--otlp-endpoint` and `--otlp-sample-ratio` (also in
//! the config file). The standard `OTEL_*` environment variables are read by [`crate::otel`]
//! when the router starts; these settings win over them.

use std::time::Duration;

use super::{ConfigError, FileConfig, ServeArgs, invalid};

/// Where and how much the router exports its traces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OtlpSettings {
    /// The OTLP/HTTP endpoint (`http(s)://host:4318`, `/v1/traces` appended when the URL has
    /// no path, or a full traces URL); `None`: the `OTEL_EXPORTER_OTLP_*ENDPOINT` variables,
    /// and without them no tracing.
    pub endpoint: Option<String>,
    /// The share of new traces sampled (a client's sampled flag is followed: parent-based);
    /// `None`: `OTEL_TRACES_SAMPLER`, else every trace.
    pub sample_ratio: Option<f64>,
    /// How long finished spans wait to be batched; `None`: `OTEL_BSP_SCHEDULE_DELAY`, else
    /// 5 s. Not a flag: tests shorten it.
    pub schedule_delay: Option<Duration>,
    /// Finished spans held for export at most (the batch being built included); past it
    /// spans are dropped and counted. `None`: `OTEL_BSP_MAX_QUEUE_SIZE`, else 2048.
    pub max_queue: Option<usize>,
}

/// The settings from the flags over the file.
pub(super) fn otlp_settings(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<OtlpSettings, ConfigError> {
    let endpoint = args
        .otlp_endpoint
        .clone()
        .or_else(|| file.otlp_endpoint.clone())
        .filter(|e| !e.is_empty());
    if let Some(e) = &endpoint {
        check_endpoint(e).map_err(|m| invalid("otlp_endpoint", m))?;
    }
    let sample_ratio = args.otlp_sample_ratio.or(file.otlp_sample_ratio);
    if let Some(r) = sample_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return Err(invalid(
            "otlp_sample_ratio",
            format!("must be between 0 and 1, got {r}"),
        ));
    }
    Ok(OtlpSettings {
        endpoint,
        sample_ratio,
        ..OtlpSettings::default()
    })
}

/// An endpoint must be an absolute `http` or `https` URL.
pub fn check_endpoint(e: &str) -> Result<(), String> {
    let uri: http::Uri = e
        .parse()
        .map_err(|err| format!("`{e}` is not a URL: {err}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(format!(
            "`{e}` must be an http:// or https:// URL with a host (OTLP/HTTP, e.g. http://localhost:4318)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_http_urls_with_a_host() {
        assert!(check_endpoint("http://localhost:4318").is_ok());
        assert!(check_endpoint("https://otel.example:4318/v1/traces").is_ok());
        assert!(check_endpoint("localhost:4318").is_err());
        assert!(check_endpoint("grpc://localhost:4317").is_err());
        assert!(check_endpoint("not a url").is_err());
    }

    #[test]
    fn the_example_configs_keys_resolve() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/switchyard.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let file: FileConfig = toml::from_str(&text.replace("# otlp_", "otlp_")).unwrap();
        let s = otlp_settings(&ServeArgs::default(), &file).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://localhost:4318"));
        assert_eq!(s.sample_ratio, Some(0.01));
    }

    #[test]
    fn the_flag_wins_over_the_file_and_ratios_are_checked() {
        let file = FileConfig {
            otlp_endpoint: Some("http://file:4318".into()),
            otlp_sample_ratio: Some(0.5),
            ..FileConfig::default()
        };
        let mut args = ServeArgs::default();
        let s = otlp_settings(&args, &file).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://file:4318"));
        assert_eq!(s.sample_ratio, Some(0.5));
        args.otlp_endpoint = Some("http://flag:4318".into());
        args.otlp_sample_ratio = Some(0.01);
        let s = otlp_settings(&args, &file).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://flag:4318"));
        assert_eq!(s.sample_ratio, Some(0.01));
        args.otlp_sample_ratio = Some(1.5);
        let e = otlp_settings(&args, &file).unwrap_err().to_string();
        assert!(e.contains("otlp_sample_ratio"), "{e}");
        args.otlp_sample_ratio = None;
        args.otlp_endpoint = Some("ftp://x".into());
        let e = otlp_settings(&args, &file).unwrap_err().to_string();
        assert!(e.contains("otlp_endpoint"), "{e}");
    }
}
