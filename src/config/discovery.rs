//! The engine-discovery settings: `service_discovery` and the `k8s_*` keys, validated with
//! Kubernetes' own name rules.

use super::{ConfigError, FileConfig, ServeArgs, invalid};
use crate::engines::discovery::ServiceDiscovery;
use crate::engines::k8s::{self, K8sDiscovery};

/// `service_discovery` and the `k8s_*` settings.
pub(super) fn discovery_from(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<ServiceDiscovery, ConfigError> {
    let mode = args
        .service_discovery
        .as_deref()
        .or(file.service_discovery.as_deref())
        .unwrap_or("static");
    let namespace = args.k8s_namespace.clone().or(file.k8s_namespace.clone());
    let selector = args
        .k8s_label_selector
        .clone()
        .or(file.k8s_label_selector.clone());
    let port = args.k8s_port.or(file.k8s_port);
    let model_label = args
        .k8s_model_label
        .clone()
        .or(file.k8s_model_label.clone());
    match mode {
        "static" => {
            for (setting, given) in [
                ("k8s_namespace", namespace.is_some()),
                ("k8s_label_selector", selector.is_some()),
                ("k8s_port", port.is_some()),
                ("k8s_model_label", model_label.is_some()),
            ] {
                if given {
                    return Err(invalid(
                        setting,
                        "only applies with service_discovery = k8s (the discovery is static)",
                    ));
                }
            }
            Ok(ServiceDiscovery::Static)
        }
        "k8s" => {
            if let Some(ns) = &namespace
                && !is_dns_label(ns)
            {
                return Err(invalid(
                    "k8s_namespace",
                    format!(
                        "{ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
                    ),
                ));
            }
            if let Some(sel) = &selector
                && (sel.trim().is_empty() || sel.chars().any(char::is_control))
            {
                return Err(invalid(
                    "k8s_label_selector",
                    "must be a label selector such as app=vllm (omit it to take every pod of the namespace)",
                ));
            }
            if port == Some(0) {
                return Err(invalid("k8s_port", "must be a port number, 1 to 65535"));
            }
            let model_label = match model_label {
                None => Some(k8s::DEFAULT_MODEL_LABEL.to_owned()),
                Some(l) if l.is_empty() => None,
                Some(l) if is_label_key(&l) => Some(l),
                Some(l) => {
                    return Err(invalid(
                        "k8s_model_label",
                        format!(
                            "{l:?} is not a label key (e.g. model or example.com/model; \"\" for none)"
                        ),
                    ));
                }
            };
            Ok(ServiceDiscovery::K8s(Box::new(K8sDiscovery {
                namespace,
                label_selector: selector.map(|s| s.trim().to_owned()),
                port: port.unwrap_or(k8s::DEFAULT_PORT),
                model_label,
                ..K8sDiscovery::default()
            })))
        }
        other => Err(invalid(
            "service_discovery",
            format!("unknown value {other:?} (static or k8s)"),
        )),
    }
}

/// An RFC 1123 label: what a namespace name is.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` and `.`, beginning and ending with an alphanumeric.
pub(super) fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok =
        prefix.is_none_or(|p| (1..=253).contains(&p.len()) && p.split('.').all(is_dns_label));
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::super::RouterConfig;
    use super::super::tests::args;
    use super::*;

    #[test]
    fn kubernetes_discovery_settings() {
        let c = RouterConfig::resolve(&args(&[
            "--service-discovery",
            "k8s",
            "--k8s-label-selector",
            "app=vllm",
        ]))
        .unwrap();
        let ServiceDiscovery::K8s(k) = &c.discovery else {
            panic!("k8s discovery expected, got {:?}", c.discovery)
        };
        assert!(c.backends.is_empty());
        assert_eq!(k.label_selector.as_deref(), Some("app=vllm"));
        assert_eq!(k.port, 8000);
        assert_eq!(k.namespace, None);
        assert_eq!(k.model_label.as_deref(), Some("model"));
        let c = RouterConfig::resolve(&args(&[
            "--service-discovery=k8s",
            "--k8s-namespace=llm",
            "--k8s-port=8080",
            "--k8s-model-label=",
        ]))
        .unwrap();
        let ServiceDiscovery::K8s(k) = &c.discovery else {
            panic!("k8s discovery expected")
        };
        assert_eq!((k.namespace.as_deref(), k.port), (Some("llm"), 8080));
        assert_eq!(k.model_label, None, "\"\" turns the model label off");
        assert!(matches!(
            RouterConfig::resolve(&args(&[])).unwrap().discovery,
            ServiceDiscovery::Static
        ));

        for (flags, setting) in [
            (&["--k8s-port", "8000"][..], "k8s_port:"),
            (
                &["--k8s-label-selector", "app=vllm"][..],
                "k8s_label_selector:",
            ),
            (&["--service-discovery", "consul"][..], "service_discovery:"),
            (
                &[
                    "--service-discovery",
                    "k8s",
                    "--static-backends",
                    "http://a:1",
                    "--static-models",
                    "m",
                ][..],
                "static_backends:",
            ),
            (
                &["--service-discovery", "k8s", "--demo-engines", "2"][..],
                "demo_engines:",
            ),
            (
                &[
                    "--service-discovery",
                    "k8s",
                    "--k8s-namespace",
                    "Not_A_Namespace",
                ][..],
                "k8s_namespace:",
            ),
            (
                &["--service-discovery", "k8s", "--k8s-port", "0"][..],
                "k8s_port:",
            ),
            (
                &["--service-discovery", "k8s", "--k8s-label-selector", " "][..],
                "k8s_label_selector:",
            ),
            (
                &["--service-discovery", "k8s", "--k8s-model-label", "a b"][..],
                "k8s_model_label:",
            ),
        ] {
            let e = RouterConfig::resolve(&args(flags)).unwrap_err();
            assert!(e.to_string().starts_with(setting), "{flags:?}: {e}");
        }
        assert!(is_label_key("model") && is_label_key("example.com/model-name"));
        assert!(!is_label_key("-x") && !is_label_key("a/b/c") && !is_label_key(""));
    }
}
