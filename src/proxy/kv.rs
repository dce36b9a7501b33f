//! The prefix matches of one request, from two sources, computed only when a policy tier
//! needs them (see [`crate::policy::kv`]):
//!
//! - **exact**: for an engine whose KV-event stream is live (its exact view), the tokens of
//!   the request's real token ids it holds, from the engine's own events. Needs `--tokenizer`;
//!   the request is tokenized at most once, and only when some candidate has a live view.
//! - **approximate**: otherwise, the router's own index of the prompts it sent
//!   ([`crate::prefix::PrefixIndex`], stand-in tokenizer).
//!
//! A complete view is the engine's figure alone ([`KvSource::Exact`]). A partial view (it
//! started mid-stream: the engine holds at least what it says, maybe more stored before) is
//! weighed against the approximate index: the better of the two is the engine's figure, the
//! view's on a tie ([`KvSource::Partial`], else [`KvSource::Approximate`]).
//!
//! When the prompt was tokenized, every figure is in real tokens: the prompt's length is its
//! real token count, and an approximate match (in stand-in tokens) is scaled by real /
//! estimated prompt length, so that `kv_lookup` compares like with like and its `min_match`
//! is a fraction of the real prompt. A tokenization error never fails the request: it is
//! logged, counted (`switchyard_tokenize_total{result="error"}`) and the request falls back
//! to approximate matches.
//!
//! Matches are kept per engine for the request: a retry's decision (over the candidates left)
//! reuses them instead of computing them again.
//!
//! Tokenizing is bounded ([`crate::tokens::bound`]): at most [`Sources::max_prompt_tokens`]
//! tokens of a prompt (the model's context length, else `--tokenize-max-tokens`), at a cost
//! that follows that cap, not the body. A body of [`OFF_THE_WORKERS_BYTES`] or more is
//! tokenized off the runtime's workers, and at most one such tokenization per CPU runs at a
//! time (the others wait their turn), so that a few huge prompts leave CPU to `/health` and
//! to ordinary requests.
//!
//! When the request was tokenized, each engine it is sent to is told its token ids
//! ([`RequestKv::note_sent`]): an engine's partial view anchors on them the blocks the engine
//! stores for it under a parent block the view does not know
//! ([`crate::prefix::exact::anchor`]).

use std::cell::{OnceCell, RefCell};
use std::sync::{Arc, Condvar, LazyLock, Mutex};

use crate::engines::Candidate;
use crate::policy::{KvMatches, KvSource, PrefixMatcher, off_the_workers};
use crate::prefix::PrefixIndex;
use crate::prefix::exact::{ExactIndex, ExactMatch};
use crate::request::RequestInfo;
use crate::tokens::{PromptIds, Tokenizer};

/// Bodies at least this large are tokenized off the runtime's workers, one per CPU at a time.
pub const OFF_THE_WORKERS_BYTES: usize = 64 * 1024;

/// Permits for the large tokenizations running at once: one per CPU.
static LARGE_TOKENIZATIONS: LazyLock<Permits> =
    LazyLock::new(|| Permits::new(std::thread::available_parallelism().map_or(1, |n| n.get())));

/// A counting semaphore for threads that may block (tokenizing runs off the workers).
struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A permit of [`Permits`], given back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(n: usize) -> Permits {
        Permits {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Waits for a permit.
    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// The exact source: the engines' own KV-cache views.
pub trait ExactLookup: Sync {
    /// Per engine id in `engines`: `Some(its match of token_ids)` while its exact view is live
    /// (complete or partial), `None` otherwise.
    fn matches(
        &self,
        token_ids: &[u32],
        lora_name: Option<&str>,
        engines: &[u32],
    ) -> Vec<Option<ExactMatch>>;

    /// Whether `engine`'s exact view is live.
    fn is_live(&self, engine: u32) -> bool;

    /// The request with `token_ids` is sent to `engine` (see [`ExactIndex::note_sent`]).
    fn note_sent(&self, engine: u32, token_ids: &Arc<[u32]>, lora_name: Option<&str>);
}

/// Tokenizes requests as the engines do.
pub trait RequestTokenizer: Sync {
    /// The first token ids (at most `max_tokens`) the engine would compute for the request to
    /// `path` with `body`.
    fn token_ids(&self, path: &str, body: &[u8], max_tokens: usize) -> Result<PromptIds, String>;
}

impl ExactLookup for ExactIndex {
    fn matches(
        &self,
        token_ids: &[u32],
        lora_name: Option<&str>,
        engines: &[u32],
    ) -> Vec<Option<ExactMatch>> {
        ExactIndex::matches(self, token_ids, lora_name, engines)
    }

    fn is_live(&self, engine: u32) -> bool {
        ExactIndex::is_live(self, engine)
    }

    fn note_sent(&self, engine: u32, token_ids: &Arc<[u32]>, lora_name: Option<&str>) {
        ExactIndex::note_sent(self, engine, token_ids, lora_name);
    }
}

impl RequestTokenizer for Tokenizer {
    fn token_ids(&self, path: &str, body: &[u8], max_tokens: usize) -> Result<PromptIds, String> {
        self.prompt_token_ids(path, body, max_tokens)
            .map_err(|e| e.to_string())
    }
}

/// Where one request's prefix matches come from.
pub struct Sources<'a> {
    pub approximate: &'a PrefixIndex,
    /// The approximate index's block size, in stand-in tokens.
    pub block_size: usize,
    /// Both or neither: exact matching needs the engines' views and the request's token ids.
    pub exact: Option<(&'a dyn ExactLookup, &'a dyn RequestTokenizer)>,
    /// The LoRA adapter the request's model names, if it is one (its blocks are keyed apart).
    pub lora_name: Option<&'a str>,
    /// The most tokens of a prompt worth tokenizing: the model's context length if known, else
    /// `--tokenize-max-tokens`.
    pub max_prompt_tokens: usize,
}

/// One request's prefix matches, computed on demand and kept per engine across its attempts.
pub struct RequestKv<'a> {
    sources: Sources<'a>,
    /// The request's token ids: `Some` once tokenized, `None` if tokenization failed. Shared
    /// with the engines' views it is noted on.
    token_ids: OnceCell<Option<Arc<[u32]>>>,
    known: RefCell<Known>,
}

/// The engines matched so far: (engine id, matched tokens, source) each, and the prompt's
/// length in the unit of the figures.
type Known = (Vec<(u32, usize, KvSource)>, usize);

impl<'a> RequestKv<'a> {
    pub fn new(sources: Sources<'a>) -> RequestKv<'a> {
        RequestKv {
            sources,
            token_ids: OnceCell::new(),
            known: RefCell::new((Vec::new(), 0)),
        }
    }

    /// The request's token ids, tokenizing it now if not yet done; `None` on error. A large
    /// body is tokenized off the runtime's workers (it may take milliseconds).
    fn token_ids(&self, tokenizer: &dyn RequestTokenizer, req: &RequestInfo) -> Option<&[u32]> {
        let max_tokens = self.sources.max_prompt_tokens;
        let tokenize = || tokenizer.token_ids(&req.path, &req.body, max_tokens);
        self.token_ids
            .get_or_init(|| {
                let result = if req.body.len() >= OFF_THE_WORKERS_BYTES {
                    off_the_workers(|| {
                        let _permit = LARGE_TOKENIZATIONS.acquire();
                        tokenize()
                    })
                } else {
                    tokenize()
                };
                match result {
                Ok(PromptIds { ids, complete }) => {
                    metrics::counter!("switchyard_tokenize_total", "result" => "ok").increment(1);
                    if !complete {
                        metrics::counter!("switchyard_tokenize_capped_total").increment(1);
                    }
                    Some(Arc::from(ids))
                }
                Err(e) => {
                    metrics::counter!("switchyard_tokenize_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(model = %req.model, path = %req.path, error = %e, "cannot tokenize the request; its prefix matches are approximate");
                    None
                }
            }})
            .as_deref()
    }

    /// The prefix match computed for `engine` (tokens), if a tier asked for matches.
    pub fn matched(&self, engine: u32) -> Option<usize> {
        let known = self.known.borrow();
        known
            .0
            .iter()
            .find(|(e, _, _)| *e == engine)
            .map(|(_, t, _)| *t)
    }

    /// The request is sent to `engine`: if it was tokenized (a tier computed exact matches),
    /// its token ids are noted on the engine's views, for anchoring. Before the request goes
    /// out, so that the engine's events for it find the note.
    pub fn note_sent(&self, engine: u32) {
        if let Some((views, _)) = self.sources.exact
            && let Some(Some(ids)) = self.token_ids.get()
        {
            views.note_sent(engine, ids, self.sources.lora_name);
        }
    }

    /// Computes the matches of `engines` (none known yet) and the prompt's length.
    fn compute(&self, req: &RequestInfo, engines: &[u32]) -> (Vec<(usize, KvSource)>, usize) {
        let s = &self.sources;
        let estimate = req.prompt_tokens();
        let mut exact: Vec<Option<ExactMatch>> = vec![None; engines.len()];
        if let Some((views, tokenizer)) = s.exact
            && engines.iter().any(|&e| views.is_live(e))
            && let Some(ids) = self.token_ids(tokenizer, req)
        {
            exact = views.matches(ids, s.lora_name, engines);
            exact.resize(engines.len(), None);
        }
        let real_tokens = self
            .token_ids
            .get()
            .and_then(Option::as_deref)
            .map(<[u32]>::len);
        // Every engine but those with a complete view.
        let approx_needed: Vec<u32> = engines
            .iter()
            .zip(&exact)
            .filter(|(_, x)| !x.is_some_and(|m| m.complete))
            .map(|(&e, _)| e)
            .collect();
        let approx = if approx_needed.is_empty() || req.block_hashes().is_empty() {
            vec![0; approx_needed.len()]
        } else {
            s.approximate
                .match_blocks(req.block_hashes(), &approx_needed)
                .into_iter()
                .map(|b| b * s.block_size)
                .collect()
        };
        // Approximate figures are in stand-in tokens: scaled to real ones once tokenized.
        let scale = |t: usize| match real_tokens {
            Some(real) if estimate > 0 => {
                ((t as u128 * real as u128 / estimate as u128) as usize).min(real)
            }
            _ => t,
        };
        let mut approx = approx.into_iter();
        let out = exact
            .into_iter()
            .map(|x| match x {
                Some(m) if m.complete => (m.tokens, KvSource::Exact),
                partial => {
                    let approx = scale(approx.next().unwrap_or(0));
                    match partial {
                        Some(m) if m.tokens >= approx => (m.tokens, KvSource::Partial),
                        _ => (approx, KvSource::Approximate),
                    }
                }
            })
            .collect();
        (out, real_tokens.unwrap_or(estimate))
    }
}

impl PrefixMatcher for RequestKv<'_> {
    fn matches(&self, req: &RequestInfo, cands: &[Candidate]) -> KvMatches {
        let mut known = self.known.borrow_mut();
        let missing: Vec<u32> = cands
            .iter()
            .map(|c| c.engine.id)
            .filter(|id| !known.0.iter().any(|k| k.0 == *id))
            .collect();
        if !missing.is_empty() {
            let (figures, prompt_tokens) = self.compute(req, &missing);
            known
                .0
                .extend(missing.iter().zip(figures).map(|(&e, (t, s))| (e, t, s)));
            known.1 = prompt_tokens;
        }
        let (tokens, sources) = cands
            .iter()
            .map(|c| {
                known
                    .0
                    .iter()
                    .find(|k| k.0 == c.engine.id)
                    .map_or((0, KvSource::Approximate), |k| (k.1, k.2))
            })
            .unzip();
        KvMatches {
            tokens,
            sources,
            prompt_tokens: known.1,
        }
    }
}

#[cfg(test)]
mod tests;
