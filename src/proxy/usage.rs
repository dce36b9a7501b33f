//! The token usage an answer reports (`usage.prompt_tokens`, `usage.completion_tokens`), read
//! from the last bytes of its body, for a traced request's span (`gen_ai.usage.*`). Only kept
//! for requests whose span records: an untraced answer is not copied at all.
//!
//! OpenAI's answers carry `usage` at the end: a JSON answer in its last field, a stream (with
//! `stream_options.include_usage`) in its last event. The last [`TAIL_BYTES`] of the body are
//! kept and the last `"usage"` object in them is read.

use serde::Deserialize;

/// The bytes kept from the end of a body: more than a final usage event or a JSON answer's
/// closing fields.
pub const TAIL_BYTES: usize = 8 * 1024;

/// What an answer reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// The last bytes of a body.
#[derive(Debug, Default)]
pub struct UsageTail {
    buf: Vec<u8>,
}

impl UsageTail {
    /// Adds the body's next bytes, keeping at most twice [`TAIL_BYTES`] (trimmed to
    /// [`TAIL_BYTES`] when past it, so a copy is amortised over many frames).
    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - TAIL_BYTES..]);
            return;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * TAIL_BYTES {
            let cut = self.buf.len() - TAIL_BYTES;
            self.buf.drain(..cut);
        }
    }

    /// The last `"usage"` object of the tail, if it is one.
    pub fn usage(&self) -> Option<Usage> {
        let at = memchr::memmem::rfind(&self.buf, b"\"usage\"")?;
        let rest = &self.buf[at + b"\"usage\"".len()..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let rest = rest[colon..].strip_prefix(b":")?;
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Usage>();
        values.next()?.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(chunks: &[&[u8]]) -> UsageTail {
        let mut t = UsageTail::default();
        for c in chunks {
            t.push(c);
        }
        t
    }

    #[test]
    fn a_json_answers_usage_is_read() {
        let t = tail_of(&[
            br#"{"id":"cmpl-1","choices":[{"text":"hi"}],"#,
            br#""usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}}"#,
        ]);
        let u = t.usage().expect("usage");
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(3), Some(1)));
    }

    #[test]
    fn a_streams_last_usage_event_wins_over_the_nulls_before_it() {
        let mut chunks: Vec<Vec<u8>> = (0..2000)
            .map(|i| {
                format!("data: {{\"choices\":[{{\"text\":\"t{i}\"}}],\"usage\":null}}\n\n")
                    .into_bytes()
            })
            .collect();
        chunks.push(
            b"data: {\"choices\":[],\"usage\": {\"prompt_tokens\":120,\"completion_tokens\":2000}}\n\ndata: [DONE]\n\n"
                .to_vec(),
        );
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let t = tail_of(&refs);
        assert!(t.buf.len() <= 2 * TAIL_BYTES);
        let u = t.usage().expect("usage");
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (Some(120), Some(2000))
        );
    }

    #[test]
    fn no_usage_or_a_null_one_is_none() {
        assert_eq!(tail_of(&[br#"{"choices":[]}"#]).usage(), None);
        assert_eq!(tail_of(&[br#"data: {"usage":null}"#]).usage(), None);
        assert_eq!(tail_of(&[br#"{"usage""#]).usage(), None);
        let big = vec![b'x'; 3 * TAIL_BYTES];
        let t = tail_of(&[br#"{"usage":{"prompt_tokens":1}}"#, &big]);
        assert_eq!(t.usage(), None, "gone past the tail");
    }
}
