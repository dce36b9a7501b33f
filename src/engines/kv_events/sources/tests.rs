use super::*;

/// vLLM 0.32's answer for one rank with `--kv-events-config` giving `endpoint` (and
/// `replay`, `topic`).
fn rank(endpoint: &str, replay: Option<&str>, topic: &str) -> RankConfig {
    RankConfig {
        enable_kv_cache_events: true,
        publisher: Some("zmq".into()),
        endpoint: endpoint.into(),
        replay_endpoint: replay.map(str::to_owned),
        topic: topic.into(),
    }
}

fn follow(rank: u32, events: &str, replay: Option<&str>, topic: &str) -> RankPlan {
    RankPlan::Follow {
        rank,
        endpoints: KvEndpoints {
            events: events.into(),
            replay: replay.map(str::to_owned),
        },
        topic: topic.into(),
    }
}

fn one(c: RankConfig, host: &str) -> RankPlan {
    plan(&BTreeMap::from([(0, c)]), host).remove(0)
}

#[test]
fn parses_vllm_0_32s_answer() {
    let body = br#"{"0": {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": null, "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000, "topic": ""}, "1": {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5558", "replay_endpoint": "tcp://*:5560", "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000, "topic": "kv"}}"#;
    let s = parse(body).unwrap();
    assert_eq!(
        s,
        BTreeMap::from([
            (0, rank("tcp://*:5557", None, "")),
            (1, rank("tcp://*:5558", Some("tcp://*:5560"), "kv")),
        ])
    );
    assert_eq!(
        plan(&s, "10.0.0.5"),
        vec![
            follow(0, "tcp://10.0.0.5:5557", None, ""),
            follow(1, "tcp://10.0.0.5:5558", Some("tcp://10.0.0.5:5560"), "kv"),
        ]
    );
    // No KV events on any rank: vLLM answers an empty map.
    assert!(parse(b"{}").unwrap().is_empty());
}

#[test]
fn unparsable_answers_are_errors() {
    for body in [
        &b"Not Found"[..],
        b"[]",
        b"{\"0\": 5}",
        b"{\"rank0\": {}}",
        b"{\"-1\": {}}",
        b"",
    ] {
        assert!(parse(body).is_err(), "{:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn wildcard_hosts_become_the_engines_host() {
    for ep in [
        "tcp://*:5557",
        "tcp://[::]:5557",
        "tcp://:::5557",
        "tcp://[*]:5557",
    ] {
        assert_eq!(
            one(rank(ep, Some("tcp://0.0.0.0:5558"), ""), "10.0.0.5"),
            follow(0, "tcp://10.0.0.5:5557", Some("tcp://10.0.0.5:5558"), ""),
            "{ep}"
        );
    }
    // An IPv6 engine: brackets in the endpoints, whichever form its URL's host came in.
    for host in ["[fd00::5]", "fd00::5"] {
        assert_eq!(
            one(rank("tcp://*:5557", Some("tcp://[::]:5558"), ""), host),
            follow(0, "tcp://[fd00::5]:5557", Some("tcp://[fd00::5]:5558"), ""),
        );
    }
    // A host name.
    assert_eq!(
        one(rank("tcp://*:5557", None, "t"), "vllm-0.vllm.ns.svc"),
        follow(0, "tcp://vllm-0.vllm.ns.svc:5557", None, "t")
    );
}

#[test]
fn engine_host_comes_from_the_url() {
    assert_eq!(
        engine_host("http://10.0.0.5:8000").as_deref(),
        Some("10.0.0.5")
    );
    assert_eq!(
        engine_host("http://[fd00::5]:8000").as_deref(),
        Some("[fd00::5]")
    );
    assert_eq!(engine_host("http://vllm:8000/").as_deref(), Some("vllm"));
    assert_eq!(engine_host("not a url"), None);
}

#[test]
fn bound_named_hosts_are_followed_as_given() {
    // `::` anywhere makes vLLM bind (here on the IPv6 loopback): followed there.
    assert_eq!(
        one(rank("tcp://[::1]:5557", None, ""), "[::1]"),
        follow(0, "tcp://[::1]:5557", None, "")
    );
    // `tcp://*:0`: vLLM binds the node's IP and reports it; the engine's own host is its
    // own socket (IPv4 and IPv6, however written).
    assert_eq!(
        one(rank("tcp://10.0.0.5:41234", None, ""), "10.0.0.5"),
        follow(0, "tcp://10.0.0.5:41234", None, "")
    );
    assert_eq!(
        one(
            rank("tcp://2001:db8:0:0:0:0:0:5:41234", None, ""),
            "[2001:db8::5]"
        ),
        follow(0, "tcp://[2001:db8:0:0:0:0:0:5]:41234", None, "")
    );
    // The replay socket always binds, on a named host too.
    assert_eq!(
        one(
            rank("tcp://*:5557", Some("tcp://10.9.9.9:5558"), ""),
            "10.0.0.5"
        ),
        follow(0, "tcp://10.0.0.5:5557", Some("tcp://10.9.9.9:5558"), "")
    );
}

#[test]
fn endpoints_naming_another_host_connect_out() {
    for ep in [
        "tcp://10.0.0.9:5557",
        "tcp://scheduler.llm-d.svc:5557",
        "tcp://[2001:db8:1:2:3:4:5:6]:5557",
        // vLLM 0.32 binds only `*` and `::`: with 0.0.0.0 its PUB socket connects.
        "tcp://0.0.0.0:5557",
    ] {
        assert_eq!(
            one(rank(ep, Some("tcp://*:5558"), "kv@10.0.0.5@m"), "10.0.0.5"),
            RankPlan::ConnectsOut {
                rank: 0,
                endpoint: ep.into()
            },
            "{ep}"
        );
    }
}

#[test]
fn disabled_other_publishers_and_local_sockets_are_skipped() {
    let skipped = |c: RankConfig| matches!(one(c, "10.0.0.5"), RankPlan::Skip { rank: 0, .. });
    let mut off = rank("tcp://*:5557", None, "");
    off.enable_kv_cache_events = false;
    assert!(skipped(off.clone()));
    off.publisher = None;
    assert!(skipped(off));
    let mut null = rank("tcp://*:5557", None, "");
    null.publisher = Some("null".into());
    assert!(skipped(null));
    let mut custom = rank("tcp://*:5557", None, "");
    custom.publisher = Some("nats".into());
    assert!(skipped(custom));
    for ep in [
        "ipc:///tmp/kv",
        "inproc://cache",
        "tcp://*:0",
        "tcp://*",
        "udp://*:5557",
        "",
    ] {
        assert!(skipped(rank(ep, None, "")), "{ep}");
    }
    // Events on with vLLM's default publisher (`null` in the JSON means "zmq" then).
    let mut default = rank("tcp://*:5557", None, "");
    default.publisher = None;
    assert_eq!(one(default, "h"), follow(0, "tcp://h:5557", None, ""));
    // A replay endpoint the router cannot use: followed without replay.
    assert_eq!(
        one(rank("tcp://*:5557", Some("ipc:///tmp/r"), ""), "h"),
        follow(0, "tcp://h:5557", None, "")
    );
}

#[test]
fn missing_fields_take_vllms_defaults() {
    let s = parse(br#"{"0": {"enable_kv_cache_events": true}, "3": {}}"#).unwrap();
    assert_eq!(
        plan(&s, "h"),
        vec![
            follow(0, "tcp://h:5557", None, ""),
            RankPlan::Skip {
                rank: 3,
                reason: "KV-cache events are disabled".into()
            }
        ]
    );
}

/// `tests/fixtures/vllm-0.32.0/kv_event_sources.json` as recorded from real vLLM 0.32.0 on CPU
/// (branch `vllm`; pretty-printed by the recorder), for `--kv-events-config` with
/// `tcp://*:5600`, `tcp://*:5700` and an llm-d-style topic.
const RECORDED: &str = r#"{
 "0": {
  "enable_kv_cache_events": true,
  "publisher": "zmq",
  "endpoint": "tcp://*:5600",
  "replay_endpoint": "tcp://*:5700",
  "buffer_steps": 10000,
  "hwm": 100000,
  "max_queue_size": 100000,
  "topic": "kv@127.0.0.1:8100@tiny"
 }
}"#;

#[test]
fn the_recorded_vllm_answer_is_followed_at_the_engines_host() {
    let s = parse(RECORDED.as_bytes()).unwrap();
    assert_eq!(
        plan(&s, "127.0.0.1"),
        vec![follow(
            0,
            "tcp://127.0.0.1:5600",
            Some("tcp://127.0.0.1:5700"),
            "kv@127.0.0.1:8100@tiny"
        )]
    );
}
