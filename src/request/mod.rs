//! Parsing of an OpenAI-style request body: only what routing needs.
//!
//! The body is scanned once for `model`, `stream`, the prompt (`prompt`, `messages` or `input`)
//! and the session field; every other value is skipped without being materialised. The prompt
//! itself is never built either: its pieces are streamed into a [`PromptDigest`] (length,
//! characters, chained block hashes), so memory stays proportional to the body whatever the
//! JSON's shape (a body of ten million `{}` messages costs a few hashes, not a vector of ten
//! million structs). Scripts that want other top-level fields get them lazily through
//! [`RequestInfo::fields`], within a budget.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

pub mod admission;
mod prompt;

pub use prompt::PromptDigest;
use prompt::PromptSink;

/// Why a request body could not be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("request body has no \"model\" field")]
    MissingModel,
    #[error("\"model\" must be a string")]
    ModelNotString,
}

/// What routing knows about one request.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    pub model: String,
    pub stream: bool,
    /// The prompt as the prefix cache sees it.
    pub prompt: PromptDigest,
    /// The session key: the session header if present, else the body field of that name.
    pub session_key: Option<String>,
    pub headers: HeaderMap,
    /// The raw body, forwarded as-is.
    pub body: Bytes,
    /// Its tenant and priority (the proxy sets them from the headers and `admission.rhai`).
    pub admission: admission::Admission,
}

/// The JSON text of the top-level arrays and objects that [`RequestInfo::fields`] materialises
/// for scripts, in all: parsed JSON takes many times its text's size.
pub const FIELDS_BUDGET_BYTES: usize = 1024 * 1024;

impl RequestInfo {
    /// Estimated prompt length in tokens of the stand-in tokenizer.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.tokens()
    }

    /// The chained block hashes of the prompt.
    pub fn block_hashes(&self) -> &[u64] {
        &self.prompt.block_hashes
    }

    /// The body's top-level fields, parsed on demand. Scalars always; arrays and objects
    /// smallest first while their JSON text fits [`FIELDS_BUDGET_BYTES`] in all; the rest read
    /// as `null`.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        top_level_fields(&self.body)
    }
}

fn top_level_fields(body: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let Ok(raw) = serde_json::from_slice::<RawFields>(body) else {
        return serde_json::Map::new();
    };
    let mut compound: Vec<(usize, &str, &RawValue)> = Vec::new();
    let raw = &raw.0;
    let mut out = serde_json::Map::new();
    for (k, v) in raw {
        let text = v.get();
        if text.starts_with('[') || text.starts_with('{') {
            compound.push((text.len(), k, v));
            out.insert(k.to_string(), serde_json::Value::Null);
        } else if let Ok(v) = serde_json::from_str(text) {
            out.insert(k.to_string(), v);
        }
    }
    compound.sort_by_key(|c| c.0);
    let mut budget = FIELDS_BUDGET_BYTES;
    for (len, k, v) in compound {
        if len > budget {
            break;
        }
        budget -= len;
        if let Ok(v) = serde_json::from_str(v.get()) {
            out.insert(k.to_owned(), v);
        }
    }
    out
}

/// A JSON object's entries, values left as JSON text.
struct RawFields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(NOT_OBJECT)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    out.push((k.0, map.next_value()?));
                }
                Ok(RawFields(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The routing-relevant fields of a body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub model: String,
    pub stream: bool,
    pub prompt: PromptDigest,
    pub session_value: Option<String>,
}

/// Parses the routing view of `body`. `session_field` names the JSON field holding the session
/// key, if any; `block_size` is the prefix block size in tokens.
pub fn parse_body(
    body: &[u8],
    session_field: Option<&str>,
    block_size: usize,
) -> Result<Parsed, ParseError> {
    parse_into(body, session_field, PromptSink::new(block_size)).map(|(p, _)| p)
}

/// [`parse_body`], also returning the canonical prompt text its digest describes (see
/// [`PromptDigest`]): what the stand-in tokenizer tokenizes.
pub fn parse_body_with_text(
    body: &[u8],
    session_field: Option<&str>,
    block_size: usize,
) -> Result<(Parsed, String), ParseError> {
    parse_into(body, session_field, PromptSink::keeping_text(block_size))
}

fn parse_into(
    body: &[u8],
    session_field: Option<&str>,
    mut sink: PromptSink,
) -> Result<(Parsed, String), ParseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = RoutingSeed { session_field }
        .deserialize(&mut de)
        .map_err(|e| classify(&e))?;
    de.end().map_err(|e| ParseError::Json(e.to_string()))?;
    let model = match raw.model {
        None => return Err(ParseError::MissingModel),
        Some(m) => m,
    };
    let model = prompt::json_str(model.get())
        .ok_or(ParseError::ModelNotString)?
        .into_owned();
    if let Some(msgs) = raw.messages {
        prompt::messages_into(msgs, &mut sink)
            .map_err(|e| ParseError::Json(format!("messages: {e}")))?;
    } else if let Some(p) = raw.prompt.or(raw.input) {
        prompt::completion_prompt_into(p, &mut sink);
    }
    let session_value = raw.session.and_then(scalar_text);
    let (prompt, text) = sink.finish_with_text();
    let parsed = Parsed {
        model,
        stream: raw.stream.unwrap_or(false),
        prompt,
        session_value,
    };
    Ok((parsed, text))
}

fn classify(e: &serde_json::Error) -> ParseError {
    if e.to_string().contains(NOT_OBJECT) {
        ParseError::NotObject
    } else {
        ParseError::Json(e.to_string())
    }
}

const NOT_OBJECT: &str = "a JSON object";

#[derive(Default)]
struct RawRouting<'a> {
    model: Option<&'a RawValue>,
    stream: Option<bool>,
    prompt: Option<&'a RawValue>,
    messages: Option<&'a RawValue>,
    input: Option<&'a RawValue>,
    session: Option<&'a RawValue>,
}

struct RoutingSeed<'s> {
    session_field: Option<&'s str>,
}

impl<'de> DeserializeSeed<'de> for RoutingSeed<'_> {
    type Value = RawRouting<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RoutingSeed<'_> {
    type Value = RawRouting<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(NOT_OBJECT)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = RawRouting::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let k: &str = &key.0;
            if Some(k) == self.session_field {
                out.session = Some(map.next_value()?);
                continue;
            }
            match k {
                "model" => out.model = Some(map.next_value()?),
                "stream" => out.stream = map.next_value::<Option<bool>>()?,
                "prompt" => out.prompt = Some(map.next_value()?),
                "messages" => out.messages = Some(map.next_value()?),
                "input" => out.input = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A map key borrowed from the input where possible.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

fn scalar_text(v: &RawValue) -> Option<String> {
    let s = v.get();
    if s.starts_with('"') {
        prompt::json_str(s).map(Cow::into_owned)
    } else if s == "null" {
        None
    } else {
        Some(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &[u8]) -> Result<Parsed, ParseError> {
        parse_body(body, None, 16)
    }

    fn digest(text: &str) -> PromptDigest {
        PromptDigest::of_text(text, 16)
    }

    #[test]
    fn the_kept_text_is_the_text_the_digest_describes() {
        let chat = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"content":[{"type":"text","text":"hi"}],"role":"user"}]}"#;
        let (p, text) = parse_body_with_text(chat, None, 16).unwrap();
        assert_eq!(text, "system\nbe brief\nuser\nhi\n");
        assert_eq!(p, parse(chat).unwrap());
        assert_eq!(p.prompt, digest(&text));
        for body in [
            &br#"{"model":"m","prompt":["a","b"]}"#[..],
            br#"{"model":"m","prompt":[1,2,300000]}"#,
        ] {
            let (p, text) = parse_body_with_text(body, None, 1).unwrap();
            assert_eq!(p, parse_body(body, None, 1).unwrap());
            assert_eq!(p.prompt, PromptDigest::of_text(&text, 1));
        }
    }

    #[test]
    fn extracts_model_stream_and_prompt() {
        let p = parse(br#"{"model":"m","prompt":"hello","stream":true,"max_tokens":3}"#).unwrap();
        assert_eq!(
            p,
            Parsed {
                model: "m".into(),
                stream: true,
                prompt: digest("hello"),
                session_value: None
            }
        );
        assert_eq!((p.prompt.bytes, p.prompt.chars), (5, 5));
    }

    #[test]
    fn chat_messages_count_with_roles_in_order() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{}}],"role":"user"}]}"#;
        assert_eq!(
            parse(body).unwrap().prompt,
            digest("system\nbe brief\nuser\nhi\n")
        );
    }

    #[test]
    fn long_prompts_hash_like_the_whole_text() {
        let text = "ünïcode and plain text ".repeat(40);
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": &text[..200]},
            {"role": "user", "content": [{"type": "text", "text": &text[200..]}, {"type": "text", "text": "\"esc\""}]},
        ]});
        let p = parse(body.to_string().as_bytes()).unwrap();
        let whole = format!("system\n{}\nuser\n{}\"esc\"\n", &text[..200], &text[200..]);
        assert_eq!(p.prompt, digest(&whole));
        assert_eq!(
            p.prompt.block_hashes,
            crate::tokens::block_hashes(whole.as_bytes(), 16)
        );
        assert_eq!(p.prompt.chars, whole.chars().count());
        let list = serde_json::json!({"model": "m", "prompt": ["a b", "c", 7, [1, 2]]});
        let p = parse(list.to_string().as_bytes()).unwrap();
        assert_eq!(p.prompt.bytes, "a b\nc".len() + 3 * 4);
    }

    #[test]
    fn session_field_and_errors() {
        let p = parse_body(br#"{"model":"m","user":"u1"}"#, Some("user"), 16).unwrap();
        assert_eq!(p.session_value.as_deref(), Some("u1"));
        let p = parse_body(br#"{"model":"m","user":42}"#, Some("user"), 16).unwrap();
        assert_eq!(p.session_value.as_deref(), Some("42"));
        assert_eq!(parse(br#"{"prompt":"x"}"#), Err(ParseError::MissingModel));
        assert_eq!(parse(br#"[1]"#), Err(ParseError::NotObject));
        assert_eq!(parse(br#"{"model":1}"#), Err(ParseError::ModelNotString));
        assert!(matches!(
            parse(br#"{"model":"m""#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"m"} x"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"m","messages":[1]}"#),
            Err(ParseError::Json(m)) if m.starts_with("messages:")
        ));
    }

    #[test]
    fn token_id_prompts_count_one_token_per_id() {
        let p = parse(br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(p.prompt.tokens(), 3);
        let p = parse(br#"{"model":"m","prompt":[[1,2],[3, "x", -1, 4]]}"#).unwrap();
        assert_eq!(p.prompt.tokens(), 4);
    }

    #[test]
    fn escaped_keys_are_recognised() {
        let p = parse(br#"{"mod\u0065l":"m"}"#).unwrap();
        assert_eq!(p.model, "m");
    }

    #[test]
    fn fields_materialise_scalars_and_small_compounds_within_the_budget() {
        let big = vec![serde_json::json!({}); FIELDS_BUDGET_BYTES / 2];
        let body = serde_json::json!({
            "model": "m", "max_tokens": 7, "tools": [{"type": "function"}], "messages": big,
        });
        let req = RequestInfo {
            body: body.to_string().into(),
            admission: Default::default(),
            ..Default::default()
        };
        let f = req.fields();
        assert_eq!(f["model"], "m");
        assert_eq!(f["max_tokens"], 7);
        assert_eq!(f["tools"][0]["type"], "function");
        assert_eq!(f["messages"], serde_json::Value::Null, "over the budget");
    }
}
