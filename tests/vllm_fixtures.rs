//! Bytes recorded from a real vLLM 0.32.0 engine (CPU, `examples/real_vllm/record_fixtures.py`;
//! see `tests/fixtures/vllm-0.32.0/README.md`): the KV-event decoder on every live batch, the
//! exact index fed with them against the prompts that were sent (and vLLM's own prefix-cache
//! counters), the metrics reader on the real `/metrics` page, and the model tokenizer against
//! vLLM's `/tokenize` under two chat templates.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use switchyard::engines::kv_events::ingest::apply_batch;
use switchyard::engines::kv_events::wire::{BlockHash, KvEvent, decode_batch, split_frames};
use switchyard::engines::stats::parse_vllm_metrics;
use switchyard::prefix::exact::ExactIndex;
use switchyard::tokens::Tokenizer;

const TOPIC: &[u8] = b"kv@127.0.0.1:8100@tiny";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm-0.32.0")
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// One published message: its frames and the phase of the recording it arrived in.
struct Message {
    frames: Vec<Vec<u8>>,
    note: String,
}

/// A request the recorder sent, with vLLM's token ids for its prompt.
struct Sent {
    phase: String,
    path: String,
    body: Value,
    prompt: Vec<u32>,
}

struct Live {
    block_size: usize,
    messages: Vec<Message>,
    requests: Vec<Sent>,
}

fn live() -> Live {
    let v = json("live_batches.json");
    assert_eq!(v["vllm_version"], "0.32.0");
    let messages = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            frames: m["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| unhex(f.as_str().unwrap()))
                .collect(),
            note: m["note"].as_str().unwrap().to_owned(),
        })
        .collect();
    let requests = v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Sent {
            phase: r["phase"].as_str().unwrap().to_owned(),
            path: r["path"].as_str().unwrap().to_owned(),
            body: r["body"].clone(),
            prompt: ids(&r["prompt_token_ids"]),
        })
        .collect();
    Live {
        block_size: usize::try_from(v["block_size"].as_u64().unwrap()).unwrap(),
        messages,
        requests,
    }
}

#[test]
fn every_live_batch_from_vllm_decodes_with_its_events() {
    let live = live();
    assert_eq!(live.block_size, 32);
    assert!(
        live.messages.len() >= 30,
        "{} messages",
        live.messages.len()
    );
    let (mut stored, mut removed, mut cleared) = (0usize, 0usize, 0usize);
    let mut first_removal_note = None;
    for (i, m) in live.messages.iter().enumerate() {
        let f = split_frames(&m.frames).unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(f.topic, TOPIC, "message {i}: the configured topic");
        assert_eq!(f.seq, i as u64, "sequence numbers from 0, without gaps");
        // vLLM 0.32 sends an array-like batch `[ts, events, data_parallel_rank]`...
        assert_eq!(f.payload[0], 0x93, "message {i}: a 3-element msgpack array");
        let batch = decode_batch(f.payload).unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(batch.data_parallel_rank, Some(0), "message {i}");
        assert!(
            batch.ts > 1.7e9,
            "message {i}: ts in seconds since the epoch"
        );
        assert!(!batch.events.is_empty(), "message {i}: no empty batches");
        for e in &batch.events {
            match e {
                KvEvent::Stored(s) => {
                    stored += 1;
                    assert_eq!(s.block_size, 32);
                    assert!(!s.block_hashes.is_empty());
                    assert_eq!(s.token_ids.len(), s.block_hashes.len() * s.block_size);
                    assert!(
                        s.block_hashes
                            .iter()
                            .chain(&s.parent_block_hash)
                            .all(|h| matches!(h, BlockHash::Int(_))),
                        "vLLM 0.32 publishes int hashes"
                    );
                    assert_eq!(s.medium.as_deref(), Some("GPU"), "CPU KV cache is `GPU`");
                    assert_eq!(s.group_idx, Some(0));
                    assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
                    assert_eq!((s.lora_id, s.lora_name.as_deref()), (None, None));
                    let keys = s.extra_keys.as_ref().expect("extra_keys sent");
                    assert_eq!(keys.len(), s.block_hashes.len());
                    assert!(keys.iter().all(Option::is_none));
                }
                KvEvent::Removed(r) => {
                    removed += 1;
                    first_removal_note.get_or_insert(m.note.as_str());
                    assert_eq!(r.block_hashes.len(), 1, "vLLM removes one block per event");
                    assert_eq!(r.medium.as_deref(), Some("GPU"));
                    assert_eq!(r.group_idx, Some(0));
                }
                KvEvent::Cleared => {
                    cleared += 1;
                    // The reset is published with the engine's next step, first in its batch.
                    assert_eq!(m.note, "after the reset");
                    assert!(matches!(batch.events[0], KvEvent::Cleared));
                }
                KvEvent::Unknown(tag) => panic!("message {i}: unknown event {tag}"),
            }
        }
    }
    assert!(stored >= 30, "{stored} BlockStored");
    assert!(removed >= 50, "{removed} BlockRemoved");
    assert_eq!(cleared, 1, "one AllBlocksCleared");
    let note = first_removal_note.unwrap();
    assert!(
        note.starts_with("eviction"),
        "blocks are only removed once the small cache is full: {note}"
    );
}

/// Tokens of `prompt` that vLLM can take from its cache when `held` leading tokens are
/// cached: whole blocks, and never the prompt's last token (vLLM computes at least one).
fn vllm_hit(held: usize, prompt_len: usize, block_size: usize) -> usize {
    held.min((prompt_len - 1) / block_size * block_size)
}

#[test]
fn the_batches_applied_in_order_give_a_view_of_exactly_what_was_sent() {
    let live = live();
    let bs = live.block_size;
    let index = ExactIndex::new(64 << 20);
    index.add_engine(0);
    index.update(0, |v| v.set_live(true)).unwrap();
    let held = |prompt: &[u32]| index.match_tokens(prompt, None, &[0])[0].unwrap();
    let full = |prompt: &[u32]| prompt.len() / bs * bs;

    // Phases in the order they were recorded; the reset's batch is published with the next
    // request's step, so it belongs to that request's phase.
    let rank: HashMap<&str, usize> = live
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.phase.as_str(), i))
        .collect();
    let rank_of = |note: &str| match note {
        "reset_prefix_cache" => rank["after the reset"],
        n => *rank.get(n).unwrap_or_else(|| panic!("unknown phase {n}")),
    };
    let (mut next, mut keys) = (0, Vec::new());
    let mut hits_before_sending = 0;
    let mut removed_known = 0;
    for (i, r) in live.requests.iter().enumerate() {
        // What vLLM could reuse for this prompt, by the view, before the request ran.
        hits_before_sending += vllm_hit(held(&r.prompt), r.prompt.len(), bs);
        while next < live.messages.len() && rank_of(&live.messages[next].note) <= i {
            let f = split_frames(&live.messages[next].frames).unwrap();
            let batch = decode_batch(f.payload).unwrap();
            let a = apply_batch(&index, 0, &batch, &mut keys).unwrap();
            assert_eq!(
                (a.unanchored_blocks, a.unknown_removals, a.bad_events),
                (0, 0, 0),
                "message {next}: every parent and every removed block known to the view"
            );
            removed_known += a.removed;
            next += 1;
        }
        assert_eq!(
            held(&r.prompt),
            full(&r.prompt),
            "{}: the prompt's whole blocks are in the view once it ran",
            r.phase
        );
    }
    assert_eq!(
        next,
        live.messages.len(),
        "every message belongs to a phase"
    );
    assert!(removed_known > 0);

    let by_phase = |p: &str| &live.requests[rank[p]].prompt;
    let shared = [
        by_phase("shared prefix: first"),
        by_phase("shared prefix: second"),
        by_phase("shared prefix: third"),
    ];
    assert!(
        shared[0][..4 * bs] == shared[1][..4 * bs] && shared[0][..4 * bs] == shared[2][..4 * bs],
        "the shared prefix is four whole blocks in vLLM's ids"
    );
    let turns = [
        by_phase("chat turn 1"),
        by_phase("chat turn 2"),
        by_phase("chat turn 3"),
    ];
    for w in turns.windows(2) {
        assert!(
            w[1].starts_with(w[0]),
            "ChatML: each turn's ids extend the last"
        );
    }

    // The end state: the reset dropped everything, then one prompt was stored again.
    let after = by_phase("after the reset");
    assert_eq!(held(after), full(after));
    for r in &live.requests {
        if r.phase.starts_with("eviction") || r.phase.starts_with("chat") {
            assert_eq!(held(&r.prompt), 0, "{}: cleared by the reset", r.phase);
        }
    }
    let last = split_frames(&live.messages.last().unwrap().frames).unwrap();
    let stored_since_reset: usize = decode_batch(last.payload)
        .unwrap()
        .events
        .iter()
        .map(|e| match e {
            KvEvent::Stored(s) => s.block_hashes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(
        index.blocks(),
        stored_since_reset,
        "only the blocks stored since the reset are held"
    );

    // vLLM's own counters agree with the view: every token it reused was in the view.
    let metrics = std::fs::read_to_string(dir().join("metrics.txt")).unwrap();
    let f = parse_vllm_metrics(&metrics).unwrap();
    let queries: usize = live.requests.iter().map(|r| r.prompt.len()).sum();
    assert_eq!(
        f.prefix_queries as usize, queries,
        "vLLM counted every prompt token"
    );
    assert_eq!(
        f.prefix_hits as usize, hits_before_sending,
        "vLLM's prefix-cache hits are what the view held before each request"
    );
}

/// The value of the one sample named `name` on the page, read by prometheus-parse (which
/// only takes `\w+` names, so the colon is mapped first).
fn independent_sample(page: &str, name: &str) -> f64 {
    let mapped = page.replace("vllm:", "vllm_");
    let scrape = prometheus_parse::Scrape::parse(mapped.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let name = name.replace("vllm:", "vllm_");
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name}: one label set on a one-engine page");
    found[0]
}

#[test]
fn the_metrics_reader_reads_vllm_s_real_page() {
    let page = std::fs::read_to_string(dir().join("metrics.txt")).unwrap();
    let f = parse_vllm_metrics(&page).unwrap();
    assert_eq!(
        f.running,
        independent_sample(&page, "vllm:num_requests_running")
    );
    assert_eq!(
        f.waiting,
        independent_sample(&page, "vllm:num_requests_waiting")
    );
    assert_eq!(
        f.kv_usage,
        independent_sample(&page, "vllm:kv_cache_usage_perc")
    );
    assert_eq!(
        f.prefix_queries,
        independent_sample(&page, "vllm:prefix_cache_queries_total")
    );
    assert_eq!(
        f.prefix_hits,
        independent_sample(&page, "vllm:prefix_cache_hits_total")
    );
    // The recording ended idle, after the reset and one more request.
    assert_eq!((f.running, f.waiting), (0.0, 0.0));
    assert!(f.prefix_hits > 0.0 && f.prefix_hits < f.prefix_queries);
    // The page names the cache it was recorded with (what capacity readers use).
    assert!(page.contains(r#"num_gpu_blocks="64""#));
    assert!(page.contains(r#"block_size="32""#));
}

/// The converted tekken tokenizer (gzipped in the fixtures) with one template's files, in a
/// model directory of its own.
fn tokenizer(tmp: &Path, template: &str) -> Tokenizer {
    let src = dir().join("tokenizer");
    let model = tmp.join(template);
    if !model.join("tokenizer.json").is_file() {
        std::fs::create_dir_all(&model).unwrap();
        let gz = std::fs::File::open(src.join("tokenizer.json.gz")).unwrap();
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut json)
            .unwrap();
        std::fs::write(model.join("tokenizer.json"), json).unwrap();
        for f in ["tokenizer_config.json", "chat_template.jinja"] {
            std::fs::copy(src.join(template).join(f), model.join(f)).unwrap();
        }
    }
    Tokenizer::load(&model).unwrap()
}

#[test]
fn the_tokenizer_gives_vllm_s_ids_for_chats_under_both_templates_and_for_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let toks: HashMap<&str, Tokenizer> = ["chatml", "mistral"]
        .into_iter()
        .map(|t| (t, tokenizer(tmp.path(), t)))
        .collect();
    let v = json("chat_token_ids.json");
    assert_eq!(v["vllm_version"], "0.32.0");
    let mut checked: HashMap<&str, usize> = HashMap::new();
    for case in v["cases"].as_array().unwrap() {
        let label = case["label"].as_str().unwrap();
        let template = case["template"].as_str().unwrap_or("chatml");
        let path = case["path"].as_str().unwrap();
        let body = serde_json::to_vec(&case["body"]).unwrap();
        let got = toks[template]
            .request_token_ids(path, &body)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(got, ids(&case["token_ids"]), "{label}");
        *checked
            .entry(if path.ends_with("/chat/completions") {
                template
            } else {
                "completion"
            })
            .or_default() += 1;
    }
    assert!(checked["chatml"] >= 8 && checked["mistral"] >= 8 && checked["completion"] >= 8);

    // The requests of the live recording, as vLLM tokenized them (the engine's ChatML model).
    for r in live().requests {
        let body = serde_json::to_vec(&r.body).unwrap();
        assert_eq!(
            toks["chatml"].request_token_ids(&r.path, &body).unwrap(),
            r.prompt,
            "{}",
            r.phase
        );
    }
}

#[test]
fn the_mistral_template_moves_the_system_prompt_so_history_is_no_prefix() {
    // The property the two templates were chosen for, in vLLM's own ids.
    let v = json("chat_token_ids.json");
    let case = |label: &str| {
        let c = v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["label"] == label)
            .unwrap_or_else(|| panic!("{label}"));
        ids(&c["token_ids"])
    };
    for (template, is_prefix) in [("chatml", true), ("mistral", false)] {
        let first = case(&format!(
            "{template}: conversation 1, add_generation_prompt=True"
        ));
        let later = case(&format!(
            "{template}: conversation 2, add_generation_prompt=True"
        ));
        assert_eq!(later.starts_with(&first), is_prefix, "{template}");
    }
}

#[test]
fn kv_event_sources_names_the_sockets_the_engine_was_given() {
    let v = json("kv_event_sources.json");
    let rank0 = &v["0"];
    assert_eq!(rank0["enable_kv_cache_events"], true);
    assert_eq!(rank0["publisher"], "zmq");
    assert_eq!(rank0["endpoint"], "tcp://*:5600");
    assert_eq!(rank0["replay_endpoint"], "tcp://*:5700");
    assert_eq!(rank0["topic"].as_str().unwrap().as_bytes(), TOPIC);
    assert_eq!(v.as_object().unwrap().len(), 1, "one data-parallel rank");
    let models = json("models.json");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 2016);
}
