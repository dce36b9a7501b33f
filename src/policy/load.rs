//! Reading policy files: `NAME.rhai` scripts and `NAME.toml` pipelines, compiled and validated,
//! with every problem reported as `file:line:col: message`.

use std::fmt;
use std::path::{Path, PathBuf};

use rhai::{Dynamic, Map};
use xxhash_rust::xxh3::Xxh3;

use super::chain;
use super::files;
use super::pipeline::{CompiledPolicy, Handoff, Tier, TierKind};
use super::script::sandbox::Sandbox;
use super::script::{self, ScriptError};

mod tiers;

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

    pub(super) fn at(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        PolicyDiagnostic::new(file, line, col, message)
    }

    fn script(file: &Path, e: ScriptError) -> Self {
        PolicyDiagnostic::new(file, e.line, e.col, e.message)
    }
}

/// 1-based line and character column of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
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
        FileKind::Toml => tiers::load_toml(sandbox, dir, file, &text, &mut hasher, &mut imports),
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
pub(super) type Parts = (Vec<Tier>, Dynamic, Option<(Vec<Tier>, Handoff)>);

pub(super) fn empty_params() -> Dynamic {
    Dynamic::from_map(Map::new())
}

pub(super) fn compile(
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
}
