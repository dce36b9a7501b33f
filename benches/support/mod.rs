//! What the benches share: a chat request of a given length in the tokenizer's tokens.

use switchyard::tokens::Tokenizer;

/// A chat of alternating turns, words drawn from `words` (seeded), that the tokenizer makes at
/// least `tokens` tokens long and that ends on a user turn: the body and its token count.
pub fn chat_body(tok: &Tokenizer, tokens: usize, words: &[&str]) -> (Vec<u8>, usize) {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut messages = vec![serde_json::json!({
        "role": "system",
        "content": "You are a careful assistant that answers questions about LLM routing.",
    })];
    loop {
        let role = if messages.len() % 2 == 1 {
            "user"
        } else {
            "assistant"
        };
        let n = rng.usize(20..60);
        let text: Vec<&str> = (0..n).map(|_| words[rng.usize(..words.len())]).collect();
        messages.push(serde_json::json!({"role": role, "content": text.join(" ") + "."}));
        let body = serde_json::json!({"model": "m", "messages": messages}).to_string();
        let ids = tok
            .request_token_ids("/v1/chat/completions", body.as_bytes())
            .expect("tokenizes");
        if ids.len() >= tokens && role == "user" {
            return (body.into_bytes(), ids.len());
        }
    }
}
