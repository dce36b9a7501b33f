//! The bodies of a disaggregated request (vLLM's NixlConnector protocol, as vLLM's own
//! `toy_proxy_server.py` and production-stack's `disaggregated_prefill_orchestrated` speak it):
//!
//! 1. the prefill leg ([`prefill_body`]): the client's body with `stream: false`, no
//!    `stream_options`, `max_tokens` 1 (and `max_completion_tokens` 1 if given), no
//!    `min_tokens` / `min_completion_tokens`, and (NIXL) `kv_transfer_params` asking for a
//!    remote decode;
//! 2. the prefill engine's answer ([`PrefillAnswer`]): its top-level `kv_transfer_params`,
//!    opaque to the router, and its `usage.prompt_tokens_details.cached_tokens`;
//! 3. the decode leg ([`decode_body`]): the client's body with the prefill answer's
//!    `kv_transfer_params` verbatim (a client's own `kv_transfer_params` never reaches an
//!    engine on this path);
//! 4. the decode engine's answer ([`AnswerRewrite`]): `kv_transfer_params` removed, and
//!    `usage.prompt_tokens_details.cached_tokens` set to the prefill engine's figure (the
//!    decode engine counts the transferred tokens as cached), SSE or JSON.
//!
//! Only top-level fields are touched: the rest of the body (the prompt) is copied as it came.

use bytes::{Bytes, BytesMut};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::policy::Handoff;

/// The prefill leg's `kv_transfer_params` (vLLM's toy proxy's, verbatim).
const REMOTE_DECODE: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// Most bytes of a JSON (not SSE) decode answer held to be rewritten; a larger one is relayed
/// as it came (its `cached_tokens` not rewritten), with a warning.
pub const MAX_REWRITTEN_JSON_BYTES: usize = 16 << 20;

/// A request body's top-level fields, each value as it was written.
#[derive(Debug)]
pub struct Fields(Vec<(String, Box<RawValue>)>);

/// Why a body cannot be split into prefill and decode legs.
#[derive(Debug, thiserror::Error)]
pub enum FieldsError {
    #[error("the request body is not a JSON object: {0}")]
    NotAnObject(serde_json::Error),
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
                let mut v = Vec::new();
                while let Some((k, raw)) = m.next_entry::<String, Box<RawValue>>()? {
                    // A repeated key: the last one wins, as in serde_json's maps (and vLLM).
                    v.retain(|(name, _): &(String, Box<RawValue>)| *name != k);
                    v.push((k, raw));
                }
                Ok(Fields(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Fields {
    pub fn parse(body: &[u8]) -> Result<Fields, FieldsError> {
        serde_json::from_slice(body).map_err(FieldsError::NotAnObject)
    }

    fn get(&self, name: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }

    /// `n`, the number of choices asked for (1 if absent or not a number).
    pub fn choices(&self) -> u64 {
        self.get("n")
            .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
            .unwrap_or(1)
    }

    /// The body with `drop` fields left out and `set` fields (name, JSON text) written last.
    fn write(&self, drop: &[&str], set: &[(&str, &str)]) -> Bytes {
        let mut out = Vec::with_capacity(
            self.0
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 4)
                .sum::<usize>()
                + 256,
        );
        out.push(b'{');
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, k: &str, v: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            // A key that came as a JSON string re-encodes to a valid one.
            out.extend_from_slice(
                serde_json::to_string(k)
                    .unwrap_or_else(|_| "\"\"".into())
                    .as_bytes(),
            );
            out.push(b':');
            out.extend_from_slice(v.as_bytes());
        };
        for (k, v) in &self.0 {
            if drop.contains(&k.as_str()) || set.iter().any(|(s, _)| s == k) {
                continue;
            }
            field(&mut out, k, v.get());
        }
        for (k, v) in set {
            field(&mut out, k, v);
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// The prefill leg's body.
pub fn prefill_body(fields: &Fields, handoff: Handoff) -> Bytes {
    let mut set: Vec<(&str, &str)> = vec![("stream", "false"), ("max_tokens", "1")];
    if fields.get("max_completion_tokens").is_some() {
        set.push(("max_completion_tokens", "1"));
    }
    if handoff == Handoff::Nixl {
        set.push(("kv_transfer_params", REMOTE_DECODE));
    }
    fields.write(
        &[
            "stream_options",
            "min_tokens",
            "min_completion_tokens",
            "kv_transfer_params",
        ],
        &set,
    )
}

/// The decode leg's body: the client's, with the prefill answer's `kv_transfer_params` (if it
/// gave any) in place of any the client sent.
pub fn decode_body(fields: &Fields, kv_transfer_params: Option<&RawValue>) -> Bytes {
    match kv_transfer_params {
        Some(p) => fields.write(&[], &[("kv_transfer_params", p.get())]),
        None => fields.write(&["kv_transfer_params"], &[]),
    }
}

/// What the router needs of the prefill engine's answer.
#[derive(Debug, Default)]
pub struct PrefillAnswer {
    /// Its top-level `kv_transfer_params`, verbatim (`None` if absent or null: the decode
    /// engine then computes the prompt itself).
    pub kv_transfer_params: Option<Box<RawValue>>,
    /// Its `usage.prompt_tokens_details.cached_tokens`, if it reported one.
    pub cached_tokens: Option<u64>,
}

impl PrefillAnswer {
    /// Reads a prefill answer; a body that is not a JSON object gives an empty answer (the
    /// decode engine computes the prompt).
    pub fn parse(body: &[u8]) -> PrefillAnswer {
        #[derive(serde::Deserialize)]
        struct Details {
            cached_tokens: Option<u64>,
        }
        #[derive(serde::Deserialize)]
        struct Usage {
            prompt_tokens_details: Option<Details>,
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            kv_transfer_params: Option<Box<RawValue>>,
            usage: Option<Usage>,
        }
        match serde_json::from_slice::<Answer>(body) {
            Ok(a) => PrefillAnswer {
                kv_transfer_params: a.kv_transfer_params.filter(|p| p.get().trim() != "null"),
                cached_tokens: a
                    .usage
                    .and_then(|u| u.prompt_tokens_details)
                    .and_then(|d| d.cached_tokens),
            },
            Err(e) => {
                tracing::warn!(error = %e, "prefill answer is not a completion; the decode engine computes the prompt");
                PrefillAnswer::default()
            }
        }
    }
}

impl PrefillAnswer {
    /// The decode leg's body and the `cached_tokens` figure the client's answer gets. With
    /// NIXL, only a hand-off makes the prefill engine's figure the right one: a prefill answer
    /// without `kv_transfer_params` (vLLM's `"kv_transfer_params": null`, e.g. the first token
    /// was EOS) leaves the decode engine to compute the prompt itself, and its own figure
    /// stands. With a shared store the decode engine finds the prefill engine's KV there.
    pub fn decode_leg(&self, fields: &Fields, handoff: Handoff) -> (Bytes, Option<u64>) {
        match (handoff, self.kv_transfer_params.as_deref()) {
            (Handoff::Nixl, Some(p)) => (decode_body(fields, Some(p)), self.cached_tokens),
            (Handoff::Nixl, None) => (decode_body(fields, None), None),
            (Handoff::SharedStore, _) => (decode_body(fields, None), self.cached_tokens),
        }
    }
}

/// Rewrites a decode engine's answer on its way to the client: `kv_transfer_params` removed,
/// `usage.prompt_tokens_details.cached_tokens` set to the prefill engine's figure. SSE events
/// are rewritten one by one (only those that mention either field are parsed); a JSON answer
/// is held whole (up to [`MAX_REWRITTEN_JSON_BYTES`]) and rewritten at its end.
#[derive(Debug)]
pub struct AnswerRewrite {
    sse: bool,
    cached_tokens: Option<u64>,
    held: BytesMut,
    /// A JSON answer too large to hold: relayed as it comes.
    passthrough: bool,
}

impl AnswerRewrite {
    pub fn new(sse: bool, cached_tokens: Option<u64>) -> AnswerRewrite {
        AnswerRewrite {
            sse,
            cached_tokens,
            held: BytesMut::new(),
            passthrough: false,
        }
    }

    /// Takes the next bytes of the answer; returns what can go to the client now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.passthrough {
            return chunk;
        }
        if !self.sse {
            if self.held.len() + chunk.len() > MAX_REWRITTEN_JSON_BYTES {
                tracing::warn!(
                    bytes = self.held.len() + chunk.len(),
                    "decode answer too large to rewrite; relayed as it came"
                );
                self.passthrough = true;
                self.held.extend_from_slice(&chunk);
                return self.held.split().freeze();
            }
            self.held.extend_from_slice(&chunk);
            return Bytes::new();
        }
        if self.held.is_empty() && !needs_rewrite(&chunk) && chunk.ends_with(b"\n\n") {
            return chunk; // the usual token event, passed on without a copy
        }
        self.held.extend_from_slice(&chunk);
        let Some(end) = memchr::memmem::rfind(&self.held, b"\n\n") else {
            return Bytes::new();
        };
        let complete = self.held.split_to(end + 2).freeze();
        if !needs_rewrite(&complete) {
            return complete;
        }
        let mut out = BytesMut::with_capacity(complete.len() + 16);
        for event in complete.split_inclusive(|b| *b == b'\n') {
            match event.strip_prefix(b"data: ") {
                Some(data) if needs_rewrite(data) => {
                    let json = data.strip_suffix(b"\n").unwrap_or(data);
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&rewrite_json(json, self.cached_tokens));
                    out.extend_from_slice(b"\n");
                }
                _ => out.extend_from_slice(event),
            }
        }
        out.freeze()
    }

    /// The end of the answer: what is still held, rewritten.
    pub fn finish(&mut self) -> Bytes {
        if self.held.is_empty() {
            return Bytes::new();
        }
        let held = self.held.split().freeze();
        if self.sse || self.passthrough {
            return held;
        }
        Bytes::from(rewrite_json(&held, self.cached_tokens))
    }
}

fn needs_rewrite(b: &[u8]) -> bool {
    memchr::memmem::find(b, b"\"kv_transfer_params\"").is_some()
        || memchr::memmem::find(b, b"\"prompt_tokens_details\"").is_some()
}

/// One JSON object with `kv_transfer_params` removed and `usage.prompt_tokens_details.
/// cached_tokens` set to `cached_tokens` (when both exist); anything that is not a JSON object
/// is returned as it came.
fn rewrite_json(json: &[u8], cached_tokens: Option<u64>) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(json) else {
        return json.to_vec();
    };
    obj.remove("kv_transfer_params");
    if let (Some(cached), Some(details)) = (
        cached_tokens,
        obj.get_mut("usage")
            .and_then(|u| u.get_mut("prompt_tokens_details"))
            .and_then(|d| d.as_object_mut()),
    ) {
        details.insert("cached_tokens".into(), cached.into());
    }
    serde_json::to_vec(&obj).unwrap_or_else(|_| json.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).expect("json")
    }

    #[test]
    fn the_prefill_leg_follows_vllms_toy_proxy() {
        let body = br#"{"model":"m","prompt":[1,2,3],"stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"max_completion_tokens":50,"min_tokens":5,"min_completion_tokens":5,"kv_transfer_params":{"evil":1},"temperature":0.5}"#;
        let f = Fields::parse(body).expect("fields");
        let p = json(&prefill_body(&f, Handoff::Nixl));
        assert_eq!(
            p,
            serde_json::json!({"model":"m","prompt":[1,2,3],"temperature":0.5,"stream":false,
                "max_tokens":1,"max_completion_tokens":1,
                "kv_transfer_params":{"do_remote_decode":true,"do_remote_prefill":false,
                    "remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}})
        );
        let shared = json(&prefill_body(&f, Handoff::SharedStore));
        assert!(shared.get("kv_transfer_params").is_none());
        assert_eq!(shared["max_tokens"], 1);
        // Without max_completion_tokens none is added.
        let f2 = Fields::parse(br#"{"model":"m","prompt":"x"}"#).expect("fields");
        assert!(
            json(&prefill_body(&f2, Handoff::Nixl))
                .get("max_completion_tokens")
                .is_none()
        );
    }

    #[test]
    fn the_decode_leg_is_the_clients_body_with_the_prefill_params() {
        let body = br#"{"model":"m","prompt":"hi","stream":true,"max_tokens":50,"min_tokens":5,"kv_transfer_params":{"evil":1}}"#;
        let f = Fields::parse(body).expect("fields");
        let params = RawValue::from_string(
            r#"{"do_remote_prefill":true,"remote_block_ids":[[1,2]]}"#.into(),
        )
        .expect("raw");
        let d = json(&decode_body(&f, Some(&params)));
        assert_eq!(
            d,
            serde_json::json!({"model":"m","prompt":"hi","stream":true,"max_tokens":50,"min_tokens":5,
                "kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":[[1,2]]}})
        );
        let alone = json(&decode_body(&f, None));
        assert!(alone.get("kv_transfer_params").is_none());
        assert_eq!(Fields::parse(br#"{"n":3}"#).expect("f").choices(), 3);
        assert_eq!(f.choices(), 1);
        assert!(Fields::parse(b"[1]").is_err());
    }

    #[test]
    fn the_prefill_answer_gives_its_params_and_cached_tokens() {
        let a = PrefillAnswer::parse(br#"{"id":"x","choices":[{"text":"a","finish_reason":"length"}],"usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32}},"kv_transfer_params":{"do_remote_prefill":true,"remote_engine_id":"e"}}"#);
        assert_eq!(
            a.kv_transfer_params.map(|p| p.get().to_owned()).as_deref(),
            Some(r#"{"do_remote_prefill":true,"remote_engine_id":"e"}"#)
        );
        assert_eq!(a.cached_tokens, Some(32));
        let none =
            PrefillAnswer::parse(br#"{"kv_transfer_params":null,"usage":{"prompt_tokens":3}}"#);
        assert!(none.kv_transfer_params.is_none() && none.cached_tokens.is_none());
        assert!(PrefillAnswer::parse(b"oops").kv_transfer_params.is_none());
    }

    #[test]
    fn without_a_hand_off_the_decode_engines_cached_tokens_stand() {
        // vLLM 0.32's P answering without a hand-off (tests/fixtures/vllm-0.32.0/pd/
        // p_without_params.json): `"kv_transfer_params":null` next to its own cache hits.
        let f = Fields::parse(br#"{"model":"m","prompt":"hi","max_tokens":8}"#).expect("fields");
        let none = PrefillAnswer::parse(
            br#"{"usage":{"prompt_tokens":167,"prompt_tokens_details":{"cached_tokens":32}},"kv_transfer_params":null}"#,
        );
        let (body, cached) = none.decode_leg(&f, Handoff::Nixl);
        assert!(json(&body).get("kv_transfer_params").is_none());
        assert_eq!(
            cached, None,
            "the decode engine computed the prompt: its figure stands"
        );
        let (_, shared) = none.decode_leg(&f, Handoff::SharedStore);
        assert_eq!(
            shared,
            Some(32),
            "a shared store: the decode engine loads P's KV"
        );
        let some = PrefillAnswer::parse(
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":32}},"kv_transfer_params":{"do_remote_prefill":true}}"#,
        );
        let (body, cached) = some.decode_leg(&f, Handoff::Nixl);
        assert_eq!(
            json(&body)["kv_transfer_params"],
            serde_json::json!({"do_remote_prefill": true})
        );
        assert_eq!(cached, Some(32));
    }

    #[test]
    fn a_json_answer_loses_its_params_and_gets_the_prefill_cached_tokens() {
        let mut r = AnswerRewrite::new(false, Some(32));
        let body = br#"{"id":"x","usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":39}},"kv_transfer_params":null}"#;
        let (a, b) = body.split_at(20);
        assert!(r.feed(Bytes::copy_from_slice(a)).is_empty());
        assert!(r.feed(Bytes::copy_from_slice(b)).is_empty());
        let out = json(&r.finish());
        assert_eq!(
            out,
            serde_json::json!({"id":"x","usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32}}})
        );
        // Without details nothing is added.
        let mut r = AnswerRewrite::new(false, Some(32));
        r.feed(Bytes::from_static(br#"{"usage":{"prompt_tokens":4}}"#));
        assert_eq!(
            json(&r.finish()),
            serde_json::json!({"usage":{"prompt_tokens":4}})
        );
    }

    #[test]
    fn sse_events_are_rewritten_one_by_one_across_frames() {
        let mut r = AnswerRewrite::new(true, Some(7));
        let token = Bytes::from_static(b"data: {\"choices\":[{\"text\":\" a\"}]}\n\n");
        let same = r.feed(token.clone());
        assert_eq!(
            same.as_ptr(),
            token.as_ptr(),
            "token events pass without a copy"
        );
        let last = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":9}},\"kv_transfer_params\":{\"x\":1}}\n\ndata: [DONE]\n\n";
        let (a, b) = last.split_at(30);
        let mut out = r.feed(Bytes::copy_from_slice(a)).to_vec();
        out.extend_from_slice(&r.feed(Bytes::copy_from_slice(b)));
        out.extend_from_slice(&r.finish());
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":7}}}\n\ndata: [DONE]\n\n"
        );
    }
}
