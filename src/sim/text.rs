//! Deterministic generated text: every token is exactly [`tokens::BYTES_PER_TOKEN`] bytes.
//!
//! Token `i` of every completion is a space followed by a consonant-vowel-consonant syllable
//! (" bal", " kor", ...) picked by hashing the engine seed and `i`. Being 4 ASCII bytes, a
//! generated token counts as exactly one token of the stand-in tokenizer, so a client that
//! appends answers to its history keeps token counts (and block boundaries) consistent.

use crate::tokens;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const CONSONANTS: &[u8] = b"bcdfghjklmnprstvz";
const VOWELS: &[u8] = b"aeiou";
/// Words precomputed at start-up (32 KiB of text); positions repeat with this period.
const TABLE_TOKENS: usize = 8192;

const _: () = assert!(tokens::BYTES_PER_TOKEN == 4);

/// The generated words of one engine.
#[derive(Debug)]
pub(crate) struct Words {
    table: String,
}

impl Words {
    pub(crate) fn new(seed: u64) -> Words {
        let mut table = String::with_capacity(TABLE_TOKENS * tokens::BYTES_PER_TOKEN);
        for i in 0..TABLE_TOKENS {
            push_word(seed, i, &mut table);
        }
        Words { table }
    }

    /// Appends the text of tokens `start..end` to `out`.
    pub(crate) fn push(&self, start: usize, end: usize, out: &mut String) {
        let mut i = start;
        while i < end {
            let a = i % TABLE_TOKENS;
            let n = (end - i).min(TABLE_TOKENS - a);
            out.push_str(
                &self.table[a * tokens::BYTES_PER_TOKEN..(a + n) * tokens::BYTES_PER_TOKEN],
            );
            i += n;
        }
    }

    /// The text of token `i`.
    pub(crate) fn word(&self, i: usize) -> &str {
        let a = i % TABLE_TOKENS;
        &self.table[a * tokens::BYTES_PER_TOKEN..(a + 1) * tokens::BYTES_PER_TOKEN]
    }
}

fn push_word(seed: u64, i: usize, out: &mut String) {
    let h = xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed);
    let pick = |set: &[u8], shift: u32| char::from(set[((h >> shift) % set.len() as u64) as usize]);
    out.push(' ');
    out.push(pick(CONSONANTS, 0));
    out.push(pick(VOWELS, 16));
    out.push(pick(CONSONANTS, 32));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_is_four_bytes_and_deterministic() {
        let w = Words::new(42);
        let mut s = String::new();
        w.push(0, 20, &mut s);
        assert_eq!(s.len(), 80);
        assert_eq!(tokens::estimate_tokens(s.len()), 20);
        for i in 0..20 {
            assert_eq!(w.word(i).len(), 4);
            assert_eq!(&s[i * 4..i * 4 + 4], w.word(i));
            assert!(w.word(i).starts_with(' '));
        }
        let mut again = String::new();
        Words::new(42).push(0, 20, &mut again);
        assert_eq!(s, again);
        let mut other = String::new();
        Words::new(43).push(0, 20, &mut other);
        assert_ne!(s, other, "the seed changes the words");
    }

    #[test]
    fn positions_beyond_the_table_wrap_around() {
        let w = Words::new(1);
        let mut s = String::new();
        w.push(TABLE_TOKENS - 2, 2 * TABLE_TOKENS + 3, &mut s);
        assert_eq!(s.len(), (TABLE_TOKENS + 5) * 4);
        assert_eq!(&s[8..12], w.word(0));
        assert_eq!(w.word(TABLE_TOKENS + 7), w.word(7));
    }
}
