//! The Grafana dashboard (`deploy/grafana/switchyard.json`) queries only metrics a running router
//! exports.
//!
//! Every PromQL expression of the dashboard (panel targets and template-variable queries) is
//! reduced to the metric names it selects, and each must be a sample name in the `/metrics` text
//! of a real router that has just started in front of simulated engines, before any request.
//! That works because the router pre-registers its metric families at start
//! (`switchyard::proxy::telemetry::register_families`): a counter such as
//! `switchyard_retries_total` or `switchyard_policy_reloads_total` would otherwise only appear
//! after the first retry or reload, the dashboard would show "no data" instead of 0, and this test
//! could not tell a metric that has not happened yet from one that does not exist. Histogram
//! queries name the `_bucket`/`_sum`/`_count` series, which must be there too (`_bucket` only
//! if the family really is a histogram, not a summary).
//!
//! Pre-registration could also keep a renamed metric alive under its old name:
//! `every_family_the_dashboard_uses_is_recorded_outside_the_pre_registration` checks that every
//! family the dashboard uses is recorded somewhere in `src/` besides the pre-registration itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn dashboard() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/switchyard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard: panel targets (rows included) and the metric
/// selectors of template-variable queries.
fn expressions(dash: &serde_json::Value) -> Vec<String> {
    fn panels(list: &serde_json::Value, out: &mut Vec<String>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_owned());
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str());
        if let Some(q) = q.and_then(variable_expr) {
            out.push(q);
        }
    }
    out
}

/// The PromQL inside a Grafana Prometheus variable query: `label_values(SELECTOR, label)`
/// (`label_values(label)` selects no metric), `query_result(EXPR)`; anything else is taken as
/// PromQL.
fn variable_expr(q: &str) -> Option<String> {
    let q = q.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return inner
            .rsplit_once(',')
            .map(|(selector, _label)| selector.trim().to_owned());
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(inner.to_owned());
    }
    (!q.starts_with("label_names(") && !q.starts_with("metrics(")).then(|| q.to_owned())
}

/// PromQL words that are not metric names when not followed by `(`.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];

/// The metric names a PromQL expression selects: identifiers outside label matchers (`{...}`),
/// ranges (`[...]`), strings and Grafana variables, that are not functions (followed by `(`),
/// keywords, or the label lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    // Index just past the bracket that closes the one at `open`, skipping quoted strings.
    let close = |open: usize, o: u8, c: u8| {
        let mut depth = 0usize;
        let mut j = open;
        while j < b.len() {
            match b[j] {
                q @ (b'"' | b'\'' | b'`') => {
                    j += 1;
                    while j < b.len() && b[j] != q {
                        j += if b[j] == b'\\' { 2 } else { 1 };
                    }
                }
                x if x == o => depth += 1,
                x if x == c => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        b.len()
    };
    while i < b.len() {
        match b[i] {
            b'{' => i = close(i, b'{', b'}'),
            b'[' => i = close(i, b'[', b']'),
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'$' => {
                // A Grafana variable: $name, ${name} or $__name.
                i += 1;
                if i < b.len() && b[i] == b'{' {
                    i = close(i, b'{', b'}');
                } else {
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                // A number (also 1e-3, 0x1f, 5m in offsets).
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = skip_ws(i);
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    // Their label list is not a selector.
                    if next < b.len() && b[next] == b'(' {
                        i = close(next, b'(', b')');
                    }
                } else if next < b.len() && b[next] == b'(' {
                    // A function or an aggregation: its arguments are scanned next.
                } else if !KEYWORDS.contains(&lower.as_str()) {
                    names.push(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Sample names in a Prometheus text exposition, with the family type of each (`# TYPE`).
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    (samples, types)
}

/// The family a sample name belongs to (histogram and summary series carry a suffix).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// The names `exprs` use that `/metrics` does not export, each with why.
fn missing(exprs: &[String], metrics_text: &str) -> Vec<String> {
    let (samples, types) = exported(metrics_text);
    let mut out = Vec::new();
    for e in exprs {
        for name in metric_names(e) {
            if !samples.contains(&name) {
                out.push(format!("{name} (in `{e}`) is not exported"));
            } else if name.ends_with("_bucket")
                && types.get(family(&name)).map(String::as_str) != Some("histogram")
            {
                out.push(format!("{name} (in `{e}`) is not a histogram bucket"));
            }
        }
    }
    out
}

async fn fresh_router_metrics() -> String {
    let sims = start_sims(2, instant_sim()).await;
    let router = start_router(&urls(&sims), |_| {}).await;
    let text = String::from_utf8(
        get(&client(), &router.url(), "/metrics")
            .await
            .body
            .to_vec(),
    )
    .expect("metrics are UTF-8");
    router.shutdown(Duration::from_secs(1)).await;
    text
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported_by_a_fresh_router() {
    let exprs = expressions(&dashboard());
    assert!(
        exprs
            .iter()
            .any(|e| e.starts_with("switchyard_engine_healthy{")),
        "the template variables' selectors are checked too: {exprs:?}"
    );
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // The dashboard covers what the issue asks for; guards against an extraction that finds nothing.
    for needed in [
        "switchyard_requests_total",
        "switchyard_time_to_first_byte_seconds_bucket",
        "switchyard_request_duration_seconds_bucket",
        "switchyard_routing_decisions_total",
        "switchyard_engine_healthy",
        "switchyard_engine_in_flight",
        "switchyard_retries_total",
        "switchyard_engine_ejections_total",
        "switchyard_policy_reloads_total",
        "switchyard_policy_script_errors_total",
        "switchyard_client_connections_closed_total",
        "switchyard_queue_length",
        "switchyard_queue_wait_seconds_bucket",
        "switchyard_queue_rejections_total",
        "switchyard_rate_limited_total",
    ] {
        assert!(
            names.contains(needed),
            "the dashboard does not query {needed}: {names:?}"
        );
    }
    let text = fresh_router_metrics().await;
    let missing = missing(&exprs, &text);
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the router does not export:\n  {}\n/metrics:\n{text}",
        missing.join("\n  ")
    );

    // And the check does catch a misspelt or a summary-typed name.
    let typo = vec![
        "sum(rate(switchyard_retry_total{job=~\"$job\"}[$__rate_interval]))".to_owned(),
        "histogram_quantile(0.9, sum by (le) (rate(switchyard_requests_total_bucket[5m])))"
            .to_owned(),
    ];
    let caught = self::missing(&typo, &text);
    assert_eq!(caught.len(), 2, "{caught:?}");
    assert!(
        caught[0].starts_with("switchyard_retry_total "),
        "{caught:?}"
    );
}

#[test]
fn promql_names_are_extracted_without_labels_functions_or_variables() {
    let names = |e: &str| metric_names(e);
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~\"$model\", x=\"b{c}\"}[$__rate_interval])))"
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("count(min by (engine) (up_gauge{job=~\"${job}\"}) == 1) or vector(0)"),
        ["up_gauge"]
    );
    assert_eq!(
        names("sum(rate(x_total[5m] offset 1h)) / on (job) group_left (pod) y_info"),
        ["x_total", "y_info"]
    );
    assert_eq!(names("sum without (instance) (z) > bool 2e-3"), ["z"]);
    assert_eq!(
        variable_expr("label_values(m_total{namespace=~\"$namespace\"}, job)").as_deref(),
        Some("m_total{namespace=~\"$namespace\"}")
    );
    assert_eq!(variable_expr("label_values(job)"), None);
}

/// Files under `dir` ending in `.rs`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_family_the_dashboard_uses_is_recorded_outside_the_pre_registration() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let telemetry = src.join("proxy/telemetry.rs");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut text = String::new();
    for f in files.iter().filter(|f| **f != telemetry) {
        text.push_str(&std::fs::read_to_string(f).expect("readable source"));
    }
    // telemetry.rs records per request too; only its part before the pre-registration counts.
    let t = std::fs::read_to_string(&telemetry).expect("readable telemetry.rs");
    let recording = t
        .split("pub fn register_families(")
        .next()
        .expect("split yields a first part");
    text.push_str(recording);
    let families: BTreeSet<String> = expressions(&dashboard())
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| family(&n).to_owned())
        .collect();
    for f in families {
        assert!(
            recorded(&text, &f),
            "{f} is on the dashboard but nothing in src/ records it (only pre-registered?)"
        );
    }
    // The scan itself: a description is not a recording.
    assert!(recorded("metrics::counter!(\n    \"a_total\",", "a_total"));
    assert!(!recorded(
        "metrics::describe_counter!(\"a_total\", \"…\")",
        "a_total"
    ));
}

/// Whether `src` passes the literal `"name"` as the first argument of `counter!`, `gauge!` or
/// `histogram!` (not `describe_*!`).
fn recorded(src: &str, name: &str) -> bool {
    let lit = format!("\"{name}\"");
    src.match_indices(&lit).any(|(at, _)| {
        let before = src[..at].trim_end();
        let Some(call) = before.strip_suffix('(') else {
            return false;
        };
        ["counter!", "gauge!", "histogram!"].iter().any(|m| {
            call.strip_suffix(m)
                .is_some_and(|rest| !rest.ends_with(|c: char| c == '_' || c.is_alphanumeric()))
        })
    })
}
