//! Helpers shared by the policy tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::engines::{Candidate, Engine, EngineSnapshot};
use switchyard::policy::{PolicySettings, PolicyStore};
use switchyard::request::{PromptDigest, RequestInfo};

/// An engine `http://e{id}:8000`, named `e{id}:8000`.
pub fn engine(id: u32) -> Arc<Engine> {
    Arc::new(Engine::new(
        id,
        &format!("http://e{id}:8000"),
        vec!["m".into()],
    ))
}

/// A candidate with fresh stats and the given queue, in-flight count and prefix match.
pub fn cand(id: u32, queue: f64, in_flight: u64, prefix: usize) -> Candidate {
    Candidate {
        engine: engine(id),
        load: EngineSnapshot {
            running: queue,
            waiting: 0.0,
            queue,
            in_flight,
            kv_usage: 0.0,
            stats_age_secs: Some(0.5),
            stale: false,
            ..Default::default()
        },
        prefix_match_tokens: prefix,
    }
}

/// Candidates with these queues (no in-flight, no prefix match).
pub fn queues(qs: &[f64]) -> Vec<Candidate> {
    qs.iter()
        .enumerate()
        .map(|(i, &q)| cand(i as u32, q, 0, 0))
        .collect()
}

/// A completion request for model `m` whose prompt has `tokens` stand-in tokens.
pub fn request(tokens: usize) -> RequestInfo {
    let prompt = "x".repeat(tokens * 4);
    let body = serde_json::json!({ "model": "m", "prompt": prompt, "temperature": 0.5 });
    RequestInfo {
        path: "/v1/completions".into(),
        model: "m".into(),
        stream: false,
        prompt: PromptDigest::of_text(&prompt, 16),
        session_key: None,
        headers: Default::default(),
        body: body.to_string().into(),
        admission: Default::default(),
    }
}

/// The script time budget of [`settings`]: generous, so that a test machine busy enough to
/// preempt an evaluation for milliseconds does not make a script tier pass. Tests of the budget
/// set their own.
pub const TEST_SCRIPT_BUDGET: Duration = Duration::from_secs(2);

pub fn settings(dir: &Path, default: &str) -> PolicySettings {
    PolicySettings {
        dir: dir.to_path_buf(),
        default_policy: default.into(),
        per_model: BTreeMap::new(),
        script_time_budget: TEST_SCRIPT_BUDGET,
    }
}

/// A store over a temporary directory holding `files` (name, content).
pub fn store_with(files: &[(&str, &str)], default: &str) -> (TempDir, Arc<PolicyStore>) {
    let dir = temp_dir();
    for (name, content) in files {
        dir.write(name, content);
    }
    let store = PolicyStore::new(settings(dir.path(), default), 16).expect("store");
    (dir, store)
}

/// The repository's `policies/` directory.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it became true.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub use tempfile::TempDir;

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("switchyard-policy-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Writing policy files into a directory as editors do.
pub trait WriteAtomic {
    /// Writes `name` atomically: a hidden temporary file in the directory, then a rename.
    fn write(&self, name: &str, content: &str);
}

impl WriteAtomic for TempDir {
    fn write(&self, name: &str, content: &str) {
        use std::io::Write;
        let mut tmp = tempfile::NamedTempFile::new_in(self.path()).expect("create temp file");
        tmp.write_all(content.as_bytes()).expect("write temp file");
        tmp.persist(self.path().join(name))
            .expect("rename into place");
    }
}
