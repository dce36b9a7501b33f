//! A model's own tokenizer (`--tokenizer`): Hugging Face `tokenizer.json` through the
//! `tokenizers` crate, with the chat template and special tokens of `tokenizer_config.json`.
//!
//! [`Tokenizer::request_token_ids`] gives the token ids an engine (vLLM) sees for a request
//! body, with vLLM's defaults (`vllm/entrypoints/openai/protocol.py`):
//!
//! - **completions** (`/v1/completions`, and any path other than chat): `prompt` (or `input`)
//!   as a string is tokenized with the tokenizer's special tokens added (vLLM's
//!   `add_special_tokens=True` default for completions; the request may set it); a prompt given
//!   as token ids is used as given. A list of prompts (a batch) counts as its first prompt.
//! - **chat** (`/v1/chat/completions`): `messages` rendered through the chat template with
//!   `add_generation_prompt=true` unless the request sets it (or `continue_final_message`),
//!   then tokenized **without** adding special tokens (vLLM's `add_special_tokens=False`
//!   default for chat: the template already has them; the request may set it).
//!
//! The router asks for [`Tokenizer::prompt_token_ids`]: the first of those ids, at most a cap,
//! at a cost the cap bounds ([`super::bound`]).
//!
//! Nothing is downloaded: the files are read once, at start.

use std::path::{Path, PathBuf};

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::bound::{self, PromptIds};
use super::chat::{ChatRequest, ChatTemplate, borrowed_str};
use super::{TokenizeError, TokenizerError};

/// A model's tokenizer and chat template. Cheap to share in an `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("chat_template", &self.chat.is_some())
            .finish()
    }
}

/// The parts of `tokenizer_config.json` that matter here.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// `chat_template`: one template, or a list of named ones (`default` is used).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// The special tokens transformers passes to chat templates.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl Tokenizer {
    /// Loads `path`: a `tokenizer.json` file, or a model directory holding one. The chat
    /// template and special tokens come from `tokenizer_config.json` beside it (a
    /// `chat_template.jinja` file there wins, as in transformers); without one, chat requests
    /// cannot be tokenized.
    pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_owned())
        } else if path.is_file() {
            let dir = path.parent().map(Path::to_owned).unwrap_or_default();
            (path.to_owned(), dir)
        } else {
            return Err(TokenizerError::NotFound {
                path: path.to_owned(),
            });
        };
        if !file.is_file() {
            return Err(TokenizerError::NotFound {
                path: path.to_owned(),
            });
        }
        let bytes = std::fs::read(&file).map_err(|source| TokenizerError::Read {
            path: file.clone(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
        // transformers encodes without the file's padding or truncation unless asked to.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let chat = load_chat_template(&dir)?;
        Ok(Tokenizer {
            inner,
            chat,
            source: file,
        })
    }

    /// The `tokenizer.json` file this was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether chat requests can be tokenized (there is a chat template).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The token ids of `text`, with the tokenizer's special tokens (e.g. BOS) added or not.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// The prompt text of a chat request body: its messages rendered through the chat template.
    pub fn render_chat(&self, body: &[u8]) -> Result<String, TokenizeError> {
        let req: ChatRequest = parse(body)?;
        self.chat
            .as_ref()
            .ok_or(TokenizeError::NoChatTemplate)?
            .render(&req)
    }

    /// The token ids the engine will see for this request body; `path` is the request path
    /// (`/v1/completions` vs `/v1/chat/completions`). See the module documentation. All of
    /// them, however long the prompt: the router uses [`Tokenizer::prompt_token_ids`].
    pub fn request_token_ids(&self, path: &str, body: &[u8]) -> Result<Vec<u32>, TokenizeError> {
        self.prompt_token_ids(path, body, usize::MAX).map(|p| p.ids)
    }

    /// The first token ids the engine will see for this request body, at most `max_tokens`,
    /// computed at a cost bounded by `max_tokens` rather than by the body ([`super::bound`]):
    /// equal to the first ids of [`Tokenizer::request_token_ids`], fewer where a cut prompt
    /// leaves them uncertain.
    pub fn prompt_token_ids(
        &self,
        path: &str,
        body: &[u8],
        max_tokens: usize,
    ) -> Result<PromptIds, TokenizeError> {
        let budget = bound::text_budget(max_tokens);
        let (text, add_special, whole) = if path.ends_with("/chat/completions") {
            let req: ChatRequest = parse(body)?;
            let (text, whole) = self
                .chat
                .as_ref()
                .ok_or(TokenizeError::NoChatTemplate)?
                .render_within(&req, budget)?;
            (text, req.add_special_tokens.unwrap_or(false), whole)
        } else {
            let req: CompletionRequest = parse(body)?;
            let add_special = req.add_special_tokens.unwrap_or(true);
            let raw = req.prompt.or(req.input).ok_or(TokenizeError::NoPrompt)?;
            match prompt_of(raw, max_tokens)? {
                Prompt::Ids(ids, complete) => return Ok(PromptIds { ids, complete }),
                Prompt::Text(s) => {
                    let (text, cut) = bound::cap_text(s, budget);
                    (text, add_special, !cut)
                }
            }
        };
        bound::encode_prefix(&self.inner, &text, add_special, whole, max_tokens)
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, TokenizeError> {
    serde_json::from_slice(body).map_err(|e| TokenizeError::Json(e.to_string()))
}

/// The prompt fields of a completion request, read as they are in the body.
#[derive(Deserialize)]
struct CompletionRequest<'a> {
    #[serde(default, borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
}

/// A completion prompt: text (borrowed from the body where it has no escapes), or token ids
/// (at most the cap, and whether that is all of them).
enum Prompt<'a> {
    Text(Cow<'a, str>),
    Ids(Vec<u32>, bool),
}

/// The prompt of `raw`: a string, token ids, or a batch of either (its first prompt counts).
/// Token ids past `max_tokens` are skipped unread, never stored.
fn prompt_of(raw: &RawValue, max_tokens: usize) -> Result<Prompt<'_>, TokenizeError> {
    let json = |e: serde_json::Error| TokenizeError::Json(e.to_string());
    let first_byte = |r: &RawValue| r.get().trim_start().as_bytes().first().copied();
    match first_byte(raw) {
        Some(b'"') => return Ok(Prompt::Text(borrowed_str(raw).map_err(json)?)),
        Some(b'[') => {}
        _ => {
            return Err(TokenizeError::Json(
                "prompt: expected a string, token ids, or a list of either".into(),
            ));
        }
    }
    let FirstItem(first) = serde_json::from_str(raw.get()).map_err(json)?;
    let ids = |r: &RawValue| {
        let mut de = serde_json::Deserializer::from_str(r.get());
        let (ids, complete) = CappedIds(max_tokens).deserialize(&mut de).map_err(json)?;
        Ok(Prompt::Ids(ids, complete))
    };
    match first.map(first_byte) {
        // `[]`: no token ids.
        None => Ok(Prompt::Ids(Vec::new(), true)),
        Some(Some(b'"')) => first
            .map(|f| Ok(Prompt::Text(borrowed_str(f).map_err(json)?)))
            .unwrap_or(Err(TokenizeError::NoPrompt)),
        Some(Some(b'[')) => first.map(ids).unwrap_or(Err(TokenizeError::NoPrompt)),
        Some(_) => ids(raw),
    }
}

/// The first item of a JSON array, as it is in the body (the others are checked, not kept).
struct FirstItem<'a>(Option<&'a RawValue>);

impl<'de> Deserialize<'de> for FirstItem<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstItem<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<&'de RawValue>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstItem(first))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A list of token ids, at most this many kept (the rest checked to be ids, not stored), and
/// whether that was all of them.
struct CappedIds(usize);

impl<'de> DeserializeSeed<'de> for CappedIds {
    type Value = (Vec<u32>, bool);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CappedIds {
    type Value = (Vec<u32>, bool);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of token ids")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0).min(1 << 16));
        while ids.len() < self.0 {
            match seq.next_element::<u32>()? {
                Some(id) => ids.push(id),
                None => return Ok((ids, true)),
            }
        }
        let mut complete = true;
        while seq.next_element::<u32>()?.is_some() {
            complete = false;
        }
        Ok((ids, complete))
    }
}

fn load_chat_template(dir: &Path) -> Result<Option<ChatTemplate>, TokenizerError> {
    let config_path = dir.join("tokenizer_config.json");
    let config: TokenizerConfig = if config_path.is_file() {
        let text = std::fs::read(&config_path).map_err(|source| TokenizerError::Read {
            path: config_path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| TokenizerError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?
    } else {
        TokenizerConfig::default()
    };
    let jinja_path = dir.join("chat_template.jinja");
    let (source, from) = if jinja_path.is_file() {
        let text = std::fs::read_to_string(&jinja_path).map_err(|source| TokenizerError::Read {
            path: jinja_path.clone(),
            source,
        })?;
        (Some(text), jinja_path)
    } else {
        let source = match config.chat_template {
            None => None,
            Some(TemplateField::One(s)) => Some(s),
            Some(TemplateField::Named(list)) => {
                let mut list = list;
                let at = list
                    .iter()
                    .position(|t| t.name == "default")
                    .ok_or_else(|| TokenizerError::Config {
                        path: config_path.clone(),
                        message: "chat_template is a list of named templates without one named \
                                  \"default\""
                            .into(),
                    })?;
                Some(list.swap_remove(at).template)
            }
        };
        (source, config_path.clone())
    };
    let Some(source) = source else {
        return Ok(None);
    };
    let special = special_tokens(&config.rest);
    ChatTemplate::new(source, special)
        .map(Some)
        .map_err(|e| TokenizerError::Template {
            path: from,
            message: e.to_string(),
        })
}

/// The special tokens of `tokenizer_config.json` as strings: each may be a string or an
/// `AddedToken` object (`{"content": ..}`); `additional_special_tokens` is a list of them.
fn special_tokens(
    cfg: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, minijinja::Value)> {
    fn text(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
            _ => None,
        }
    }
    let mut out: Vec<(String, minijinja::Value)> = SPECIAL_TOKENS
        .iter()
        .filter_map(|k| Some(((*k).to_owned(), text(cfg.get(*k)?)?.into())))
        .collect();
    if let Some(serde_json::Value::Array(list)) = cfg.get("additional_special_tokens") {
        let list: Vec<String> = list.iter().filter_map(text).collect();
        out.push(("additional_special_tokens".into(), list.into()));
    }
    out
}
