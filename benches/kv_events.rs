//! KV-event ingestion: decode + apply of vLLM-format batches into the exact index, on one
//! core (the subscriber task's work per batch; the sockets are left out).
//!
//! The stream is a steady-state engine: each batch (one scheduler step) stores a run of 8
//! blocks of 16 tokens (bytes hashes, as vLLM's sha256 ones), chained from the previous run
//! of its conversation for 3 runs in 4, and removes the 8 blocks stored 512 batches earlier
//! (LRU evictions), so the view stays at ~4,000 blocks.
//!
//! `anchor/*`: a partial view's anchoring (see `switchyard::prefix::exact::anchor`): the
//! request path's note of a request sent to an engine, and the subscriber's search of a run
//! in a full ring (128 chats of 8,192 tokens, 1 Mi token ids), found in the oldest request or
//! in none.
//!
//! Run: `cargo bench --bench kv_events -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use switchyard::engines::kv_events::encode::{Encoding, encode_batch};
use switchyard::engines::kv_events::ingest::apply_batch;
use switchyard::engines::kv_events::wire::{
    BlockHash, BlockRemoved, BlockStored, EventBatch, KvEvent, decode_batch,
};

use switchyard::prefix::exact::anchor::{RECENT_REQUESTS, SentRequest, find_anchor};
use switchyard::prefix::exact::{ExactIndex, ViewState};

const BATCHES: usize = 4096;
const BLOCKS_PER_RUN: usize = 8;
const BS: usize = 16;
const EVICT_AFTER: usize = 512;

fn hash(batch: usize, block: usize) -> BlockHash {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(batch as u64).to_be_bytes());
    b[8..16].copy_from_slice(&(block as u64).to_be_bytes());
    b[16..].copy_from_slice(&0x5eed_u128.to_le_bytes());
    BlockHash::Bytes(b.to_vec())
}

fn stream() -> Vec<Vec<u8>> {
    (0..BATCHES)
        .map(|i| {
            let parent = (i % 4 != 0 && i > 0).then(|| hash(i - 1, BLOCKS_PER_RUN - 1));
            let mut events = vec![KvEvent::Stored(BlockStored {
                block_hashes: (0..BLOCKS_PER_RUN).map(|b| hash(i, b)).collect(),
                parent_block_hash: parent,
                token_ids: (0..(BLOCKS_PER_RUN * BS) as u32)
                    .map(|t| (t * 7919 + i as u32) % 128_256)
                    .collect(),
                block_size: BS,
                medium: Some("GPU".into()),
                ..BlockStored::default()
            })];
            if i >= EVICT_AFTER {
                events.push(KvEvent::Removed(BlockRemoved {
                    block_hashes: (0..BLOCKS_PER_RUN)
                        .map(|b| hash(i - EVICT_AFTER, b))
                        .collect(),
                    medium: Some("GPU".into()),
                    group_idx: None,
                }));
            }
            encode_batch(
                &EventBatch {
                    ts: 1.7e9 + i as f64,
                    events,
                    data_parallel_rank: Some(0),
                },
                Encoding::Map,
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let payloads = stream();
    let events: usize = payloads
        .iter()
        .map(|p| decode_batch(p).unwrap().events.len())
        .sum();
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    eprintln!(
        "kv events: {BATCHES} batches, {events} events, {} blocks stored, {} KiB of payload",
        BATCHES * BLOCKS_PER_RUN,
        bytes >> 10
    );
    let mut g = c.benchmark_group("kv_events");
    g.sample_size(20);
    g.throughput(Throughput::Elements(events as u64));
    g.bench_function("decode", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(decode_batch(black_box(p)).unwrap());
            }
        })
    });
    g.bench_function("decode_and_apply", |b| {
        b.iter(|| {
            let index = ExactIndex::new(256 << 20);
            index.add_engine(1);
            let mut keys = Vec::new();
            for p in &payloads {
                let batch = decode_batch(black_box(p)).unwrap();
                black_box(apply_batch(&index, 1, &batch, &mut keys));
            }
            assert!(index.blocks() > 0);
        })
    });
    g.finish();
}

/// A chat of 8,192 token ids: a shared 64-token opening, then ids unique to `i`.
fn chat_ids(i: u32) -> Arc<[u32]> {
    (0..8192u32)
        .map(|t| {
            if t < 64 {
                t
            } else {
                (t * 7919 + i * 131) % 128_256
            }
        })
        .collect()
}

fn bench_anchor(c: &mut Criterion) {
    let mut g = c.benchmark_group("anchor");
    let index = ExactIndex::new(256 << 20);
    index.add_engine(1);
    index.update(1, |v| v.set_state(ViewState::Partial));
    let ids = chat_ids(0);
    g.bench_function("note_sent", |b| {
        b.iter(|| index.note_sent(1, black_box(&ids), None))
    });
    let ring: Vec<SentRequest> = (0..RECENT_REQUESTS as u32)
        .map(|i| SentRequest {
            token_ids: chat_ids(i),
            lora_name: None,
        })
        .collect();
    // A 32-block run after the oldest chat's first 100 blocks.
    let oldest = &ring[RECENT_REQUESTS - 1].token_ids;
    let run = oldest[100 * BS..132 * BS].to_vec();
    g.bench_function("search_found", |b| {
        b.iter(|| assert!(find_anchor(black_box(&ring), &run, BS, None).is_some()))
    });
    let absent: Vec<u32> = run.iter().map(|t| t + 1).collect();
    g.bench_function("search_absent", |b| {
        b.iter(|| assert!(find_anchor(black_box(&ring), &absent, BS, None).is_none()))
    });
    g.finish();
}

criterion_group!(benches, bench, bench_anchor);
criterion_main!(benches);
