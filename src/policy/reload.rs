//! Hot reload: watch the policies directory and the config file, coalesce the bursts of events
//! an editor's save produces, and reload; SIGHUP reloads too.
//!
//! A save is often several events (write a temporary file, rename it over the original,
//! change attributes). Events are gathered until [`QUIET`] passes without one (but at most
//! [`MAX_DELAY`] after the first), then the store reloads once on a blocking thread. Reading
//! the files produces access events, which are ignored, so a reload never triggers another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{PolicyError, PolicySettings, PolicyStore, SettingsLoader};

/// Quiet time that ends a burst of file events.
pub const QUIET: Duration = Duration::from_millis(60);
/// Longest a burst can delay a reload.
pub const MAX_DELAY: Duration = Duration::from_millis(250);

/// Keeps the watcher running; dropping it stops watching.
#[derive(Debug)]
pub struct WatchHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The config file, split for matching events against it.
#[derive(Debug, Clone)]
struct ConfigFile {
    parent: PathBuf,
    name: std::ffi::OsString,
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize()
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

impl ConfigFile {
    fn new(path: &Path) -> Option<ConfigFile> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let name = path.file_name()?.to_os_string();
        let parent = absolute(path.parent()?);
        Some(ConfigFile { parent, name })
    }

    fn matches(&self, p: &Path) -> bool {
        p.file_name() == Some(self.name.as_os_str())
            && p.parent().is_some_and(|d| absolute(d) == self.parent)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    policies: bool,
    config: bool,
}

impl Pending {
    fn any(self) -> bool {
        self.policies || self.config
    }
}

fn classify(
    ev: notify::Result<notify::Event>,
    dir: &Path,
    config: Option<&ConfigFile>,
    pending: &mut Pending,
) {
    let ev = match ev {
        Ok(ev) => ev,
        Err(e) => {
            tracing::warn!("policy watcher: {e}");
            // Something happened that we could not see: reload to be safe.
            pending.policies = true;
            return;
        }
    };
    if matches!(ev.kind, EventKind::Access(_)) {
        return;
    }
    for p in &ev.paths {
        if config.is_some_and(|c| c.matches(p)) {
            pending.config = true;
        }
        if p.starts_with(dir) {
            pending.policies = true;
        }
    }
}

struct Watching {
    store: Arc<PolicyStore>,
    watcher: notify::RecommendedWatcher,
    dir: PathBuf,
    config: Option<ConfigFile>,
    loader: Option<SettingsLoader>,
}

impl Watching {
    fn rewatch_if_moved(&mut self) {
        let dir = absolute(&self.store.settings().dir);
        if dir == self.dir {
            return;
        }
        if let Err(e) = self.watcher.unwatch(&self.dir) {
            tracing::debug!("policy watcher: unwatch {}: {e}", self.dir.display());
        }
        match self.watcher.watch(&dir, RecursiveMode::Recursive) {
            Ok(()) => tracing::info!("watching policies in {}", dir.display()),
            Err(e) => tracing::error!("cannot watch policies in {}: {e}", dir.display()),
        }
        self.dir = dir;
    }

    async fn apply(&mut self, pending: Pending) {
        let store = Arc::clone(&self.store);
        let loader = if pending.config {
            self.loader.clone()
        } else {
            None
        };
        let reload_policies = pending.policies;
        let outcome = tokio::task::spawn_blocking(move || {
            let settings: Option<PolicySettings> = match loader.map(|l| l()) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    tracing::error!("config reload failed, policy settings unchanged: {e}");
                    metrics::counter!("switchyard_policy_reloads_total", "result" => "error")
                        .increment(1);
                    None
                }
                None => None,
            };
            match settings {
                Some(s) => Some(store.reload_with(s)),
                None if reload_policies => Some(store.reload_now()),
                None => None,
            }
        })
        .await;
        if let Err(e) = outcome {
            tracing::error!("policy reload task failed: {e}");
        }
        self.rewatch_if_moved();
    }
}

async fn run(
    mut w: Watching,
    mut rx: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    mut hup: tokio::signal::unix::Signal,
) {
    loop {
        let mut pending = Pending::default();
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => classify(ev, &w.dir, w.config.as_ref(), &mut pending),
                None => return,
            },
            sig = hup.recv() => {
                if sig.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading policies");
                pending = Pending { policies: true, config: true };
            }
        }
        if !pending.any() {
            continue;
        }
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(ev)) => classify(ev, &w.dir, w.config.as_ref(), &mut pending),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        w.apply(pending).await;
    }
}

pub(crate) fn watch(
    store: Arc<PolicyStore>,
    config_file: Option<PathBuf>,
    loader: Option<SettingsLoader>,
) -> Result<WatchHandle, PolicyError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| PolicyError::NoRuntime)?;
    let _enter = rt.enter();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev| {
        // The receiver is gone only when watching stopped.
        let _ = tx.send(ev);
    })
    .map_err(|e| PolicyError::Watch(e.to_string()))?;
    let dir = absolute(&store.settings().dir);
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|e| PolicyError::Watch(format!("{}: {e}", dir.display())))?;
    let config = config_file.as_deref().and_then(ConfigFile::new);
    if let Some(c) = &config
        && !c.parent.starts_with(&dir)
    {
        watcher
            .watch(&c.parent, RecursiveMode::NonRecursive)
            .map_err(|e| PolicyError::Watch(format!("{}: {e}", c.parent.display())))?;
    }
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| PolicyError::Watch(format!("SIGHUP handler: {e}")))?;
    let w = Watching {
        store,
        watcher,
        dir,
        config,
        loader,
    };
    let task = rt.spawn(run(w, rx, hup));
    Ok(WatchHandle { task })
}
