//! Which part of a request a decision is for: the whole request (aggregated), its decode
//! engine, or its prefill engine once the decode engine is chosen (see `docs/policies.md`,
//! "Prefill/decode disaggregation").

use crate::engines::Candidate;
use crate::request::RequestInfo;

use super::kv::{Kv, PrefixMatcher};

/// A prefill pipeline's answer meaning "no prefill leg: the decode engine computes the prompt
/// itself" (`skip_prefill`, `no_prefill`), in place of a candidate's index.
pub const SKIP_PREFILL: usize = usize::MAX;

/// The stage a decision is for.
#[derive(Clone, Copy, Default)]
pub enum Stage<'a> {
    /// A whole request, on one engine.
    #[default]
    Aggregated,
    /// The decode engine of a disaggregated request.
    Decode,
    /// The prefill engine of a disaggregated request whose decode engine is chosen.
    Prefill(&'a DecodeChoice<'a>),
}

impl Stage<'_> {
    /// `aggregated`, `decode` or `prefill`: scripts' `request.stage` and the `stage` label of
    /// `switchyard_routing_decisions_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Aggregated => "aggregated",
            Stage::Decode => "decode",
            Stage::Prefill(_) => "prefill",
        }
    }
}

/// The decode engine chosen for a request, as its prefill decision sees it. Its prefix match
/// is computed when a tier first needs it (the decider), from the same matcher as the
/// decode decision's (which keeps each engine's match for the request).
pub struct DecodeChoice<'a> {
    cand: &'a Candidate,
    kv: Kv<'a>,
}

impl<'a> DecodeChoice<'a> {
    pub fn new(
        matcher: Option<&'a dyn PrefixMatcher>,
        req: &'a RequestInfo,
        cand: &'a Candidate,
    ) -> DecodeChoice<'a> {
        DecodeChoice {
            cand,
            kv: Kv::new(matcher, req, std::slice::from_ref(cand)),
        }
    }

    /// The decode engine.
    pub fn candidate(&self) -> &Candidate {
        self.cand
    }

    /// Prompt tokens not cached on the decode engine: what it would compute without a
    /// prefill leg.
    pub fn uncached_tokens(&self) -> usize {
        let m = self.kv.get();
        let cached = m.tokens.first().copied().unwrap_or(0);
        m.prompt_tokens.saturating_sub(cached)
    }
}
