//! Seeded filler text whose size is exact in tokens of the stand-in tokenizer.
//!
//! Every generated token is 4 ASCII bytes — a space and three lowercase letters — so a text
//! of `n` tokens is exactly `n * BYTES_PER_TOKEN` bytes and counts as `n` tokens for the router
//! and the simulated engines alike.

use crate::tokens::BYTES_PER_TOKEN;

const CONSONANTS: &[u8] = b"bcdfghjklmnprstvwz";
const VOWELS: &[u8] = b"aeiou";

const _: () = assert!(BYTES_PER_TOKEN == 4);

/// A seeded source of filler text.
#[derive(Debug, Clone)]
pub struct TextGen {
    rng: fastrand::Rng,
}

impl TextGen {
    /// A generator for the text stream `stream` of the workload seeded with `seed`: equal
    /// `(seed, stream)` give equal text, different streams give unrelated text.
    pub fn new(seed: u64, stream: u64) -> TextGen {
        TextGen {
            rng: fastrand::Rng::with_seed(mix(seed, stream)),
        }
    }

    /// `tokens` tokens of text.
    pub fn text(&mut self, tokens: usize) -> String {
        let mut s = String::with_capacity(tokens * BYTES_PER_TOKEN);
        for _ in 0..tokens {
            s.push(' ');
            s.push(pick(&mut self.rng, CONSONANTS));
            s.push(pick(&mut self.rng, VOWELS));
            s.push(pick(&mut self.rng, CONSONANTS));
        }
        s
    }
}

fn pick(rng: &mut fastrand::Rng, set: &[u8]) -> char {
    char::from(set[rng.usize(..set.len())])
}

/// Mixes a seed and a stream id into one well-spread seed (splitmix64 finaliser).
pub fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::estimate_tokens;

    #[test]
    fn sizes_are_exact_in_tokens() {
        let mut g = TextGen::new(7, 1);
        for n in [0, 1, 15, 16, 1000] {
            let t = g.text(n);
            assert_eq!(t.len(), n * BYTES_PER_TOKEN);
            assert_eq!(estimate_tokens(t.len()), n);
            assert!(t.is_ascii());
        }
    }

    #[test]
    fn seeded_and_stream_separated() {
        assert_eq!(TextGen::new(1, 2).text(50), TextGen::new(1, 2).text(50));
        assert_ne!(TextGen::new(1, 2).text(50), TextGen::new(1, 3).text(50));
        assert_ne!(TextGen::new(1, 2).text(50), TextGen::new(2, 2).text(50));
    }
}
