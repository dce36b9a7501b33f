//! Parsing of an OpenAI-style request body: only what routing needs.
//!
//! The body is scanned once; `model`, `stream`, the prompt (`prompt`, `messages` or `input`) and
//! the session field are extracted, every other value is skipped without being materialised.
//! Scripts that want other top-level fields get them lazily through [`RequestInfo::field`].

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::tokens;

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
    /// The canonical prompt text (see [`prompt_text`]): what the prefix cache sees.
    pub prompt: String,
    /// The session key: the session header if present, else the body field of that name.
    pub session_key: Option<String>,
    pub headers: HeaderMap,
    /// The raw body, forwarded as-is.
    pub body: Bytes,
    /// Chained block hashes of `prompt` (filled when the router keeps a prefix index).
    pub block_hashes: Vec<u64>,
}

impl RequestInfo {
    /// Estimated prompt length in tokens of the stand-in tokenizer.
    pub fn prompt_tokens(&self) -> usize {
        tokens::estimate_tokens(self.prompt.len())
    }

    /// A top-level JSON field of the body, parsed on demand.
    pub fn field(&self, name: &str) -> Option<serde_json::Value> {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&self.body).ok()?;
        map.get(name).cloned()
    }

    /// Every top-level JSON field of the body, parsed on demand.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// The routing-relevant fields of a body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub model: String,
    pub stream: bool,
    pub prompt: String,
    pub session_value: Option<String>,
}

/// Parses the routing view of `body`. `session_field` names the JSON field holding the session
/// key, if any.
pub fn parse_body(body: &[u8], session_field: Option<&str>) -> Result<Parsed, ParseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = RoutingSeed { session_field }
        .deserialize(&mut de)
        .map_err(|e| classify(&e))?;
    de.end().map_err(|e| ParseError::Json(e.to_string()))?;
    let model = match raw.model {
        None => return Err(ParseError::MissingModel),
        Some(m) => m,
    };
    let model: String =
        serde_json::from_str::<String>(model.get()).map_err(|_| ParseError::ModelNotString)?;
    let mut prompt = String::new();
    if let Some(msgs) = raw.messages {
        let msgs: Vec<ChatMessage> = serde_json::from_str(msgs.get())
            .map_err(|e| ParseError::Json(format!("messages: {e}")))?;
        chat_prompt_into(&msgs, &mut prompt);
    } else if let Some(p) = raw.prompt.or(raw.input) {
        completion_prompt_into(p, &mut prompt);
    }
    let session_value = raw.session.and_then(scalar_text);
    Ok(Parsed {
        model,
        stream: raw.stream.unwrap_or(false),
        prompt,
        session_value,
    })
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

#[derive(Deserialize)]
struct ChatMessage<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

fn chat_prompt_into(msgs: &[ChatMessage], out: &mut String) {
    for m in msgs {
        out.push_str(m.role.as_deref().unwrap_or(""));
        out.push('\n');
        if let Some(c) = m.content {
            let raw = c.get();
            if raw.starts_with('"') {
                if let Ok(s) = serde_json::from_str::<Cow<str>>(raw) {
                    out.push_str(&s);
                }
            } else if raw.starts_with('[')
                && let Ok(parts) = serde_json::from_str::<Vec<ContentPart>>(raw)
            {
                for p in parts.iter().filter_map(|p| p.text.as_deref()) {
                    out.push_str(p);
                }
            }
        }
        out.push('\n');
    }
}

/// `prompt`/`input` may be a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids. Strings are concatenated with newlines; each token id counts as
/// [`tokens::BYTES_PER_TOKEN`] bytes (its little-endian bytes) so that token arrays hash and
/// count consistently with text.
fn completion_prompt_into(raw: &RawValue, out: &mut String) {
    let s = raw.get();
    if s.starts_with('"') {
        if let Ok(p) = serde_json::from_str::<Cow<str>>(s) {
            out.push_str(&p);
        }
        return;
    }
    if let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(s) {
        for (i, item) in list.iter().enumerate() {
            let t = item.get();
            if t.starts_with('"') {
                if i > 0 {
                    out.push('\n');
                }
                if let Ok(p) = serde_json::from_str::<Cow<str>>(t) {
                    out.push_str(&p);
                }
            } else if let Ok(id) = t.parse::<u32>() {
                push_token_id(id, out);
            } else if t.starts_with('[')
                && let Ok(ids) = serde_json::from_str::<Vec<u32>>(t)
            {
                ids.into_iter().for_each(|id| push_token_id(id, out));
            }
        }
    }
}

fn push_token_id(id: u32, out: &mut String) {
    // Four ASCII characters derived from the id: one stand-in token, hashed like text.
    for shift in [0, 6, 12, 18] {
        out.push(char::from(b'0' + ((id >> shift) & 0x3f) as u8));
    }
}

fn scalar_text(v: &RawValue) -> Option<String> {
    let s = v.get();
    if s.starts_with('"') {
        serde_json::from_str::<String>(s).ok()
    } else if s == "null" {
        None
    } else {
        Some(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_model_stream_and_prompt() {
        let p = parse_body(
            br#"{"model":"m","prompt":"hello","stream":true,"max_tokens":3}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            p,
            Parsed {
                model: "m".into(),
                stream: true,
                prompt: "hello".into(),
                session_value: None
            }
        );
    }

    #[test]
    fn chat_messages_count_with_roles_in_order() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{}}]}]}"#;
        assert_eq!(
            parse_body(body, None).unwrap().prompt,
            "system\nbe brief\nuser\nhi\n"
        );
    }

    #[test]
    fn session_field_and_errors() {
        let p = parse_body(br#"{"model":"m","user":"u1"}"#, Some("user")).unwrap();
        assert_eq!(p.session_value.as_deref(), Some("u1"));
        let p = parse_body(br#"{"model":"m","user":42}"#, Some("user")).unwrap();
        assert_eq!(p.session_value.as_deref(), Some("42"));
        assert_eq!(
            parse_body(br#"{"prompt":"x"}"#, None),
            Err(ParseError::MissingModel)
        );
        assert_eq!(parse_body(br#"[1]"#, None), Err(ParseError::NotObject));
        assert_eq!(
            parse_body(br#"{"model":1}"#, None),
            Err(ParseError::ModelNotString)
        );
        assert!(matches!(
            parse_body(br#"{"model":"m""#, None),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_body(br#"{"model":"m"} x"#, None),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn token_id_prompts_count_one_token_per_id() {
        let p = parse_body(br#"{"model":"m","prompt":[1,2,3]}"#, None).unwrap();
        assert_eq!(tokens::estimate_tokens(p.prompt.len()), 3);
    }

    #[test]
    fn escaped_keys_are_recognised() {
        let p = parse_body(br#"{"mod\u0065l":"m"}"#, None).unwrap();
        assert_eq!(p.model, "m");
    }
}
