//! The model tokenizer (`--tokenizer`) against golden outputs of independent implementations:
//! Python `tokenizers` for token ids and Python `jinja2` (set up as transformers sets it up)
//! for chat templates, written by `tests/fixtures/tokenizer/gen_tokenizer.py`.

use std::path::PathBuf;

use serde_json::Value;
use switchyard::tokens::{TokenizeError, Tokenizer, TokenizerError};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_model(name: &str) {
    let g = golden();
    let g = &g[name];
    let tok = Tokenizer::load(&fixtures().join(name)).unwrap();
    assert!(tok.has_chat_template());
    let mut checked = 0;
    for case in g["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["with_special"]),
            "{name}: {text:?} with special tokens"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["without_special"]),
            "{name}: {text:?} without special tokens"
        );
        checked += 1;
    }
    for case in g["requests"].as_array().unwrap() {
        let label = case["label"].as_str().unwrap();
        let path = case["path"].as_str().unwrap();
        let body = case["body"].as_str().unwrap().as_bytes();
        let got = tok.request_token_ids(path, body);
        if let Some(err) = case.get("error") {
            let e = got.expect_err(label);
            assert!(
                matches!(e, TokenizeError::Template(ref m) if m.contains(err.as_str().unwrap())),
                "{name}: {label}: {e}"
            );
            continue;
        }
        if let Some(text) = case.get("text") {
            assert_eq!(
                tok.render_chat(body).unwrap(),
                text.as_str().unwrap(),
                "{name}: {label}: rendered chat"
            );
        }
        assert_eq!(got.unwrap(), ids(&case["ids"]), "{name}: {label}: ids");
        checked += 1;
    }
    assert!(checked >= 20, "{name}: only {checked} cases");
}

#[test]
fn llama3_style_tokenizer_and_template_match_python() {
    check_model("llama3");
}

#[test]
fn chatml_tokenizer_with_named_templates_and_content_parts_matches_python() {
    check_model("chatml");
}

#[test]
fn a_tokenizer_json_file_alone_loads_with_its_directory_config() {
    let tok = Tokenizer::load(&fixtures().join("llama3/tokenizer.json")).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.encode("Hello world", true).unwrap()[0], 0, "BOS first");
}

#[test]
fn chat_without_a_template_and_bad_bodies_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("llama3/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    assert!(matches!(
        tok.request_token_ids("/v1/chat/completions", chat),
        Err(TokenizeError::NoChatTemplate)
    ));
    assert!(matches!(
        tok.request_token_ids("/v1/completions", b"{not json"),
        Err(TokenizeError::Json(_))
    ));
    assert!(matches!(
        tok.request_token_ids("/v1/completions", br#"{"model":"m"}"#),
        Err(TokenizeError::NoPrompt)
    ));
    let tok = Tokenizer::load(&fixtures().join("llama3")).unwrap();
    let both = br#"{"messages":[{"role":"user","content":"hi"}],"add_generation_prompt":true,"continue_final_message":true}"#;
    assert!(matches!(
        tok.request_token_ids("/v1/chat/completions", both),
        Err(TokenizeError::Invalid(_))
    ));
}

#[test]
fn bad_paths_and_files_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Tokenizer::load(&dir.path().join("missing")),
        Err(TokenizerError::NotFound { .. })
    ));
    assert!(matches!(
        Tokenizer::load(dir.path()),
        Err(TokenizerError::NotFound { .. })
    ));
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"not\": \"a tokenizer\"}",
    )
    .unwrap();
    let e = Tokenizer::load(dir.path()).unwrap_err();
    assert!(matches!(e, TokenizerError::Tokenizer { .. }), "{e}");
    std::fs::copy(
        fixtures().join("llama3/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
    )
    .unwrap();
    let e = Tokenizer::load(dir.path()).unwrap_err();
    assert!(matches!(e, TokenizerError::Template { .. }), "{e}");
}

#[tokio::test]
async fn the_router_loads_its_tokenizer_at_start_and_a_bad_one_stops_the_start() {
    use switchyard::config::RouterConfig;
    let backends = ["http://127.0.0.1:9".to_owned()];
    let mut cfg = RouterConfig::for_backends(&backends, "m");
    let running = switchyard::proxy::start(cfg.clone(), None).await.unwrap();
    assert!(
        running.state.tokenizer.is_none(),
        "no --tokenizer, none loaded"
    );
    running.shutdown(std::time::Duration::ZERO).await;
    cfg.tokenizer = Some(fixtures().join("llama3"));
    let running = switchyard::proxy::start(cfg.clone(), None).await.unwrap();
    let tok = running.state.tokenizer.clone().expect("loaded at start");
    let body = br#"{"model":"m","prompt":"Hello world"}"#;
    assert_eq!(
        tok.request_token_ids("/v1/completions", body).unwrap(),
        tok.encode("Hello world", true).unwrap()
    );
    running.shutdown(std::time::Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "not json").unwrap();
    cfg.tokenizer = Some(dir.path().to_owned());
    let e = switchyard::proxy::start(cfg, None)
        .await
        .err()
        .expect("a bad tokenizer stops the start")
        .to_string();
    assert!(
        e.starts_with("--tokenizer: ") && e.contains("tokenizer.json"),
        "{e}"
    );
}
