//! Chat templates rendered as Hugging Face `transformers` renders them for vLLM.
//!
//! The template is Jinja, run by `minijinja` with transformers' environment settings
//! (`trim_blocks`, `lstrip_blocks`, loop controls) and helpers: Python string/dict methods
//! (`minijinja-contrib`'s pycompat), `raise_exception(msg)`, `strftime_now(fmt)` (UTC), and a
//! `tojson` that writes what Python's `json.dumps(ensure_ascii=False)` writes. The variables
//! are transformers': `messages`, `add_generation_prompt`, the special tokens (`bos_token`,
//! `eos_token`, ...), `tools`/`documents` when the request has them (else undefined), and the
//! request's `chat_template_kwargs`.
//!
//! Messages are first shaped as vLLM shapes them (`vllm/entrypoints/chat_utils.py`): only
//! `role`, `content`, `name`, an assistant's `tool_calls` (with JSON `arguments` parsed) and a
//! tool's `tool_call_id` are kept. A message's `content` follows vLLM's detected content
//! format: templates that loop over a message's content get a list of parts
//! (`{"type":"text","text":..}`, a string becoming one such part), others get a string (the
//! text parts joined with `\n`).

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error};
use serde::Deserialize;
use serde_json::value::RawValue;

use std::borrow::Cow;

use super::TokenizeError;
use super::bound::cap_text;
use super::jinja::{raise_exception, strftime_now, tojson};

const TEMPLATE: &str = "chat";

/// A compiled chat template with the special tokens it is rendered with.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// vLLM's "openai" content format: the template iterates over a message's content parts.
    parts_content: bool,
    /// `bos_token`, `eos_token`, ... as strings.
    special: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("parts_content", &self.parts_content)
            .finish_non_exhaustive()
    }
}

/// The chat fields of a request body that rendering reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest<'a> {
    #[serde(borrow)]
    pub messages: Vec<Message<'a>>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default, borrow)]
    pub tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub documents: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub chat_template_kwargs: Option<&'a RawValue>,
}

/// One message, with the fields vLLM passes on to the template.
#[derive(Debug, Deserialize)]
pub(crate) struct Message<'a> {
    #[serde(default)]
    role: Option<String>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    name: Option<serde_json::Value>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    tool_call_id: Option<serde_json::Value>,
}

impl ChatTemplate {
    /// Compiles `source`; `special` are the special tokens' names and strings.
    pub(crate) fn new(source: String, special: Vec<(String, Value)>) -> Result<Self, Error> {
        let parts_content = loops_over_content(&source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source)?;
        Ok(ChatTemplate {
            env,
            parts_content,
            special,
        })
    }

    /// The prompt text of a chat request, as vLLM renders it (see the module documentation).
    pub(crate) fn render(&self, req: &ChatRequest<'_>) -> Result<String, TokenizeError> {
        self.render_within(req, usize::MAX).map(|(text, _)| text)
    }

    /// The first `budget` bytes (at most) of the prompt text ([`super::bound`]): each
    /// message's text cut to the budget before rendering, the rendered text cut as it is
    /// written. The flag says whether the text is whole (nothing was cut).
    pub(crate) fn render_within(
        &self,
        req: &ChatRequest<'_>,
        budget: usize,
    ) -> Result<(String, bool), TokenizeError> {
        let continue_final = req.continue_final_message.unwrap_or(false);
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(!continue_final);
        if continue_final && add_generation_prompt {
            return Err(TokenizeError::Invalid(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                    .into(),
            ));
        }
        let mut whole = true;
        let messages: Vec<Value> = req
            .messages
            .iter()
            .map(|m| self.shape(m, budget, &mut whole))
            .collect::<Result<_, _>>()?;
        let mut ctx: Vec<(String, Value)> = self.special.clone();
        if let Some(kw) = req.chat_template_kwargs {
            let kw: Value = serde_json::from_str(kw.get())
                .map_err(|e| TokenizeError::Invalid(format!("chat_template_kwargs: {e}")))?;
            if kw.kind() == ValueKind::Map {
                for k in kw.try_iter().map_err(template_error)? {
                    let v = kw.get_item(&k).map_err(template_error)?;
                    ctx.push((k.to_string(), v));
                }
            }
        }
        if let Some(raw) = req.tools {
            let tools = tools_value(raw)?;
            if !tools.is_none() {
                ctx.push(("tools".into(), tools));
            }
        }
        if let Some(raw) = req.documents {
            let v: Value = serde_json::from_str(raw.get())
                .map_err(|e| TokenizeError::Invalid(format!("documents: {e}")))?;
            if !v.is_none() {
                ctx.push(("documents".into(), v));
            }
        }
        let final_text = continue_final
            .then(|| final_message_text(&messages))
            .transpose()?;
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx = Value::from_pairs(ctx);
        let tmpl = self.env.get_template(TEMPLATE).map_err(template_error)?;
        let mut out = BoundedText::new(budget);
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            // The budget is reached: the text so far is the start of the prompt.
            Err(_) if out.full => {}
            Err(e) => return Err(template_error(e)),
        }
        let full = out.full;
        let rendered = out.into_string();
        match final_text {
            // Cut short before the end: the final message's tail is past the budget anyway.
            _ if full => Ok((rendered, false)),
            None => Ok((rendered, whole)),
            Some(text) => cut_after_final_message(rendered, &text).map(|t| (t, whole)),
        }
    }

    /// A message as vLLM passes it to the template.
    /// Its text is cut to `budget` bytes (`whole` cleared if it was).
    fn shape(
        &self,
        m: &Message<'_>,
        budget: usize,
        whole: &mut bool,
    ) -> Result<Value, TokenizeError> {
        let mut out: Vec<(&str, Value)> = Vec::with_capacity(5);
        let role = m.role.clone().unwrap_or_default();
        let parts = content_parts(m.content, budget, whole)?;
        let content = if self.parts_content {
            Value::from(
                parts
                    .into_iter()
                    .map(|p| match p {
                        Part::Text(t) => Value::from_pairs([("type", "text"), ("text", &t)]),
                        Part::Other(kind) => Value::from_pairs([("type", kind)]),
                    })
                    .collect::<Vec<_>>(),
            )
        } else {
            let texts: Vec<String> = parts
                .into_iter()
                .filter_map(|p| match p {
                    Part::Text(t) => Some(t),
                    Part::Other(_) => None,
                })
                .collect();
            let (text, cut) = cap_text(Cow::Owned(texts.join("\n")), budget);
            *whole &= !cut;
            Value::from(text)
        };
        out.push(("role", Value::from(role.clone())));
        out.push(("content", content));
        if role == "assistant"
            && let Some(calls) = &m.tool_calls
            && !calls.is_null()
        {
            out.push(("tool_calls", json_value(parse_arguments(calls))));
        }
        if role == "tool"
            && let Some(id) = &m.tool_call_id
        {
            out.push(("tool_call_id", json_value(id.clone())));
        }
        if let Some(serde_json::Value::String(name)) = &m.name {
            out.push(("name", Value::from(name.clone())));
        }
        Ok(Value::from_pairs(out))
    }
}

/// One tool of a request, as vLLM's `ChatCompletionToolsParam` reads it.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(borrow)]
    function: Function<'a>,
}

#[derive(Deserialize)]
struct Function<'a> {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
}

/// The request's `tools` as vLLM passes them to the template (`tool.model_dump()`): each
/// `{"type", "function": {"name", "description", "parameters"}}`, absent fields as `null`,
/// other fields dropped. Tools of another shape are passed as given.
fn tools_value(raw: &RawValue) -> Result<Value, TokenizeError> {
    let invalid = |e: serde_json::Error| TokenizeError::Invalid(format!("tools: {e}"));
    let Ok(tools) = serde_json::from_str::<Option<Vec<Tool>>>(raw.get()) else {
        return serde_json::from_str(raw.get()).map_err(invalid);
    };
    let Some(tools) = tools else {
        return Ok(Value::from(()));
    };
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        let parameters = match t.function.parameters {
            Some(p) => serde_json::from_str::<Value>(p.get()).map_err(invalid)?,
            None => Value::from(()),
        };
        let function = Value::from_pairs([
            ("name", Value::from(t.function.name)),
            ("description", Value::from(t.function.description)),
            ("parameters", parameters),
        ]);
        out.push(Value::from_pairs([
            (
                "type",
                Value::from(t.kind.unwrap_or_else(|| "function".into())),
            ),
            ("function", function),
        ]));
    }
    Ok(Value::from(out))
}

enum Part {
    Text(String),
    Other(String),
}

/// A message's content as parts: a string is one text part, `null` none. Texts are read
/// borrowed from the body where they have no escapes, and each is cut to `budget` bytes
/// (`whole` cleared if one was), so no copy of a huge text is kept.
fn content_parts(
    raw: Option<&RawValue>,
    budget: usize,
    whole: &mut bool,
) -> Result<Vec<Part>, TokenizeError> {
    let invalid = |e: serde_json::Error| TokenizeError::Invalid(format!("message content: {e}"));
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut text = |s: Cow<'_, str>| {
        let (t, cut) = cap_text(s, budget);
        *whole &= !cut;
        Part::Text(t)
    };
    match raw.get().trim_start().as_bytes().first() {
        Some(b'n') => {
            serde_json::from_str::<()>(raw.get()).map_err(invalid)?;
            Ok(Vec::new())
        }
        Some(b'"') => Ok(vec![text(borrowed_str(raw).map_err(invalid)?)]),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(invalid)?;
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item.get().trim_start().as_bytes().first() {
                    Some(b'"') => parts.push(text(borrowed_str(item).map_err(invalid)?)),
                    Some(b'{') => {
                        let o: PartObject = serde_json::from_str(item.get()).map_err(invalid)?;
                        let kind = o.kind.and_then(|k| borrowed_str(k).ok());
                        let kind = kind.as_deref().unwrap_or("text");
                        let body = o.text.and_then(|t| borrowed_str(t).ok());
                        parts.push(match (kind, body) {
                            ("text" | "input_text", Some(t)) => text(t),
                            (k, _) => Part::Other(
                                k.trim_end_matches("_url")
                                    .trim_start_matches("input_")
                                    .into(),
                            ),
                        });
                    }
                    _ => {}
                }
            }
            Ok(parts)
        }
        _ => Err(TokenizeError::Invalid(
            "message content must be a string or an array of content parts".into(),
        )),
    }
}

/// One object of a content array: its `type` and `text`, if strings.
#[derive(Deserialize)]
struct PartObject<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the body unless it has escapes.
pub(super) fn borrowed_str(raw: &RawValue) -> Result<Cow<'_, str>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    serde_json::from_str::<Text>(raw.get()).map(|t| t.0)
}

/// Rendered text up to a byte budget: writes past it fail (ending the render) and set `full`.
struct BoundedText {
    buf: Vec<u8>,
    limit: usize,
    full: bool,
}

impl BoundedText {
    fn new(limit: usize) -> BoundedText {
        BoundedText {
            buf: Vec::new(),
            limit,
            full: false,
        }
    }

    /// The text, without a character the budget cut in two.
    fn into_string(mut self) -> String {
        match String::from_utf8(self.buf) {
            Ok(s) => s,
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                self.buf = e.into_bytes();
                self.buf.truncate(valid);
                String::from_utf8(self.buf).unwrap_or_default()
            }
        }
    }
}

impl std::io::Write for BoundedText {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = self.limit.saturating_sub(self.buf.len());
        if bytes.len() > room {
            self.buf.extend_from_slice(&bytes[..room]);
            self.full = true;
            return Err(std::io::Error::other("prompt text budget reached"));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_value(v: serde_json::Value) -> Value {
    serde_json::from_value(v).unwrap_or(Value::UNDEFINED)
}

/// vLLM parses each tool call's JSON `arguments` string into an object for the template.
fn parse_arguments(calls: &serde_json::Value) -> serde_json::Value {
    let mut calls = calls.clone();
    if let Some(items) = calls.as_array_mut() {
        for call in items {
            if let Some(f) = call.get_mut("function")
                && let Some(args) = f.get_mut("arguments")
                && let Some(s) = args.as_str()
                && let Ok(parsed) = serde_json::from_str::<serde_json::Value>(s)
            {
                *args = parsed;
            }
        }
    }
    calls
}

/// The text of the final message, which `continue_final_message` leaves open.
fn final_message_text(messages: &[Value]) -> Result<String, TokenizeError> {
    let none = || {
        TokenizeError::Invalid(
            "continue_final_message is set but there is no text to continue in the final message"
                .into(),
        )
    };
    let last = messages.last().ok_or_else(none)?;
    let content = last.get_attr("content").map_err(template_error)?;
    if let Some(s) = content.as_str() {
        return Ok(s.to_owned());
    }
    let mut found = None;
    if let Ok(parts) = content.try_iter() {
        for p in parts {
            if let Ok(t) = p.get_attr("text")
                && let Some(t) = t.as_str()
            {
                found = Some(t.to_owned());
            }
        }
    }
    found.ok_or_else(none)
}

/// transformers' `continue_final_message`: the rendered chat cut right after the final
/// message's text.
fn cut_after_final_message(mut rendered: String, text: &str) -> Result<String, TokenizeError> {
    let stripped = text.trim();
    let at = match rendered.rfind(stripped) {
        Some(at) if !stripped.is_empty() => at,
        _ => {
            return Err(TokenizeError::Invalid(
                "continue_final_message is set but the final message does not appear in the \
                 chat after applying the chat template"
                    .into(),
            ));
        }
    };
    let lstripped = text.trim_start();
    let end = if rendered[at..].starts_with(lstripped) && text.len() == lstripped.len() {
        at + lstripped.len()
    } else {
        at + stripped.len()
    };
    rendered.truncate(end);
    Ok(rendered)
}

fn template_error(e: Error) -> TokenizeError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    TokenizeError::Template(msg)
}

/// Whether the template iterates over a message's content (vLLM's "openai" content format):
/// a `{% for x in <var>['content'] %}` (or `["content"]`, `.content`) loop.
fn loops_over_content(source: &str) -> bool {
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        rest = &rest[start + 2..];
        let end = rest.find("%}").unwrap_or(rest.len());
        let tag = rest[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        rest = &rest[end..];
        let Some(head) = tag.strip_prefix("for ") else {
            continue;
        };
        let Some((_, iter)) = head.split_once(" in ") else {
            continue;
        };
        let iter = iter
            .split(['|', ' '])
            .next()
            .unwrap_or("")
            .trim_end_matches(')');
        if iter.ends_with("['content']")
            || iter.ends_with("[\"content\"]")
            || iter.ends_with(".content")
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_loops_are_detected_as_vllm_does() {
        assert!(loops_over_content(
            "{% for m in messages %}{% for c in m['content'] %}{{ c.text }}{% endfor %}{% endfor %}"
        ));
        assert!(loops_over_content(
            "{%- for part in message.content | selectattr('type') -%}x{%- endfor %}"
        ));
        assert!(!loops_over_content(
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        ));
    }
}
