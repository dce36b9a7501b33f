//! vLLM V1's scheduling under KV-memory pressure, one step at a time (no clock).

use super::*;
use crate::sim::delivery::ReqShared;
use crate::sim::profile::{StepCost, step_ms};
use crate::sim::{Profile, SimConfig};

/// An engine of `blocks` blocks of 2 tokens.
fn engine(blocks: usize, max_num_seqs: usize, budget: usize) -> EngineState {
    EngineState::new(BlockPool::new(blocks, 2, None), 2, max_num_seqs, budget)
}

/// Queues request `id`: `prompt` tokens whose full blocks hash to `hashes`.
fn add(s: &mut EngineState, id: u64, prompt: usize, hashes: &[u64], max_tokens: usize) {
    let r = Req::new(
        Arc::new(ReqShared::new(0.0)),
        vec![id as u32; prompt],
        hashes.to_vec(),
        max_tokens,
    );
    s.add(id, r);
}

/// A step's work: (request id, tokens computed).
type Work = Vec<(u64, usize)>;
/// A step's outcomes: (tokens generated so far, finished) per request with a new token.
type Generated = Vec<(usize, bool)>;

/// Runs one step; returns its work and what it generated.
fn step(s: &mut EngineState) -> (Work, Generated) {
    let st = s.schedule();
    let out = s.finish(&st);
    (
        st.work,
        out.iter().map(|o| (o.generated, o.finished)).collect(),
    )
}

#[test]
fn admission_waits_while_the_blocks_do_not_fit() {
    let mut s = engine(10, 8, 100);
    add(&mut s, 1, 12, &[], 5); // 6 blocks
    add(&mut s, 2, 10, &[], 1); // 5 blocks: 4 left
    let (work, _) = step(&mut s);
    assert_eq!(work, vec![(1, 12)]);
    assert_eq!((s.running(), s.waiting()), (1, 1));
    assert_eq!(s.pool.usage(), 0.6, "kv_cache_usage_perc = 6 of 10 blocks");
    // It stays waiting until request 1 finishes and frees its blocks.
    let mut steps = 1;
    while s.waiting() > 0 {
        step(&mut s);
        steps += 1;
    }
    assert_eq!(
        steps, 6,
        "request 1 prefills and decodes 4 tokens, then request 2 is admitted"
    );
    assert!(s.is_idle() || s.running() == 1);
}

#[test]
fn a_decode_without_a_free_block_preempts_the_newest_request_which_recomputes() {
    // 4 blocks of 2: two 4-token prompts fill them; the first decode needs a fifth.
    let mut s = engine(4, 8, 100);
    add(&mut s, 1, 4, &[], 3);
    add(&mut s, 2, 4, &[], 3);
    let (work, out) = step(&mut s);
    assert_eq!(work, vec![(1, 4), (2, 4)]);
    assert_eq!(
        out,
        vec![(1, false), (1, false)],
        "both sample their first token"
    );
    assert_eq!(s.pool.usage(), 1.0);
    // Request 1 decodes; it needs a block: the newest (2) is preempted, back to the front.
    let (work, _) = step(&mut s);
    assert_eq!(work, vec![(1, 1)]);
    assert_eq!(s.counts.preemptions, 1);
    assert_eq!((s.running(), s.waiting()), (1, 1));
    // Request 1 finishes; request 2 recomputes its prompt and its generated token, then
    // generates exactly its two remaining tokens.
    let mut tokens_of_2 = 1;
    let mut recomputed = None;
    while !s.is_idle() {
        let (work, out) = step(&mut s);
        if let Some(&(_, n)) = work.iter().find(|(id, n)| *id == 2 && *n > 1) {
            recomputed = Some(n);
        }
        if work.iter().any(|(id, _)| *id == 2) {
            tokens_of_2 += out.len();
        }
    }
    assert_eq!(recomputed, Some(5), "prompt 4 + 1 generated token");
    assert_eq!(tokens_of_2, 3, "exactly max_tokens, none twice");
    assert_eq!(s.counts.preemptions, 1);
    assert_eq!(s.pool.used_blocks(), 0);
}

#[test]
fn a_preempted_requests_second_lookup_is_no_prefix_cache_query() {
    // As above, with request 2's blocks hashed: its recompute may find them cached, but, as
    // vLLM 0.32 counts it (`preempted_queries`), that lookup is not in the prefix-cache figures.
    let mut s = engine(4, 8, 100);
    add(&mut s, 1, 4, &[], 3);
    add(&mut s, 2, 4, &[21, 22], 3);
    while !s.is_idle() {
        step(&mut s);
    }
    assert_eq!(s.counts.preemptions, 1);
    assert_eq!((s.counts.prefix_queries, s.counts.prefix_hits), (8, 0));
    assert_eq!(s.counts.prompt_tokens, 8);
}

#[test]
fn a_running_prefix_is_shared_counted_once_and_hit() {
    let mut s = engine(100, 8, 100);
    add(&mut s, 1, 8, &[11, 12, 13, 14], 10);
    step(&mut s);
    // The same 8-token prompt: 3 of its 4 blocks are hit (the last token is recomputed).
    add(&mut s, 2, 8, &[11, 12, 13, 14], 10);
    let (work, _) = step(&mut s);
    assert_eq!(work, vec![(1, 1), (2, 2)]);
    assert_eq!(s.counts.prefix_hits, 6);
    assert_eq!(s.counts.prefix_queries, 16);
    // Request 1: 4 prompt blocks + 1 for its decodes; request 2: 3 shared + 1 of its own.
    assert_eq!(s.pool.used_blocks(), 4 + 1 + 1);
}

#[test]
fn chunked_prefill_splits_a_long_prompt_and_slows_the_decodes_sharing_its_steps() {
    let mut s = engine(100, 8, 8);
    add(&mut s, 1, 2, &[], 100);
    step(&mut s);
    add(&mut s, 2, 20, &[], 1);
    let cost = StepCost::of(&Profile::Llama3_8bH100.config());
    let mut chunks = Vec::new();
    loop {
        let st = s.schedule();
        let decode = st.work.iter().find(|w| w.0 == 1).copied();
        assert_eq!(decode, Some((1, 1)), "request 1 decodes in every step");
        let ms = step_ms(&cost, st.work.len(), st.prefill_tokens, st.prefill_reqs);
        let out = s.finish(&st);
        match st.work.iter().find(|w| w.0 == 2) {
            Some(&(_, n)) => {
                chunks.push(n);
                assert!(ms > step_ms(&cost, 1, 0, 0) + 0.0405 * 6.0, "{ms}");
            }
            None => break,
        }
        if out.iter().any(|o| o.finished) {
            break;
        }
    }
    assert_eq!(
        chunks,
        vec![7, 7, 6],
        "the step budget of 8 tokens, 1 taken by the decode"
    );
}

#[test]
fn max_num_seqs_caps_the_batch_and_a_request_larger_than_the_pool_never_fits() {
    let mut s = engine(100, 2, 100);
    for id in 1..=3 {
        add(&mut s, id, 2, &[], 5);
    }
    step(&mut s);
    assert_eq!((s.running(), s.waiting()), (2, 1));
    assert!(s.fits(200) && !s.fits(201));
    let unbounded = EngineState::new(BlockPool::new(0, 2, None), 2, 1, 1);
    assert!(unbounded.fits(usize::MAX / 2));
}

#[test]
fn a_waiting_request_removed_leaves_the_queue_and_a_running_one_frees_its_blocks() {
    let mut s = engine(10, 1, 100);
    add(&mut s, 1, 4, &[], 5);
    add(&mut s, 2, 4, &[], 5);
    step(&mut s);
    assert_eq!(s.pool.used_blocks(), 2);
    assert!(s.remove(2).is_some());
    assert_eq!(s.waiting(), 0);
    assert!(s.remove(1).is_some());
    assert_eq!((s.running(), s.pool.used_blocks()), (0, 0));
    assert!(s.is_idle());
    let _ = SimConfig::default();
}
