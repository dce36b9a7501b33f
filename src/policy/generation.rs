//! One load of the policies: a [`Generation`] is every policy file of the directory compiled
//! (or its last good version kept), and the settings' policy names resolved against them. The
//! store swaps whole generations.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::PolicySettings;
use super::load::{self, FileKind, PolicyDiagnostic, PolicyFile};
use super::pipeline::CompiledPolicy;
use super::script::sandbox::Sandbox;

/// One policy file's state, for `status_json`.
#[derive(Debug)]
pub(super) struct FileStatus {
    pub file: PolicyFile,
    /// The version in use: the one just loaded, or the last good one if loading failed.
    pub policy: Option<Arc<CompiledPolicy>>,
    pub last_error: Vec<PolicyDiagnostic>,
}

/// Everything one load produced, swapped in as a whole. Every part of it comes from the same
/// settings: the files were loaded from `settings.dir`, with a script sandbox (and module
/// resolver) built for `settings.dir`.
pub(super) struct Generation {
    pub settings: Arc<PolicySettings>,
    pub sandbox: Arc<Sandbox>,
    pub default: Arc<CompiledPolicy>,
    pub per_model: HashMap<String, Arc<CompiledPolicy>>,
    /// Policies by the names the settings used.
    pub resolved: HashMap<String, Arc<CompiledPolicy>>,
    pub files: Vec<FileStatus>,
    pub errors: Vec<PolicyDiagnostic>,
    pub reloaded_at: SystemTime,
    /// Counts loads: 1 for the first, +1 per reload.
    pub number: u64,
    /// `admission.rhai` (or `.toml`): run on every request before the rate limits and the
    /// router's queue, it may set the request's tenant and priority.
    pub admission: Option<Arc<CompiledPolicy>>,
}

impl Generation {
    pub fn new(
        settings: PolicySettings,
        sandbox: Arc<Sandbox>,
        (default, per_model, resolved): Resolution,
        files: Vec<FileStatus>,
        errors: Vec<PolicyDiagnostic>,
        number: u64,
    ) -> Generation {
        let admission = lookup(&files, ADMISSION_POLICY).cloned();
        Generation {
            admission,
            settings: Arc::new(settings),
            sandbox,
            default,
            per_model,
            resolved,
            files,
            errors,
            reloaded_at: SystemTime::now(),
            number,
        }
    }
}

/// The policy run before admission, by its reserved name.
pub const ADMISSION_POLICY: &str = "admission";

/// Finds a policy by the name settings use: `NAME` (the `.rhai` if both `NAME.rhai` and
/// `NAME.toml` exist) or a file name `NAME.rhai` / `NAME.toml`.
fn lookup<'a>(files: &'a [FileStatus], name: &str) -> Option<&'a Arc<CompiledPolicy>> {
    let by_file = |kind: FileKind, stem: &str| {
        files
            .iter()
            .find(|f| f.file.kind == kind && f.file.name == stem)
            .and_then(|f| f.policy.as_ref())
    };
    if let Some(stem) = name.strip_suffix(".toml") {
        return by_file(FileKind::Toml, stem);
    }
    if let Some(stem) = name.strip_suffix(".rhai") {
        return by_file(FileKind::Rhai, stem);
    }
    by_file(FileKind::Rhai, name).or_else(|| by_file(FileKind::Toml, name))
}

fn settings_names(s: &PolicySettings) -> impl Iterator<Item = (&str, String)> {
    std::iter::once((s.default_policy.as_str(), "default policy".to_string())).chain(
        s.per_model
            .iter()
            .map(|(m, p)| (p.as_str(), format!("policy for model `{m}`"))),
    )
}

pub(super) type Resolution = (
    Arc<CompiledPolicy>,
    HashMap<String, Arc<CompiledPolicy>>,
    HashMap<String, Arc<CompiledPolicy>>,
);

/// Resolves the settings' policy names. A name that no longer resolves in `files` but did in
/// `prev` (its file vanished) keeps the last good version, with a diagnostic; a name that never
/// resolved is an error.
pub(super) fn resolve(
    settings: &PolicySettings,
    files: &[FileStatus],
    prev: Option<&Generation>,
) -> Result<(Resolution, Vec<PolicyDiagnostic>), Vec<PolicyDiagnostic>> {
    let mut resolved = HashMap::new();
    let mut errors = Vec::new();
    let mut kept = Vec::new();
    for (name, role) in settings_names(settings) {
        if resolved.contains_key(name) {
            continue;
        }
        let missing = |what: &str| {
            PolicyDiagnostic::new(
                &settings.dir.join(name),
                1,
                1,
                format!(
                    "{what} {role} `{name}`: no loadable {name}.rhai or {name}.toml in {}",
                    settings.dir.display()
                ),
            )
        };
        if let Some(p) = lookup(files, name) {
            resolved.insert(name.to_string(), Arc::clone(p));
        } else if let Some(p) = prev.and_then(|g| g.resolved.get(name)) {
            let mut d = missing("vanished");
            d.message.push_str("; keeping its last good version");
            kept.push(d);
            resolved.insert(name.to_string(), Arc::clone(p));
        } else {
            errors.push(missing("unknown"));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let default = Arc::clone(&resolved[settings.default_policy.as_str()]);
    let per_model = settings
        .per_model
        .iter()
        .map(|(m, p)| (m.clone(), Arc::clone(&resolved[p.as_str()])))
        .collect();
    Ok(((default, per_model, resolved), kept))
}

/// Loads every policy file of `dir`, keeping `prev`'s version of files that fail.
pub(super) fn load_files(
    sandbox: &Arc<Sandbox>,
    dir: &Path,
    prev: Option<&Generation>,
) -> (Vec<FileStatus>, Vec<PolicyDiagnostic>) {
    // Compiled scripts are only reused with the engine that compiled them.
    let reuse = prev.is_some_and(|g| Arc::ptr_eq(&g.sandbox, sandbox));
    let mut errors = Vec::new();
    let files = match load::policy_files(dir) {
        Ok(f) => f,
        Err(d) => {
            errors.push(d);
            // Keep serving what was loaded before.
            let kept = prev
                .map(|g| {
                    g.files
                        .iter()
                        .map(|f| FileStatus {
                            file: f.file.clone(),
                            policy: f.policy.clone(),
                            last_error: errors.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            return (kept, errors);
        }
    };
    let mut out = Vec::with_capacity(files.len());
    for file in files {
        let loaded = load::load_file(sandbox, dir, &file);
        let previous = prev.and_then(|g| {
            g.files
                .iter()
                .find(|f| f.file.path == file.path)
                .and_then(|f| f.policy.clone())
        });
        match loaded.result {
            Ok(p) => {
                // An unchanged file keeps its compiled policy (and load time, counters).
                let policy = match previous {
                    Some(old) if reuse && !loaded.imports && old.hash == loaded.hash => old,
                    _ => Arc::new(p),
                };
                out.push(FileStatus {
                    file,
                    policy: Some(policy),
                    last_error: Vec::new(),
                });
            }
            Err(diags) => {
                for d in &diags {
                    tracing::error!(policy = %file.name, "{d}");
                }
                errors.extend(diags.iter().cloned());
                out.push(FileStatus {
                    file,
                    policy: previous,
                    last_error: diags,
                });
            }
        }
    }
    (out, errors)
}
