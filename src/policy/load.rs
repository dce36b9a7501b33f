//! Reading policy files: `NAME.rhai` scripts and `NAME.toml` pipelines, compiled and validated,
//! with every problem reported as `file:line:col: message`.

use std::fmt;
use std::path::{Path, PathBuf};

use rhai::{Array, Dynamic, FLOAT, INT, Map};
use toml::Spanned;
use toml::de::{DeTable, DeValue};
use xxhash_rust::xxh3::Xxh3;

use super::builtins::{Arg, ArgError, BUILTINS, Builtin, BuiltinSpec, MAX_PARAMS};
use super::chain;
use super::files;
use super::pipeline::{CompiledPolicy, Handoff, Tier, TierKind};
use super::script::sandbox::Sandbox;
use super::script::{self, ScriptError};

/// One problem in a policy file, displayed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDiagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

impl PolicyDiagnostic {
    pub(crate) fn new(file: &Path, line: usize, col: usize, message: impl Into<String>) -> Self {
        PolicyDiagnostic {
            file: file.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    fn at(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        PolicyDiagnostic::new(file, line, col, message)
    }

    fn script(file: &Path, e: ScriptError) -> Self {
        PolicyDiagnostic::new(file, e.line, e.col, e.message)
    }
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The kind of a policy file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Rhai,
    Toml,
}

/// A policy file found in the directory.
#[derive(Debug, Clone)]
pub(crate) struct PolicyFile {
    pub name: String,
    pub path: PathBuf,
    pub kind: FileKind,
}

/// The policy files directly inside `dir` (hidden and editor backup files skipped), sorted.
pub(crate) fn policy_files(dir: &Path) -> Result<Vec<PolicyFile>, PolicyDiagnostic> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        PolicyDiagnostic::new(dir, 1, 1, format!("cannot read policies directory: {e}"))
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name.starts_with('.') || file_name.ends_with('~') || !path.is_file() {
            continue;
        }
        let kind = match path.extension().and_then(|e| e.to_str()) {
            Some("rhai") => FileKind::Rhai,
            Some("toml") => FileKind::Toml,
            _ => continue,
        };
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        out.push(PolicyFile {
            name: stem.to_string(),
            path,
            kind,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A policy file, loaded: its content hash and the compiled policy or its problems.
pub(crate) struct Loaded {
    pub hash: u64,
    /// Whether a script of the policy may `import` modules, whose content the hash does not
    /// cover (so a compiled version cannot be reused on the strength of the hash alone).
    pub imports: bool,
    pub result: Result<CompiledPolicy, Vec<PolicyDiagnostic>>,
}

/// Reads, compiles and validates one policy file.
pub(crate) fn load_file(sandbox: &Sandbox, dir: &Path, file: &PolicyFile) -> Loaded {
    let mut hasher = Xxh3::new();
    let text = match files::read_policy_text(dir, &file.path) {
        Ok(t) => t,
        Err(refusal) => {
            return Loaded {
                hash: 0,
                imports: false,
                result: Err(vec![PolicyDiagnostic::new(
                    &file.path,
                    1,
                    1,
                    format!("policy file {refusal}"),
                )]),
            };
        }
    };
    hasher.update(text.as_bytes());
    let mut imports = script::mentions(&text, "import");
    let result = match file.kind {
        FileKind::Rhai => load_rhai(sandbox, file, &text),
        FileKind::Toml => load_toml(sandbox, dir, file, &text, &mut hasher, &mut imports),
    };
    let hash = hasher.digest();
    Loaded {
        hash,
        imports,
        result: result.map(|(tiers, params, split)| {
            let p = CompiledPolicy::new(&file.name, hash, tiers, params);
            match split {
                Some((prefill, handoff)) => p.with_split(prefill, handoff),
                None => p,
            }
        }),
    }
}

/// A policy's tiers, its `[params]`, and for a disaggregated policy its prefill tiers and
/// hand-off (the tiers are then the decode pipeline).
type Parts = (Vec<Tier>, Dynamic, Option<(Vec<Tier>, Handoff)>);

fn empty_params() -> Dynamic {
    Dynamic::from_map(Map::new())
}

fn compile(
    sandbox: &Sandbox,
    src: &str,
    file: &Path,
    origin: (usize, usize),
) -> Result<script::Script, PolicyDiagnostic> {
    script::compile(sandbox, src, file, origin).map_err(|e| PolicyDiagnostic::script(file, e))
}

fn load_rhai(
    sandbox: &Sandbox,
    file: &PolicyFile,
    text: &str,
) -> Result<Parts, Vec<PolicyDiagnostic>> {
    let s = compile(sandbox, text, &file.path, (1, 1)).map_err(|d| vec![d])?;
    // A bare `??` chain of built-ins runs as the equivalent pipeline of built-in tiers.
    let tiers = match chain::builtin_chain(s.ast()) {
        Some(builtins) => builtins
            .into_iter()
            .map(|b| Tier::new(b.name(), TierKind::Builtin(b)))
            .collect(),
        None => vec![Tier::new(&file.name, TierKind::Script(s))],
    };
    Ok((tiers, empty_params(), None))
}

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

fn load_toml(
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
    fn line_col_counts_characters() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 8), (3, 1));
        assert_eq!(line_col(t, 7), (2, 4));
    }

    #[test]
    fn string_content_start_skips_quotes_and_first_newline() {
        let t = "a = \"\"\"\nx\"\"\"";
        assert_eq!(string_content_start(t, 4), 8);
        let t = "a = 'x'";
        assert_eq!(string_content_start(t, 4), 5);
    }
}
