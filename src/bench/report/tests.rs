//! Tests of the report: tables, files, winners, warnings.

use super::*;
use crate::bench::stats::EngineFigures;
use crate::bench::stats::tests::record;
use crate::bench::workload::{WorkloadKind, WorkloadKnobs};

fn figures(hit: f64) -> EngineFigures {
    EngineFigures {
        cache_hit_rate: Some(hit),
        ttft_mean: Some(0.1),
        preemptions: Some(3),
        kv_transferred_tokens: None,
    }
}

pub(crate) fn sample_report() -> BenchReport {
    let engines = vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
    let a: Vec<RequestRecord> = (0..10)
        .map(|i| {
            record(
                i as f64,
                0.1 + i as f64 * 0.01,
                &engines[i % 2],
                "kv_lookup",
            )
        })
        .collect();
    let b: Vec<RequestRecord> = (0..10)
        .map(|i| record(i as f64, 0.5, &engines[0], if i < 5 { "a" } else { "b" }))
        .collect();
    let runs = vec![
        RunStats::compute("kvaware", "kvaware", 10, &a, &engines, figures(0.8)),
        RunStats::compute("round<robin>", "roundrobin", 10, &b, &engines, figures(0.2)),
    ];
    BenchReport {
        settings: BenchSettings {
            command: "switchyard bench --quick".into(),
            workload: Some(
                WorkloadSpec::resolve(
                    Some(WorkloadKind::SharedPrefix),
                    true,
                    None,
                    &WorkloadKnobs::default(),
                )
                .unwrap(),
            ),
            trace: None,
            engines: Some(2),
            target: None,
            model: "m".into(),
            time_scale: 0.1,
            slow_engine: None,
            policies_dir: "policies".into(),
            time_unit: "simulated seconds",
        },
        winners: winners(&runs),
        ideal_cache_hit_rate: None,
        kv_compare: None,
        runs,
        records: vec![a, b],
    }
}

#[test]
fn winners_pick_the_best_per_figure() {
    let r = sample_report();
    let get = |f: &str| r.winners.iter().find(|w| w.figure == f).unwrap();
    assert_eq!(get("TTFT p50").runs, vec!["kvaware"]);
    assert_eq!(get("cache hit rate").runs, vec!["kvaware"]);
    assert_eq!(get("cache hit rate").value, 0.8);
    assert_eq!(get("max/min load").runs, vec!["kvaware"]);
    // Equal values share the win.
    let mut twin = r.runs[0].clone();
    twin.name = "twin".into();
    let w = winners(&[r.runs[0].clone(), twin]);
    assert!(w.iter().all(|w| w.runs.len() == 2), "{w:?}");
}

#[test]
fn tables_have_a_row_per_run() {
    let r = sample_report();
    let text = r.render_text();
    for name in ["kvaware", "round<robin>"] {
        assert_eq!(
            text.lines().filter(|l| l.starts_with(name)).count(),
            2,
            "{name} has a row in both tables:\n{text}"
        );
    }
    assert!(text.contains("TTFT p99"));
    assert!(text.contains("preempt"), "{text}");
    assert!(
        r.render_markdown()
            .lines()
            .any(|l| l.starts_with("| kvaware |") && l.ends_with("| 3 |")),
        "the preemptions column"
    );
    assert!(text.contains("50% 50%"), "{text}");
    assert!(
        text.contains("inf"),
        "roundrobin used only one engine:\n{text}"
    );
    assert!(text.contains("Best per figure"));
    assert!(
        text.contains(
            "Router + client overhead (client TTFT mean − the engines' own TTFT mean): 45–400 ms."
        ),
        "{text}"
    );
    assert!(text.contains("TTFT p50: kvaware"), "{text}");
    let md = r.render_markdown();
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| kvaware |")).count(),
        2
    );
    let csv = r.render_csv();
    assert_eq!(csv.lines().count(), 21);
    // Names with separators, quotes and both line endings survive a CSV reader.
    let mut odd = sample_report();
    odd.runs[0].name = "a,\"b\"\r\nc".into();
    let text = odd.render_csv();
    let mut rd = csv::Reader::from_reader(text.as_bytes());
    let first = rd.records().next().unwrap().unwrap();
    assert_eq!(&first[0], "a,\"b\"\r\nc");
    assert_eq!(rd.records().count(), 19);
}

#[test]
fn an_ideal_hit_rate_adds_hit_over_ideal() {
    let mut r = sample_report();
    assert!(!r.render_text().contains("hit/ideal"));
    r.ideal_cache_hit_rate = Some(0.8);
    let md = r.render_markdown();
    assert!(md.contains("| cache hit | hit/ideal |"), "{md}");
    assert!(
        md.contains("| 80.0% | 100% |") && md.contains("| 20.0% | 25% |"),
        "{md}"
    );
}

#[test]
fn late_sends_are_warned_about() {
    let mut r = sample_report();
    assert!(!r.render_text().contains("warning"));
    // 0.2 s simulated = 20 ms wall at time scale 0.1, above a quarter of TTFT p50 (0.5 s).
    r.runs[1].send_lag_p99 = 0.2;
    let text = r.render_text();
    assert!(
        text.contains("warning: the client sent requests late in round<robin>"),
        "{text}"
    );
    // 4 ms of wall lag at real speed is normal timer jitter: no warning.
    r.runs[1].send_lag_p99 = 0.004;
    r.settings.time_scale = 1.0;
    assert!(!r.render_text().contains("warning"));
}

#[test]
fn files_are_written_and_json_round_trips() {
    let r = sample_report();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let written = r.write_files(&dir).unwrap();
    assert_eq!(written.len(), 4);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 2);
    assert_eq!(json["runs"][0]["name"], "kvaware");
    assert_eq!(json["runs"][0]["preemptions"], 3);
    assert_eq!(json["settings"]["workload"]["kind"], "shared-prefix");
    assert_eq!(json["settings"]["workload"]["groups"], 6);
    assert!(json["winners"].as_array().unwrap().len() >= 5);
    let _ = std::fs::remove_dir_all(&dir);
}
