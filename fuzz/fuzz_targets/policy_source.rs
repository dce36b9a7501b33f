#![no_main]
//! Policy files (`.rhai` or `.toml`, chosen by the first byte): compiled and validated as on a
//! reload, then, if they load, evaluated for one decision (the sandbox limits must hold).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard::engines::{Candidate, Engine, EngineSnapshot};
use switchyard::policy::{PolicySettings, PolicyStore};
use switchyard::request::RequestInfo;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("switchyard-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, src)) = data.split_first() else { return };
    let Ok(src) = std::str::from_utf8(src) else { return };
    let dir = dir();
    let (file, other) = if kind & 1 == 0 { ("p.rhai", "p.toml") } else { ("p.toml", "p.rhai") };
    let _ = std::fs::remove_file(dir.join(other));
    if std::fs::write(dir.join(file), src).is_err() {
        return;
    }
    let diagnostics = PolicyStore::check_dir(dir);
    for d in &diagnostics {
        let _ = d.to_string();
    }
    if !diagnostics.is_empty() {
        return;
    }
    let settings = PolicySettings {
        dir: dir.to_path_buf(),
        default_policy: "p".into(),
        per_model: BTreeMap::new(),
        ..PolicySettings::default()
    };
    // What `switchyard check` accepts, the router loads.
    let store = match PolicyStore::new(settings, 16) {
        Ok(s) => s,
        Err(e) => panic!("check passed but loading failed: {e}"),
    };
    let cands: Vec<Candidate> = (0..3u32)
        .map(|i| Candidate {
            engine: Arc::new(Engine::new(i, &format!("http://127.0.0.1:{}", 9000 + i), vec!["m".into()])),
            load: EngineSnapshot { queue: f64::from(i), ..Default::default() },
            prefix_match_tokens: (i as usize) * 16,
        })
        .collect();
    let req = RequestInfo { model: "m".into(), prompt: switchyard::request::PromptDigest::of_text(&"hello world".repeat(10), 16), ..Default::default() };
    // `decide` debug-asserts that the tier's pick is a candidate before clamping it (fuzz
    // builds keep debug assertions), so a tier returning an index out of range fails here.
    let d = store.decide(&req, &cands);
    assert_eq!(&*d.policy, "p");
    assert!(!d.tier.is_empty());
    assert!(d.engine < cands.len());
});
