//! Hot reload at the store level: edits take effect, broken edits keep the last good version
//! (visible in status_json), fixes restore; config changes re-apply settings; SIGHUP reloads.
//! Every wait polls with a bounded timeout.

mod policy_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use policy_support::*;
use switchyard::policy::{PolicySettings, PolicyStore, SettingsLoader};

/// Safety net only: reloads normally land within a few hundred milliseconds.
const TIMEOUT: Duration = Duration::from_secs(20);

fn pipeline(threshold: u32) -> String {
    format!(
        "[[tier]]\nbuiltin = \"load_balance\"\nthreshold = {threshold}\n\n[[tier]]\nbuiltin = \"round_robin\"\n"
    )
}

fn tier(store: &PolicyStore) -> String {
    // Spread 5: load_balance decides iff threshold <= 5.
    store
        .decide(&request(1), &queues(&[5.0, 0.0]))
        .tier
        .to_string()
}

fn policy_status(store: &PolicyStore, name: &str) -> serde_json::Value {
    store.status_json()["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_default()
}

#[test]
fn reload_now_swaps_keeps_last_good_and_recovers() {
    let (dir, store) = store_with(&[("p.toml", &pipeline(8))], "p");
    assert_eq!(tier(&store), "round_robin");
    let first = policy_status(&store, "p");

    dir.write("p.toml", &pipeline(4));
    let out = store.reload_now();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(tier(&store), "load_balance");
    let second = policy_status(&store, "p");
    assert_ne!(first["hash"], second["hash"]);

    dir.write(
        "p.toml",
        "[[tier]]\nbuiltin = \"load_balance\"\nthreshold = -1\n",
    );
    let out = store.reload_now();
    assert!(!out.is_ok());
    assert_eq!(out.errors.len(), 1);
    assert!(
        out.errors[0].to_string().contains("p.toml:3:13:"),
        "{}",
        out.errors[0]
    );
    assert_eq!(
        tier(&store),
        "load_balance",
        "last good version keeps deciding"
    );
    let broken = policy_status(&store, "p");
    assert_eq!(broken["hash"], second["hash"]);
    assert!(
        broken["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("p.toml:3:13:"))
    );
    assert_eq!(
        store.status_json()["errors"].as_array().map(Vec::len),
        Some(1)
    );

    dir.write("p.toml", &pipeline(8));
    assert!(store.reload_now().is_ok());
    assert_eq!(tier(&store), "round_robin");
    assert!(policy_status(&store, "p")["last_error"].is_null());
}

#[test]
fn unchanged_files_keep_their_compiled_version() {
    let (dir, store) = store_with(&[("a.rhai", "fallback()"), ("b.rhai", "fallback()")], "a");
    let before = policy_status(&store, "a")["loaded_at"].clone();
    dir.write("b.rhai", "round_robin()");
    assert!(store.reload_now().is_ok());
    assert_eq!(policy_status(&store, "a")["loaded_at"], before);
}

#[test]
fn deleting_the_default_policy_keeps_it() {
    let (dir, store) = store_with(&[("p.toml", &pipeline(4))], "p");
    std::fs::remove_file(dir.path().join("p.toml")).expect("remove");
    let out = store.reload_now();
    assert!(!out.is_ok());
    assert!(
        out.errors[0]
            .message
            .contains("vanished default policy `p`"),
        "{out:?}"
    );
    assert_eq!(tier(&store), "load_balance");
}

#[test]
fn reload_with_rejects_unknown_names_and_applies_good_settings() {
    let (dir, store) = store_with(&[("p.toml", &pipeline(8)), ("q.rhai", "random()")], "p");
    let bad = settings(dir.path(), "nope");
    let out = store.reload_with(bad);
    assert!(!out.settings_applied);
    assert_eq!(store.settings().default_policy, "p");
    assert_eq!(tier(&store), "round_robin");
    let out = store.reload_with(settings(dir.path(), "q"));
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(tier(&store), "random");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn watcher_picks_up_edits_breakage_and_fixes() {
    let rt = runtime();
    let (dir, store) = store_with(&[("p.toml", &pipeline(8))], "p");
    let _watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    assert_eq!(tier(&store), "round_robin");

    // Change the threshold: the deciding tier changes.
    let t = std::time::Instant::now();
    dir.write("p.toml", &pipeline(4));
    assert!(poll_until(TIMEOUT, || tier(&store) == "load_balance"));
    eprintln!("edit effective after {:?}", t.elapsed());

    // Break it: the old version keeps deciding and the error shows.
    dir.write(
        "p.toml",
        "[[tier]]\nbuiltin = \"load_balance\"\nthreshold = \n",
    );
    assert!(poll_until(TIMEOUT, || {
        policy_status(&store, "p")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("p.toml:3:"))
    }));
    assert_eq!(tier(&store), "load_balance");

    // Fix it: back to the new content.
    dir.write("p.toml", &pipeline(8));
    assert!(poll_until(TIMEOUT, || {
        tier(&store) == "round_robin" && policy_status(&store, "p")["last_error"].is_null()
    }));

    // Plain in-place writes (truncate + write) work too, and new files appear.
    std::fs::write(dir.path().join("p.toml"), pipeline(3)).expect("write");
    assert!(poll_until(TIMEOUT, || tier(&store) == "load_balance"));
    dir.write("fresh.rhai", "fallback()");
    assert!(poll_until(
        TIMEOUT,
        || policy_status(&store, "fresh")["loaded"] == true
    ));
}

#[test]
fn dropping_the_handle_stops_watching() {
    let rt = runtime();
    let (dir, store) = store_with(&[("p.toml", &pipeline(8))], "p");
    let watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    dir.write("p.toml", &pipeline(4));
    assert!(poll_until(TIMEOUT, || tier(&store) == "load_balance"));
    drop(watch);
    // Once the task has gone, the watcher (and its inotify instance) goes with it: the store
    // must be referenced only by us again.
    assert!(poll_until(TIMEOUT, || Arc::strong_count(&store) == 1));
    dir.write("p.toml", &pipeline(8));
    // Nothing can reload now; a reload would have to come from us.
    assert_eq!(tier(&store), "load_balance");
}

#[test]
fn config_changes_apply_new_settings() {
    let rt = runtime();
    let (dir, store) = store_with(&[("p.toml", &pipeline(8)), ("q.rhai", "random()")], "p");
    let conf_dir = temp_dir();
    let conf = conf_dir.path().join("switchyard.conf");
    std::fs::write(&conf, "p").expect("write config");
    let calls = Arc::new(AtomicUsize::new(0));
    let loader: SettingsLoader = {
        let conf = conf.clone();
        let dir = dir.path().to_path_buf();
        let calls = Arc::clone(&calls);
        Arc::new(move || {
            calls.fetch_add(1, Ordering::Relaxed);
            let name = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
            Ok(PolicySettings {
                dir: dir.clone(),
                default_policy: name.trim().to_string(),
                ..settings(&dir, "unused")
            })
        })
    };
    let _watch = rt
        .block_on(async { store.watch(Some(conf.clone()), Some(loader)) })
        .expect("watch");
    std::fs::write(&conf, "q").expect("write config");
    assert!(poll_until(TIMEOUT, || tier(&store) == "random"));
    assert!(calls.load(Ordering::Relaxed) >= 1);
    // An unknown name is not applied.
    std::fs::write(&conf, "nope").expect("write config");
    assert!(poll_until(TIMEOUT, || {
        store.status_json()["errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|x| x.as_str().is_some_and(|s| s.contains("`nope`")))
        })
    }));
    assert_eq!(tier(&store), "random");
}

#[test]
fn sighup_reloads() {
    let rt = runtime();
    let (_dir, store) = store_with(&[("p.toml", &pipeline(8))], "p");
    let _watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    let generation = || store.status_json()["generation"].as_u64().unwrap_or(0);
    let before = generation();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(poll_until(TIMEOUT, || generation() > before));
}

#[test]
fn edited_modules_take_effect() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
    std::fs::write(
        dir.path().join("lib/pick.rhai"),
        "fn choose() { round_robin() }",
    )
    .expect("write");
    dir.write("m.rhai", "import \"lib/pick\" as pick;\npick::choose()\n");
    let store = PolicyStore::new(settings(dir.path(), "m"), 16).expect("store");
    assert_eq!(tier(&store), "round_robin");
    // Only the module changes; the policy file does not.
    std::fs::write(dir.path().join("lib/pick.rhai"), "fn choose() { random() }").expect("write");
    assert!(store.reload_now().is_ok());
    assert_eq!(tier(&store), "random");
}

#[test]
fn settings_not_applied_leave_modules_resolving_from_the_kept_directory() {
    let write_dir = |choice: &str| {
        let dir = temp_dir();
        std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
        std::fs::write(
            dir.path().join("lib/pick.rhai"),
            format!("fn choose() {{ {choice}() }}"),
        )
        .expect("write");
        dir.write("m.rhai", "import \"lib/pick\" as pick;\npick::choose()\n");
        dir
    };
    let a = write_dir("round_robin");
    let b = write_dir("random");
    let store = PolicyStore::new(settings(a.path(), "m"), 16).expect("store");
    assert_eq!(tier(&store), "round_robin");
    // New settings point at another directory but name a policy that does not exist there:
    // they are not applied, and the store keeps directory `a`.
    let outcome = store.reload_with(settings(b.path(), "nope"));
    assert!(!outcome.settings_applied);
    assert_eq!(store.settings().dir, a.path());
    // A later reload of `a` resolves `a`'s modules, not those of the rejected directory.
    assert!(store.reload_now().is_ok());
    assert_eq!(tier(&store), "round_robin");
}

#[test]
fn rejected_settings_leave_the_previous_generation_in_effect() {
    let named = |tier: &str| format!("[[tier]]\nname = \"{tier}\"\nbuiltin = \"round_robin\"\n");
    let a = temp_dir();
    a.write("p.toml", &named("from_a"));
    let b = temp_dir();
    b.write("p.toml", &named("from_b"));
    b.write("only_b.rhai", "random()");
    let store = PolicyStore::new(settings(a.path(), "p"), 16).expect("store");
    let listed = |s: &serde_json::Value| -> Vec<(String, String)> {
        s["policies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| (p["source"].to_string(), p["hash"].to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = store.status_json();
    // New settings point at directory b but name a policy that does not exist there.
    let out = store.reload_with(settings(b.path(), "nope"));
    assert!(!out.settings_applied);
    // The very next decision is made by a's policy, and the status shows a's files only.
    assert_eq!(
        &*store.decide(&request(1), &queues(&[1.0, 1.0])).tier,
        "from_a"
    );
    let after = store.status_json();
    assert_eq!(after["dir"], before["dir"]);
    assert_eq!(after["default_policy"], "p");
    assert_eq!(listed(&after), listed(&before));
    assert!(
        after["errors"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x
                .as_str()
                .is_some_and(|s| s.contains("unknown default policy `nope`")))),
        "{after}"
    );
    assert_eq!(store.settings().dir, a.path());
}

/// Copies the directory tree `from` to `to` (files and directories only).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The deciding tier of the policy whose tiers are all named `tier`-something; see `named`.
fn named(tier: &str) -> String {
    format!("[[tier]]\nname = \"{tier}\"\nbuiltin = \"round_robin\"\n")
}

fn decided_by(store: &PolicyStore) -> String {
    store
        .decide(&request(1), &queues(&[1.0, 1.0]))
        .tier
        .to_string()
}

#[test]
fn watcher_follows_a_directory_replaced_by_move_and_copy() {
    let rt = runtime();
    let root = temp_dir();
    let dir = root.path().join("policies");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("p.toml"), named("v1")).expect("write");
    let store = PolicyStore::new(settings(&dir, "p"), 16).expect("store");
    let _watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    // `mv policies old && cp -r old policies`, then an edit in the new directory.
    std::fs::rename(&dir, root.path().join("old")).expect("mv");
    copy_dir(&root.path().join("old"), &dir);
    let t = std::time::Instant::now();
    std::fs::write(dir.join("p.toml"), named("v2")).expect("edit");
    assert!(poll_until(TIMEOUT, || decided_by(&store) == "v2"));
    eprintln!(
        "edit in the replaced directory effective after {:?}",
        t.elapsed()
    );
    // And again: the watcher keeps following.
    std::fs::rename(&dir, root.path().join("older")).expect("mv");
    copy_dir(&root.path().join("older"), &dir);
    std::fs::write(dir.join("p.toml"), named("v3")).expect("edit");
    assert!(poll_until(TIMEOUT, || decided_by(&store) == "v3"));
    // Edits in the moved-away directory are not the policies.
    std::fs::write(root.path().join("old/p.toml"), named("stale")).expect("edit");
    std::fs::write(dir.join("p.toml"), named("v4")).expect("edit");
    assert!(poll_until(TIMEOUT, || decided_by(&store) == "v4"));
}

#[test]
fn watcher_follows_a_re_pointed_directory_symlink() {
    let rt = runtime();
    let root = temp_dir();
    for (release, tier) in [("r1", "v1"), ("r2", "v2")] {
        std::fs::create_dir(root.path().join(release)).expect("mkdir");
        std::fs::write(root.path().join(release).join("p.toml"), named(tier)).expect("write");
    }
    let dir = root.path().join("policies");
    std::os::unix::fs::symlink("r1", &dir).expect("symlink");
    let store = PolicyStore::new(settings(&dir, "p"), 16).expect("store");
    let _watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    // `ln -sfn r2 policies`, atomically: a new link renamed over the old one.
    std::os::unix::fs::symlink("r2", root.path().join("policies.tmp")).expect("symlink");
    let t = std::time::Instant::now();
    std::fs::rename(root.path().join("policies.tmp"), &dir).expect("rename");
    assert!(poll_until(TIMEOUT, || decided_by(&store) == "v2"));
    eprintln!("re-pointed symlink effective after {:?}", t.elapsed());
    // Edits in the new target are watched.
    std::fs::write(root.path().join("r2/p.toml"), named("v3")).expect("edit");
    assert!(poll_until(TIMEOUT, || decided_by(&store) == "v3"));
}

/// What the kubelet's AtomicWriter does to a ConfigMap volume on an update: write the new
/// content to a fresh timestamped directory, point a `..data_tmp` symlink at it, rename that
/// over `..data`, remove the old directory.
fn configmap_update(volume: &std::path::Path, version: &str, files: &[(&str, String)]) {
    let data = volume.join(version);
    std::fs::create_dir(&data).expect("mkdir");
    for (name, content) in files {
        std::fs::write(data.join(name), content).expect("write");
    }
    let old = std::fs::read_link(volume.join("..data")).ok();
    std::os::unix::fs::symlink(version, volume.join("..data_tmp")).expect("symlink");
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).expect("rename");
    if let Some(old) = old {
        std::fs::remove_dir_all(volume.join(old)).expect("remove old version");
    }
}

#[test]
fn watcher_follows_configmap_updates() {
    let rt = runtime();
    let volume = temp_dir();
    configmap_update(
        volume.path(),
        "..2026_11_25_10_00_00.1",
        &[("p.toml", named("v1"))],
    );
    std::os::unix::fs::symlink("..data/p.toml", volume.path().join("p.toml")).expect("symlink");
    let store = PolicyStore::new(settings(volume.path(), "p"), 16).expect("store");
    assert_eq!(decided_by(&store), "v1");
    let _watch = rt
        .block_on(async { store.watch(None, None) })
        .expect("watch");
    // A second store configured with the volume's `..data` as its policies directory.
    let via_data =
        PolicyStore::new(settings(&volume.path().join("..data"), "p"), 16).expect("store");
    let _watch_data = rt
        .block_on(async { via_data.watch(None, None) })
        .expect("watch");
    for (i, tier) in ["v2", "v3", "v4"].iter().enumerate() {
        let t = std::time::Instant::now();
        configmap_update(
            volume.path(),
            &format!("..2026_11_25_10_00_0{}.{i}", i + 1),
            &[("p.toml", named(tier))],
        );
        assert!(
            poll_until(TIMEOUT, || decided_by(&store) == *tier),
            "{tier}"
        );
        eprintln!("ConfigMap update {tier} effective after {:?}", t.elapsed());
        assert!(
            poll_until(TIMEOUT, || decided_by(&via_data) == *tier),
            "{tier} through ..data"
        );
    }
}

#[test]
fn sighup_reloads_and_re_arms_when_watching_failed() {
    let rt = runtime();
    let (dir, store) = store_with(&[("p.toml", &pipeline(8)), ("q.rhai", "random()")], "p");
    // The config file's directory does not exist yet: it cannot be watched at start.
    let conf_root = temp_dir();
    let conf_dir = conf_root.path().join("conf.d");
    let conf = conf_dir.join("switchyard.conf");
    let loader: SettingsLoader = {
        let conf = conf.clone();
        let dir = dir.path().to_path_buf();
        Arc::new(move || {
            let name = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
            Ok(PolicySettings {
                default_policy: name.trim().to_string(),
                ..settings(&dir, "unused")
            })
        })
    };
    let _watch = rt
        .block_on(async { store.watch(Some(conf.clone()), Some(loader)) })
        .expect("SIGHUP is handled even when watching fails");
    std::fs::create_dir(&conf_dir).expect("mkdir");
    std::fs::write(&conf, "q").expect("write config");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(poll_until(TIMEOUT, || tier(&store) == "random"));
    // SIGHUP re-armed the watch on the config file: the next edit needs no signal.
    std::fs::write(&conf, "p").expect("write config");
    assert!(poll_until(TIMEOUT, || tier(&store) == "round_robin"));
}
