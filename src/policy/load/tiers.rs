//! TOML policy files: `[[tier]]` pipelines, a disaggregated policy's `[[decode.tier]]` and
//! `[[prefill.tier]]` with its `handoff`, `[params]`, and each tier's built-in arguments, script
//! file or inline script.

use std::path::Path;

use rhai::{Array, Dynamic, FLOAT, INT, Map};
use toml::Spanned;
use toml::de::{DeTable, DeValue};
use xxhash_rust::xxh3::Xxh3;

use super::super::builtins::{Arg, ArgError, BUILTINS, Builtin, BuiltinSpec, MAX_PARAMS};
use super::super::files;
use super::super::pipeline::{Handoff, Tier, TierKind};
use super::super::script::{self, sandbox::Sandbox};
use super::{Parts, PolicyDiagnostic, PolicyFile, compile, empty_params, line_col};

fn toml_to_dynamic(v: &DeValue<'_>) -> Dynamic {
    match v {
        DeValue::String(s) => Dynamic::from(rhai::ImmutableString::from(s.as_ref())),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Dynamic::from(n as INT),
            Err(_) => Dynamic::UNIT,
        },
        DeValue::Float(f) => Dynamic::from(f.as_str().parse::<f64>().unwrap_or(f64::NAN) as FLOAT),
        DeValue::Boolean(b) => Dynamic::from(*b),
        DeValue::Datetime(d) => Dynamic::from(rhai::ImmutableString::from(d.to_string())),
        DeValue::Array(a) => Dynamic::from_array(
            a.iter()
                .map(|x| toml_to_dynamic(x.get_ref()))
                .collect::<Array>(),
        ),
        DeValue::Table(t) => Dynamic::from_map(
            t.iter()
                .map(|(k, v)| (k.get_ref().as_ref().into(), toml_to_dynamic(v.get_ref())))
                .collect::<Map>(),
        ),
    }
}

/// A TOML value as a built-in's argument.
fn arg<'a>(v: &'a DeValue<'_>) -> Arg<'a> {
    match v {
        DeValue::Integer(i) => {
            i64::from_str_radix(i.as_str(), i.radix()).map_or(Arg::Other, |n| Arg::Number(n as f64))
        }
        DeValue::Float(f) => f.as_str().parse().map_or(Arg::Other, Arg::Number),
        DeValue::String(s) => Arg::Str(s),
        _ => Arg::Other,
    }
}

/// Where the content of the string value starting at byte `start` begins (after its opening
/// quotes, and after the newline that directly follows `"""`/`'''`).
fn string_content_start(text: &str, start: usize) -> usize {
    let rest = &text[start.min(text.len())..];
    if rest.starts_with("\"\"\"") || rest.starts_with("'''") {
        let after = &rest[3..];
        start
            + 3
            + if after.starts_with("\r\n") {
                2
            } else if after.starts_with('\n') {
                1
            } else {
                0
            }
    } else if rest.starts_with('"') || rest.starts_with('\'') {
        start + 1
    } else {
        start
    }
}

struct TomlCx<'a> {
    sandbox: &'a Sandbox,
    dir: &'a Path,
    file: &'a Path,
    text: &'a str,
    diags: Vec<PolicyDiagnostic>,
    imports: bool,
}

impl TomlCx<'_> {
    fn err(&mut self, offset: usize, message: impl Into<String>) {
        self.diags
            .push(PolicyDiagnostic::at(self.file, self.text, offset, message));
    }
}

pub(super) fn load_toml(
    sandbox: &Sandbox,
    dir: &Path,
    file: &PolicyFile,
    text: &str,
    hasher: &mut Xxh3,
    imports: &mut bool,
) -> Result<Parts, Vec<PolicyDiagnostic>> {
    let root = DeTable::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        vec![PolicyDiagnostic::at(
            &file.path,
            text,
            offset,
            e.message().trim().to_string(),
        )]
    })?;
    let mut cx = TomlCx {
        sandbox,
        dir,
        file: &file.path,
        text,
        diags: Vec::new(),
        imports: false,
    };
    let mut params = empty_params();
    let mut tier_values: Option<&Spanned<DeValue<'_>>> = None;
    let mut stages: [Option<&Spanned<DeValue<'_>>>; 2] = [None, None];
    let mut handoff: Option<&Spanned<DeValue<'_>>> = None;
    for (k, v) in root.get_ref().iter() {
        match k.get_ref().as_ref() {
            "description" => {
                if !v.get_ref().is_str() {
                    cx.err(v.span().start, "`description` must be a string");
                }
            }
            "params" => match v.get_ref() {
                DeValue::Table(_) => params = toml_to_dynamic(v.get_ref()),
                _ => cx.err(v.span().start, "`params` must be a table"),
            },
            "tier" => tier_values = Some(v),
            "decode" => stages[0] = Some(v),
            "prefill" => stages[1] = Some(v),
            "handoff" => handoff = Some(v),
            other => cx.err(
                k.span().start,
                format!(
                    "unknown key `{other}` (expected `tier`, `params`, `description`, or \
                     `decode`, `prefill` and `handoff` for a disaggregated policy)"
                ),
            ),
        }
    }
    let split = stages[0].is_some() || stages[1].is_some() || handoff.is_some();
    let mut tiers = Vec::new();
    let mut prefill = Vec::new();
    if split {
        if let Some(v) = tier_values {
            cx.err(
                v.span().start,
                "a disaggregated policy has `[[decode.tier]]` and `[[prefill.tier]]`, not `[[tier]]`",
            );
        }
        for (slot, (stage, out)) in stages
            .iter()
            .zip([("decode", &mut tiers), ("prefill", &mut prefill)])
        {
            match slot.map(|v| (v, v.get_ref())) {
                None => cx.err(
                    0,
                    format!("a disaggregated policy needs `[[{stage}.tier]]` tables"),
                ),
                Some((_, DeValue::Table(t))) => {
                    let mut found = None;
                    for (k, v) in t.iter() {
                        match k.get_ref().as_ref() {
                            "tier" => found = Some(v),
                            other => cx.err(
                                k.span().start,
                                format!("unknown key `{stage}.{other}` (expected `{stage}.tier`)"),
                            ),
                        }
                    }
                    match found {
                        Some(v) => *out = parse_tiers(&mut cx, v, hasher, stage),
                        None => cx.err(
                            slot.map_or(0, |v| v.span().start),
                            format!("`{stage}` has no tiers: add `[[{stage}.tier]]` tables"),
                        ),
                    }
                }
                Some((v, _)) => cx.err(
                    v.span().start,
                    format!("`{stage}` must be a table of tiers (`[[{stage}.tier]]`)"),
                ),
            }
        }
    } else {
        match tier_values {
            None => cx.err(0, "policy has no tiers: add `[[tier]]` tables"),
            Some(v) => tiers = parse_tiers(&mut cx, v, hasher, ""),
        }
    }
    let handoff = match handoff.map(|v| (v, v.get_ref().as_str())) {
        None => Handoff::Nixl,
        Some((_, Some("nixl"))) => Handoff::Nixl,
        Some((_, Some("shared_store"))) => Handoff::SharedStore,
        Some((v, _)) => {
            cx.err(
                v.span().start,
                "`handoff` must be \"nixl\" (vLLM's NixlConnector) or \"shared_store\" (LMCache)",
            );
            Handoff::Nixl
        }
    };
    *imports |= cx.imports;
    if cx.diags.is_empty() {
        Ok((tiers, params, split.then_some((prefill, handoff))))
    } else {
        Err(cx.diags)
    }
}

/// The tiers of a `tier` array (`[[tier]]`, or `[[decode.tier]]` when `stage` is `decode`).
fn parse_tiers(
    cx: &mut TomlCx<'_>,
    v: &Spanned<DeValue<'_>>,
    hasher: &mut Xxh3,
    stage: &str,
) -> Vec<Tier> {
    let table = if stage.is_empty() {
        "tier".to_string()
    } else {
        format!("{stage}.tier")
    };
    let mut tiers = Vec::new();
    match v.get_ref() {
        DeValue::Array(arr) if !arr.is_empty() => {
            for (i, t) in arr.iter().enumerate() {
                match t.get_ref() {
                    DeValue::Table(t_table) => {
                        if let Some(tier) = parse_tier(cx, i, t.span().start, t_table, hasher) {
                            tiers.push(tier);
                        }
                    }
                    _ => cx.err(
                        t.span().start,
                        format!("each tier must be a table (`[[{table}]]`)"),
                    ),
                }
            }
        }
        _ => cx.err(
            v.span().start,
            format!("`{table}` must be a non-empty array of tables (`[[{table}]]`)"),
        ),
    }
    tiers
}

fn parse_tier(
    cx: &mut TomlCx<'_>,
    index: usize,
    at: usize,
    table: &DeTable<'_>,
    hasher: &mut Xxh3,
) -> Option<Tier> {
    let mut name: Option<String> = None;
    let mut builtin: Option<(&Spanned<DeValue<'_>>, String)> = None;
    let mut file: Option<(&Spanned<DeValue<'_>>, String)> = None;
    let mut inline: Option<(&Spanned<DeValue<'_>>, String)> = None;
    let mut args: Vec<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)> = Vec::new();
    let errors_before = cx.diags.len();
    for (k, v) in table.iter() {
        let key = k.get_ref().as_ref();
        let as_string = |cx: &mut TomlCx<'_>| match v.get_ref().as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                cx.err(v.span().start, format!("`{key}` must be a string"));
                None
            }
        };
        match key {
            "name" => name = as_string(cx),
            "builtin" => builtin = as_string(cx).map(|s| (v, s)),
            "file" => file = as_string(cx).map(|s| (v, s)),
            "script" => inline = as_string(cx).map(|s| (v, s)),
            _ => args.push((k, v)),
        }
    }
    let kinds = [builtin.is_some(), file.is_some(), inline.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        if cx.diags.len() == errors_before {
            cx.err(
                at,
                format!(
                    "tier {} must have exactly one of `builtin`, `file` or `script`",
                    index + 1
                ),
            );
        }
        return None;
    }
    if let Some((v, b)) = builtin {
        let built = parse_builtin(cx, v, &b, &args)?;
        let label = name.unwrap_or_else(|| b.clone());
        return Some(Tier::new(&label, TierKind::Builtin(built)));
    }
    if let Some((k, _)) = args.first() {
        cx.err(
            k.span().start,
            format!(
                "unknown key `{}` in a script tier (script tiers read arguments from `[params]`)",
                k.get_ref()
            ),
        );
        return None;
    }
    if let Some((v, rel)) = file {
        let Some(path) = files::join_relative(cx.dir, &rel) else {
            cx.err(
                v.span().start,
                format!("`{rel}` is not inside the policies directory"),
            );
            return None;
        };
        let src = match files::read_policy_text(cx.dir, &path) {
            Ok(s) => s,
            Err(refusal) => {
                cx.err(v.span().start, format!("script file `{rel}` {refusal}"));
                return None;
            }
        };
        hasher.update(src.as_bytes());
        cx.imports |= script::mentions(&src, "import");
        let script = match compile(cx.sandbox, &src, &path, (1, 1)) {
            Ok(s) => s,
            Err(d) => {
                cx.diags.push(d);
                return None;
            }
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("script")
            .to_string();
        return Some(Tier::new(&name.unwrap_or(stem), TierKind::Script(script)));
    }
    let (v, src) = inline?;
    let origin = line_col(cx.text, string_content_start(cx.text, v.span().start));
    match compile(cx.sandbox, &src, cx.file, origin) {
        Ok(s) => {
            let label = name.unwrap_or_else(|| format!("script{}", index + 1));
            Some(Tier::new(&label, TierKind::Script(s)))
        }
        Err(d) => {
            cx.diags.push(d);
            None
        }
    }
}

fn parse_builtin(
    cx: &mut TomlCx<'_>,
    v: &Spanned<DeValue<'_>>,
    name: &str,
    args: &[(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)],
) -> Option<Builtin> {
    let Some(spec) = BuiltinSpec::find(name) else {
        let known: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
        cx.err(
            v.span().start,
            format!("unknown built-in `{name}` (known: {})", known.join(", ")),
        );
        return None;
    };
    let mut ok = true;
    let mut bound: [Option<Arg<'_>>; MAX_PARAMS] = [None; MAX_PARAMS];
    let mut spans = [v.span().start; MAX_PARAMS];
    for (k, value) in args {
        let key = k.get_ref().as_ref();
        match spec.param(key) {
            Some(i) if i < MAX_PARAMS => {
                bound[i] = Some(arg(value.get_ref()));
                spans[i] = value.span().start;
            }
            _ => {
                ok = false;
                cx.err(
                    k.span().start,
                    format!("unknown argument `{key}`; {}", spec.takes()),
                );
            }
        }
    }
    match spec.bind(&bound) {
        Ok(b) => ok.then_some(b),
        Err(e) => {
            let at = match e {
                ArgError::Invalid { index, .. } => spans.get(index).copied(),
                ArgError::Missing { .. } | ArgError::TooMany { .. } => None,
            };
            cx.err(at.unwrap_or(v.span().start), e.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_content_start_skips_quotes_and_first_newline() {
        let t = "a = \"\"\"\nx\"\"\"";
        assert_eq!(string_content_start(t, 4), 8);
        let t = "a = 'x'";
        assert_eq!(string_content_start(t, 4), 5);
    }
}
