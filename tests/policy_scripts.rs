//! Scripts: the context they see, what they may return, the sandbox and its limits, and
//! diagnostics with file:line:col.

mod policy_support;

use std::time::{Duration, Instant};

use policy_support::*;
use switchyard::policy::{PolicyError, PolicyStore};

const CONTEXT_CHECK: &str = r#"
fn check(ok, what) { if !ok { throw what; } }
check(request.model == "m", "model");
check(request.path == "/v1/completions", "path");
check(request.stream == false, "stream");
check(request.session_key == "sess", "session_key");
check(request.prompt_chars == 40, "prompt_chars");
check(request.prompt_tokens == 10, "prompt_tokens");
check(request.headers["x-tenant"] == "acme", "headers map");
check(request.header("X-Tenant") == "acme", "header()");
check(request.header("x-missing") == (), "missing header");
check(request.field("temperature") == 0.5, "field()");
check(request.field("nope") == (), "missing field");
check(request.fields.model == "m", "fields");
check(engines.len() == 3, "engines");
let e = engines[1];
check(e.name == "e1:8000", "name");
check(e.url == "http://e1:8000", "url");
check(e.running == 4.0 && e.waiting == 0.0 && e.queue == 4.0, "queue");
check(e.in_flight == 2, "in_flight");
check(e.kv_usage == 0.25, "kv_usage");
check(e.stats_age == 0.5, "stats_age");
check(engines[2].stats_age == -1.0 && engines[2].stale, "never scraped");
check(e.prefix_match == 32, "prefix_match");
check(params.answer == 42 && params.nested.list[1] == "b", "params");
check(type_of(e) == "Engine" && type_of(request) == "Request", "type names");
e
"#;

#[test]
fn script_context_reference() {
    let toml = format!(
        "[params]\nanswer = 42\nnested = {{ list = [\"a\", \"b\"] }}\n\n[[tier]]\nname = \"ctx\"\nscript = '''\n{CONTEXT_CHECK}'''\n"
    );
    let (_d, s) = store_with(&[("ctx.toml", &toml)], "ctx");
    let mut req = request(10);
    req.session_key = Some("sess".into());
    req.headers
        .insert("x-tenant", http::HeaderValue::from_static("acme"));
    let mut c = vec![cand(0, 0.0, 0, 0), cand(1, 4.0, 2, 32), cand(2, 0.0, 0, 0)];
    c[1].load.kv_usage = 0.25;
    c[2].load.stats_age_secs = None;
    c[2].load.stale = true;
    let d = s.decide(&req, &c);
    assert_eq!(
        (d.engine, &*d.tier),
        (1, "ctx"),
        "a check failed: {}",
        s.status_json()
    );
}

#[test]
fn scripts_may_return_an_engine_name_or_url() {
    let (_d, s) = store_with(
        &[
            ("by_name.rhai", r#""e2:8000""#),
            ("by_url.rhai", r#""http://e1:8000""#),
        ],
        "by_name",
    );
    let c = queues(&[0.0, 0.0, 0.0]);
    let d = s.decide(&request(1), &c);
    assert_eq!((d.engine, &*d.tier), (2, "by_name"));
    let (_d2, s) = store_with(&[("by_url.rhai", r#""http://e1:8000""#)], "by_url");
    assert_eq!(s.decide(&request(1), &c).engine, 1);
}

#[test]
fn bad_results_and_runtime_errors_pass_the_tier() {
    let pipeline = r#"
[[tier]]
name = "number"
script = "42"

[[tier]]
name = "unknown_name"
script = '"nobody:1"'

[[tier]]
name = "throws"
script = 'throw "boom"'

[[tier]]
name = "index"
script = "engines[99]"

[[tier]]
name = "passes"
script = "()"

[[tier]]
builtin = "round_robin"
"#;
    let (_d, s) = store_with(&[("p.toml", pipeline)], "p");
    let d = s.decide(&request(1), &queues(&[1.0, 0.0]));
    assert_eq!(&*d.tier, "round_robin");
}

#[test]
fn every_tier_passing_still_routes() {
    let (_d, s) = store_with(&[("never.rhai", "()")], "never");
    let d = s.decide(&request(1), &queues(&[3.0, 1.0, 2.0]));
    assert_eq!((d.engine, &*d.tier), (1, "default"));
}

#[test]
fn infinite_loop_is_stopped_and_passed_over() {
    let pipeline = r#"
[[tier]]
name = "spin"
script = "loop { }"

[[tier]]
name = "recurse"
script = "fn f(x) { f(x + 1) } f(0)"

[[tier]]
name = "grow"
script = 'let s = "xx"; loop { s += s; }'

[[tier]]
builtin = "fallback"
"#;
    let (_d, s) = store_with(&[("spin.toml", pipeline)], "spin");
    let started = Instant::now();
    for _ in 0..3 {
        let d = s.decide(&request(1), &queues(&[2.0, 1.0]));
        assert_eq!((d.engine, &*d.tier), (1, "fallback"));
    }
    // Generous bound: the limits stop each evaluation after at most a few milliseconds.
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn diags(files: &[(&str, &str)]) -> Vec<String> {
    let dir = temp_dir();
    for (n, c) in files {
        dir.write(n, c);
    }
    PolicyStore::check_dir(dir.path())
        .iter()
        .map(|d| {
            let s = d.to_string();
            s.strip_prefix(&format!("{}/", dir.path().display()))
                .unwrap_or(&s)
                .to_string()
        })
        .collect()
}

#[test]
fn syntax_errors_report_file_line_col() {
    let d = diags(&[("bad.rhai", "// header\nlet x = 1;\nlet y = (x +;\n")]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("bad.rhai:3:13: "), "{d:?}");

    // An inline TOML script: positions are in the TOML file.
    let toml = "[[tier]]\nbuiltin = \"load_balance\"\nthreshold = 8\n\n[[tier]]\nscript = \"\"\"\nlet a = 1;\n  a +* 2\n\"\"\"\n";
    let d = diags(&[("inline.toml", toml)]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("inline.toml:8:6: "), "{d:?}");

    // Same-line inline script: the column is offset by the key.
    let d = diags(&[("one.toml", "[[tier]]\nscript = \"let = 3\"\n")]);
    assert!(d[0].starts_with("one.toml:2:15: "), "{d:?}");

    // TOML errors.
    let d = diags(&[(
        "t.toml",
        "[[tier]]\nbuiltin = \"load_balance\"\nthreshold = \n",
    )]);
    assert!(d[0].starts_with("t.toml:3:"), "{d:?}");
    let d = diags(&[("u.toml", "[[tier]]\nbuiltin = \"load_balanse\"\n")]);
    assert!(
        d[0].starts_with("u.toml:2:11: unknown built-in `load_balanse`"),
        "{d:?}"
    );
    let d = diags(&[(
        "v.toml",
        "[[tier]]\nbuiltin = \"kv_lookup\"\nmin_match = 3\ncolour = 1\n",
    )]);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d.iter().any(|x| x.starts_with("v.toml:3:13: `min_match`")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.starts_with("v.toml:4:1: unknown argument `colour`")),
        "{d:?}"
    );
    let d = diags(&[(
        "w.toml",
        "[[tier]]\nbuiltin = \"fallback\"\nscript = \"()\"\n",
    )]);
    assert!(d[0].starts_with("w.toml:1:"), "{d:?}");
    assert!(d[0].contains("exactly one of"), "{d:?}");
    let d = diags(&[("x.toml", "[params]\na = 1\n")]);
    assert!(d[0].contains("no tiers"), "{d:?}");
}

#[test]
fn unknown_functions_and_variables_are_caught_at_load() {
    let d = diags(&[("typo.rhai", "load_balance(8) ?? kv_lookp()\n")]);
    // load_balance passes on the validation run's idle engines, so kv_lookp is reached.
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("typo.rhai:1:20: Function not found: kv_lookp"),
        "{d:?}"
    );
    let d = diags(&[("var.rhai", "let a = 1;\nengine\n")]);
    assert!(d[0].starts_with("var.rhai:2:1: "), "{d:?}");
    assert!(d[0].contains("engine"), "{d:?}");
    let d = diags(&[("prop.rhai", "engines[0].queu\n")]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("prop.rhai:1:"), "{d:?}");
}

#[test]
fn validation_reads_the_whole_script_not_one_run() {
    // A branch the request data may never reach is checked too.
    let d = diags(&[(
        "branch.rhai",
        "if request.stream {\n  kv_lookp()\n} else {\n  fallback()\n}\n",
    )]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("branch.rhai:2:3: Function not found: kv_lookp"),
        "{d:?}"
    );
    // A property of an engine held in a variable, a method of the request, and a property in
    // an inline TOML script (positions in the TOML file).
    let d = diags(&[(
        "var.rhai",
        "let b = engines[0];\nfor e in engines { if e.queue < b.queue { b = e; } }\nb.kv_usge\n",
    )]);
    assert!(
        d[0].starts_with("var.rhai:3:3: unknown property `kv_usge` of `Engine`"),
        "{d:?}"
    );
    let d = diags(&[(
        "method.rhai",
        "if request.stream { request.heder(\"x\") } else { fallback() }\n",
    )]);
    assert!(
        d[0].starts_with("method.rhai:1:29: Function not found: `Request` has no method `heder`"),
        "{d:?}"
    );
    let d = diags(&[(
        "inline.toml",
        "[[tier]]\nscript = \"\"\"\nrequest.prompt_tokns > 4\n\"\"\"\n",
    )]);
    assert!(
        d[0].starts_with("inline.toml:3:9: unknown property `prompt_tokns` of `Request`"),
        "{d:?}"
    );
    // A module's functions are checked when it is imported.
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
    std::fs::write(
        dir.path().join("lib/m.rhai"),
        "fn ok() { fallback() }\nfn broken() { nope() }\n",
    )
    .expect("write");
    dir.write("imp.rhai", "import \"lib/m\" as m;\nm::ok()\n");
    dir.write("call.rhai", "import \"lib/m\" as m;\nm::okk()\n");
    let d: Vec<String> = PolicyStore::check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d.iter()
            .any(|d| d.contains("imp.rhai:1:1: Function not found: nope")
                && d.contains("in module 'lib/m'")),
        "{d:?}"
    );
    // (`call.rhai` imports the same broken module.)
    assert!(d.iter().any(|d| d.contains("call.rhai:1:1:")), "{d:?}");
}

#[test]
fn a_script_defining_a_builtins_name_is_interpreted() {
    let (_d, s) = store_with(
        &[("own.rhai", "fn fallback() { \"e2:8000\" }\nfallback()\n")],
        "own",
    );
    assert_eq!(s.status_json()["policies"][0]["execution"], "rhai");
    let d = s.decide(&request(1), &queues(&[0.0, 0.0, 9.0]));
    assert_eq!((d.engine, &*d.tier), (2, "own"));
    let (_d, s) = store_with(&[("own.rhai", "fallback() // the built-in\n")], "own");
    assert_eq!(s.status_json()["policies"][0]["execution"], "native");
}

#[test]
fn sandbox_has_no_eval_sleep_or_escaping_imports() {
    let d = diags(&[("e.rhai", "eval(\"1\")\n")]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("e.rhai:1:1: "), "{d:?}");
    let d = diags(&[("s.rhai", "sleep(10); ()\n")]);
    assert!(d[0].contains("Function not found: sleep"), "{d:?}");
    let outside = temp_dir();
    std::fs::write(outside.path().join("evil.rhai"), "fn f() { 1 }").expect("write");
    let rel = format!(
        "../{}/evil",
        outside
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
    );
    let d = diags(&[("i.rhai", &format!("import \"{rel}\" as evil;\nevil::f()\n"))]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].contains("limited to the policies directory"), "{d:?}");
    let d = diags(&[("a.rhai", "import \"/etc/passwd\" as p;\n()\n")]);
    assert!(d[0].contains("limited to the policies directory"), "{d:?}");
    let d = diags(&[("f.toml", "[[tier]]\nfile = \"../outside.rhai\"\n")]);
    assert!(d[0].contains("not inside the policies directory"), "{d:?}");
}

#[test]
fn imports_and_script_files_inside_the_directory() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
    std::fs::write(
        dir.path().join("lib/pick.rhai"),
        "fn busiest(engines) { let b = engines[0]; for e in engines { if e.queue > b.queue { b = e; } } b }\n",
    )
    .expect("write");
    dir.write(
        "contrarian.rhai",
        "import \"lib/pick\" as pick;\npick::busiest(engines)\n",
    );
    dir.write(
        "pipe.toml",
        "[[tier]]\nfile = \"lib/pick.rhai\"\n\n[[tier]]\nfile = \"contrarian.rhai\"\n",
    );
    assert!(PolicyStore::check_dir(dir.path()).is_empty());
    let s = PolicyStore::new(settings(dir.path(), "contrarian"), 16).expect("store");
    let c = queues(&[1.0, 7.0, 3.0]);
    let d = s.decide(&request(1), &c);
    assert_eq!((d.engine, &*d.tier), (1, "contrarian"));
    // In a pipeline: lib/pick.rhai only defines a function (value `()`): it passes.
    let s = PolicyStore::new(settings(dir.path(), "pipe"), 16).expect("store");
    let d = s.decide(&request(1), &c);
    assert_eq!((d.engine, &*d.tier), (1, "contrarian"));
}

#[test]
fn settings_must_name_loadable_policies() {
    let dir = temp_dir();
    dir.write("ok.rhai", "fallback()");
    dir.write("broken.rhai", "let = ;");
    let err = PolicyStore::new(settings(dir.path(), "missing"), 16).expect_err("unknown");
    let PolicyError::Invalid(d) = &err else {
        panic!("{err}")
    };
    assert!(
        d.iter()
            .any(|d| d.message.contains("unknown default policy `missing`")),
        "{err}"
    );
    assert!(PolicyStore::new(settings(dir.path(), "broken"), 16).is_err());
    // A broken policy nobody uses does not stop the store; status shows it.
    let s = PolicyStore::new(settings(dir.path(), "ok"), 16).expect("store");
    let status = s.status_json();
    let broken = status["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "broken"))
        .expect("listed");
    assert!(
        broken["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("broken.rhai:1:"))
    );
    assert_eq!(broken["loaded"], false);
}

#[test]
fn per_model_policies_and_file_names() {
    let dir = temp_dir();
    dir.write("twin.rhai", "round_robin()");
    dir.write("twin.toml", "[[tier]]\nbuiltin = \"least_loaded\"\n");
    let mut st = settings(dir.path(), "twin");
    st.per_model.insert("m2".into(), "twin.toml".into());
    let s = PolicyStore::new(st, 16).expect("store");
    let c = queues(&[3.0, 1.0, 2.0]);
    // The bare name prefers the Rhai twin; the file name picks the TOML.
    assert_eq!(&*s.decide(&request(1), &c).tier, "round_robin");
    let mut r = request(1);
    r.model = "m2".into();
    assert_eq!(&*s.decide(&r, &c).tier, "least_loaded");
}

#[test]
fn concurrent_decisions_share_compiled_scripts() {
    let (_d, s) = store_with(
        &[(
            "p.rhai",
            "let b = engines[0]; for e in engines { if e.queue < b.queue { b = e; } } b",
        )],
        "p",
    );
    std::thread::scope(|sc| {
        for t in 0..4 {
            let s = &s;
            sc.spawn(move || {
                for i in 0..200 {
                    let mut qs = vec![5.0; 6];
                    qs[(t + i) % 6] = 0.0;
                    let d = s.decide(&request(3), &queues(&qs));
                    assert_eq!(d.engine, (t + i) % 6);
                }
            });
        }
    });
}

/// A file outside any policies directory holding `content`.
fn outside_file(content: &str) -> (TempDir, std::path::PathBuf) {
    let outside = temp_dir();
    let path = outside.path().join("secret.rhai");
    std::fs::write(&path, content).expect("write");
    (outside, path)
}

/// Content that, if it were read, would be echoed by the compiler's error message.
const SECRET: &str = "secret_token_8f3a";

#[test]
fn policy_files_symlinked_outside_are_refused_unread() {
    let (_outside, secret) = outside_file(SECRET);
    let dir = temp_dir();
    dir.write("ok.rhai", "fallback()");
    std::os::unix::fs::symlink(&secret, dir.path().join("x.rhai")).expect("symlink");
    let diags = PolicyStore::check_dir(dir.path());
    assert_eq!(diags.len(), 1, "{diags:?}");
    let d = diags[0].to_string();
    assert!(d.contains("x.rhai:1:1: policy file resolves to"), "{d}");
    assert!(d.contains("outside the policies directory"), "{d}");
    let s = PolicyStore::new(settings(dir.path(), "ok"), 16).expect("store");
    let status = s.status_json();
    let x = status["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "x"))
        .expect("listed");
    assert_eq!(x["loaded"], false);
    assert!(!status.to_string().contains(SECRET), "{status}");
    // Settings cannot name it either.
    assert!(PolicyStore::new(settings(dir.path(), "x"), 16).is_err());
}

#[test]
fn script_tiers_and_imports_symlinked_outside_are_refused_unread() {
    let (_outside, secret) = outside_file(&format!("fn f() {{ {SECRET} }}\n{SECRET}"));
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
    std::os::unix::fs::symlink(&secret, dir.path().join("lib/link.rhai")).expect("symlink");
    dir.write("tier.toml", "[[tier]]\nfile = \"lib/link.rhai\"\n");
    dir.write("imp.rhai", "import \"lib/link\" as l;\nl::f()\n");
    let diags: Vec<String> = PolicyStore::check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(diags.len(), 2, "{diags:?}");
    assert!(
        diags.iter().any(
            |d| d.contains("tier.toml:2:8: script file `lib/link.rhai` resolves to")
                && d.contains("outside the policies directory")
        ),
        "{diags:?}"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("imp.rhai:") && d.contains("limited to the policies directory")),
        "{diags:?}"
    );
    assert!(!diags.iter().any(|d| d.contains(SECRET)), "{diags:?}");
}

#[test]
fn files_over_one_mib_are_refused() {
    let big = format!("// {}\nfallback()\n", "x".repeat(1024 * 1024));
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("lib")).expect("mkdir");
    dir.write("big.rhai", &big);
    std::fs::write(dir.path().join("lib/big.rhai"), &big).expect("write");
    dir.write("tier.toml", "[[tier]]\nfile = \"lib/big.rhai\"\n");
    dir.write("imp.rhai", "import \"lib/big\" as b;\nfallback()\n");
    // Just under the limit is fine.
    dir.write(
        "fits.rhai",
        &format!("// {}\nfallback()\n", "x".repeat(1024 * 1000)),
    );
    let diags: Vec<String> = PolicyStore::check_dir(dir.path())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(diags.len(), 3, "{diags:?}");
    assert!(
        diags
            .iter()
            .any(|d| d.contains("big.rhai:1:1: policy file") && d.contains("over the 1 MiB limit")),
        "{diags:?}"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("tier.toml:2:8: script file `lib/big.rhai`") && d.contains("1 MiB")),
        "{diags:?}"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("imp.rhai:") && d.contains("1 MiB")),
        "{diags:?}"
    );
    assert_eq!(switchyard::policy::MAX_POLICY_FILE_BYTES, 1024 * 1024);
}

/// A Kubernetes ConfigMap volume: every file is a symlink through `..data` to a timestamped
/// directory, all inside the volume.
#[test]
fn configmap_symlinks_inside_the_directory_work() {
    let dir = temp_dir();
    let data = dir.path().join("..2026_11_25_10_00_00.123");
    std::fs::create_dir_all(data.join("lib")).expect("mkdir");
    std::fs::write(data.join("lib/pick.rhai"), "fn choose() { round_robin() }").expect("write");
    std::fs::write(
        data.join("m.rhai"),
        "import \"lib/pick\" as pick;\npick::choose()\n",
    )
    .expect("write");
    std::fs::write(
        data.join("t.toml"),
        "[[tier]]\nfile = \"lib/pick.rhai\"\n\n[[tier]]\nbuiltin = \"random\"\n",
    )
    .expect("write");
    std::os::unix::fs::symlink("..2026_11_25_10_00_00.123", dir.path().join("..data"))
        .expect("symlink");
    for name in ["m.rhai", "t.toml", "lib"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name))
            .expect("symlink");
    }
    assert!(
        PolicyStore::check_dir(dir.path()).is_empty(),
        "{:?}",
        PolicyStore::check_dir(dir.path())
    );
    let s = PolicyStore::new(settings(dir.path(), "m"), 16).expect("store");
    let c = queues(&[1.0, 1.0]);
    assert_eq!(&*s.decide(&request(1), &c).tier, "round_robin");
    let s = PolicyStore::new(settings(dir.path(), "t"), 16).expect("store");
    assert_eq!(&*s.decide(&request(1), &c).tier, "random");
    // The policies directory itself may be a symlink too.
    let parent = temp_dir();
    let link = parent.path().join("policies");
    std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
    assert!(PolicyStore::check_dir(&link).is_empty());
}

/// One operation is a native call over a 4000-element array: seconds per evaluation under the
/// operation limit alone.
const RUNAWAY: &str = "let a = []; a.pad(4000, 7); loop { if a.contains(8) {} }";

#[test]
fn other_tasks_run_while_a_script_evaluates() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // One worker thread: if the evaluation held it, nothing else could run until it ended.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (_d, s) = store_with(&[("runaway.rhai", RUNAWAY)], "runaway");
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let decision = rt.spawn({
        let (started, finished) = (Arc::clone(&started), Arc::clone(&finished));
        async move {
            started.store(true, Ordering::SeqCst);
            let d = s.decide(&request(1), &queues(&[2.0, 1.0]));
            finished.store(true, Ordering::SeqCst);
            d
        }
    });
    assert!(poll_until(Duration::from_secs(20), || started.load(Ordering::SeqCst)));
    // Another task (think `/health`) runs while the script is still being evaluated.
    let other = rt.spawn({
        let finished = Arc::clone(&finished);
        async move { finished.load(Ordering::SeqCst) }
    });
    let decided_first = rt.block_on(other).expect("task");
    assert!(
        !decided_first,
        "the other task had to wait for the evaluation"
    );
    let d = rt.block_on(decision).expect("decision");
    assert_eq!((d.engine, &*d.tier), (1, "default"));
}
