//! KV-event subscribers end to end over real ZMQ sockets on 127.0.0.1: the simulated engine's
//! publisher (vLLM's frames, encoding and replay protocol) → the subscriber → the exact index.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{SAFETY, eventually};
use switchyard::engines::kv_events::{KvEndpoints, KvSubscribers, SubscriberOptions};
use switchyard::prefix::exact::{ExactIndex, ViewState};
use switchyard::sim::cache_events::{CacheEvents, StoredBlocks};
use switchyard::sim::kv_publisher::KvPublisher;

const BS: usize = 16;
const ENGINE: u32 = 7;

fn tokens(blocks: usize, salt: u32) -> Vec<u32> {
    (0..(blocks * BS) as u32).map(|i| i * 31 + salt).collect()
}

fn stored(parent: Option<u64>, hashes: &[u64], ids: &[u32]) -> StoredBlocks {
    StoredBlocks {
        parent,
        block_hashes: hashes.to_vec(),
        token_ids: ids.to_vec(),
        block_size: BS,
        lora_name: None,
    }
}

async fn publisher(replay: bool) -> KvPublisher {
    KvPublisher::start("tcp://127.0.0.1:0", replay.then_some("tcp://127.0.0.1:0"))
        .await
        .expect("publisher binds")
}

fn endpoints(p: &KvPublisher) -> KvEndpoints {
    KvEndpoints {
        events: p.endpoint().to_owned(),
        replay: p.replay_endpoint().map(str::to_owned),
    }
}

fn subscribe(p: &KvPublisher, opts: SubscriberOptions) -> (Arc<ExactIndex>, KvSubscribers) {
    let index = Arc::new(ExactIndex::new(64 << 20));
    let subs = KvSubscribers::new(Arc::clone(&index), opts);
    subs.start(ENGINE, "engine-under-test", endpoints(p));
    (index, subs)
}

/// Publishes harmless batches (a removal of a block nobody holds) until the view is live: the
/// first batches may go out before the subscription reaches the publisher.
async fn until_live(p: &KvPublisher, index: &ExactIndex) {
    let deadline = tokio::time::Instant::now() + SAFETY;
    while !index.is_live(ENGINE) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the view never became live"
        );
        p.removed(&[u64::MAX]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn held(index: &ExactIndex, ids: &[u32]) -> Option<usize> {
    index.match_tokens(ids, None, &[ENGINE])[0]
}

#[tokio::test]
async fn stored_blocks_become_visible_and_removed_ones_go() {
    let p = publisher(true).await;
    let (index, _subs) = subscribe(&p, SubscriberOptions::default());
    until_live(&p, &index).await;
    let ids = tokens(3, 1);
    p.stored(stored(None, &[11, 12], &ids[..2 * BS]));
    p.stored(stored(Some(12), &[13], &ids[2 * BS..]));
    eventually("three blocks held", || held(&index, &ids) == Some(3 * BS)).await;
    // A prompt that extends the cached one matches the cached part.
    let mut longer = ids.clone();
    longer.extend(tokens(2, 99));
    assert_eq!(held(&index, &longer), Some(3 * BS));
    p.removed(&[12]);
    eventually("the match stops at the removed block", || {
        held(&index, &ids) == Some(BS)
    })
    .await;
    p.cleared();
    eventually("all cleared", || held(&index, &ids) == Some(0)).await;
    assert!(index.is_live(ENGINE));
}

#[tokio::test]
async fn a_sequence_gap_is_recovered_from_the_replay_socket() {
    let p = publisher(true).await;
    let (index, _subs) = subscribe(&p, SubscriberOptions::default());
    until_live(&p, &index).await;
    let ids = tokens(2, 2);
    // The batch storing block 1 is lost on the PUB socket (kept in the replay buffer); block 2
    // is chained from it, so it can only be keyed if the lost batch is replayed.
    p.lose_next_batches(1);
    p.stored(stored(None, &[21], &ids[..BS]));
    p.end_batch();
    p.stored(stored(Some(21), &[22], &ids[BS..]));
    eventually("both blocks held after the replay", || {
        held(&index, &ids) == Some(2 * BS)
    })
    .await;
    assert!(index.is_live(ENGINE), "a replayed gap keeps the view live");
}

#[tokio::test]
async fn a_gap_without_replay_drops_the_view_which_is_used_partial_until_complete() {
    let p = publisher(false).await;
    let opts = SubscriberOptions {
        rebuild_after_batches: 5,
        ..SubscriberOptions::default()
    };
    let (index, _subs) = subscribe(&p, opts);
    until_live(&p, &index).await;
    // Complete from an AllBlocksCleared, whatever batches the subscription missed.
    p.cleared();
    eventually("complete at the clear", || {
        index.state(ENGINE) == ViewState::Complete
    })
    .await;
    let ids = tokens(1, 3);
    p.stored(stored(None, &[31], &ids));
    eventually("block held", || held(&index, &ids) == Some(BS)).await;
    p.lose_next_batches(1);
    p.removed(&[31]);
    p.end_batch();
    p.removed(&[u64::MAX]);
    eventually("the view is dropped at the gap and followed anew", || {
        index.state(ENGINE) == ViewState::Partial
    })
    .await;
    assert_eq!(
        held(&index, &ids),
        Some(0),
        "the dropped view starts empty, and is used at once"
    );
    let again = tokens(1, 4);
    p.stored(stored(None, &[32], &again));
    eventually("new blocks are followed", || {
        held(&index, &again) == Some(BS)
    })
    .await;
    // Complete after following the stream in sequence for 5 batches (capacity unknown).
    let deadline = tokio::time::Instant::now() + SAFETY;
    while index.state(ENGINE) != ViewState::Complete {
        assert!(tokio::time::Instant::now() < deadline, "never complete");
        p.removed(&[u64::MAX]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held(&index, &again), Some(BS));
}

#[tokio::test]
async fn a_restarted_publisher_is_followed_again_from_scratch() {
    let p = publisher(true).await;
    let (index, _subs) = subscribe(&p, SubscriberOptions::default());
    until_live(&p, &index).await;
    let old = tokens(1, 5);
    p.stored(stored(None, &[41], &old));
    eventually("block held", || held(&index, &old) == Some(BS)).await;
    let (events, replay) = (
        p.endpoint().to_owned(),
        p.replay_endpoint().map(str::to_owned),
    );
    drop(p);
    eventually("not live once the publisher is gone", || {
        !index.is_live(ENGINE)
    })
    .await;
    // The engine restarts on the same ports, its sequence from 0 and its cache empty.
    let p = KvPublisher::start(&events, replay.as_deref())
        .await
        .expect("rebinds its ports");
    until_live(&p, &index).await;
    assert_eq!(
        held(&index, &old),
        Some(0),
        "blocks of the engine's previous life are gone"
    );
    let new = tokens(1, 6);
    p.stored(stored(None, &[42], &new));
    eventually("the new engine's blocks are held", || {
        held(&index, &new) == Some(BS)
    })
    .await;
}

#[tokio::test]
async fn stopping_a_subscriber_drops_its_view() {
    let p = publisher(true).await;
    let (index, subs) = subscribe(&p, SubscriberOptions::default());
    until_live(&p, &index).await;
    assert_eq!(subs.engines(), vec![ENGINE]);
    subs.stop(ENGINE);
    assert!(!index.is_live(ENGINE));
    assert_eq!(held(&index, &tokens(1, 0)), None);
    assert!(subs.engines().is_empty());
}

/// The value of the first `/metrics` sample named `name` whose labels include `label`.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn the_router_follows_its_static_engines_and_counts_malformed_messages() {
    let sims = common::start_sims(
        2,
        switchyard::sim::SimConfig {
            kv_events_endpoint: Some("tcp://127.0.0.1:0".into()),
            kv_events_replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            ..common::instant_sim()
        },
    )
    .await;
    let p = sims[0].kv_events().expect("the sim publishes KV events");
    // Engine 0 has KV events, engine 1 none (an empty entry).
    let endpoints = vec![Some(endpoints(p)), None];
    let router = common::start_router(&common::urls(&sims), |cfg| {
        cfg.kv_events.static_endpoints = endpoints;
    })
    .await;
    let exact = Arc::clone(&router.state.exact);
    let ids = router
        .state
        .registry
        .all()
        .iter()
        .map(|e| e.id)
        .collect::<Vec<_>>();
    let deadline = tokio::time::Instant::now() + SAFETY;
    while !exact.is_live(ids[0]) {
        assert!(tokio::time::Instant::now() < deadline, "never live");
        p.removed(&[u64::MAX]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Messages that are not [topic, seq, payload] are counted and skipped.
    p.send_raw(vec![bytes::Bytes::from_static(b"only one frame")]);
    p.send_raw(vec![
        bytes::Bytes::new(),
        bytes::Bytes::from_static(b"seq"),
        bytes::Bytes::from_static(b"payload"),
    ]);
    // A numbered batch that is not a KVEventBatch: counted, skipped, and no gap.
    p.send_payload(bytes::Bytes::from_static(b"\xc1 not msgpack"));
    let t = tokens(2, 8);
    p.stored(stored(None, &[81, 82], &t));
    eventually("the stream goes on past them", || {
        exact.match_tokens(&t, None, &ids) == vec![Some(2 * BS), None]
    })
    .await;
    let engine = format!("engine=\"{}\"", sims[0].addr());
    let c = common::client();
    let m = String::from_utf8_lossy(&common::get(&c, &router.url(), "/metrics").await.body)
        .into_owned();
    assert_eq!(
        sample(&m, "switchyard_kv_events_malformed_total", &engine),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "switchyard_kv_events_gaps_total", &engine),
        Some(0.0)
    );
    assert_eq!(sample(&m, "switchyard_kv_events_live", &engine), Some(1.0));
    assert!(sample(&m, "switchyard_kv_events_batches_total", &engine).unwrap() >= 2.0);
    assert!(
        sample(
            &m,
            "switchyard_kv_events_events_total",
            "type=\"BlockStored\""
        )
        .unwrap()
            >= 1.0
    );
    assert!(sample(&m, "switchyard_kv_events_index_blocks", "").unwrap() >= 2.0);
    router.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn switchyard_sim_flags_start_the_publisher() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: switchyard::sim::SimArgs,
    }
    assert!(
        Cli::try_parse_from(["sim", "--kv-events-replay-endpoint", "tcp://127.0.0.1:0"]).is_err(),
        "a replay endpoint needs an events endpoint"
    );
    let cli = Cli::try_parse_from([
        "sim",
        "--kv-events-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-replay-endpoint",
        "tcp://127.0.0.1:0",
    ])
    .unwrap();
    let cfg = cli.sim.to_config();
    assert_eq!(cfg.kv_events_endpoint.as_deref(), Some("tcp://127.0.0.1:0"));
    let sim = switchyard::sim::start(cfg, common::loopback())
        .await
        .unwrap();
    let p = sim.kv_events().expect("publisher started");
    assert!(p.endpoint().starts_with("tcp://127.0.0.1:") && !p.endpoint().ends_with(":0"));
    // The replay socket answers an empty buffer with the end-of-sequence marker alone.
    let replayed = switchyard::engines::kv_events::replay::fetch_replay(
        p.replay_endpoint().unwrap(),
        0,
        SAFETY,
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(replayed.is_empty());
    sim.shutdown().await;
    assert!(
        switchyard::sim::start(
            switchyard::sim::SimConfig {
                kv_events_endpoint: Some("udp://nowhere".into()),
                ..common::instant_sim()
            },
            common::loopback()
        )
        .await
        .is_err()
    );
}

/// An engine that stored blocks before the router subscribed, and then went idle: the
/// subscriber catches up from the replay socket as soon as it connects, without waiting for a
/// batch the engine may never send.
#[tokio::test]
async fn a_subscriber_joining_an_idle_engine_catches_up_from_the_replay_socket() {
    let p = publisher(true).await;
    let ids = tokens(2, 5);
    p.stored(stored(None, &[21, 22], &ids));
    // Nobody is subscribed: the live copy is lost, only the replay buffer holds the batch.
    let replay = p.replay_endpoint().expect("replay socket").to_owned();
    let deadline = tokio::time::Instant::now() + SAFETY;
    loop {
        let buffered = switchyard::engines::kv_events::replay::fetch_replay(
            &replay,
            0,
            SAFETY,
            &Default::default(),
        )
        .await
        .is_ok_and(|b| b.len() == 1);
        if buffered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch never reached the replay buffer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (index, _subs) = subscribe(&p, SubscriberOptions::default());
    eventually("the idle engine's view is live with its blocks", || {
        index.is_live(ENGINE) && held(&index, &ids) == Some(2 * BS)
    })
    .await;
    assert_eq!(
        index.state(ENGINE),
        ViewState::Complete,
        "the replay reached back to the engine's first batch"
    );
}
