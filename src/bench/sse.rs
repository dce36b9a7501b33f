//! An incremental reader of OpenAI-style SSE streams: the answer text of each event, the
//! `[DONE]` marker, and error events.

use serde::Deserialize;

/// What one SSE event carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// Answer text (`choices[].text` or `choices[].delta.content`), possibly empty (e.g. the
    /// role-only first chunk of a chat stream, or a usage chunk).
    Content(String),
    /// `data: [DONE]`.
    Done,
    /// An event with an `error` object, or data that is not JSON.
    Error(String),
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// Splits a byte stream into SSE events (lines ending in `\n` or `\r\n`; a blank line ends an
/// event; `data:` lines of one event are joined with `\n`; other fields are ignored).
#[derive(Debug, Default)]
pub struct SseReader {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseReader {
    pub fn new() -> SseReader {
        SseReader::default()
    }

    /// Feeds bytes; appends each event completed by them to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, out);
            self.line = line;
            self.line.clear();
        }
        self.line.extend_from_slice(rest);
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                out.push(parse_data(&self.data));
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(v);
            self.has_data = true;
        }
    }
}

fn parse_data(data: &[u8]) -> SseEvent {
    if data == b"[DONE]" {
        return SseEvent::Done;
    }
    match serde_json::from_slice::<Chunk>(data) {
        Ok(c) => {
            if let Some(e) = c.error {
                let msg = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.to_string());
                return SseEvent::Error(msg);
            }
            let mut text = String::new();
            for ch in c.choices {
                if let Some(t) = ch.text {
                    text.push_str(&t);
                }
                if let Some(t) = ch.delta.and_then(|d| d.content) {
                    text.push_str(&t);
                }
            }
            SseEvent::Content(text)
        }
        Err(e) => SseEvent::Error(format!(
            "unreadable event ({e}): {}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut r = SseReader::new();
        let mut out = Vec::new();
        for c in chunks {
            r.push(c, &mut out);
        }
        out
    }

    #[test]
    fn chat_and_completion_events_split_anywhere() {
        let stream =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\" bal\"}}]}\n\n\
data: {\"choices\":[{\"text\":\" kor\",\"finish_reason\":\"length\"}]}\r\n\r\n\
: comment\n\
data: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\n\
data: [DONE]\n\n";
        let want = vec![
            SseEvent::Content(String::new()),
            SseEvent::Content(" bal".into()),
            SseEvent::Content(" kor".into()),
            SseEvent::Content(String::new()),
            SseEvent::Done,
        ];
        assert_eq!(all(&[stream]), want);
        // Byte by byte gives the same events.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytes), want);
    }

    #[test]
    fn error_events_and_garbage() {
        let ev =
            all(&[b"data: {\"error\":{\"message\":\"engine stream failed\"}}\n\ndata: nope\n\n"]);
        assert_eq!(ev[0], SseEvent::Error("engine stream failed".into()));
        assert!(matches!(ev[1], SseEvent::Error(_)));
        // An unterminated event is not emitted.
        assert!(all(&[b"data: [DONE]\n"]).is_empty());
    }
}
