//! Tests of a request's prefix matches from two sources.

use super::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engines::Engine;
use crate::request::PromptDigest;

/// Complete views of `live` engines, partial ones of `partial`, each holding `held` tokens.
#[derive(Default)]
struct Views {
    live: Vec<u32>,
    partial: Vec<u32>,
    held: usize,
    /// (engine, tokens, adapter) of each request noted as sent.
    notes: Mutex<Vec<(u32, usize, Option<String>)>>,
}

impl ExactLookup for Views {
    fn matches(&self, ids: &[u32], _: Option<&str>, engines: &[u32]) -> Vec<Option<ExactMatch>> {
        engines
            .iter()
            .map(|e| {
                self.is_live(*e).then_some(ExactMatch {
                    tokens: self.held.min(ids.len()),
                    complete: self.live.contains(e),
                })
            })
            .collect()
    }
    fn is_live(&self, engine: u32) -> bool {
        self.live.contains(&engine) || self.partial.contains(&engine)
    }
    fn note_sent(&self, engine: u32, ids: &Arc<[u32]>, lora: Option<&str>) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.push((engine, ids.len(), lora.map(str::to_owned)));
    }
}

struct Counting {
    calls: AtomicUsize,
    fail: bool,
}

impl RequestTokenizer for Counting {
    fn token_ids(&self, _: &str, _: &[u8], max_tokens: usize) -> Result<PromptIds, String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.fail {
            Err("no template".into())
        } else {
            let ids: Vec<u32> = (0..200).collect();
            Ok(PromptIds {
                complete: ids.len() <= max_tokens,
                ids: ids.into_iter().take(max_tokens).collect(),
            })
        }
    }
}

fn counting(fail: bool) -> Counting {
    Counting {
        calls: AtomicUsize::new(0),
        fail,
    }
}

/// Both sources over `index` (block size 16), tokenizing at most `max_prompt_tokens`.
fn sources<'a>(
    index: &'a PrefixIndex,
    views: &'a dyn ExactLookup,
    tok: &'a dyn RequestTokenizer,
    max_prompt_tokens: usize,
) -> Sources<'a> {
    Sources {
        approximate: index,
        block_size: 16,
        exact: Some((views, tok)),
        lora_name: None,
        max_prompt_tokens,
    }
}

fn cands(ids: &[u32]) -> Vec<Candidate> {
    ids.iter()
        .map(|&i| Candidate {
            engine: Arc::new(Engine::new(i, &format!("http://e{i}:1"), vec!["m".into()])),
            load: Default::default(),
            prefix_match_tokens: 0,
        })
        .collect()
}

/// A request of 400 stand-in tokens, routed to engine 2 before (all 25 blocks known).
fn setup() -> (PrefixIndex, RequestInfo) {
    let text = "y".repeat(1600);
    let req = RequestInfo {
        prompt: PromptDigest::of_text(&text, 16),
        ..Default::default()
    };
    let index = PrefixIndex::new(1 << 20);
    index.insert(2, req.block_hashes());
    (index, req)
}

#[test]
fn exact_where_live_approximate_elsewhere_scaled_to_real_tokens_and_kept_for_retries() {
    let (index, req) = setup();
    let views = Views {
        live: vec![1],
        partial: vec![],
        held: 64,
        ..Views::default()
    };
    let tok = counting(false);
    let kv = RequestKv::new(sources(&index, &views, &tok, 1 << 20));
    let c = cands(&[1, 2, 3]);
    let m = kv.matches(&req, &c);
    // 200 real tokens; engine 2's 400 stand-in tokens scale to 200.
    assert_eq!(m.prompt_tokens, 200);
    assert_eq!(m.tokens, vec![64, 200, 0]);
    use KvSource::*;
    assert_eq!(m.sources, vec![Exact, Approximate, Approximate]);
    // A retry over fewer candidates computes nothing again.
    let again = kv.matches(&req, &c[1..]);
    assert_eq!((again.tokens, again.prompt_tokens), (vec![200, 0], 200));
    assert_eq!(tok.calls.load(Ordering::Relaxed), 1);
}

#[test]
fn the_cap_reaches_the_tokenizer_and_bounds_the_prompt_length() {
    let (index, req) = setup();
    let views = Views {
        live: vec![1],
        partial: vec![],
        held: 64,
        ..Views::default()
    };
    let tok = counting(false);
    let kv = RequestKv::new(sources(&index, &views, &tok, 50));
    let m = kv.matches(&req, &cands(&[1, 2]));
    // 50 of the prompt's 200 tokens; engine 2's 400 stand-in tokens scale to 50.
    assert_eq!((m.tokens, m.prompt_tokens), (vec![50, 50], 50));
}

#[test]
fn large_tokenizations_hold_one_permit_each() {
    let permits = Permits::new(2);
    let inside = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    let _p = permits.acquire();
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    std::thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert!(most.load(Ordering::SeqCst) <= 2);
    assert_eq!(*permits.free.lock().unwrap(), 2, "every permit given back");
}

#[test]
fn no_tokenizing_without_a_live_view_and_errors_fall_back_to_approximate() {
    let (index, req) = setup();
    let none_live = Views {
        live: vec![],
        partial: vec![],
        held: 64,
        ..Views::default()
    };
    let tok = counting(false);
    let kv = RequestKv::new(sources(&index, &none_live, &tok, 1 << 20));
    let m = kv.matches(&req, &cands(&[1, 2]));
    assert_eq!((m.tokens, m.prompt_tokens), (vec![0, 400], 400));
    assert_eq!(
        tok.calls.load(Ordering::Relaxed),
        0,
        "nothing to look up exactly: not tokenized"
    );

    let live = Views {
        live: vec![1, 2],
        partial: vec![],
        held: 64,
        ..Views::default()
    };
    let failing = counting(true);
    let kv = RequestKv::new(sources(&index, &live, &failing, 1 << 20));
    let m = kv.matches(&req, &cands(&[1, 2]));
    assert_eq!((m.tokens, m.prompt_tokens), (vec![0, 400], 400));
    assert_eq!(m.sources, vec![KvSource::Approximate; 2]);
    assert_eq!(failing.calls.load(Ordering::Relaxed), 1);
}

#[test]
fn a_partial_view_counts_when_it_matches_at_least_the_approximate_index() {
    // Engine 2 was sent the whole prompt before (approximate: 400 stand-in tokens, 200
    // real); every view holds 64 real tokens of it.
    let (index, req) = setup();
    let views = Views {
        live: vec![3],
        partial: vec![1, 2, 4],
        held: 64,
        ..Views::default()
    };
    let tok = counting(false);
    let kv = RequestKv::new(sources(&index, &views, &tok, 1 << 20));
    let m = kv.matches(&req, &cands(&[1, 2, 3, 4, 5]));
    use KvSource::*;
    // 1: partial 64 beats approximate 0. 2: approximate 200 beats partial 64. 3: complete
    // 64, alone. 4: partial 64 beats approximate 0. 5: no view: approximate.
    assert_eq!(m.tokens, vec![64, 200, 64, 64, 0]);
    assert_eq!(
        m.sources,
        vec![Partial, Approximate, Exact, Partial, Approximate]
    );

    // A partial view matching nothing ties with an approximate index matching nothing:
    // the view's (certain) figure is used; against a real approximate match, the latter.
    let empty = Views {
        live: vec![],
        partial: vec![1, 2],
        held: 0,
        ..Views::default()
    };
    let kv = RequestKv::new(sources(&index, &empty, &tok, 1 << 20));
    let m = kv.matches(&req, &cands(&[1, 2]));
    assert_eq!(
        (m.tokens, m.sources),
        (vec![0, 200], vec![Partial, Approximate])
    );

    // A complete view is the engine's figure alone, even below the approximate index's.
    let complete = Views {
        live: vec![2],
        partial: vec![],
        held: 64,
        ..Views::default()
    };
    let kv = RequestKv::new(sources(&index, &complete, &tok, 1 << 20));
    let m = kv.matches(&req, &cands(&[2]));
    assert_eq!((m.tokens, m.sources), (vec![64], vec![Exact]));
}

#[test]
fn a_tokenized_request_is_noted_on_each_engine_it_is_sent_to_and_an_untokenized_one_not() {
    let (index, req) = setup();
    let tok = counting(false);
    let views = Views {
        partial: vec![1],
        ..Views::default()
    };
    let kv = RequestKv::new(Sources {
        approximate: &index,
        block_size: 16,
        exact: Some((&views, &tok)),
        lora_name: Some("adapter"),
        max_prompt_tokens: 1 << 20,
    });
    // Sent before any tier asked for matches: not tokenized, nothing to note.
    kv.note_sent(1);
    assert!(
        views
            .notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    );
    kv.matches(&req, &cands(&[1, 2]));
    // Sent to engine 1, then retried on engine 2: both noted, the ids tokenized once.
    kv.note_sent(1);
    kv.note_sent(2);
    let notes = views
        .notes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let adapter = Some("adapter".to_owned());
    assert_eq!(notes, vec![(1, 200, adapter.clone()), (2, 200, adapter)]);
    assert_eq!(tok.calls.load(Ordering::Relaxed), 1);

    // No live view: the request is never tokenized, so never noted.
    let none = Views::default();
    let kv = RequestKv::new(sources(&index, &none, &tok, 1 << 20));
    kv.matches(&req, &cands(&[1]));
    kv.note_sent(1);
    assert!(
        none.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    );
}
