//! Hot reload: watch the policies directory and the config file, coalesce the bursts of events
//! an editor's save produces, and reload; SIGHUP reloads too.
//!
//! A save is often several events (write a temporary file, rename it over the original,
//! change attributes). Events are gathered until [`QUIET`] passes without one (but at most
//! [`MAX_DELAY`] after the first), then the store reloads once on a blocking thread. Reading
//! the files produces access events, which are ignored, so a reload never triggers another.
//!
//! The directory itself may be replaced: `mv policies old && cp -r old policies`, a
//! `git checkout`, a symlink re-pointed, or a Kubernetes ConfigMap volume whose kubelet swaps
//! its `..data` symlink. A watch follows the directory it was set on, not the path, so the
//! watcher also watches the directory's parent (non-recursively) and, before every reload,
//! compares the directory at the configured path (real path and inode) with the one it
//! watches; if they differ it watches the new one (and logs it) and reloads. The same check
//! runs every [`REARM_INTERVAL`], which also retries a watcher that failed to start.
//!
//! SIGHUP is handled independently of the file watcher: it reloads (and re-arms the watcher)
//! even when watching files failed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{PolicyError, PolicySettings, PolicyStore, SettingsLoader};

/// Quiet time that ends a burst of file events.
pub const QUIET: Duration = Duration::from_millis(60);
/// Longest a burst can delay a reload.
pub const MAX_DELAY: Duration = Duration::from_millis(250);
/// How often the watcher checks, without any event, that it watches the policies directory
/// now at the configured path (re-arming and reloading if not), and retries a file watcher
/// that could not start.
pub const REARM_INTERVAL: Duration = Duration::from_secs(5);

/// Test hook: `SWITCHYARD_TEST_WATCHER_FAILURES=N` makes the first N attempts to start the file
/// watcher fail, as when inotify is unavailable (there is no other way to make it fail for a
/// process running as root).
const FAILURES_HOOK: &str = "SWITCHYARD_TEST_WATCHER_FAILURES";

fn injected_failure() -> bool {
    static LEFT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU32::new(
            std::env::var(FAILURES_HOOK)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

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

/// Which directory a path names now: its real path and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirId {
    real: PathBuf,
    dev: u64,
    ino: u64,
}

impl DirId {
    fn of(dir: &Path) -> Option<DirId> {
        let real = dir.canonicalize().ok()?;
        let meta = std::fs::metadata(&real).ok()?;
        meta.is_dir().then(|| DirId {
            real,
            dev: meta.dev(),
            ino: meta.ino(),
        })
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

type Events = mpsc::UnboundedSender<notify::Result<notify::Event>>;

struct Watching {
    store: Arc<PolicyStore>,
    config: Option<ConfigFile>,
    loader: Option<SettingsLoader>,
    events: Events,
    watcher: Option<notify::RecommendedWatcher>,
    /// The policies directory as configured, made absolute without resolving symlinks: events
    /// on this path (seen through the parent's watch) mean it was created, removed or replaced.
    dir: PathBuf,
    /// The directory watched recursively, as it was when the watch was set.
    watched: Option<DirId>,
    /// Directories watched non-recursively: the policies directory's parent, the config file's.
    flat: Vec<PathBuf>,
    /// Whether a failure to start the watcher was already logged (retries log at debug).
    start_failed: bool,
    /// Whether a policies directory was watched before (so a new watch is a re-arm).
    armed_before: bool,
}

impl Watching {
    fn classify(&self, ev: notify::Result<notify::Event>, pending: &mut Pending) {
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
            if self.config.as_ref().is_some_and(|c| c.matches(p)) {
                pending.config = true;
            }
            if *p == self.dir
                || self
                    .watched
                    .as_ref()
                    .is_some_and(|w| p.starts_with(&w.real))
            {
                pending.policies = true;
            }
        }
    }

    fn start_watcher(&self) -> notify::Result<notify::RecommendedWatcher> {
        if injected_failure() {
            return Err(notify::Error::generic(&format!(
                "failure injected by {FAILURES_HOOK}"
            )));
        }
        let tx = self.events.clone();
        notify::recommended_watcher(move |ev| {
            // The receiver is gone only when watching stopped.
            let _ = tx.send(ev);
        })
    }

    /// Makes the watches match the policies directory now at the configured path (and the
    /// config file's directory), starting the watcher if it is not running. Returns whether
    /// the directory differs from the one watched until now (replaced, re-pointed, gone or
    /// back): events may have been missed, so it must be reloaded.
    fn rearm(&mut self) -> bool {
        let configured = self.store.settings().dir.clone();
        self.dir = std::path::absolute(&configured).unwrap_or(configured);
        let current = DirId::of(&self.dir);
        let changed = current != self.watched;
        if self.watcher.is_none() {
            match self.start_watcher() {
                Ok(w) => {
                    if self.start_failed {
                        tracing::info!("policy watcher started; watching for policy changes again");
                    }
                    self.start_failed = false;
                    self.watcher = Some(w);
                    self.watched = None;
                    self.flat.clear();
                }
                Err(e) => {
                    if self.start_failed {
                        tracing::debug!("policy watcher still cannot start: {e}");
                    } else {
                        tracing::error!(
                            "cannot watch for policy changes: {e}; SIGHUP still reloads, and \
                             starting the watcher is retried every {}s",
                            REARM_INTERVAL.as_secs()
                        );
                    }
                    self.start_failed = true;
                    // Without a watcher, remember what we saw so that a replacement is
                    // noticed (and reloaded) once, not on every check.
                    self.watched = current;
                    return changed;
                }
            }
        }
        let Some(watcher) = self.watcher.as_mut() else {
            return changed;
        };
        if current != self.watched {
            if let Some(old) = self.watched.take()
                && let Err(e) = watcher.unwatch(&old.real)
            {
                // Normal when the old directory was deleted (the watch went with it).
                tracing::debug!("policy watcher: unwatch {}: {e}", old.real.display());
            }
            match &current {
                Some(id) => match watcher.watch(&id.real, RecursiveMode::Recursive) {
                    Ok(()) => {
                        if self.armed_before {
                            tracing::info!(
                                "policies directory {} changed (replaced, re-pointed or back); \
                                 watching it again ({})",
                                self.dir.display(),
                                id.real.display()
                            );
                        } else {
                            tracing::debug!("watching policies in {}", id.real.display());
                        }
                        self.armed_before = true;
                        self.watched = current.clone();
                    }
                    Err(e) => {
                        tracing::error!("cannot watch policies in {}: {e}", id.real.display());
                    }
                },
                None => tracing::warn!(
                    "policies directory {} is gone; the loaded policies stay in effect until it \
                     is back",
                    self.dir.display()
                ),
            }
        }
        let mut want: Vec<PathBuf> = Vec::new();
        if let Some(parent) = self.dir.parent() {
            want.push(parent.to_path_buf());
        }
        if let Some(c) = &self.config
            && !self
                .watched
                .as_ref()
                .is_some_and(|w| c.parent.starts_with(&w.real))
            && !want.contains(&c.parent)
        {
            want.push(c.parent.clone());
        }
        for p in std::mem::take(&mut self.flat) {
            if want.contains(&p) {
                self.flat.push(p);
            } else if let Err(e) = watcher.unwatch(&p) {
                tracing::debug!("policy watcher: unwatch {}: {e}", p.display());
            }
        }
        for p in want {
            if self.flat.contains(&p) {
                continue;
            }
            match watcher.watch(&p, RecursiveMode::NonRecursive) {
                Ok(()) => self.flat.push(p),
                Err(e) => tracing::warn!(
                    "cannot watch {} (retried every {}s and on SIGHUP): {e}",
                    p.display(),
                    REARM_INTERVAL.as_secs()
                ),
            }
        }
        changed
    }

    async fn reload(&self, pending: Pending) {
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
    }

    async fn apply(&mut self, pending: Pending) {
        // Watch first, then read: whatever changes after the watch is set is seen by it, and
        // whatever changed before is read by this reload.
        self.rearm();
        self.reload(pending).await;
        // New settings may point elsewhere.
        if self.rearm() {
            self.reload(Pending {
                policies: true,
                config: false,
            })
            .await;
        }
    }
}

async fn run(
    mut w: Watching,
    mut rx: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    mut hup: tokio::signal::unix::Signal,
) {
    let mut check = tokio::time::interval_at(Instant::now() + REARM_INTERVAL, REARM_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut pending = Pending::default();
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => w.classify(ev, &mut pending),
                None => return,
            },
            sig = hup.recv() => {
                if sig.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading policies");
                pending = Pending { policies: true, config: true };
            }
            _ = check.tick() => {
                if w.rearm() {
                    pending.policies = true;
                }
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
                Ok(Some(ev)) => w.classify(ev, &mut pending),
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
    // SIGHUP first, whatever happens to the file watcher.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| PolicyError::Watch(format!("SIGHUP handler: {e}")))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut w = Watching {
        store,
        config: config_file.as_deref().and_then(ConfigFile::new),
        loader,
        events: tx,
        watcher: None,
        dir: PathBuf::new(),
        watched: None,
        flat: Vec::new(),
        start_failed: false,
        armed_before: false,
    };
    // Failures are logged and retried (every REARM_INTERVAL and on SIGHUP).
    w.rearm();
    let task = rt.spawn(run(w, rx, hup));
    Ok(WatchHandle { task })
}
