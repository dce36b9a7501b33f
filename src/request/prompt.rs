//! The prompt of a request as routing keeps it: streamed out of the body's `messages`,
//! `prompt` or `input` by serde visitors into a [`PromptDigest`] (length, characters, chained
//! block hashes), never materialised, so memory stays proportional to the body whatever the
//! JSON's shape.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::Key;
use crate::tokens::{self, BlockHasher};

/// What routing keeps of a prompt: its size and the chained hashes of its full blocks
/// (see [`crate::tokens`]), never the text.
///
/// The canonical prompt text these describe: a completion's `prompt`/`input` strings joined
/// with newlines (each token id counts as one stand-in token); a chat's messages as
/// `role\ncontent\n` each, content parts' `text` concatenated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptDigest {
    /// UTF-8 bytes of the canonical prompt text.
    pub bytes: usize,
    /// Unicode characters of the canonical prompt text.
    pub chars: usize,
    /// Chained hashes of every full block of the canonical prompt text.
    pub block_hashes: Vec<u64>,
}

impl PromptDigest {
    /// The digest of a prompt given as text.
    pub fn of_text(text: &str, block_size: usize) -> PromptDigest {
        let mut sink = PromptSink::new(block_size);
        sink.push(text);
        sink.finish()
    }

    /// Estimated prompt length in tokens of the stand-in tokenizer.
    pub fn tokens(&self) -> usize {
        tokens::estimate_tokens(self.bytes)
    }
}

/// Receives the canonical prompt text piece by piece.
pub(super) struct PromptSink {
    chars: usize,
    hasher: BlockHasher,
    /// The canonical prompt text itself, when asked for.
    text: Option<String>,
}

impl PromptSink {
    pub(super) fn new(block_size: usize) -> PromptSink {
        PromptSink {
            chars: 0,
            hasher: BlockHasher::new(block_size),
            text: None,
        }
    }

    /// A sink that also keeps the canonical prompt text.
    pub(super) fn keeping_text(block_size: usize) -> PromptSink {
        PromptSink {
            text: Some(String::new()),
            ..PromptSink::new(block_size)
        }
    }

    fn push(&mut self, s: &str) {
        self.chars += s.chars().count();
        self.hasher.push(s.as_bytes());
        if let Some(t) = &mut self.text {
            t.push_str(s);
        }
    }

    /// One token id: four ASCII characters derived from it, one stand-in token hashed like text.
    fn push_token_id(&mut self, id: u32) {
        let mut b = [0u8; 4];
        for (i, shift) in [0, 6, 12, 18].into_iter().enumerate() {
            b[i] = b'0' + ((id >> shift) & 0x3f) as u8;
        }
        self.chars += 4;
        self.hasher.push(&b);
        if let Some(t) = &mut self.text {
            t.extend(b.iter().map(|&c| char::from(c)));
        }
    }

    pub(super) fn finish(self) -> PromptDigest {
        self.finish_with_text().0
    }

    /// The digest and the canonical prompt text (empty unless kept).
    pub(super) fn finish_with_text(self) -> (PromptDigest, String) {
        let digest = PromptDigest {
            bytes: self.hasher.len(),
            chars: self.chars,
            block_hashes: self.hasher.finish(),
        };
        (digest, self.text.unwrap_or_default())
    }
}

/// The text of a JSON value that is a string (`raw` is validated JSON, as a [`RawValue`]'s
/// text is): borrowed from `raw` when it has no escapes (most prompts), decoded otherwise;
/// `None` if the value is not a string.
pub(super) fn json_str(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    // memchr's vectorised search: core's byte search costs ~1.2 instructions per byte.
    if memchr::memchr(b'\\', inner.as_bytes()).is_none() {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// A string value, borrowed from the input where possible (serde's own `Cow<str>` always
/// copies).
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_string(V)
    }
}

/// Streams a chat's `messages` into `sink`.
pub(super) fn messages_into(
    raw: &RawValue,
    sink: &mut PromptSink,
) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    MessagesSeed(sink).deserialize(&mut de)
}

/// `messages`: an array of message objects, each streamed into the sink as `role\ncontent\n`.
struct MessagesSeed<'s>(&'s mut PromptSink);

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(MessageSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

struct MessageSeed<'s>(&'s mut PromptSink);

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Role and content may come in either order: keep both (borrowed) until the end.
        let mut role: Option<Cow<'de, str>> = None;
        let mut content: Option<&'de RawValue> = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match &*key.0 {
                "role" => role = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                "content" => content = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let sink = self.0;
        sink.push(role.as_deref().unwrap_or(""));
        sink.push("\n");
        if let Some(c) = content {
            content_into(c, sink);
        }
        sink.push("\n");
        Ok(())
    }
}

/// A message's content: a string, or an array of parts whose `text` values are concatenated.
fn content_into(raw: &RawValue, sink: &mut PromptSink) {
    let text = raw.get();
    if text.starts_with('"') {
        if let Some(s) = json_str(text) {
            sink.push(&s);
        }
    } else if text.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(text);
        // A malformed part list contributes what it had before the fault, as before.
        let _ = serde::Deserializer::deserialize_seq(&mut de, PartsVisitor(sink));
    }
}

struct PartsVisitor<'s>(&'s mut PromptSink);

impl<'de> Visitor<'de> for PartsVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of content parts")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(part) = seq.next_element::<ContentPart<'de>>()? {
            if let Some(t) = part.text {
                self.0.push(&t);
            }
        }
        Ok(())
    }
}

/// One content part; only its `text` matters (anything else, of any type, is skipped).
struct ContentPart<'a> {
    text: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for ContentPart<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentPart<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a content part")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut text = None;
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if &*key.0 == "text" {
                        text = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ContentPart { text })
            }
        }
        d.deserialize_map(V)
    }
}

/// `prompt`/`input` may be a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids. Strings are joined with newlines; each token id counts as one stand-in
/// token (see [`PromptSink::push_token_id`]) so that token arrays hash and count like text.
pub(super) fn completion_prompt_into(raw: &RawValue, sink: &mut PromptSink) {
    let s = raw.get();
    if s.starts_with('"') {
        if let Some(p) = json_str(s) {
            sink.push(&p);
        }
        return;
    }
    if s.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(s);
        let _ = serde::Deserializer::deserialize_seq(&mut de, PromptItems { sink, index: 0 });
    }
}

/// The items of a prompt array: strings, token ids, arrays of token ids; others are skipped.
struct PromptItems<'s> {
    sink: &'s mut PromptSink,
    index: usize,
}

impl<'de> Visitor<'de> for PromptItems<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a prompt array")
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(PromptItem {
                sink: &mut *self.sink,
                first: self.index == 0,
            })?
            .is_some()
        {
            self.index += 1;
        }
        Ok(())
    }
}

struct PromptItem<'s> {
    sink: &'s mut PromptSink,
    first: bool,
}

impl<'de> DeserializeSeed<'de> for PromptItem<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptItem<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a prompt item")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if !self.first {
            self.sink.push("\n");
        }
        self.sink.push(v);
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        if let Ok(id) = u32::try_from(v) {
            self.sink.push_token_id(id);
        }
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // An array of token ids; anything else in it is skipped.
        while let Some(v) = seq.next_element::<TokenId>()? {
            if let Some(id) = v.0 {
                self.sink.push_token_id(id);
            }
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// A token id, or `None` for any other JSON value.
struct TokenId(Option<u32>);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = IgnoredOrU64::deserialize(d)?;
        Ok(TokenId(v.0.and_then(|n| u32::try_from(n).ok())))
    }
}

struct IgnoredOrU64(Option<u64>);

impl<'de> Deserialize<'de> for IgnoredOrU64 {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IgnoredOrU64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token id")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<IgnoredOrU64, E> {
                Ok(IgnoredOrU64(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IgnoredOrU64, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IgnoredOrU64(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IgnoredOrU64, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IgnoredOrU64(None))
            }
        }
        d.deserialize_any(V)
    }
}
