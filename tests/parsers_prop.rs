//! Property tests over everything that parses untrusted input: request bodies, engine
//! `/metrics` text and config files. A bounded number of cases runs in CI; the same inputs are
//! fuzzed without bound by the `cargo fuzz` targets under `fuzz/`.

use proptest::prelude::*;
use switchyard::engines::stats::parse_vllm_metrics;
use switchyard::request::{ParseError, parse_body};

fn json_fragment() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z\\\\\"é\\u{0}]{0,12}".prop_map(|s| serde_json::Value::String(s).to_string()),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    "(model|prompt|messages|stream|role|content|text|input|user|[a-z]{1,5})",
                    inner
                ),
                0..5
            )
            .prop_map(|kv| format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn body_parser_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_body(&body, Some("user"), 16);
    }

    #[test]
    fn body_parser_never_panics_on_json_shapes(body in json_fragment()) {
        // Whatever the parser accepts is a JSON object whose `model` it reports faithfully.
        match parse_body(body.as_bytes(), Some("user"), 16) {
            Ok(p) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                prop_assert_eq!(v["model"].as_str(), Some(p.model.as_str()));
            }
            Err(ParseError::MissingModel) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                prop_assert!(v.get("model").is_none());
            }
            Err(ParseError::Json(_) | ParseError::NotObject | ParseError::ModelNotString) => {}
        }
    }

    #[test]
    fn a_valid_request_always_parses(model in "[a-zA-Z0-9/._-]{1,40}", prompt in "\\PC{0,200}", stream in any::<bool>()) {
        let body = serde_json::json!({"model": model, "prompt": prompt, "stream": stream, "temperature": 0.5});
        let p = parse_body(body.to_string().as_bytes(), None, 16).unwrap();
        prop_assert_eq!(p.model, model);
        prop_assert_eq!(p.prompt, switchyard::request::PromptDigest::of_text(&prompt, 16));
        prop_assert_eq!(p.stream, stream);
    }

    #[test]
    fn chat_prompts_digest_like_their_canonical_text(
        msgs in prop::collection::vec(("[a-z]{0,10}", "\\PC{0,150}", any::<bool>()), 0..6),
    ) {
        // The streamed digest equals the digest of the canonical text built by hand, whatever
        // the key order and content form.
        let mut text = String::new();
        let messages: Vec<serde_json::Value> = msgs.iter().map(|(role, content, parts)| {
            text.push_str(role);
            text.push('\n');
            text.push_str(content);
            text.push('\n');
            if *parts {
                serde_json::json!({"content": [{"type": "text", "text": content}], "role": role})
            } else {
                serde_json::json!({"role": role, "content": content})
            }
        }).collect();
        let body = serde_json::json!({"model": "m", "messages": messages});
        let p = parse_body(body.to_string().as_bytes(), None, 16).unwrap();
        prop_assert_eq!(p.prompt, switchyard::request::PromptDigest::of_text(&text, 16));
    }

    #[test]
    fn metrics_parser_never_panics(text in "(vllm:[a-z_]{1,20}(\\{[a-z_]{1,8}=\"[^\"]{0,8}\"\\})? [-+0-9.eEInfa]{0,10}\n|# (HELP|TYPE) [a-z:_]{1,20} [a-z ]{0,10}\n|\\PC{0,30}\n){0,20}") {
        let _ = parse_vllm_metrics(&text);
    }

    #[test]
    fn metrics_parser_sums_generated_samples(values in prop::collection::vec(0u32..1000, 1..8)) {
        let text: String = values.iter().enumerate()
            .map(|(i, v)| format!("vllm:num_requests_running{{engine=\"{i}\",model_name=\"m\"}} {v}\n"))
            .collect();
        let f = parse_vllm_metrics(&text).unwrap();
        prop_assert_eq!(f.running, values.iter().map(|&v| v as f64).sum::<f64>());
    }

    #[test]
    fn config_parser_never_panics(text in "([a-z_]{1,22} = (\"[^\"\n]{0,12}\"|[0-9.]{1,6}|true|\\[\"[a-z:/.0-9]{0,12}\"\\])\n|\\[[a-z]{1,10}\\]\n|\\PC{0,20}\n){0,12}") {
        let _ = toml::from_str::<switchyard::config::FileConfig>(&text);
    }
}
