use super::*;

#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeArgs,
}

pub(super) fn args(v: &[&str]) -> ServeArgs {
    parse(v).unwrap()
}

fn parse(v: &[&str]) -> Result<ServeArgs, clap::Error> {
    use clap::Parser;
    let mut full = vec!["switchyard"];
    full.extend_from_slice(v);
    Flags::try_parse_from(full).map(|f| f.serve)
}

#[test]
fn tokenize_max_tokens_flag_and_file_key_resolve_and_zero_is_refused() {
    let c = RouterConfig::resolve(&args(&[])).unwrap();
    assert_eq!(c.tokenize_max_tokens, 131_072);
    let c = RouterConfig::resolve(&args(&["--tokenize-max-tokens", "4096"])).unwrap();
    assert_eq!(c.tokenize_max_tokens, 4096);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(&file, "tokenize_max_tokens = 777\n").unwrap();
    let c = RouterConfig::resolve(&args(&["--config", file.to_str().unwrap()])).unwrap();
    assert_eq!(c.tokenize_max_tokens, 777);
    let e = RouterConfig::resolve(&args(&["--tokenize-max-tokens", "0"]))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("tokenize_max_tokens: "), "{e}");
}

#[test]
fn tokenizer_flag_and_file_key_resolve_and_a_missing_path_names_the_setting() {
    assert_eq!(RouterConfig::resolve(&args(&[])).unwrap().tokenizer, None);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let c = RouterConfig::resolve(&args(&["--tokenizer", d])).unwrap();
    assert_eq!(c.tokenizer.as_deref(), Some(dir.path()));
    let file = dir.path().join("s.toml");
    std::fs::write(&file, format!("tokenizer = {d:?}\n")).unwrap();
    let c = RouterConfig::resolve(&args(&["--config", file.to_str().unwrap()])).unwrap();
    assert_eq!(c.tokenizer.as_deref(), Some(dir.path()));
    let missing = dir.path().join("nope");
    let e = RouterConfig::resolve(&args(&["--tokenizer", missing.to_str().unwrap()]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("tokenizer: ") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn model_labels_give_backends_their_roles() {
    let base = [
        "--static-backends",
        "http://p:1,http://d:1,http://a:1",
        "--static-models",
        "m",
    ];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        RouterConfig::resolve(&args(&v))
    };
    let c = with(&[
        "--static-model-labels",
        "llama-prefill,llama-decode,",
        "--prefill-model-labels",
        "llama-prefill",
        "--decode-model-labels",
        "llama-decode",
    ])
    .unwrap();
    let labels: Vec<Option<&str>> = c.backends.iter().map(|b| b.label.as_deref()).collect();
    assert_eq!(labels, [Some("llama-prefill"), Some("llama-decode"), None]);
    assert_eq!(
        (c.prefill_labels.as_slice(), c.decode_labels.as_slice()),
        (
            &["llama-prefill".to_string()][..],
            &["llama-decode".to_string()][..]
        )
    );
    assert_eq!(c.prefill_timeout, c.first_byte_timeout);
    let err = |extra: &[&str]| with(extra).unwrap_err().to_string();
    assert!(
        err(&["--static-model-labels", "a,b"]).starts_with("static_model_labels: 2 labels for 3"),
    );
    let e = err(&[
        "--static-model-labels",
        "p,d,a",
        "--prefill-model-labels",
        "p",
        "--decode-model-labels",
        "x",
    ]);
    assert!(
        e.starts_with("decode_model_labels: \"x\" is the label of no"),
        "{e}"
    );
    let e = err(&[
        "--static-model-labels",
        "p,d,a",
        "--prefill-model-labels",
        "p",
    ]);
    assert!(e.starts_with("decode_model_labels: required with"), "{e}");
    let e = err(&[
        "--static-model-labels",
        "p,d,a",
        "--prefill-model-labels",
        "p",
        "--decode-model-labels",
        "p",
    ]);
    assert!(e.starts_with("prefill_model_labels: \"p\" is also"), "{e}");
    assert!(err(&["--prefill-timeout", "0"]).starts_with("prefill_timeout: must be a positive"));
}

#[test]
fn defaults_and_flags() {
    let c = RouterConfig::resolve(&args(&[])).unwrap();
    assert_eq!(c.port, 8001);
    assert_eq!(c.host.to_string(), "127.0.0.1");
    assert!(c.backends.is_empty());
    assert_eq!(c.policy.default_policy, "load_balanced_kvaware");
    let c = RouterConfig::resolve(&args(&[
        "--static-backends",
        "http://a:8000,http://b:8000",
        "--static-models",
        "m",
        "--log-level",
        "warning",
    ]))
    .unwrap();
    assert_eq!(c.backends.len(), 2);
    assert_eq!(
        c.backends[1],
        Backend {
            url: "http://b:8000".into(),
            models: vec!["m".into()],
            label: None,
        }
    );
    assert_eq!(c.log_level, "warn");
}

#[test]
fn inconsistent_settings_name_the_setting() {
    let e = RouterConfig::resolve(&args(&[
        "--static-backends",
        "http://a:1,http://b:1",
        "--static-models",
        "x,y,z",
    ]))
    .unwrap_err();
    assert!(e.to_string().starts_with("static_models:"), "{e}");
    let e = RouterConfig::resolve(&args(&["--static-backends", "a:1"])).unwrap_err();
    assert!(e.to_string().starts_with("static_backends:"), "{e}");
    let e = RouterConfig::resolve(&args(&["--log-level", "loud"])).unwrap_err();
    assert!(e.to_string().starts_with("log_level:"), "{e}");
    let e = RouterConfig::resolve(&args(&["--connect-timeout=-1"])).unwrap_err();
    assert!(e.to_string().starts_with("connect_timeout:"), "{e}");
    assert!(parse(&["--no-such-flag"]).is_err());
}

#[test]
fn connection_limits() {
    let c = RouterConfig::resolve(&args(&[])).unwrap();
    assert_eq!(c.body_read_timeout, Duration::from_secs(30));
    assert_eq!(
        c.max_connections, None,
        "derived from the fd limit at start"
    );
    let c = RouterConfig::resolve(&args(&[
        "--body-read-timeout",
        "0.5",
        "--max-connections",
        "8",
    ]))
    .unwrap();
    assert_eq!(c.body_read_timeout, Duration::from_millis(500));
    assert_eq!(c.max_connections, Some(8));
    let e = RouterConfig::resolve(&args(&["--max-connections", "0"])).unwrap_err();
    assert!(e.to_string().starts_with("max_connections:"), "{e}");
    let e = RouterConfig::resolve(&args(&["--body-read-timeout", "0"])).unwrap_err();
    assert!(e.to_string().starts_with("body_read_timeout:"), "{e}");
    // The shipped example config parses, new keys included.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/switchyard.toml");
    let f = load_file(&example).unwrap();
    assert_eq!(f.body_read_timeout, Some(30.0));
}

#[test]
fn shutdown_grace_in_seconds() {
    let c = RouterConfig::resolve(&args(&[])).unwrap();
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    let c = RouterConfig::resolve(&args(&["--shutdown-grace", "2.5"])).unwrap();
    assert_eq!(c.shutdown_grace, Duration::from_millis(2500));
    let e = RouterConfig::resolve(&args(&["--shutdown-grace=-1"])).unwrap_err();
    assert!(e.to_string().starts_with("shutdown_grace:"), "{e}");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/switchyard.toml");
    assert_eq!(load_file(&example).unwrap().shutdown_grace, Some(30.0));
}

#[test]
fn file_then_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "port = 9000\nrouting_logic = \"session\"\nstatic_backends = [\"http://a:1\"]\nstatic_models = [\"m\"]\n[policies]\nbig = \"kvaware\"\n").unwrap();
    let p = path.to_str().unwrap();
    let c = RouterConfig::resolve(&args(&["--config", p, "--port", "9100"])).unwrap();
    assert_eq!(c.port, 9100);
    assert_eq!(c.policy.default_policy, "session");
    assert_eq!(
        c.policy.per_model.get("big").map(String::as_str),
        Some("kvaware")
    );
    std::fs::write(&path, "prot = 1\n").unwrap();
    let e = RouterConfig::resolve(&args(&["--config", p])).unwrap_err();
    assert!(e.to_string().contains("prot"), "{e}");
}
