//! The house rules of `src/`, checked from the source text: the module import graph has no
//! circles, and the router core never imports a leaf (the command line, the simulated engine,
//! the benchmark). A module is a file (`a/b.rs` or `a/b/mod.rs` is `a::b`); an arrow is any
//! `crate::…` or `super::…` path in it, outside `#[cfg(test)]` modules, resolved to the deepest
//! module it names. A child naming its own ancestor (`super::Type` from `a::b` to `a`) is how
//! Rust modules share their parent's types and is not counted as an arrow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The router core, at the bottom.
const CORE: &[&str] = &[
    "admit", "config", "request", "engines", "prefix", "policy", "proxy", "tokens", "upstream",
    "otel",
];
/// The leaves on top, which use the core only through its public API.
const LEAVES: &[&str] = &["cli", "sim", "bench"];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_name(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn collect(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src");
            let name = module_name(rel);
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source is readable");
            out.insert(name, without_test_modules(&text));
        }
    }
}

/// The source less every `#[cfg(test)]` item (test helpers may reach anywhere).
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // Skip to the end of the item: its braces balanced, or its `;`.
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every `crate::a::b` / `super::x` path in `text`, with `{a, b}` groups expanded one level.
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let mut end = at;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
            {
                end += 1;
            }
            let path = text[at..end].trim_end_matches(':').to_owned();
            if text[end..].starts_with('{') {
                let group_end = text[end..].find('}').map_or(text.len(), |j| end + j);
                for item in text[end + 1..group_end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.push(format!("{path}::{name}"));
                    }
                }
            }
            out.push(path);
        }
    }
    out
}

/// The module `path` (seen from module `from`) lands in.
fn resolve(from: &str, path: &str, modules: &BTreeMap<String, String>) -> Option<String> {
    let mut segs = path.split("::").peekable();
    let mut base: Vec<&str> = match segs.next()? {
        "crate" => Vec::new(),
        "super" => {
            let mut b: Vec<&str> = from.split("::").collect();
            b.pop();
            while segs.peek() == Some(&"super") {
                segs.next();
                b.pop();
            }
            b
        }
        _ => return None,
    };
    for s in segs {
        base.push(s);
        if !modules.contains_key(&base.join("::")) {
            base.pop();
            break;
        }
    }
    (!base.is_empty()).then(|| base.join("::"))
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    collect(&root, &root, &mut modules);
    let mut g = Graph::new();
    for (name, text) in &modules {
        let arrows = g.entry(name.clone()).or_default();
        for p in paths(text) {
            if let Some(to) = resolve(name, &p, &modules)
                && to != *name
                && !name.starts_with(&format!("{to}::"))
            {
                arrows.insert(to);
            }
        }
    }
    g
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut c = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                c.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                t.out.push(c);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_import_graph_has_no_circles() {
    let g = graph();
    assert!(g.len() > 30, "found only {} modules", g.len());
    let c = circles(&g);
    assert!(c.is_empty(), "import circles: {c:?}");
}

#[test]
fn the_core_never_imports_a_leaf() {
    let g = graph();
    for (from, tos) in &g {
        assert!(
            CORE.contains(&top(from)) || LEAVES.contains(&top(from)),
            "module {from} is neither core nor leaf: add it to one list"
        );
        if CORE.contains(&top(from)) {
            let up: Vec<&String> = tos.iter().filter(|t| LEAVES.contains(&top(t))).collect();
            assert!(up.is_empty(), "core module {from} imports leaves {up:?}");
        }
    }
}

#[test]
fn the_checker_sees_circles_and_upward_arrows() {
    // The checker itself: a graph with a circle and an arrow up is caught.
    let mut g = Graph::new();
    g.entry("proxy::a".into())
        .or_default()
        .insert("proxy::b".into());
    g.entry("proxy::b".into())
        .or_default()
        .insert("proxy::a".into());
    g.entry("proxy::b".into())
        .or_default()
        .insert("bench".into());
    g.entry("bench".into()).or_default();
    assert_eq!(
        circles(&g),
        vec![vec!["proxy::a".to_owned(), "proxy::b".to_owned()]]
    );
    let mut modules = BTreeMap::new();
    for m in ["proxy", "proxy::body", "proxy::errors", "bench"] {
        modules.insert(m.to_owned(), String::new());
    }
    assert_eq!(
        resolve("proxy::body", "super::errors::ApiError", &modules).as_deref(),
        Some("proxy::errors")
    );
    assert_eq!(
        resolve("proxy::body", "crate::bench::run", &modules).as_deref(),
        Some("bench")
    );
    assert_eq!(
        paths("use super::{errors::X, conn};"),
        vec!["super::errors", "super::conn", "super"]
    );
}
