//! The prefix matches a decision reads (`kv_lookup`, an engine's `prefix_match` in scripts),
//! computed only when a tier first needs them, at most once per decision.
//!
//! The proxy passes a [`PrefixMatcher`] to [`crate::policy::PolicyStore::decide_with`]; the
//! decision wraps it in a [`Kv`], which calls it on first use and keeps the result. A policy
//! whose deciding tier never looks at prefix matches (e.g. `load_balance` deciding before
//! `kv_lookup`) never calls it, so a request is never tokenized for nothing. Without a matcher
//! ([`crate::policy::PolicyStore::decide`]) the matches are the candidates' own
//! `prefix_match_tokens` (tests, benchmarks).

use std::cell::OnceCell;

use crate::engines::Candidate;
use crate::request::RequestInfo;

/// Where an engine's prefix match came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvSource {
    /// The engine's own KV-cache events, over the request's real token ids: a complete view
    /// (followed since the engine's cache state was known).
    Exact,
    /// The engine's own KV-cache events through a partial view (it started mid-stream: the
    /// engine holds at least this, maybe more), which matched at least as much as the
    /// approximate index.
    Partial,
    /// The router's approximate index of the prompts it sent (stand-in tokenizer); also when
    /// it matched more than a partial view.
    Approximate,
}

impl KvSource {
    /// `exact`, `partial` or `approximate`: the `x-switchyard-kv` header's value and the `kv`
    /// label of `switchyard_routing_decisions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvSource::Exact => "exact",
            KvSource::Partial => "partial",
            KvSource::Approximate => "approximate",
        }
    }

    /// Every value of the decision counter's `kv` label.
    pub const LABELS: [&'static str; 4] = ["none", "exact", "partial", "approximate"];

    /// The decision counter's `kv` label for a decision: the chosen engine's source, or
    /// `none` when no tier needed prefix matches.
    pub fn label(source: Option<KvSource>) -> &'static str {
        source.map_or("none", KvSource::as_str)
    }
}

/// The prefix matches of one decision's candidates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvMatches {
    /// Per candidate, in the candidates' order: prompt tokens found cached there.
    pub tokens: Vec<usize>,
    /// Per candidate: where its figure came from (empty when the figures were given as-is).
    pub sources: Vec<KvSource>,
    /// The prompt's length, in the same tokens as `tokens` (the real count when the prompt
    /// was tokenized).
    pub prompt_tokens: usize,
}

/// Computes the prefix matches of a decision's candidates on demand.
pub trait PrefixMatcher {
    /// The matches of `cands` (same order and length) for `req`. Called at most once per
    /// decision, by the first tier that needs them; never fails (a source that cannot answer
    /// falls back to another, ultimately to no match).
    fn matches(&self, req: &RequestInfo, cands: &[Candidate]) -> KvMatches;
}

/// One decision's lazily computed prefix matches.
pub struct Kv<'a> {
    matcher: Option<&'a dyn PrefixMatcher>,
    req: &'a RequestInfo,
    cands: &'a [Candidate],
    cell: OnceCell<KvMatches>,
}

impl<'a> Kv<'a> {
    /// Matches computed by `matcher` on first use; without one, the candidates' own
    /// `prefix_match_tokens` and the request's estimated prompt length.
    pub fn new(
        matcher: Option<&'a dyn PrefixMatcher>,
        req: &'a RequestInfo,
        cands: &'a [Candidate],
    ) -> Kv<'a> {
        Kv {
            matcher,
            req,
            cands,
            cell: OnceCell::new(),
        }
    }

    /// The matches, computed now if no tier needed them before.
    pub fn get(&self) -> &KvMatches {
        self.cell.get_or_init(|| match self.matcher {
            Some(m) => {
                let mut r = m.matches(self.req, self.cands);
                // A matcher's bug must not index out of bounds.
                r.tokens.resize(self.cands.len(), 0);
                if !r.sources.is_empty() {
                    r.sources.resize(self.cands.len(), KvSource::Approximate);
                }
                r
            }
            None => KvMatches {
                tokens: self.cands.iter().map(|c| c.prefix_match_tokens).collect(),
                sources: Vec::new(),
                prompt_tokens: self.req.prompt_tokens(),
            },
        })
    }

    /// Whether the matches have been computed (a tier needed them).
    pub fn is_computed(&self) -> bool {
        self.cell.get().is_some()
    }

    /// The prompt tokens matched on candidate `i`.
    pub fn tokens(&self, i: usize) -> usize {
        self.get().tokens.get(i).copied().unwrap_or(0)
    }

    /// The prompt's length in tokens: the matches' (real tokens when tokenized) once they are
    /// computed, else the estimate of the stand-in tokenizer (reading it computes nothing).
    pub fn prompt_tokens(&self) -> usize {
        self.cell
            .get()
            .map_or_else(|| self.req.prompt_tokens(), |m| m.prompt_tokens)
    }

    /// Where candidate `i`'s match came from, if matches were computed by a matcher.
    pub fn source(&self, i: usize) -> Option<KvSource> {
        self.cell.get()?.sources.get(i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::Arc;

    struct Counting(Cell<usize>);

    impl PrefixMatcher for Counting {
        fn matches(&self, req: &RequestInfo, _: &[Candidate]) -> KvMatches {
            self.0.set(self.0.get() + 1);
            // Shorter than the candidates: `Kv` pads.
            KvMatches {
                tokens: vec![7],
                sources: vec![KvSource::Exact],
                prompt_tokens: req.prompt_tokens() + 1000,
            }
        }
    }

    fn cands(n: u32) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                engine: Arc::new(crate::engines::Engine::new(
                    i,
                    &format!("http://e{i}:1"),
                    vec!["m".into()],
                )),
                load: Default::default(),
                prefix_match_tokens: 3,
            })
            .collect()
    }

    #[test]
    fn computed_once_on_first_use_and_padded_to_the_candidates() {
        let m = Counting(Cell::new(0));
        let req = RequestInfo::default();
        let c = cands(3);
        let kv = Kv::new(Some(&m), &req, &c);
        assert_eq!(kv.prompt_tokens(), 0, "the estimate, nothing computed");
        assert!(!kv.is_computed() && kv.source(0).is_none());
        assert_eq!(m.0.get(), 0);
        assert_eq!((kv.tokens(0), kv.tokens(2)), (7, 0));
        assert_eq!(kv.source(2), Some(KvSource::Approximate));
        assert_eq!(
            (kv.source(0), kv.prompt_tokens()),
            (Some(KvSource::Exact), 1000)
        );
        assert_eq!(m.0.get(), 1);
        let fixed = Kv::new(None, &req, &c);
        assert_eq!((fixed.tokens(1), fixed.source(1)), (3, None));
        assert_eq!(KvSource::label(None), "none");
    }
}
