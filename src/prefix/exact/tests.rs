use super::*;

const BS: usize = 4;

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i * 7 + salt).collect()
}

fn run<'a>(
    parent: Option<u64>,
    hashes: &'a [u64],
    tokens: &'a [u32],
    lora: Option<&'a str>,
    medium: Medium,
) -> StoredRun<'a> {
    StoredRun {
        parent,
        block_hashes: hashes,
        token_ids: tokens,
        block_size: BS,
        lora_name: lora,
        medium,
    }
}

fn live_index(engines: &[u32]) -> ExactIndex {
    let idx = ExactIndex::new(1 << 30);
    for &e in engines {
        idx.add_engine(e);
        idx.update(e, |v| v.set_live(true));
    }
    idx
}

#[test]
fn chained_runs_match_the_prompt_and_removal_by_engine_hash_cuts_it() {
    let idx = live_index(&[1, 2]);
    let prompt = ids(4 * BS + 2, 0);
    // Engine 1 stores the first two blocks, then the next two chained from its parent hash.
    let out = idx.update(1, |v| {
        let a = v.store(&run(
            None,
            &[100, 101],
            &prompt[..2 * BS],
            None,
            Medium::Gpu,
        ));
        let b = v.store(&run(
            Some(101),
            &[102, 103],
            &prompt[2 * BS..4 * BS],
            None,
            Medium::Gpu,
        ));
        (a, b)
    });
    assert_eq!(
        out,
        Some((StoreOutcome::Stored(2), StoreOutcome::Stored(2)))
    );
    assert_eq!(
        idx.match_tokens(&prompt, None, &[1, 2, 3]),
        vec![Some(4 * BS), Some(0), None],
        "engine 2 is live with nothing; engine 3 has no view"
    );
    // A prompt diverging in block 2 matches two blocks.
    let mut other = prompt.clone();
    other[2 * BS + 1] = 9999;
    assert_eq!(idx.match_tokens(&other, None, &[1]), vec![Some(2 * BS)]);
    // Removing block 1 by the engine's hash cuts the match at block 1.
    assert_eq!(
        idx.update(1, |v| v.remove(&[101, 555], Medium::Gpu)),
        Some(1)
    );
    assert_eq!(idx.match_tokens(&prompt, None, &[1]), vec![Some(BS)]);
    assert!(idx.blocks() == 3 && idx.accounted_bytes() > 0);
}

#[test]
fn unknown_parent_is_skipped_and_bad_lengths_rejected() {
    let idx = live_index(&[1]);
    let t = ids(2 * BS, 0);
    assert_eq!(
        idx.update(1, |v| v.store(&run(
            Some(42),
            &[1, 2],
            &t,
            None,
            Medium::Gpu
        ))),
        Some(StoreOutcome::Unanchored)
    );
    assert_eq!(
        idx.update(1, |v| v.store(&run(
            None,
            &[1, 2, 3],
            &t,
            None,
            Medium::Gpu
        ))),
        Some(StoreOutcome::BadLength)
    );
    assert_eq!(idx.blocks(), 0);
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
}

#[test]
fn lora_adapters_key_blocks_apart() {
    let idx = live_index(&[1]);
    let t = ids(2 * BS, 3);
    idx.update(1, |v| {
        v.store(&run(None, &[1, 2], &t, Some("sql"), Medium::Gpu))
    });
    assert_eq!(idx.match_tokens(&t, Some("sql"), &[1]), vec![Some(2 * BS)]);
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
    assert_eq!(idx.match_tokens(&t, Some("other"), &[1]), vec![Some(0)]);
}

#[test]
fn a_block_offloaded_to_cpu_stays_held_until_removed_there_too() {
    let idx = live_index(&[1]);
    let t = ids(BS, 0);
    idx.update(1, |v| {
        v.store(&run(None, &[7], &t, None, Medium::Gpu));
        v.store(&run(None, &[7], &t, None, Medium::from_wire(Some("CPU"))));
        v.remove(&[7], Medium::from_wire(Some("GPU")));
    });
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(BS)]);
    idx.update(1, |v| v.remove(&[7], Medium::Cpu));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
    assert_eq!(idx.blocks(), 0);
}

#[test]
fn clear_liveness_and_engine_removal() {
    let idx = live_index(&[1]);
    let t = ids(2 * BS, 0);
    idx.update(1, |v| v.store(&run(None, &[1, 2], &t, None, Medium::Gpu)));
    assert!(idx.is_live(1));
    idx.update(1, |v| v.set_live(false));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![None]);
    assert!(!idx.is_live(1));
    idx.update(1, |v| {
        v.clear();
        v.set_live(true)
    });
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
    idx.update(1, |v| v.store(&run(None, &[1, 2], &t, None, Medium::Gpu)));
    idx.remove_engine(1);
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![None]);
    assert_eq!((idx.blocks(), idx.accounted_bytes()), (0, 0));
    assert_eq!(idx.update(1, |v| v.set_live(true)), None);
}

#[test]
fn the_byte_budget_is_respected_evicting_the_oldest_blocks_of_the_largest_view() {
    let budget = 64 * 1024;
    let idx = ExactIndex::new(budget);
    for e in [1, 2] {
        idx.add_engine(e);
        idx.update(e, |v| v.set_live(true));
    }
    // Engine 2 holds one early prompt; engine 1 then stores far more than the budget.
    let early = ids(BS, 1);
    idx.update(2, |v| v.store(&run(None, &[1], &early, None, Medium::Gpu)));
    let first = ids(BS, 2);
    idx.update(1, |v| v.store(&run(None, &[1], &first, None, Medium::Gpu)));
    for i in 2..10_000u64 {
        let t = ids(BS, i as u32 * 1000);
        idx.update(1, |v| v.store(&run(None, &[i], &t, None, Medium::Gpu)));
        assert!(idx.accounted_bytes() <= budget, "over budget at {i}");
    }
    assert!(idx.blocks() > 500, "the budget is used: {}", idx.blocks());
    // The largest view lost its oldest block; the small one kept its own.
    assert_eq!(idx.match_tokens(&first, None, &[1]), vec![Some(0)]);
    let last = ids(BS, 9999 * 1000);
    assert_eq!(idx.match_tokens(&last, None, &[1]), vec![Some(BS)]);
    assert_eq!(idx.match_tokens(&early, None, &[2]), vec![Some(BS)]);
}

#[test]
fn a_new_block_size_restarts_the_view_and_each_engine_uses_its_own() {
    let idx = live_index(&[1, 2]);
    let t = ids(4 * BS, 0);
    idx.update(1, |v| {
        v.store(&run(None, &[1, 2], &t[..2 * BS], None, Medium::Gpu))
    });
    idx.update(2, |v| {
        v.store(&StoredRun {
            block_size: 2 * BS,
            ..run(None, &[1], &t[..2 * BS], None, Medium::Gpu)
        })
    });
    assert_eq!(
        idx.match_tokens(&t, None, &[1, 2]),
        vec![Some(2 * BS), Some(2 * BS)]
    );
    idx.update(1, |v| {
        v.store(&StoredRun {
            block_size: 2 * BS,
            ..run(None, &[9], &t[2 * BS..4 * BS], None, Medium::Gpu)
        })
    });
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
    assert_eq!(idx.blocks(), 2);
}

#[test]
fn an_engine_answers_the_best_over_its_ranks_and_is_live_while_one_of_them_is() {
    let idx = ExactIndex::new(1 << 30);
    idx.add_engine(1);
    idx.add_rank(1, 1);
    idx.add_rank(1, 1); // kept as it is
    idx.add_rank(2, 3);
    let t = ids(4 * BS, 0);
    // Rank 0 holds two blocks of the prompt, rank 1 three; neither is live yet.
    idx.update(1, |v| {
        v.store(&run(None, &[1, 2], &t[..2 * BS], None, Medium::Gpu))
    });
    idx.update_rank(1, 1, |v| {
        v.store(&run(None, &[5, 6, 7], &t[..3 * BS], None, Medium::Gpu))
    });
    assert!(!idx.is_live(1));
    assert_eq!(idx.match_tokens(&t, None, &[1, 2]), vec![None, None]);
    // Only rank 0 live: its figure.
    idx.update_rank(1, 0, |v| v.set_live(true));
    assert!(idx.is_live(1) && !idx.is_live(2));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(2 * BS)]);
    // Both live: the best.
    idx.update_rank(1, 1, |v| v.set_live(true));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(3 * BS)]);
    // A live rank of its own engine only; an unknown rank has no view.
    idx.update_rank(2, 3, |v| v.set_live(true));
    assert_eq!(
        idx.match_tokens(&t, None, &[2, 1, 2]),
        vec![Some(0), Some(3 * BS), Some(0)]
    );
    assert_eq!(idx.update_rank(2, 0, |v| v.set_live(true)), None);
    assert_eq!(idx.update(2, |_| ()), None, "update is rank 0");
    assert_eq!((idx.live_engines(), idx.blocks()), (2, 5));
    // Removing the engine drops all its ranks and their blocks.
    idx.remove_engine(1);
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![None]);
    assert_eq!(idx.update_rank(1, 1, |v| v.set_live(true)), None);
    assert_eq!((idx.live_engines(), idx.blocks()), (1, 0));
}

#[test]
fn the_byte_budget_counts_every_rank() {
    let budget = 64 * 1024;
    let idx = ExactIndex::new(budget);
    idx.add_rank(1, 0);
    idx.add_rank(1, 1);
    for i in 0..4_000u64 {
        let t = ids(BS, i as u32 * 1000);
        let rank = (i % 2) as u32;
        idx.update_rank(1, rank, |v| {
            v.store(&run(None, &[i], &t, None, Medium::Gpu))
        });
        assert!(idx.accounted_bytes() <= budget, "over budget at {i}");
    }
    idx.remove_engine(1);
    assert_eq!((idx.blocks(), idx.accounted_bytes()), (0, 0));
}

#[test]
fn an_engine_is_complete_only_when_every_rank_is_and_partial_while_one_is_live() {
    let idx = ExactIndex::new(1 << 30);
    idx.add_rank(1, 0);
    idx.add_rank(1, 1);
    let t = ids(2 * BS, 0);
    idx.update_rank(1, 0, |v| {
        v.store(&run(None, &[1, 2], &t, None, Medium::Gpu))
    });
    let m = |tokens, complete| Some(ExactMatch { tokens, complete });
    assert_eq!(idx.state(1), ViewState::Off);
    assert_eq!(idx.state(9), ViewState::Off, "no view");
    idx.update_rank(1, 0, |v| v.set_state(ViewState::Partial));
    assert_eq!(idx.state(1), ViewState::Partial);
    assert_eq!(idx.matches(&t, None, &[1]), vec![m(2 * BS, false)]);
    // Rank 0 complete, rank 1 not followed: the engine may hold more than rank 0 says.
    idx.update_rank(1, 0, |v| v.set_state(ViewState::Complete));
    assert_eq!(idx.state(1), ViewState::Partial);
    assert_eq!(idx.matches(&t, None, &[1]), vec![m(2 * BS, false)]);
    idx.update_rank(1, 1, |v| v.set_state(ViewState::Partial));
    assert_eq!(idx.matches(&t, None, &[1]), vec![m(2 * BS, false)]);
    idx.update_rank(1, 1, |v| v.set_state(ViewState::Complete));
    assert_eq!(idx.state(1), ViewState::Complete);
    assert_eq!(idx.matches(&t, None, &[1]), vec![m(2 * BS, true)]);
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(2 * BS)]);
    assert!(idx.is_live(1));
}

#[test]
fn runs_under_an_unknown_parent_are_remembered_as_unkeyed_until_removed() {
    let idx = live_index(&[1]);
    let t = ids(3 * BS, 0);
    // Block 10 was stored before the view started; 11 and 12 hang off it.
    let out = idx.update(1, |v| {
        let o = v.store(&run(Some(10), &[11, 12], &t[BS..], None, Medium::Gpu));
        (o, v.unkeyed())
    });
    assert_eq!(out, Some((StoreOutcome::Unanchored, 3)));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(0)]);
    // Removing one of them: neither unknown nor held any more.
    assert_eq!(idx.update(1, |v| v.remove(&[12, 99], Medium::Gpu)), Some(1));
    // Stored again from the root, with its content: keyed.
    idx.update(1, |v| {
        v.store(&run(None, &[10, 11], &t[..2 * BS], None, Medium::Gpu))
    });
    assert_eq!(idx.update(1, |v| v.unkeyed()), Some(0));
    assert_eq!(idx.match_tokens(&t, None, &[1]), vec![Some(2 * BS)]);
    idx.update(1, |v| {
        v.store(&run(Some(77), &[78], &t[..BS], None, Medium::Gpu));
        v.clear()
    });
    assert_eq!(idx.update(1, |v| v.unkeyed()), Some(0), "cleared");
}

/// An index with engine 1's view partial (joined mid-stream).
fn partial_index() -> ExactIndex {
    let idx = ExactIndex::new(1 << 30);
    idx.add_engine(1);
    idx.update(1, |v| v.set_state(ViewState::Partial));
    idx
}

fn sent(idx: &ExactIndex, engine: u32, tokens: &[u32], lora: Option<&str>) {
    idx.note_sent(engine, &Arc::from(tokens), lora);
}

#[test]
fn a_run_under_an_unknown_parent_is_anchored_on_a_request_the_router_sent() {
    let idx = partial_index();
    // Blocks 0 and 1 (engine hashes 900, 901) were cached before the join. The router sends
    // the engine a 6-block prompt; it hits blocks 0..2 and stores 2..6 under 901.
    let r = ids(6 * BS, 0);
    sent(&idx, 1, &r, None);
    let before = idx.update(1, |v| v.unkeyed());
    let out = idx.update(1, |v| {
        v.store(&run(
            Some(901),
            &[102, 103, 104, 105],
            &r[2 * BS..],
            None,
            Medium::Gpu,
        ))
    });
    assert_eq!(out, Some(StoreOutcome::Anchored(4)));
    assert_eq!(before, Some(0));
    assert_eq!(
        idx.update(1, |v| (v.unkeyed(), v.anchors(), v.implied())),
        Some((0, 1, 1)),
        "nothing unkeyed; 901 anchored, block 0 implied by it"
    );
    // The whole prompt matches: block 0 implied, 901 keyed, the run stored.
    assert_eq!(idx.match_tokens(&r, None, &[1]), vec![Some(6 * BS)]);
    // The next run under 901 is stored as any other: its parent is known now.
    let mut next = r[..2 * BS].to_vec();
    next.extend(ids(BS, 5000));
    let out = idx.update(1, |v| {
        v.store(&run(Some(901), &[202], &next[2 * BS..], None, Medium::Gpu))
    });
    assert_eq!(out, Some(StoreOutcome::Stored(1)));
    assert_eq!(idx.match_tokens(&next, None, &[1]), vec![Some(3 * BS)]);
    // The engine evicts 901 (by its own hash): what it implied goes with it.
    assert_eq!(idx.update(1, |v| v.remove(&[901], Medium::Gpu)), Some(0));
    assert_eq!(idx.update(1, |v| (v.anchors(), v.implied())), Some((0, 0)));
    assert_eq!(idx.match_tokens(&r, None, &[1]), vec![Some(0)]);
}

#[test]
fn implied_blocks_are_counted_by_the_anchors_implying_them_and_dropped_on_a_clear() {
    let idx = partial_index();
    // Two prompts sharing block 0 (engine 900, before the join), differing from block 1 on
    // (901 and 911, before the join too).
    let a = ids(4 * BS, 0);
    let mut b = a[..BS].to_vec();
    b.extend(ids(3 * BS, 3000));
    sent(&idx, 1, &a, None);
    sent(&idx, 1, &b, None);
    idx.update(1, |v| {
        v.store(&run(
            Some(901),
            &[102, 103],
            &a[2 * BS..],
            None,
            Medium::Gpu,
        ));
        v.store(&run(
            Some(911),
            &[112, 113],
            &b[2 * BS..],
            None,
            Medium::Gpu,
        ));
    });
    assert_eq!(idx.update(1, |v| (v.anchors(), v.implied())), Some((2, 1)));
    assert_eq!(
        idx.match_tokens(&a, None, &[1]),
        vec![Some(4 * BS)],
        "a shares block 0 with b"
    );
    // 901 goes: block 0 stays implied by 911.
    idx.update(1, |v| v.remove(&[901], Medium::Gpu));
    assert_eq!(idx.match_tokens(&a, None, &[1]), vec![Some(BS)]);
    assert_eq!(idx.match_tokens(&b, None, &[1]), vec![Some(4 * BS)]);
    // 911 goes too: nothing implies block 0 any more.
    idx.update(1, |v| v.remove(&[911], Medium::Gpu));
    assert_eq!(idx.match_tokens(&b, None, &[1]), vec![Some(0)]);
    assert_eq!(idx.update(1, |v| v.implied()), Some(0));

    // Anchored again, then the engine clears its cache: anchors and implied blocks go.
    let c = ids(3 * BS, 7000);
    sent(&idx, 1, &c, None);
    idx.update(1, |v| {
        v.store(&run(Some(921), &[122], &c[2 * BS..], None, Medium::Gpu))
    });
    assert_eq!(idx.match_tokens(&c, None, &[1]), vec![Some(3 * BS)]);
    idx.update(1, |v| v.clear());
    assert_eq!(idx.update(1, |v| (v.anchors(), v.implied())), Some((0, 0)));
    assert_eq!(idx.match_tokens(&c, None, &[1]), vec![Some(0)]);
    // The index's accounting follows: nothing left, nothing accounted.
    assert_eq!((idx.blocks(), idx.accounted_bytes()), (0, 0));
}

#[test]
fn an_anchor_evicted_for_the_budget_takes_its_implied_blocks_along() {
    let idx = partial_index();
    let r = ids(5 * BS, 0);
    sent(&idx, 1, &r, None);
    idx.update(1, |v| {
        v.store(&run(Some(903), &[104], &r[4 * BS..], None, Medium::Gpu));
        assert_eq!((v.anchors(), v.implied()), (1, 3));
        // The anchor was keyed first: it is the oldest block.
        assert!(v.evict_oldest());
        assert_eq!((v.anchors(), v.implied()), (0, 0));
    });
    assert_eq!(idx.match_tokens(&r, None, &[1]), vec![Some(0)]);
}

#[test]
fn only_requests_sent_to_that_engine_while_its_view_is_incomplete_anchor() {
    let idx = partial_index();
    idx.add_engine(2);
    idx.update(2, |v| v.set_live(true));
    let r = ids(3 * BS, 0);
    // Sent to engine 2 (complete: not noted), and to engine 3 (no view): engine 1's run
    // under an unknown parent finds nothing.
    sent(&idx, 2, &r, None);
    sent(&idx, 3, &r, None);
    let stored = |e: u32, parent: u64, hash: u64| {
        idx.update(e, |v| {
            v.store(&run(Some(parent), &[hash], &r[2 * BS..], None, Medium::Gpu))
        })
    };
    assert_eq!(stored(1, 901, 102), Some(StoreOutcome::Unanchored));
    assert_eq!(stored(2, 901, 102), Some(StoreOutcome::Unanchored));
    // Under another adapter: no anchor for the base model's run.
    sent(&idx, 1, &r, Some("sql"));
    assert_eq!(stored(1, 901, 102), Some(StoreOutcome::Unanchored));
    assert_eq!(idx.update(1, |v| v.unkeyed()), Some(2));
    // Sent to engine 1: anchored, and neither the parent nor the run is unkeyed any more.
    sent(&idx, 1, &r, None);
    assert_eq!(stored(1, 901, 102), Some(StoreOutcome::Anchored(1)));
    assert_eq!(idx.update(1, |v| v.unkeyed()), Some(0));
    assert_eq!(
        idx.match_tokens(&r, None, &[1, 2]),
        vec![Some(3 * BS), Some(0)]
    );
    // Once engine 1's view is complete its notes are dropped and no more are taken.
    idx.update(1, |v| v.set_state(ViewState::Complete));
    sent(&idx, 1, &ids(3 * BS, 50), None);
    let other = ids(3 * BS, 50);
    let out = idx.update(1, |v| {
        v.store(&run(Some(931), &[132], &other[2 * BS..], None, Medium::Gpu))
    });
    assert_eq!(out, Some(StoreOutcome::Unanchored));
}
