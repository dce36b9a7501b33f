//! The router-side prefix index: longest consecutive match, LRU eviction within a memory
//! budget, engine removal.

use switchyard::prefix::{DEFAULT_BUDGET_BYTES, PrefixIndex};
use switchyard::tokens::block_hashes;

/// A prompt's chained block hashes: `blocks` blocks, unique per `id`.
fn prompt(id: u64, blocks: usize) -> Vec<u64> {
    let mut h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5;
    (0..blocks)
        .map(|_| {
            h = h.rotate_left(17).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ id;
            h
        })
        .collect()
}

#[test]
fn longest_consecutive_match_with_shared_prefixes() {
    let idx = PrefixIndex::new(4 << 20);
    let system = "You are a helpful assistant. ".repeat(20);
    let a = format!("{system}{}", "question one ".repeat(40));
    let b = format!("{system}{}", "question two ".repeat(40));
    let ha = block_hashes(a.as_bytes(), 16);
    let hb = block_hashes(b.as_bytes(), 16);
    let shared = ha.iter().zip(&hb).take_while(|(x, y)| x == y).count();
    assert!(shared >= 9 && shared < ha.len());
    idx.insert(7, &ha);
    idx.insert(9, &hb);
    assert_eq!(
        idx.match_blocks(&ha, &[7, 9, 11]),
        vec![ha.len(), shared, 0]
    );
    assert_eq!(idx.match_blocks(&hb, &[9, 7]), vec![hb.len(), shared]);
    // A prompt extending `a` matches all of `a` on engine 7.
    let longer = block_hashes(format!("{a}{}", "more ".repeat(50)).as_bytes(), 16);
    assert_eq!(idx.match_blocks(&longer, &[7]), vec![ha.len()]);
    // A different first block matches nothing, though later text is equal.
    let other = block_hashes(format!("X{}", &a[1..]).as_bytes(), 16);
    assert_eq!(idx.match_blocks(&other, &[7]), vec![0]);
}

#[test]
fn default_budget_is_64_mib() {
    assert_eq!(DEFAULT_BUDGET_BYTES, 64 << 20);
    assert_eq!(PrefixIndex::default().budget_bytes(), 64 << 20);
}

#[test]
fn budget_is_enforced_and_oldest_prompts_go_first() {
    const BUDGET: usize = 1 << 20;
    const BLOCKS: usize = 8;
    let idx = PrefixIndex::new(BUDGET);
    // ~40 bytes per block: 1 MiB holds about 25k blocks; insert 40k prompts (320k blocks).
    let n = 40_000u64;
    for id in 0..n {
        idx.insert((id % 4) as u32, &prompt(id, BLOCKS));
        if id % 2000 == 0 {
            assert!(
                idx.accounted_bytes() <= BUDGET,
                "{} > {BUDGET}",
                idx.accounted_bytes()
            );
        }
    }
    let bytes = idx.accounted_bytes();
    assert!(bytes <= BUDGET, "{bytes} > {BUDGET}");
    assert!(bytes > BUDGET / 2, "the budget is used: {bytes}");
    let stored = idx.len();
    assert!(stored < (n as usize) * BLOCKS / 4, "evicted: {stored}");
    // The oldest prompts are gone.
    for id in 0..1000 {
        assert_eq!(
            idx.match_blocks(&prompt(id, BLOCKS), &[(id % 4) as u32]),
            vec![0]
        );
    }
    // The most recent ones match in full, on their engine only.
    for id in n - 500..n {
        let e = (id % 4) as u32;
        assert_eq!(
            idx.match_blocks(&prompt(id, BLOCKS), &[e, (e + 1) % 4]),
            vec![BLOCKS, 0],
            "prompt {id}"
        );
    }
}

#[test]
fn eviction_erodes_prompts_from_their_tail() {
    // A budget so small that a long prompt cannot fit whole: what remains is a prefix.
    let idx = PrefixIndex::new(16 * 1024);
    let p = prompt(1, 2000);
    idx.insert(0, &p);
    let m = idx.match_blocks(&p, &[0])[0];
    assert!(m > 0 && m < p.len(), "kept a leading run of {m} blocks");
    assert!(idx.accounted_bytes() <= 16 * 1024);
}

#[test]
fn remove_engine_drops_its_entries() {
    let idx = PrefixIndex::new(8 << 20);
    for id in 0..300 {
        idx.insert(1, &prompt(id, 4));
        idx.insert(2, &prompt(id + 1000, 4));
    }
    // A block held by both engines survives the removal of one.
    idx.insert(2, &prompt(5, 4));
    assert_eq!(idx.len(), 600 * 4);
    idx.remove_engine(1);
    assert_eq!(idx.len(), 300 * 4 + 4);
    assert_eq!(idx.match_blocks(&prompt(7, 4), &[1, 2]), vec![0, 0]);
    assert_eq!(idx.match_blocks(&prompt(5, 4), &[1, 2]), vec![0, 4]);
    assert_eq!(idx.match_blocks(&prompt(1007, 4), &[2]), vec![4]);
    idx.remove_engine(2);
    assert!(idx.is_empty());
    // Freed space is reused.
    idx.insert(3, &prompt(9, 4));
    assert_eq!(idx.match_blocks(&prompt(9, 4), &[3]), vec![4]);
}

#[test]
fn concurrent_inserts_and_lookups() {
    // Large enough that nothing is evicted (eviction is tested above), so every insert must be
    // found by the lookup that follows it, whatever the other threads do.
    let idx = PrefixIndex::new(64 << 20);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let idx = &idx;
            s.spawn(move || {
                for i in 0..2000 {
                    let p = prompt(t * 1_000_000 + i, 16);
                    idx.insert(t as u32, &p);
                    assert_eq!(idx.match_blocks(&p, &[t as u32])[0], 16);
                }
            });
        }
    });
    assert!(idx.accounted_bytes() <= 64 << 20);
    assert_eq!(idx.len(), 4 * 2000 * 16);
}
