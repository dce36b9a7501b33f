//! The simulated engine's KV events per data-parallel rank, as a vLLM engine run with
//! `--data-parallel-size N` publishes them, and its `GET /kv_event_sources`.
//!
//! - **Publishers.** One [`KvPublisher`] per rank. As vLLM's `offset_endpoint_port`, rank `r`
//!   binds the configured port + `r` (port 0: each rank its own free port), and so does its
//!   replay socket. Each rank's batches carry its `data_parallel_rank`.
//! - **Which rank caches what.** The sim has one prefix cache; with several ranks each run of
//!   stored blocks goes to the rank its first block's engine hash picks ([`RankedEvents`]),
//!   with the blocks before it that this rank lacks (a shared chat-template prefix another
//!   rank computed): each rank's stream is the cache of a rank that served those prompts,
//!   whose parents it holds. An eviction is reported by every rank holding the block.
//! - **`/kv_event_sources`** ([`sources_json`]) answers exactly as vLLM 0.32's (its
//!   `KVEventsConfig` per rank, keyed by the rank as a string, in rank order, compact JSON):
//!   the endpoints as vLLM reports a configured `tcp://*:PORT` (the bound port, host `*`),
//!   `buffer_steps` 10,000, `hwm` and `max_queue_size` 100,000 (vLLM's defaults). Without KV
//!   events it answers `{}`, as vLLM does when no rank has a ZMQ publisher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::cache_events::{CacheEvents, StoredBlocks};
use super::kv_publisher::{BUFFER_STEPS, KvPublisher, PublishOptions, PublisherError};

/// vLLM's `hwm` and `max_queue_size` defaults.
const HWM: usize = 100_000;
const MAX_QUEUE_SIZE: usize = 100_000;

/// `endpoint` for data-parallel rank `rank`: the port offset by the rank (port 0 kept), as
/// vLLM's `ZmqEventPublisher.offset_endpoint_port`.
pub fn offset_endpoint_port(endpoint: &str, rank: u32) -> String {
    if rank == 0 {
        return endpoint.to_owned();
    }
    match endpoint.rsplit_once(':') {
        Some((base, port)) => match port.parse::<u32>() {
            Ok(0) | Err(_) => endpoint.to_owned(),
            Ok(p) => format!("{base}:{}", p + rank),
        },
        None => endpoint.to_owned(),
    }
}

/// Starts one publisher per rank (`opts`' rank is each one's).
pub async fn start_publishers(
    endpoint: &str,
    replay_endpoint: Option<&str>,
    opts: &PublishOptions,
    ranks: usize,
) -> Result<Vec<Arc<KvPublisher>>, PublisherError> {
    let mut out = Vec::with_capacity(ranks);
    for rank in 0..ranks as u32 {
        let ep = offset_endpoint_port(endpoint, rank);
        let replay = replay_endpoint.map(|r| offset_endpoint_port(r, rank));
        let opts = PublishOptions {
            rank,
            ..opts.clone()
        };
        out.push(Arc::new(
            KvPublisher::start_with(&ep, replay.as_deref(), &opts).await?,
        ));
    }
    Ok(out)
}

/// One rank's entry: vLLM's `KVEventsConfig`, its fields in its order.
#[derive(Serialize)]
struct RankSource<'a> {
    enable_kv_cache_events: bool,
    publisher: &'static str,
    endpoint: String,
    replay_endpoint: Option<String>,
    buffer_steps: usize,
    hwm: usize,
    max_queue_size: usize,
    topic: &'a str,
}

/// `tcp://*:PORT` for a bound `tcp://HOST:PORT`.
fn as_bound(bound: &str) -> String {
    match bound.rsplit_once(':') {
        Some((_, port)) => format!("tcp://*:{port}"),
        None => bound.to_owned(),
    }
}

/// The `/kv_event_sources` body for these ranks' publishers (`{}` for none).
pub fn sources_json(publishers: &[Arc<KvPublisher>]) -> Vec<u8> {
    let entries: Vec<String> = publishers
        .iter()
        .map(|p| {
            let source = RankSource {
                enable_kv_cache_events: true,
                publisher: "zmq",
                // A connecting PUB socket is reported as configured (vLLM's `_socket_setup`).
                endpoint: if p.options().connect {
                    p.endpoint().to_owned()
                } else {
                    as_bound(p.endpoint())
                },
                replay_endpoint: p.replay_endpoint().map(as_bound),
                buffer_steps: BUFFER_STEPS,
                hwm: HWM,
                max_queue_size: MAX_QUEUE_SIZE,
                topic: &p.options().topic,
            };
            let json = serde_json::to_string(&source).unwrap_or_default();
            format!("\"{}\":{json}", p.options().rank)
        })
        .collect();
    format!("{{{}}}", entries.join(",")).into_bytes()
}

/// The prefix cache's changes shared out to the ranks' publishers.
#[derive(Debug)]
pub struct RankedEvents {
    ranks: Vec<Arc<KvPublisher>>,
    blocks: Mutex<Blocks>,
}

/// The cached blocks: each one's parent and tokens, and which ranks hold it (a bit per rank).
#[derive(Debug, Default)]
struct Blocks {
    known: HashMap<u64, Block>,
}

#[derive(Debug)]
struct Block {
    parent: Option<u64>,
    tokens: Vec<u32>,
    ranks: Vec<bool>,
}

impl RankedEvents {
    pub fn new(ranks: Vec<Arc<KvPublisher>>) -> RankedEvents {
        RankedEvents {
            ranks,
            blocks: Mutex::new(Blocks::default()),
        }
    }

    fn blocks(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CacheEvents for RankedEvents {
    /// The run goes to the rank its first block's hash picks; the blocks before it that this
    /// rank does not hold yet (a prefix another rank computed) are stored there first, in the
    /// same event, as that rank would have computed them itself.
    fn stored(&self, blocks: StoredBlocks) {
        let n = self.ranks.len();
        let Some(&first) = blocks.block_hashes.first() else {
            return;
        };
        if n == 0 {
            return;
        }
        let rank = (first % n as u64) as usize;
        let event = {
            let mut b = self.blocks();
            // The ancestors this rank lacks, nearest first.
            let mut missing = Vec::new();
            let mut parent = blocks.parent;
            while let Some(p) = parent {
                match b.known.get(&p) {
                    Some(block) if !block.ranks[rank] => {
                        missing.push(p);
                        parent = block.parent;
                    }
                    _ => break,
                }
            }
            missing.reverse();
            let mut hashes = missing.clone();
            let mut tokens = Vec::new();
            for h in &missing {
                if let Some(block) = b.known.get_mut(h) {
                    block.ranks[rank] = true;
                    tokens.extend_from_slice(&block.tokens);
                }
            }
            let bs = blocks.block_size;
            let mut prev = blocks.parent;
            for (i, h) in blocks.block_hashes.iter().enumerate() {
                let chunk = blocks
                    .token_ids
                    .get(i * bs..(i + 1) * bs)
                    .unwrap_or_default();
                let block = b.known.entry(*h).or_insert_with(|| Block {
                    parent: prev,
                    tokens: chunk.to_vec(),
                    ranks: vec![false; n],
                });
                block.ranks[rank] = true;
                prev = Some(*h);
            }
            hashes.extend_from_slice(&blocks.block_hashes);
            tokens.extend_from_slice(&blocks.token_ids);
            StoredBlocks {
                parent,
                block_hashes: hashes,
                token_ids: tokens,
                ..blocks
            }
        };
        self.ranks[rank].stored(event);
    }

    fn removed(&self, block_hashes: &[u64]) {
        let mut per_rank: Vec<Vec<u64>> = vec![Vec::new(); self.ranks.len()];
        {
            let mut b = self.blocks();
            for h in block_hashes {
                if let Some(block) = b.known.remove(h) {
                    for (r, held) in block.ranks.iter().enumerate() {
                        if *held {
                            per_rank[r].push(*h);
                        }
                    }
                }
            }
        }
        for (r, hashes) in per_rank.iter().enumerate() {
            if !hashes.is_empty() {
                self.ranks[r].removed(hashes);
            }
        }
    }

    fn cleared(&self) {
        self.blocks().known.clear();
        for p in &self.ranks {
            p.cleared();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_offset_by_rank_as_vllm_does() {
        assert_eq!(offset_endpoint_port("tcp://*:5557", 0), "tcp://*:5557");
        assert_eq!(offset_endpoint_port("tcp://*:5557", 2), "tcp://*:5559");
        assert_eq!(
            offset_endpoint_port("tcp://127.0.0.1:0", 3),
            "tcp://127.0.0.1:0"
        );
        assert_eq!(
            offset_endpoint_port("tcp://[::1]:6000", 1),
            "tcp://[::1]:6001"
        );
    }

    #[tokio::test]
    async fn sources_are_shaped_as_vllm_0_32s() {
        assert_eq!(sources_json(&[]), b"{}");
        let opts = PublishOptions {
            topic: "kv".into(),
            ..PublishOptions::default()
        };
        let ps = start_publishers("tcp://127.0.0.1:0", Some("tcp://127.0.0.1:0"), &opts, 2)
            .await
            .unwrap();
        let body = String::from_utf8(sources_json(&ps)).unwrap();
        let port = |ep: &str| ep.rsplit_once(':').unwrap().1.to_owned();
        let expected = format!(
            concat!(
                r#"{{"0":{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{}","replay_endpoint":"tcp://*:{}","buffer_steps":10000,"hwm":100000,"max_queue_size":100000,"topic":"kv"}},"#,
                r#""1":{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{}","replay_endpoint":"tcp://*:{}","buffer_steps":10000,"hwm":100000,"max_queue_size":100000,"topic":"kv"}}}}"#
            ),
            port(ps[0].endpoint()),
            port(ps[0].replay_endpoint().unwrap()),
            port(ps[1].endpoint()),
            port(ps[1].replay_endpoint().unwrap()),
        );
        assert_eq!(body, expected);
        // The fields, in order, of what real vLLM 0.32.0 answered (recorded fixture, branch
        // `vllm`: tests/fixtures/vllm-0.32.0/kv_event_sources.json).
        let recorded = [
            "enable_kv_cache_events",
            "publisher",
            "endpoint",
            "replay_endpoint",
            "buffer_steps",
            "hwm",
            "max_queue_size",
            "topic",
        ];
        let ours: Vec<String> = body
            .split(['{', ','])
            .filter_map(|f| {
                f.split_once("\":")
                    .map(|(k, _)| k.trim_matches('"').to_owned())
            })
            .filter(|k| !k.chars().all(|c| c.is_ascii_digit()))
            .take(recorded.len())
            .collect();
        assert_eq!(ours, recorded);
        assert_ne!(ps[0].endpoint(), ps[1].endpoint());
        assert_eq!((ps[0].options().rank, ps[1].options().rank), (0, 1));
    }
}
