//! Prefill/decode hand-offs in the step loop: P holds a finished leg's blocks under a lease,
//! D starts from the tokens it loaded (no clock).

use std::time::Duration;

use super::*;
use crate::sim::delivery::ReqShared;

/// An engine of `blocks` blocks of 2 tokens.
fn engine(blocks: usize) -> EngineState {
    EngineState::new(BlockPool::new(blocks, 2, None), 2, 8, 100)
}

fn req(prompt: usize, hashes: &[u64], max_tokens: usize) -> Req {
    Req::new(
        Arc::new(ReqShared::new(0.0)),
        vec![7; prompt],
        hashes.to_vec(),
        max_tokens,
    )
}

#[test]
fn a_p_leg_holds_its_blocks_until_read_once() {
    let mut s = engine(20);
    let mut r = req(10, &[1, 2, 3, 4, 5], 1);
    r.hand_off = Some("cmpl-a".into());
    s.add(1, r);
    let st = s.schedule();
    assert_eq!(st.work, vec![(1, 10)]);
    let out = s.finish(&st);
    assert_eq!(out.len(), 1);
    assert!(out[0].finished);
    let (blocks, tokens) = out[0].handed_off.clone().unwrap();
    assert_eq!((blocks.len(), tokens), (5, 10));
    assert!(s.is_idle());
    assert_eq!(s.pool.used_blocks(), 5, "held blocks stay referenced");
    assert_eq!(s.hand_offs_held(), 1);
    assert_eq!(
        s.release_hand_off("cmpl-a", &[99], Instant::now()),
        Err(ReleaseError::OtherBlocks("cmpl-a".into()))
    );
    assert_eq!(
        s.release_hand_off("cmpl-a", &blocks, Instant::now()),
        Ok((10, 5))
    );
    assert_eq!(s.pool.used_blocks(), 0);
    // Read again: served stale (vLLM 0.32's D reads the released blocks), counted.
    assert_eq!(
        s.release_hand_off("cmpl-a", &blocks, Instant::now()),
        Ok((10, 5))
    );
    assert_eq!((s.counts.stale_reads, s.pool.used_blocks()), (1, 0));
    assert_eq!(
        s.release_hand_off("cmpl-x", &blocks, Instant::now()),
        Err(ReleaseError::Unknown("cmpl-x".into()))
    );
    assert_eq!(s.counts.hand_offs_expired, 0);
}

#[test]
fn an_unread_hand_off_is_freed_when_its_lease_ends() {
    let mut s = engine(20).with_lease(Duration::from_secs(30));
    let mut r = req(8, &[1, 2, 3, 4], 1);
    r.hand_off = Some("cmpl-b".into());
    s.add(1, r);
    let st = s.schedule();
    s.finish(&st);
    assert_eq!(s.pool.used_blocks(), 4);
    s.expire_hand_offs(Instant::now() + Duration::from_secs(29));
    assert_eq!(s.pool.used_blocks(), 4);
    s.expire_hand_offs(Instant::now() + Duration::from_secs(31));
    assert_eq!((s.pool.used_blocks(), s.hand_offs_held()), (0, 0));
    assert_eq!(s.counts.hand_offs_expired, 1);
    // Its prompt blocks stay in the prefix cache, as any freed request's.
    assert_eq!(s.pool.lookup(&[1, 2, 3, 4]).len(), 4);
}

#[test]
fn a_request_without_hand_off_frees_its_blocks_at_once() {
    let mut s = engine(20);
    s.add(1, req(8, &[], 1));
    let st = s.schedule();
    let out = s.finish(&st);
    assert!(out[0].handed_off.is_none());
    assert_eq!((s.pool.used_blocks(), s.hand_offs_held()), (0, 0));
}

#[test]
fn a_d_leg_computes_only_the_last_prompt_token_and_caches_the_loaded_blocks() {
    let mut s = engine(40);
    let mut r = req(10, &[1, 2, 3, 4, 5], 3);
    r.external = 10;
    let shared = Arc::clone(&r.shared);
    s.add(1, r);
    let st = s.schedule();
    assert_eq!(
        st.work,
        vec![(1, 1)],
        "only the last prompt token is computed"
    );
    assert_eq!((st.prefill_tokens, st.prefill_reqs), (1, 1));
    let out = s.finish(&st);
    assert_eq!(out[0].generated, 1, "the first token follows that one step");
    assert_eq!(s.counts.external_tokens, 10);
    assert_eq!(s.counts.prefix_hits, 0);
    assert_eq!(s.counts.prompt_tokens, 10);
    assert_eq!(shared.cached_tokens.load(Ordering::Relaxed), 10);
    assert_eq!(
        s.pool.lookup(&[1, 2, 3, 4, 5]).len(),
        5,
        "loaded blocks enter the prefix cache as computed ones"
    );
    // The same prompt without a load prefills all of it.
    let mut s = engine(40);
    s.add(1, req(10, &[1, 2, 3, 4, 5], 3));
    assert_eq!(s.schedule().work, vec![(1, 10)]);
}

#[test]
fn a_d_leg_loads_only_what_its_own_prefix_cache_lacks() {
    let mut s = engine(40);
    s.add(1, req(4, &[1, 2], 1));
    let st = s.schedule();
    s.finish(&st);
    let mut r = req(10, &[1, 2, 3, 4, 5], 1);
    r.external = 10;
    let shared = Arc::clone(&r.shared);
    s.add(2, r);
    let st = s.schedule();
    assert_eq!(st.work, vec![(2, 1)]);
    assert_eq!(s.counts.prefix_hits, 4);
    assert_eq!(s.counts.external_tokens, 6);
    assert_eq!(shared.cached_tokens.load(Ordering::Relaxed), 10);
}
