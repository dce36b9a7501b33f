//! What tracing is configured to do: whether it is on, where spans go, how many are sampled,
//! under which service name — from [`OtlpSettings`] over the standard `OTEL_*` environment
//! variables (read through a function, so that the rules are tested without touching the
//! process environment).

use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

use crate::config::{OtlpSettings, check_endpoint};

/// The path of traces on an OTLP/HTTP receiver.
pub const TRACES_PATH: &str = "/v1/traces";
/// The OTLP/HTTP default when tracing is on without an endpoint (`OTEL_TRACES_EXPORTER=otlp`).
const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
/// The exporter's limit on one export (`OTEL_EXPORTER_OTLP_TIMEOUT`'s default).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("{variable}: {message}")]
    Env {
        variable: &'static str,
        message: String,
    },
    #[error("the OTLP exporter: {0}")]
    Exporter(String),
    #[error("https endpoint: cannot load the system's root certificates: {0}")]
    Roots(std::io::Error),
}

/// Tracing as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The full traces URL spans are POSTed to.
    pub endpoint: String,
    /// The sampler: parent-based, with the ratio for new traces.
    pub sampler: PlanSampler,
    /// `service.name`, unless the environment names it (`OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`).
    pub service_name: Option<&'static str>,
    /// One export's limit.
    pub export_timeout: Duration,
}

/// Which sampler, in a form tests can compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlanSampler {
    /// Parent-based, new traces sampled at this ratio.
    ParentRatio(f64),
    /// The SDK reads `OTEL_TRACES_SAMPLER` / `_ARG` itself (default: parent-based, always on).
    FromEnv,
}

impl PlanSampler {
    pub fn build(self) -> Option<Sampler> {
        match self {
            PlanSampler::ParentRatio(r) => Some(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(r),
            ))),
            PlanSampler::FromEnv => None,
        }
    }
}

/// Tracing's plan from the settings over the environment (`env` reads a variable), or `None`
/// when tracing is off: no endpoint set, `OTEL_SDK_DISABLED=true`, or
/// `OTEL_TRACES_EXPORTER=none` without an endpoint in the settings.
pub fn plan(
    settings: &OtlpSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Plan>, OtelError> {
    let var = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let exporter_none = var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
    let endpoint = if let Some(e) = &settings.endpoint {
        with_traces_path(e)
    } else if exporter_none {
        return Ok(None);
    } else if let Some(e) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        checked("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e)?
    } else if let Some(e) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        let e = checked("OTEL_EXPORTER_OTLP_ENDPOINT", e)?;
        format!("{}{TRACES_PATH}", e.trim_end_matches('/'))
    } else if var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "otlp") {
        format!("{DEFAULT_ENDPOINT}{TRACES_PATH}")
    } else {
        return Ok(None);
    };
    if let Some(p) =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        && p != "http/protobuf"
    {
        tracing::warn!(protocol = %p, "only OTLP/HTTP with protobuf is exported (http/protobuf); the protocol asked for is ignored");
    }
    let sampler = match settings.sample_ratio {
        Some(r) => PlanSampler::ParentRatio(r),
        None => PlanSampler::FromEnv,
    };
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let export_timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
    {
        None => DEFAULT_EXPORT_TIMEOUT,
        Some(ms) => ms
            .parse::<u64>()
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
            .ok_or(OtelError::Env {
                variable: "OTEL_EXPORTER_OTLP_TIMEOUT",
                message: format!("must be a positive number of milliseconds, got {ms}"),
            })?,
    };
    Ok(Some(Plan {
        endpoint,
        sampler,
        service_name: (!named).then_some("switchyard"),
        export_timeout,
    }))
}

fn checked(variable: &'static str, e: String) -> Result<String, OtelError> {
    check_endpoint(&e).map_err(|message| OtelError::Env { variable, message })?;
    Ok(e)
}

/// `/v1/traces` appended to a URL without a path; a URL with one is the traces URL itself.
fn with_traces_path(e: &str) -> String {
    match e.parse::<http::Uri>() {
        Ok(u) if matches!(u.path(), "" | "/") => {
            format!("{}{TRACES_PATH}", e.trim_end_matches('/'))
        }
        _ => e.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn with(endpoint: Option<&str>, ratio: Option<f64>) -> OtlpSettings {
        OtlpSettings {
            endpoint: endpoint.map(str::to_owned),
            sample_ratio: ratio,
            ..OtlpSettings::default()
        }
    }

    #[test]
    fn off_unless_an_endpoint_is_configured() {
        assert_eq!(plan(&with(None, Some(0.5)), env_of(&[])).unwrap(), None);
        let p = plan(&with(Some("http://c:4318"), None), env_of(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(p.endpoint, "http://c:4318/v1/traces");
        assert_eq!(p.sampler, PlanSampler::FromEnv);
        assert_eq!(p.service_name, Some("switchyard"));
        assert_eq!(p.export_timeout, Duration::from_secs(10));
    }

    #[test]
    fn the_traces_path_is_appended_only_to_a_bare_url() {
        assert_eq!(with_traces_path("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(
            with_traces_path("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with_traces_path("http://c/otlp/v1/traces"),
            "http://c/otlp/v1/traces"
        );
    }

    #[test]
    fn the_standard_variables_are_honoured() {
        let p = plan(
            &with(None, None),
            env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gen:4318/"),
                ("OTEL_SERVICE_NAME", "edge-router"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "http://gen:4318/v1/traces");
        assert_eq!(p.service_name, None);
        assert_eq!(p.export_timeout, Duration::from_millis(2500));
        // The signal's own variable is a full URL and wins over the general one.
        let p = plan(
            &with(None, None),
            env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gen:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://sig:9999/traces",
                ),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod, service.name=r1",
                ),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "http://sig:9999/traces");
        assert_eq!(p.service_name, None);
        // The flag wins over the variables.
        let p = plan(
            &with(Some("http://flag:4318"), Some(0.25)),
            env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gen:4318")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "http://flag:4318/v1/traces");
        assert_eq!(p.sampler, PlanSampler::ParentRatio(0.25));
        // Only the exporter named: the spec's default endpoint.
        let p = plan(
            &with(None, None),
            env_of(&[("OTEL_TRACES_EXPORTER", "otlp")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "http://localhost:4318/v1/traces");
    }

    #[test]
    fn disabled_by_the_environment() {
        let env = env_of(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://g:1"),
        ]);
        assert_eq!(plan(&with(Some("http://c:1"), None), env).unwrap(), None);
        let env = env_of(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://g:1"),
        ]);
        assert_eq!(plan(&with(None, None), env).unwrap(), None);
    }

    #[test]
    fn bad_variables_are_errors_naming_them() {
        let e = plan(
            &with(None, None),
            env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "g:4318")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
        let e = plan(
            &with(Some("http://c:1"), None),
            env_of(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_TIMEOUT"), "{e}");
    }
}
