//! How much of a prompt is tokenized for prefix matching, and how, at a cost bounded for any
//! body.
//!
//! **What.** At most `max_tokens` tokens of a prompt: the first ones, the only ones prefix
//! matching can use. The router's cap is `--tokenize-max-tokens` (default
//! [`DEFAULT_MAX_TOKENS`]), lowered to a model's `max_model_len` when its engines' model card
//! gives one: vLLM refuses a prompt longer than the context, so no engine ever caches tokens
//! past it.
//!
//! **Text budget.** Before tokenizing, the text is cut to [`text_budget`]`(max_tokens)` bytes
//! ([`TEXT_BYTES_PER_TOKEN`] per token): each message's text before the chat template is
//! rendered (so no copy of a huge message is made), and the rendered text as it is written.
//! Real text averages 3 to 5 bytes per token with the tokenizers of today's models (English
//! prose ~4.5, code ~4, CJK ~3 with a 131k vocabulary); 8 is a bound ordinary prompts stay
//! under, so their first `max_tokens` tokens all come from the kept text. A prompt with more
//! bytes per token than that (long runs of one character) just gets fewer than `max_tokens`
//! tokens compared: a shorter match, never a false one.
//!
//! A message's text is cut only when it is longer than the budget, and never shorter than the
//! budget once trailing whitespace is taken off (templates `trim` a message), so the rendered
//! text agrees with the full one on at least its first `budget` bytes for templates that write
//! each message's text (trimmed or not) where it goes; a template that picks what to write by
//! looking further into a message than the budget (Qwen3's `</think>` split of an earlier
//! assistant turn longer than the budget) is the exception.
//!
//! **Tokenizing in chunks.** The Hugging Face tokenizer allocates some hundred bytes per input
//! byte (normalized-string alignments, offsets, per-token strings), so the text is tokenized
//! [`CHUNK_BYTES`] at a time (peak memory per tokenization is then constant) and the pieces are
//! joined where they provably agree:
//!
//! - from a chunk that is not the end of the whole prompt, the tokens of the last pre-token
//!   (word) reaching into the final [`CUT_SLACK_BYTES`] are dropped: their ids could differ
//!   from the full text's (a word cut in two, a regex look-ahead past the cut). The tokens
//!   before are those of the full text: a pre-tokenizer's splits and a per-word model's
//!   tokens depend only on the text up to the split's end (and one look-ahead character);
//! - the next chunk starts [`OVERLAP_BYTES`] before the first token not yet kept, and its
//!   tokens are used only if, past its first word (which may differ: a prefix space, a split
//!   word), they equal the kept tokens on the overlap, same ids at the same offsets. From a
//!   common split boundary both tokenizations read the same text with no memory of what came
//!   before, so they go on alike. If they do not agree, tokenizing stops there: the ids are a
//!   prefix of the true ones, and the match can only be shorter.
//!
//! Tokenizers without a pre-tokenizer (one "word" per text, e.g. Llama 2's SentencePiece BPE)
//! rely on BPE's locality instead of word boundaries for the cuts: tokens within
//! [`CUT_SLACK_BYTES`] of a cut, and the first [`RESYNC_SKIP_BYTES`] of a chunk, are not used.

/// The default `--tokenize-max-tokens`: 128 Ki tokens, the context length of most of today's
/// long-context models.
pub const DEFAULT_MAX_TOKENS: usize = 131_072;

/// Bytes of prompt text kept per token of the cap (see the module documentation).
pub const TEXT_BYTES_PER_TOKEN: usize = 8;

/// Text given to the Hugging Face tokenizer at once.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// From a chunk that is not the prompt's end, tokens ending within this many bytes of its end
/// (and the rest of their word) are not kept.
pub const CUT_SLACK_BYTES: usize = 1024;

/// A chunk after the first starts this far before the first token not yet kept.
pub const OVERLAP_BYTES: usize = 1024;

/// The first bytes of a chunk after the first whose tokens are never used (nor compared).
pub const RESYNC_SKIP_BYTES: usize = 256;

/// A message's text is cut this far past the budget, then its trailing whitespace taken off.
const CUT_GUARD_BYTES: usize = 4096;

/// The bytes of prompt text worth keeping for `max_tokens` tokens.
pub fn text_budget(max_tokens: usize) -> usize {
    max_tokens.saturating_mul(TEXT_BYTES_PER_TOKEN)
}

/// `s` cut for a text budget of `budget` bytes: whole if not longer than `budget` plus a guard;
/// else its first `budget + guard` bytes without trailing whitespace, unless that leaves fewer
/// than `budget` bytes of non-whitespace-bounded text (then whole). The flag says whether it
/// was cut.
pub(crate) fn cap_text(s: std::borrow::Cow<'_, str>, budget: usize) -> (String, bool) {
    let limit = budget.saturating_add(CUT_GUARD_BYTES);
    if s.len() <= limit {
        return (s.into_owned(), false);
    }
    let head = &s[..s.floor_char_boundary(limit)];
    let kept = head.trim_end();
    if kept.trim_start().len() < budget {
        return (s.into_owned(), false);
    }
    (kept.to_owned(), true)
}

/// The first token ids of a prompt, at most `max_tokens`, and whether they are all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    pub ids: Vec<u32>,
    /// Every token of the prompt is in `ids` (nothing was cut).
    pub complete: bool,
}

/// One token of a chunk at absolute byte offsets in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placed {
    id: u32,
    start: usize,
    end: usize,
}

/// The token ids of `text` (see the module documentation), at most `max_tokens`. `complete`:
/// `text` is the whole prompt; else it is the start of a longer one, and its last tokens are
/// dropped. `usize::MAX` tokens of a complete text: the whole text at once.
pub(crate) fn encode_prefix(
    tok: &tokenizers::Tokenizer,
    text: &str,
    add_special: bool,
    complete: bool,
    max_tokens: usize,
) -> Result<PromptIds, tokenizers::Error> {
    if complete && (text.len() <= CHUNK_BYTES || max_tokens == usize::MAX) {
        let mut ids = tok.encode_fast(text, add_special)?.get_ids().to_vec();
        let complete = ids.len() <= max_tokens;
        ids.truncate(max_tokens);
        return Ok(PromptIds { ids, complete });
    }
    let mut ids: Vec<u32> = Vec::new();
    // Special tokens the post-processor appends after the text (e.g. an EOS), from chunk 0.
    let mut trailer: Vec<u32> = Vec::new();
    // The kept tokens of the overlap with the next chunk, and where the next one to keep starts.
    let mut overlap: Vec<Placed> = Vec::new();
    let mut next: usize = 0;
    let mut from: usize = 0;
    loop {
        let end = text.floor_char_boundary(from.saturating_add(CHUNK_BYTES));
        let last = end == text.len();
        let first_chunk = from == 0;
        let enc = tok.encode(&text[from..end], add_special && first_chunk)?;
        let placed: Vec<Placed> = enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(s, e))| Placed {
                id,
                start: from + s,
                end: from + e,
            })
            .collect();
        let words = enc.get_word_ids();
        let body = if first_chunk {
            // Leading and trailing specials (no word) of the post-processor.
            let text_end = words.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
            trailer = placed[text_end..].iter().map(|p| p.id).collect();
            0..text_end
        } else {
            match resync(&overlap, &placed, words, from, next) {
                Some(j) => j..placed.len(),
                None => return Ok(finish(ids, max_tokens, false)),
            }
        };
        let stop = if last && complete {
            body.end
        } else {
            safe_end(
                &placed[..body.end],
                words,
                body.start,
                end - CUT_SLACK_BYTES.min(end),
            )
        };
        if stop <= body.start && !first_chunk {
            return Ok(finish(ids, max_tokens, false));
        }
        let begin = if first_chunk { 0 } else { body.start };
        ids.extend(placed[begin..stop].iter().map(|p| p.id));
        if last || ids.len() >= max_tokens {
            let done = last && complete && stop == body.end;
            if done {
                ids.extend_from_slice(&trailer);
            }
            return Ok(finish(ids, max_tokens, done));
        }
        let kept = &placed[body.start.max(begin)..stop];
        let Some(resume) = placed.get(stop).map(|p| p.start) else {
            return Ok(finish(ids, max_tokens, false));
        };
        let keep_from = kept.partition_point(|p| p.start < resume.saturating_sub(OVERLAP_BYTES));
        overlap = kept[keep_from.min(kept.len().saturating_sub(1))..].to_vec();
        let Some(start) = overlap.first().map(|p| p.start) else {
            return Ok(finish(ids, max_tokens, false));
        };
        if start <= from {
            return Ok(finish(ids, max_tokens, false));
        }
        next = resume;
        from = start;
    }
}

fn finish(mut ids: Vec<u32>, max_tokens: usize, complete: bool) -> PromptIds {
    let complete = complete && ids.len() <= max_tokens;
    ids.truncate(max_tokens);
    PromptIds { ids, complete }
}

/// The end (exclusive index) of the tokens of `placed[first..]` that are safe to keep from a
/// chunk that is not the prompt's end: those before the first token ending after `safe`,
/// without the rest of that token's word; if that word is all the chunk has, up to that token.
fn safe_end(placed: &[Placed], words: &[Option<u32>], first: usize, safe: usize) -> usize {
    let Some(at) = placed[first..]
        .iter()
        .position(|p| p.end > safe)
        .map(|i| i + first)
    else {
        return placed.len();
    };
    // The chunk's first token of text (after the post-processor's leading specials).
    let text_first = (first..at).find(|&i| words[i].is_some()).unwrap_or(at);
    let mut i = at;
    while i > text_first && words[i].is_some() && words[i - 1] == words[i] {
        i -= 1;
    }
    if i == text_first { at } else { i }
}

/// Where the kept tokens go on in a new chunk starting at `from`: the index of its token
/// starting at `next`, if its tokens past its first word and the first [`RESYNC_SKIP_BYTES`]
/// equal `overlap`'s tokens at the same offsets up to there (at least one of them).
fn resync(
    overlap: &[Placed],
    placed: &[Placed],
    words: &[Option<u32>],
    from: usize,
    next: usize,
) -> Option<usize> {
    let j = placed.iter().position(|p| p.start >= next)?;
    if placed[j].start != next {
        return None;
    }
    let first_word = words.first().copied().flatten();
    let m = (0..j).find(|&i| {
        placed[i].start >= from + RESYNC_SKIP_BYTES
            && (first_word.is_none() || words[i] != first_word)
    })?;
    let k = overlap.iter().position(|p| p.start == placed[m].start)?;
    (overlap[k..] == placed[m..j]).then_some(j)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn text_is_cut_only_past_the_budget_and_never_below_it() {
        let short = "abc ".repeat(10);
        assert_eq!(
            cap_text(Cow::from(short.as_str()), 8),
            (short.clone(), false)
        );
        let long = "word ".repeat(4000);
        let (cut, was_cut) = cap_text(Cow::from(long.as_str()), 100);
        assert!(was_cut);
        assert!(cut.len() >= 100 && long.starts_with(&cut) && !cut.ends_with(' '));
        // Mostly whitespace past the first bytes: kept whole rather than cut short.
        let spaces = format!("x{}y", " ".repeat(20_000));
        assert_eq!(
            cap_text(Cow::from(spaces.as_str()), 100),
            (spaces.clone(), false)
        );
        // Cuts land on character boundaries.
        let wide = "東京".repeat(3000);
        let (cut, was_cut) = cap_text(Cow::from(wide.as_str()), 1000);
        assert!(was_cut && wide.starts_with(&cut));
        assert_eq!(text_budget(usize::MAX), usize::MAX);
    }
}
