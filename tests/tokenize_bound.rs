//! The bound on tokenizing (`switchyard::tokens::bound`): the ids the router computes with a
//! cap are the first ids of the whole prompt's tokenization (never others), for ordinary and
//! huge prompts, chats and completions, with the test tokenizers (and with any tokenizer
//! directory named by `SWITCHYARD_TEST_TOKENIZER`, e.g. a 131k-vocabulary one).

use std::path::PathBuf;

use serde_json::{Value, json};
use switchyard::tokens::Tokenizer;
use switchyard::tokens::bound::{CHUNK_BYTES, text_budget};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn tokenizers() -> Vec<(String, Tokenizer)> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
    let mut out: Vec<(String, Tokenizer)> = ["llama3", "chatml"]
        .iter()
        .map(|n| (n.to_string(), Tokenizer::load(&fixtures.join(n)).unwrap()))
        .collect();
    if let Some(dir) = std::env::var_os("SWITCHYARD_TEST_TOKENIZER") {
        let dir = PathBuf::from(dir);
        out.push((dir.display().to_string(), Tokenizer::load(&dir).unwrap()));
    }
    out
}

/// Text of every kind a pre-tokenizer treats apart: words, capitals, numbers, punctuation,
/// contractions, accents, CJK, emoji, runs of spaces, tabs and newlines, code.
fn text(bytes: usize, seed: u64) -> String {
    const PIECES: &[&str] = &[
        "the",
        "Router",
        "engine",
        "cache",
        "PREFIX",
        "block",
        "token's",
        "they're",
        "2024",
        "123456789",
        "3.14159",
        "système",
        "café",
        "東京",
        "日本語のテキスト",
        "🙂",
        "👩‍💻",
        "fn main() {",
        "}",
        "    return x;",
        "\t",
        "\n",
        "\n\n",
        "   ",
        "        ",
        "--",
        "==",
        "!!!",
        "\"quoted\"",
        "(parens)",
        "a_b_c",
        "x+y=z",
        "http://example.com/a?b=c",
        "<|im_start|>",
        "<|eot_id|>",
        "\r\n",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(bytes + 64);
    while s.len() < bytes {
        s.push_str(PIECES[rng.usize(..PIECES.len())]);
        if rng.u8(..3) > 0 {
            s.push(' ');
        }
    }
    s
}

fn completion(prompt: &str) -> Vec<u8> {
    json!({"model": "m", "prompt": prompt})
        .to_string()
        .into_bytes()
}

fn chat(messages: Value) -> Vec<u8> {
    json!({"model": "m", "messages": messages})
        .to_string()
        .into_bytes()
}

/// The capped ids are the first ids of the full tokenization; all of them (complete) when the
/// cap and the text budget hold the whole prompt.
fn check(tok: &Tokenizer, name: &str, path: &str, body: &[u8], max_tokens: usize) -> usize {
    let full = tok.request_token_ids(path, body).unwrap();
    let got = tok.prompt_token_ids(path, body, max_tokens).unwrap();
    assert!(got.ids.len() <= max_tokens, "{name}: over the cap");
    let agree = full
        .iter()
        .zip(&got.ids)
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(
        agree,
        got.ids.len(),
        "{name}: {path} cap {max_tokens}: id {agree} of {} differs from the full tokenization's",
        got.ids.len()
    );
    if got.complete {
        assert_eq!(got.ids, full, "{name}: complete means all of them");
    }
    if full.len() <= max_tokens && body.len() < text_budget(max_tokens) {
        assert!(
            got.complete,
            "{name}: {path} cap {max_tokens}: whole prompt fits"
        );
    }
    got.ids.len()
}

#[test]
fn ordinary_prompts_give_the_full_tokenization() {
    for (name, tok) in tokenizers() {
        for (i, bytes) in [0usize, 1, 50, 3000, CHUNK_BYTES - 100]
            .into_iter()
            .enumerate()
        {
            let t = text(bytes, i as u64);
            let n = check(&tok, &name, COMPLETIONS, &completion(&t), 131_072);
            let body = chat(json!([
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": t},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": "again"},
            ]));
            let m = check(&tok, &name, CHAT, &body, 131_072);
            assert!(n <= m);
        }
    }
}

#[test]
fn long_prompts_are_tokenized_in_chunks_to_the_same_ids() {
    for (name, tok) in tokenizers() {
        for seed in 0..3 {
            // Several chunks, no cut: every id equals the whole text's.
            let t = text(5 * CHUNK_BYTES + 777, 10 + seed);
            let body = completion(&t);
            let full = tok.request_token_ids(COMPLETIONS, &body).unwrap();
            let got = tok.prompt_token_ids(COMPLETIONS, &body, 1 << 20).unwrap();
            assert!(got.complete, "{name}: chunks resynchronised");
            assert_eq!(got.ids, full, "{name}: seed {seed}");
            // A cap: its first ids.
            assert_eq!(check(&tok, &name, COMPLETIONS, &body, 5000), 5000, "{name}");
            let body = chat(json!([{"role": "user", "content": t}]));
            assert_eq!(check(&tok, &name, CHAT, &body, 7000), 7000, "{name}");
        }
    }
}

#[test]
fn huge_prompts_are_cut_to_the_budget_and_keep_a_true_prefix() {
    for (name, tok) in tokenizers() {
        let t = text(4 << 20, 99);
        let cap = 20_000;
        // The full tokenization of a 4 MiB text is slow in debug builds: compare with that of
        // its first 300 KB, plus the slack, as the first ids of a longer text are.
        let head = &t[..t.floor_char_boundary(300_000)];
        let head_ids = tok.encode(head, true).unwrap();
        let got = tok
            .prompt_token_ids(COMPLETIONS, &completion(&t), cap)
            .unwrap();
        assert!(!got.complete);
        assert!(got.ids.len() <= cap);
        let sure = &head_ids[..head_ids.len() - 2000];
        let n = got.ids.len().min(sure.len());
        assert_eq!(got.ids[..n], sure[..n], "{name}: a true prefix");
        // The budget (8 bytes per token) holds the cap for ordinary text.
        assert_eq!(got.ids.len(), cap, "{name}");

        // A chat whose messages are each over the budget.
        let body = chat(json!([
            {"role": "system", "content": t},
            {"role": "user", "content": [{"type": "text", "text": t}]},
        ]));
        // (Both messages, for templates that move the system prompt into the user turn.)
        let head_body = chat(json!([
            {"role": "system", "content": head},
            {"role": "user", "content": head},
        ]));
        let head_ids = tok.request_token_ids(CHAT, &head_body).unwrap();
        let got = tok.prompt_token_ids(CHAT, &body, cap).unwrap();
        assert!(!got.complete);
        assert_eq!(got.ids.len(), cap, "{name}");
        assert_eq!(got.ids[..], head_ids[..cap], "{name}: chat prefix");
    }
}

#[test]
fn a_cut_never_keeps_the_ids_of_a_word_it_split() {
    // A budget that ends inside a long word, a number, a run of spaces: the kept ids are still
    // the first ids of the whole text.
    for (name, tok) in tokenizers() {
        for filler in [
            "abcdefghij",
            "0123456789",
            "          ",
            "\n \n \n",
            "東京東京",
        ] {
            let mut t = text(CHUNK_BYTES / 2, 5);
            t.push_str(&filler.repeat(5_000));
            t.push_str(&text(10_000, 6));
            for cap in [100, 3000, 6000] {
                check(&tok, &name, COMPLETIONS, &completion(&t), cap);
                let body = chat(json!([{"role": "user", "content": t}]));
                check(&tok, &name, CHAT, &body, cap);
            }
        }
    }
}

#[test]
fn token_id_prompts_are_capped() {
    let (_, tok) = tokenizers().remove(0);
    let ids: Vec<u32> = (0..10_000).collect();
    let body = json!({"prompt": ids}).to_string();
    let got = tok
        .prompt_token_ids(COMPLETIONS, body.as_bytes(), 300)
        .unwrap();
    assert_eq!((got.ids, got.complete), ((0..300).collect(), false));
    let got = tok
        .prompt_token_ids(COMPLETIONS, body.as_bytes(), 10_000)
        .unwrap();
    assert!(got.complete && got.ids.len() == 10_000);
    // A batch counts as its first prompt; a bad id anywhere is still an error.
    let body = json!({"prompt": [[5, 6, 7], [8]]}).to_string();
    let got = tok
        .prompt_token_ids(COMPLETIONS, body.as_bytes(), 2)
        .unwrap();
    assert_eq!((got.ids, got.complete), (vec![5, 6], false));
    for bad in [
        r#"{"prompt": [1, -2]}"#,
        r#"{"prompt": [1, "a"]}"#,
        r#"{"prompt": 5}"#,
    ] {
        assert!(
            tok.prompt_token_ids(COMPLETIONS, bad.as_bytes(), 1)
                .is_err(),
            "{bad}"
        );
    }
    let empty = tok
        .prompt_token_ids(COMPLETIONS, br#"{"prompt": []}"#, 10)
        .unwrap();
    assert!(empty.ids.is_empty() && empty.complete);
}
