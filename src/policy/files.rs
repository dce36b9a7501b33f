//! The one rule for every file the policy layer reads (policy files, TOML `file =` script tiers,
//! Rhai `import` modules): its real path (every symlink resolved) must lie inside the real
//! policies directory, it must be a regular file, and it must not exceed
//! [`MAX_POLICY_FILE_BYTES`].
//!
//! Symlinks that stay inside the directory are followed, so a Kubernetes ConfigMap volume works
//! (`x.rhai -> ..data/x.rhai`, `..data -> ..2026_11_25_10_00_00.123`, all inside). A file that
//! breaks the rule is refused before a byte of it is read, so its content can appear nowhere
//! (not in diagnostics, `/admin/policies` or logs).

use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest policy, script or module file read: 1 MiB.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;

/// Why a file was not read.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Its real path is outside the policies directory.
    Outside { real: PathBuf },
    /// Not a regular file (a directory, a device, a FIFO, ...).
    NotAFile,
    /// Larger than [`MAX_POLICY_FILE_BYTES`].
    TooLarge { bytes: u64 },
    /// Not UTF-8 text.
    NotText,
    /// The file or the directory could not be resolved or read.
    Io(std::io::Error),
}

impl Refusal {
    /// Whether the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Refusal::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Outside { real } => write!(
                f,
                "resolves to {}, outside the policies directory; refused",
                real.display()
            ),
            Refusal::NotAFile => write!(f, "is not a regular file; refused"),
            Refusal::TooLarge { bytes } => write!(
                f,
                "is {bytes} bytes, over the {} MiB limit for policy files; refused",
                MAX_POLICY_FILE_BYTES / (1024 * 1024)
            ),
            Refusal::NotText => write!(f, "is not UTF-8 text"),
            Refusal::Io(e) => write!(f, "cannot be read: {e}"),
        }
    }
}

/// `rel` joined to `dir` if it is a relative path made only of normal components (no `..`,
/// no root); the lexical half of the rule, for paths written in policy files.
pub(crate) fn join_relative(dir: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    Some(dir.join(p))
}

/// Reads `path` as text if it obeys the rule for the policies directory `dir` (see the module
/// documentation). `dir` is resolved now, so a directory that was replaced or re-pointed is
/// judged as it is at this moment.
pub(crate) fn read_policy_text(dir: &Path, path: &Path) -> Result<String, Refusal> {
    let root = dir.canonicalize().map_err(Refusal::Io)?;
    let real = path.canonicalize().map_err(Refusal::Io)?;
    if !real.starts_with(&root) {
        return Err(Refusal::Outside { real });
    }
    // Judge the file before opening it (opening a FIFO would block), then judge what was
    // opened: no more than the limit (plus one byte to detect growth) is ever read.
    if !std::fs::metadata(&real).map_err(Refusal::Io)?.is_file() {
        return Err(Refusal::NotAFile);
    }
    let file = std::fs::File::open(&real).map_err(Refusal::Io)?;
    let meta = file.metadata().map_err(Refusal::Io)?;
    if !meta.is_file() {
        return Err(Refusal::NotAFile);
    }
    if meta.len() > MAX_POLICY_FILE_BYTES {
        return Err(Refusal::TooLarge { bytes: meta.len() });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(Refusal::Io)?;
    if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(Refusal::TooLarge {
            bytes: bytes.len() as u64,
        });
    }
    String::from_utf8(bytes).map_err(|_| Refusal::NotText)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_lexically_inside() {
        let d = Path::new("/p");
        assert_eq!(
            join_relative(d, "a/b.rhai"),
            Some(PathBuf::from("/p/a/b.rhai"))
        );
        assert_eq!(
            join_relative(d, "./a.rhai"),
            Some(PathBuf::from("/p/a.rhai"))
        );
        assert_eq!(join_relative(d, "../x.rhai"), None);
        assert_eq!(join_relative(d, "a/../../x.rhai"), None);
        assert_eq!(join_relative(d, "/etc/x"), None);
    }
}
