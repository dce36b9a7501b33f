//! The model tokenizer (`--tokenizer`) against golden outputs of independent implementations:
//! Python `tokenizers` for token ids and Python `jinja2` (set up as transformers sets it up)
//! for chat templates, written by `tests/fixtures/tokenizer/gen_tokenizer.py`.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::{client, instant_sim, loopback, post_json};
use serde_json::{Value, json};
use switchyard::sim::cache_events::{CacheEvents, StoredBlocks};
use switchyard::sim::{self, SimConfig, SimHooks};
use switchyard::tokens::{self, TokenizeError, Tokenizer, TokenizerError};

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
        // Capped as the router caps them: the first ids, all of them when they fit.
        let want = ids(&case["ids"]);
        for cap in [1, 7, 64, want.len(), tokens::bound::DEFAULT_MAX_TOKENS] {
            let p = tok.prompt_token_ids(path, body, cap).unwrap();
            assert!(
                want.starts_with(&p.ids),
                "{name}: {label}: cap {cap}: a prefix"
            );
            if cap >= want.len() && body.len() <= tokens::bound::text_budget(cap) {
                assert!(
                    p.complete && p.ids == want,
                    "{name}: {label}: cap {cap}: all"
                );
            }
        }
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

/// The simulated engine's cache events, recorded.
#[derive(Debug, Default)]
struct Recorder {
    stored: Mutex<Vec<StoredBlocks>>,
    removed: Mutex<Vec<u64>>,
    cleared: std::sync::atomic::AtomicUsize,
}

impl CacheEvents for Recorder {
    fn stored(&self, blocks: StoredBlocks) {
        self.stored.lock().unwrap().push(blocks);
    }
    fn removed(&self, block_hashes: &[u64]) {
        self.removed.lock().unwrap().extend_from_slice(block_hashes);
    }
    fn cleared(&self) {
        self.cleared
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn sim_with(
    cfg: SimConfig,
    tokenizer: Option<Arc<Tokenizer>>,
) -> (sim::SimHandle, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let events: Arc<dyn CacheEvents> = rec.clone();
    let hooks = SimHooks {
        tokenizer,
        cache_events: Some(events),
    };
    let h = sim::start_with(cfg, loopback(), hooks).await.unwrap();
    (h, rec)
}

fn chat_body(user: &str) -> Value {
    json!({
        "model": common::MODEL,
        "max_tokens": 1,
        "messages": [
            {"role": "system", "content": "You are a helpful routing assistant."},
            {"role": "user", "content": user},
        ],
    })
}

#[tokio::test]
async fn the_simulated_engine_caches_by_the_model_token_ids_and_reports_them() {
    let tok = Arc::new(Tokenizer::load(&fixtures().join("llama3")).unwrap());
    let cfg = SimConfig {
        block_size: 4,
        ..instant_sim()
    };
    let (engine, rec) = sim_with(cfg, Some(Arc::clone(&tok))).await;
    let c = client();
    let body = chat_body("Which engine has my prefix cached? Tell me in detail, please.");
    let want = tok
        .request_token_ids("/v1/chat/completions", body.to_string().as_bytes())
        .unwrap();
    let r = post_json(&c, &engine.url(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["usage"]["prompt_tokens"], want.len());
    let stored = rec.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1, "one run of new blocks");
    let s = &stored[0];
    let full = want.len() / 4 * 4;
    assert_eq!(s.parent, None);
    assert_eq!(s.block_size, 4);
    assert_eq!(
        s.token_ids,
        want[..full],
        "the model's ids, full blocks only"
    );
    assert_eq!(s.block_hashes, sim::engine_block_hashes(&want, 4));
    let router = tokens::token_block_hashes(&want, 4, tokens::token_chain_seed(None));
    assert!(
        s.block_hashes.iter().zip(&router).all(|(a, b)| a != b),
        "the engine's hashes are its own"
    );
    // The same chat again stores nothing new; a longer conversation stores only its new
    // blocks, chained after the last block they share.
    let r = post_json(&c, &engine.url(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(rec.stored.lock().unwrap().len(), 1);
    let mut longer = body.clone();
    longer["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": "Engine b."}),
        json!({"role": "user", "content": "Why?"}),
    ]);
    let ids2 = tok
        .request_token_ids("/v1/chat/completions", longer.to_string().as_bytes())
        .unwrap();
    let r = post_json(&c, &engine.url(), "/v1/chat/completions", longer).await;
    assert_eq!(r.status, 200);
    let stored = rec.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 2);
    let shared = want
        .chunks_exact(4)
        .zip(ids2.chunks_exact(4))
        .take_while(|(a, b)| a == b)
        .count();
    let h2 = sim::engine_block_hashes(&ids2, 4);
    assert!(shared > 0);
    assert_eq!(stored[1].parent, Some(h2[shared - 1]));
    assert_eq!(stored[1].block_hashes, h2[shared..]);
    assert_eq!(stored[1].token_ids, ids2[shared * 4..h2.len() * 4]);
    assert!(rec.removed.lock().unwrap().is_empty());
    // A body the template rejects is a 400, not a cached prompt.
    let bad = json!({"model": common::MODEL, "messages": [{"role": "robot", "content": "x"}]});
    let r = post_json(&c, &engine.url(), "/v1/chat/completions", bad).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown role")
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn without_a_tokenizer_the_engine_reports_stand_in_ids_and_evictions_in_lru_order() {
    let cfg = SimConfig {
        block_size: 2,
        num_blocks: 4,
        ..instant_sim()
    };
    let (engine, rec) = sim_with(cfg, None).await;
    let c = client();
    // 16 bytes = 4 stand-in tokens = 2 blocks of 2 each.
    for prompt in ["aaaabbbbccccdddd", "eeeeffffgggghhhh"] {
        let r = post_json(
            &c,
            &engine.url(),
            "/v1/completions",
            common::completion(prompt, 1, false),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["prompt_tokens"], 4);
    }
    let stored = rec.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[0].token_ids,
        tokens::stand_in_token_ids(b"aaaabbbbccccdddd"),
        "each 4 bytes as a little-endian u32"
    );
    let first = stored[0].block_hashes.clone();
    assert!(rec.removed.lock().unwrap().is_empty());
    // A third prompt evicts the least recently used blocks: the first prompt's, tail first.
    let r = post_json(
        &c,
        &engine.url(),
        "/v1/completions",
        common::completion("iiiijjjjkkkkllll", 1, false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(*rec.removed.lock().unwrap(), vec![first[1], first[0]]);
    // vLLM's prefix-cache reset is reported as everything cleared; the next prompt stores again.
    let r = common::send(&c, common::post(&engine.url(), "/reset_prefix_cache", "")).await;
    assert_eq!(r.status, 200);
    assert_eq!(rec.cleared.load(std::sync::atomic::Ordering::Relaxed), 1);
    let r = post_json(
        &c,
        &engine.url(),
        "/v1/completions",
        common::completion("aaaabbbbccccdddd", 1, false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        rec.stored.lock().unwrap().last().unwrap().block_hashes,
        first
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn a_bad_sim_tokenizer_stops_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimConfig {
        tokenizer: Some(dir.path().join("missing")),
        ..instant_sim()
    };
    let e = sim::start(cfg, loopback()).await.unwrap_err().to_string();
    assert!(e.starts_with("--tokenizer: "), "{e}");
    let cfg = SimConfig {
        tokenizer: Some(fixtures().join("chatml")),
        ..instant_sim()
    };
    let h = sim::start(cfg, loopback()).await.unwrap();
    let r = post_json(
        &client(),
        &h.url(),
        "/v1/completions",
        json!({"model": common::MODEL, "prompt": [1, 2, 3], "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        3,
        "token ids are used as given"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn serve_with_a_tokenizer_runs_demo_engines_that_count_its_tokens_and_a_bad_one_fails() {
    let dir = fixtures().join("llama3");
    let dir_s = dir.to_str().unwrap();
    let router = common::RouterProcess::spawn(&["--tokenizer", dir_s, "--demo-engines", "1"]);
    let body = chat_body("How many tokens is this, exactly?");
    let tok = Tokenizer::load(&dir).unwrap();
    let want = tok
        .request_token_ids("/v1/chat/completions", body.to_string().as_bytes())
        .unwrap();
    let r = post_json(&client(), &router.url, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        want.len(),
        "the demo engine counts the model's tokens"
    );
    drop(router);
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("tokenizer.json"), "[]").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0", "--tokenizer"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tokenizer"), "{err}");
}
