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

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::TokenizeError;

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
        let continue_final = req.continue_final_message.unwrap_or(false);
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(!continue_final);
        if continue_final && add_generation_prompt {
            return Err(TokenizeError::Invalid(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                    .into(),
            ));
        }
        let messages: Vec<Value> = req
            .messages
            .iter()
            .map(|m| self.shape(m))
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
        let rendered = tmpl.render(ctx).map_err(template_error)?;
        match final_text {
            None => Ok(rendered),
            Some(text) => cut_after_final_message(rendered, &text),
        }
    }

    /// A message as vLLM passes it to the template.
    fn shape(&self, m: &Message<'_>) -> Result<Value, TokenizeError> {
        let mut out: Vec<(&str, Value)> = Vec::with_capacity(5);
        let role = m.role.clone().unwrap_or_default();
        let parts = content_parts(m.content)?;
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
            Value::from(texts.join("\n"))
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

/// A message's content as parts: a string is one text part, `null` none.
fn content_parts(raw: Option<&RawValue>) -> Result<Vec<Part>, TokenizeError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value = serde_json::from_str(raw.get())
        .map_err(|e| TokenizeError::Invalid(format!("message content: {e}")))?;
    match v {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::String(s) => Ok(vec![Part::Text(s)]),
        serde_json::Value::Array(items) => Ok(items
            .into_iter()
            .filter_map(|item| match item {
                serde_json::Value::String(s) => Some(Part::Text(s)),
                serde_json::Value::Object(mut o) => {
                    let kind = o
                        .get("type")
                        .and_then(|t| t.as_str())
                        .unwrap_or("text")
                        .to_owned();
                    match (kind.as_str(), o.remove("text")) {
                        ("text" | "input_text", Some(serde_json::Value::String(t))) => {
                            Some(Part::Text(t))
                        }
                        (k, _) => Some(Part::Other(
                            k.trim_end_matches("_url")
                                .trim_start_matches("input_")
                                .into(),
                        )),
                    }
                }
                _ => None,
            })
            .collect()),
        _ => Err(TokenizeError::Invalid(
            "message content must be a string or an array of content parts".into(),
        )),
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

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time; `%Y %m %d %e %H %M %S %y %b %B %a %A %j %p %%`.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(secs, &format)
}

pub(crate) fn strftime(unix_secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[(days % 7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`, so `", "`/`": "` separators and non-ASCII kept, not HTML-escaped.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(value, indent, sort_keys, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn py_json(
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i128::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&f.to_string());
                }
            }
        }
        ValueKind::String => py_string(v.as_str().unwrap_or(""), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(item, indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                match k.as_str() {
                    Some(s) => py_string(s, out),
                    None => py_string(&k.to_string(), out),
                }
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => py_string(&v.to_string(), out),
    }
    Ok(())
}

fn py_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
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

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(t, "%Y-%m-%d %H:%M:%S %A %j %%"),
            "2024-07-26 13:25:09 Friday 208 %"
        );
    }
}
