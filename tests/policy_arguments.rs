//! Built-in arguments are validated by the built-ins' table, whichever way a built-in is
//! called: for every row of the table, each bad argument (out of range, wrong type, invalid
//! header name, missing, extra) is rejected at load time from a `.rhai` script (a literal
//! argument, reported at its file:line:col) and from a `.toml` tier (at the key's value), with
//! the same message. A bad argument a script computes at run time makes the tier pass, and
//! the error is counted.

mod policy_support;

use metrics_exporter_prometheus::PrometheusBuilder;
use policy_support::*;
use switchyard::policy::PolicyStore;
use switchyard::policy::builtins::{BUILTINS, BuiltinSpec, IfAbsent, ParamType};

/// A bad value for a parameter, as Rhai and TOML literals (the same value in both).
struct Bad {
    param: &'static str,
    literal: String,
}

/// Every bad value the table says a parameter of `spec` must reject.
fn bad_values(spec: &BuiltinSpec) -> Vec<Bad> {
    let mut out = Vec::new();
    for p in spec.params {
        let mut push = |literal: String| {
            out.push(Bad {
                param: p.name,
                literal,
            })
        };
        match p.ty {
            ParamType::Number { min, max } => {
                if min.is_finite() {
                    push(format!("{:?}", min - 1.0));
                    push(format!("{}", min as i64 - 1));
                }
                if max.is_finite() {
                    push(format!("{:?}", max + 1.0));
                    push(format!("{}", max as i64 + 1));
                }
                push("\"8\"".into());
                push("true".into());
            }
            ParamType::HeaderName => {
                push("\"not a header\"".into());
                push("\"\"".into());
                push("5".into());
                push("false".into());
            }
        }
    }
    out
}

/// The diagnostics of checking a directory holding one file, without the directory.
fn check(name: &str, content: &str) -> Vec<String> {
    let dir = temp_dir();
    dir.write(name, content);
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

/// The single diagnostic of a file: (line, column, message).
fn diagnostic(name: &str, content: &str) -> (usize, usize, String) {
    let d = check(name, content);
    assert_eq!(d.len(), 1, "{name}: {content:?}: {d:?}");
    let rest = d[0]
        .strip_prefix(&format!("{name}:"))
        .unwrap_or_else(|| panic!("{d:?}"));
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse().ok()).expect("line");
    let col = parts.next().and_then(|c| c.parse().ok()).expect("column");
    let message = parts.next().expect("message").trim_start().to_string();
    (line, col, message)
}

#[test]
fn scripts_and_toml_tiers_reject_the_same_bad_arguments_with_the_same_message() {
    let mut cases = 0;
    for spec in &BUILTINS {
        // A bad value for each parameter.
        for bad in bad_values(spec) {
            let index = spec.param(bad.param).expect("a parameter");
            // The other parameters before it get a valid value; those after are left out.
            let mut args: Vec<String> = spec.params[..index]
                .iter()
                .map(|p| match p.ty {
                    ParamType::Number { min, .. } => format!("{min:?}"),
                    ParamType::HeaderName => "\"x-user\"".into(),
                })
                .collect();
            let column = spec.name.len() + 2 + args.iter().map(|a| a.len() + 2).sum::<usize>();
            args.push(bad.literal.clone());
            let rhai = format!("{}({}) ?? fallback()\n", spec.name, args.join(", "));
            let mut toml = format!("[[tier]]\nbuiltin = \"{}\"\n", spec.name);
            for (p, a) in spec.params.iter().zip(&args) {
                toml.push_str(&format!("{} = {a}\n", p.name));
            }
            let (rl, rc, rm) = diagnostic("p.rhai", &rhai);
            let (tl, tc, tm) = diagnostic("p.toml", &toml);
            assert_eq!(rm, tm, "{rhai:?} / {toml:?}");
            assert_eq!(
                rm,
                format!("`{}` must be {}", bad.param, spec.params[index].must_be)
            );
            assert_eq!((rl, rc), (1, column), "{rhai:?}");
            assert_eq!((tl, tc), (3 + index, bad.param.len() + 4), "{toml:?}");
            cases += 1;
        }
        // A missing required parameter: reported at the call, and at the `builtin` value.
        if let Some(p) = spec
            .params
            .iter()
            .find(|p| matches!(p.if_absent, IfAbsent::Required(_)))
        {
            let (rl, rc, rm) = diagnostic("p.rhai", &format!("{}()\n", spec.name));
            let (tl, tc, tm) = diagnostic(
                "p.toml",
                &format!("[[tier]]\nbuiltin = \"{}\"\n", spec.name),
            );
            assert_eq!(rm, tm);
            assert!(rm.contains(&format!("needs `{}`", p.name)), "{rm}");
            assert_eq!(((rl, rc), (tl, tc)), ((1, 1), (2, 11)));
            cases += 1;
        }
        // One argument too many: TOML names the key, a script has none; both say what the
        // built-in takes.
        let extra: Vec<String> = spec
            .params
            .iter()
            .map(|p| match p.ty {
                ParamType::Number { min, .. } => format!("{min:?}"),
                ParamType::HeaderName => "\"x-user\"".into(),
            })
            .chain(std::iter::once("1".to_string()))
            .collect();
        let (_, _, rm) = diagnostic("p.rhai", &format!("{}({})\n", spec.name, extra.join(", ")));
        let mut toml = format!("[[tier]]\nbuiltin = \"{}\"\n", spec.name);
        for (p, a) in spec.params.iter().zip(&extra) {
            toml.push_str(&format!("{} = {a}\n", p.name));
        }
        toml.push_str("extra = 1\n");
        let (_, _, tm) = diagnostic("p.toml", &toml);
        assert_eq!(rm, format!("too many arguments; {}", spec.takes()));
        assert_eq!(tm, format!("unknown argument `extra`; {}", spec.takes()));
        cases += 1;
    }
    // Every row has at least its extra-argument case; the rows with parameters more.
    assert!(cases > BUILTINS.len() * 2, "{cases}");
}

#[test]
fn valid_arguments_load_from_both() {
    for spec in &BUILTINS {
        let args: Vec<String> = spec
            .params
            .iter()
            .map(|p| match p.ty {
                ParamType::Number { min, max } if max.is_finite() => {
                    format!("{:?}", (min + max) / 2.0)
                }
                ParamType::Number { min, .. } => format!("{}", min as i64 + 8),
                ParamType::HeaderName => "\"X-User\"".into(),
            })
            .collect();
        let mut toml = format!("[[tier]]\nbuiltin = \"{}\"\n", spec.name);
        for (p, a) in spec.params.iter().zip(&args) {
            toml.push_str(&format!("{} = {a}\n", p.name));
        }
        let rhai = format!("{}({})\n", spec.name, args.join(", "));
        assert_eq!(check("p.rhai", &rhai), Vec::<String>::new(), "{rhai}");
        assert_eq!(check("p.toml", &toml), Vec::<String>::new(), "{toml}");
    }
}

#[test]
fn a_bad_argument_computed_at_run_time_passes_the_tier_and_is_counted() {
    let recorder = PrometheusBuilder::new()
        .install_recorder()
        .expect("install recorder");
    // `params.bad` is a value only the running script sees: the built-in rejects it then.
    let pipeline = r#"
[params]
bad = -1

[[tier]]
name = "computed"
script = "load_balance(params.bad)"

[[tier]]
builtin = "round_robin"
"#;
    let (_dir, store) = store_with(&[("computed.toml", pipeline)], "computed");
    for _ in 0..3 {
        let d = store.decide(&request(1), &queues(&[9.0, 0.0]));
        assert_eq!(&*d.tier, "round_robin");
    }
    let text = recorder.render();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("switchyard_policy_script_errors_total{")
                && l.contains("tier=\"computed\"")
                && l.contains("reason=\"runtime_error\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with(" 3"), "{line}");
}

/// The built-ins' table as `docs/policies.md` shows it, one row per built-in.
fn docs_rows() -> Vec<String> {
    BUILTINS
        .iter()
        .map(|spec| {
            let names: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
            let params: Vec<String> = spec
                .params
                .iter()
                .map(|p| {
                    let absent = match p.if_absent {
                        IfAbsent::Required(what) => format!("required ({what})"),
                        IfAbsent::Number(x) => format!("default {x}"),
                        IfAbsent::Nothing(what) => format!("optional (default: {what})"),
                    };
                    format!("`{}`: {}; {absent}", p.name, p.must_be)
                })
                .collect();
            let params = if params.is_empty() {
                "none".to_string()
            } else {
                params.join("<br>")
            };
            format!(
                "| `{}({})` | {params} | {} |",
                spec.name,
                names.join(", "),
                spec.doc
            )
        })
        .collect()
}

#[test]
fn the_documentation_shows_the_table() {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policies.md"),
    )
    .expect("docs/policies.md");
    let rows = docs_rows();
    let missing: Vec<&String> = rows.iter().filter(|r| !docs.contains(r.as_str())).collect();
    assert!(
        missing.is_empty(),
        "docs/policies.md must show the built-ins' table as defined; expected rows:\n{}",
        rows.join("\n")
    );
}
