//! Production traces for `switchyard bench --trace FILE`: the two JSON-lines formats, recognised
//! from the fields of the first record, read one line at a time (a multi-gigabyte file is never
//! held in memory; a line is capped at [`MAX_LINE_BYTES`]).
//!
//! - **Mooncake** (FAST'25, kvcache-ai/Mooncake `FAST25-release/traces/`): `timestamp`
//!   (milliseconds), `input_length`, `output_length`, `hash_ids` (one id per 512-token block).
//! - **Alibaba Bailian** (ATC'25, alibaba-edu/qwen-bailian-usagetraces-anon): `chat_id`,
//!   `parent_chat_id` (-1 or null for a first turn), `timestamp` (seconds), `input_length`,
//!   `output_length`, `type`, `turn`, `hash_ids` (one id per 16-token block).
//!
//! Every error names the file and line. Timestamps must not decrease; times are counted from
//! the first record's.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The longest line read (a Bailian record of a 128K-token prompt is about 80 KB).
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// A trace file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceFormat {
    Mooncake,
    Bailian,
}

impl TraceFormat {
    pub fn name(self) -> &'static str {
        match self {
            TraceFormat::Mooncake => "mooncake",
            TraceFormat::Bailian => "bailian",
        }
    }

    /// Tokens per hash id.
    pub fn block_tokens(self) -> usize {
        match self {
            TraceFormat::Mooncake => 512,
            TraceFormat::Bailian => 16,
        }
    }

    /// Seconds per timestamp unit.
    fn seconds_per_unit(self) -> f64 {
        match self {
            TraceFormat::Mooncake => 0.001,
            TraceFormat::Bailian => 1.0,
        }
    }
}

/// Why a trace cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--trace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Record {
        path: String,
        line: usize,
        message: String,
    },
    #[error("--trace {path}: the file has no records")]
    Empty { path: String },
}

/// One record of a trace, as the benchmark uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// 0-based number of the record in the file (blank lines are not records).
    pub index: usize,
    /// 1-based line number, for messages.
    pub line: usize,
    /// Seconds after the first record's timestamp (at the trace's own speed).
    pub at: f64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
    /// The session key sent as `x-user-id`: Bailian, the root of the record's chat chain
    /// (`chat-ROOT`); Mooncake (no session ids), the prompt's second block, the first after the
    /// shared system block (`conv-ID`: requests sharing their first 1,024 tokens are one
    /// conversation), or the record's own `req-INDEX` for a one-block prompt.
    pub session: String,
    /// Bailian's `turn`; 0 for Mooncake.
    pub turn: usize,
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    hash_ids: Vec<u64>,
}

#[derive(Deserialize)]
struct BailianLine {
    chat_id: i64,
    parent_chat_id: Option<i64>,
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    #[serde(rename = "type")]
    _kind: serde::de::IgnoredAny,
    turn: usize,
    hash_ids: Vec<u64>,
}

/// The fields of a record, in the file's order of formats to try.
const MOONCAKE_FIELDS: &[&str] = &["timestamp", "input_length", "output_length", "hash_ids"];

/// Reads a trace lazily, one record per [`Iterator::next`].
pub struct TraceReader {
    path: PathBuf,
    reader: BufReader<File>,
    format: TraceFormat,
    line: usize,
    index: usize,
    first_ts: Option<f64>,
    last_ts: f64,
    /// Bailian: each chat's chain root (a chat appears after its parent).
    roots: HashMap<i64, i64>,
    /// The first record's line, read to recognise the format.
    pending: Option<(usize, Vec<u8>)>,
    buf: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("line", &self.line)
            .finish()
    }
}

impl TraceReader {
    /// Opens `path` and recognises its format from the first record's fields.
    pub fn open(path: &Path) -> Result<TraceReader, TraceError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| TraceError::Open {
            path: shown.clone(),
            source,
        })?;
        let mut r = TraceReader {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 16, file),
            format: TraceFormat::Mooncake,
            line: 0,
            index: 0,
            first_ts: None,
            last_ts: f64::NEG_INFINITY,
            roots: HashMap::new(),
            pending: None,
            buf: Vec::new(),
            done: false,
        };
        let Some(first) = r.next_line()? else {
            return Err(TraceError::Empty { path: shown });
        };
        r.format = r.recognise(&first)?;
        r.pending = Some((r.line, first));
        Ok(r)
    }

    pub fn format(&self) -> TraceFormat {
        self.format
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, line: usize, message: impl Into<String>) -> TraceError {
        TraceError::Record {
            path: self.path.display().to_string(),
            line,
            message: message.into(),
        }
    }

    /// The next non-blank line (without its line end), or `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, TraceError> {
        loop {
            self.buf.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| self.error(self.line + 1, format!("cannot read: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(self.error(
                    self.line,
                    format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                ));
            }
            let text = self.buf.trim_ascii();
            if !text.is_empty() {
                return Ok(Some(text.to_vec()));
            }
        }
    }

    fn recognise(&self, line: &[u8]) -> Result<TraceFormat, TraceError> {
        let fields: HashMap<String, serde::de::IgnoredAny> = serde_json::from_slice(line)
            .map_err(|e| self.error(self.line, format!("not a JSON object: {e}")))?;
        if fields.contains_key("chat_id") {
            return Ok(TraceFormat::Bailian);
        }
        if MOONCAKE_FIELDS.iter().all(|f| fields.contains_key(*f)) {
            return Ok(TraceFormat::Mooncake);
        }
        let mut have: Vec<&str> = fields.keys().map(String::as_str).collect();
        have.sort_unstable();
        Err(self.error(
            self.line,
            format!(
                "neither a Mooncake record (timestamp, input_length, output_length, hash_ids) nor \
                 a Bailian one (chat_id, parent_chat_id, timestamp, input_length, output_length, \
                 type, turn, hash_ids); its fields: {}",
                have.join(", ")
            ),
        ))
    }

    fn parse(&mut self, line: usize, text: &[u8]) -> Result<TraceRecord, TraceError> {
        let bad = |e: serde_json::Error| {
            self.error(line, format!("not a {} record: {e}", self.format.name()))
        };
        let (ts, input_length, output_length, hash_ids, session, turn) = match self.format {
            TraceFormat::Mooncake => {
                let r: MooncakeLine = serde_json::from_slice(text).map_err(bad)?;
                let session = match r.hash_ids.get(1) {
                    Some(id) => format!("conv-{id}"),
                    None => format!("req-{}", self.index),
                };
                (
                    r.timestamp,
                    r.input_length,
                    r.output_length,
                    r.hash_ids,
                    session,
                    0,
                )
            }
            TraceFormat::Bailian => {
                let r: BailianLine = serde_json::from_slice(text).map_err(bad)?;
                let root = match r.parent_chat_id.filter(|&p| p >= 0) {
                    // A parent before the slice's start is its own root as far as we know.
                    Some(p) => self.roots.get(&p).copied().unwrap_or(p),
                    None => r.chat_id,
                };
                self.roots.insert(r.chat_id, root);
                (
                    r.timestamp,
                    r.input_length,
                    r.output_length,
                    r.hash_ids,
                    format!("chat-{root}"),
                    r.turn,
                )
            }
        };
        let ts = ts * self.format.seconds_per_unit();
        if !ts.is_finite() || ts < 0.0 {
            return Err(self.error(
                line,
                format!("timestamp must be a non-negative number, got {ts} s"),
            ));
        }
        if ts < self.last_ts {
            return Err(self.error(
                line,
                format!(
                    "timestamps must not decrease: {ts} s after {} s",
                    self.last_ts
                ),
            ));
        }
        self.last_ts = ts;
        let first = *self.first_ts.get_or_insert(ts);
        let rec = TraceRecord {
            index: self.index,
            line,
            at: ts - first,
            input_length,
            output_length,
            hash_ids,
            session,
            turn,
        };
        self.index += 1;
        Ok(rec)
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceRecord, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = match self.pending.take() {
            Some(p) => Ok(Some(p)),
            None => self.next_line().map(|l| l.map(|text| (self.line, text))),
        };
        let out = match next {
            Ok(Some((line, text))) => Some(self.parse(line, &text)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        if !matches!(out, Some(Ok(_))) {
            self.done = true;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn read(text: &str) -> Result<Vec<TraceRecord>, TraceError> {
        let f = file(text);
        TraceReader::open(f.path())?.collect()
    }

    #[test]
    fn mooncake_records_parse_with_times_in_seconds_and_conversation_keys() {
        let recs = read(
            "{\"timestamp\": 1000, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 7]}\n\
             \n\
             {\"timestamp\": 3500, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\r\n",
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0],
            TraceRecord {
                index: 0,
                line: 1,
                at: 0.0,
                input_length: 600,
                output_length: 5,
                hash_ids: vec![0, 7],
                session: "conv-7".into(),
                turn: 0,
            }
        );
        assert_eq!((recs[1].index, recs[1].line), (1, 3));
        assert!((recs[1].at - 2.5).abs() < 1e-12);
        assert_eq!(recs[1].session, "req-1");
    }

    #[test]
    fn bailian_records_parse_with_chain_roots() {
        let recs = read(concat!(
            r#"{"chat_id": 10, "parent_chat_id": -1, "timestamp": 100.5, "input_length": 40, "output_length": 8, "type": "text", "turn": 1, "hash_ids": [1, 2, 3]}"#,
            "\n",
            r#"{"chat_id": 11, "parent_chat_id": 10, "timestamp": 101.0, "input_length": 60, "output_length": 8, "type": "text", "turn": 2, "hash_ids": [1, 2, 3, 4]}"#,
            "\n",
            r#"{"chat_id": 12, "parent_chat_id": 11, "timestamp": 102.0, "input_length": 70, "output_length": 8, "type": "text", "turn": 3, "hash_ids": [1, 2, 3, 4, 5]}"#,
            "\n",
            r#"{"chat_id": 13, "parent_chat_id": 99, "timestamp": 102.0, "input_length": 16, "output_length": 8, "type": "image", "turn": 2, "hash_ids": [6]}"#,
            "\n",
            r#"{"chat_id": 14, "parent_chat_id": null, "timestamp": 103.0, "input_length": 16, "output_length": 8, "type": "text", "turn": 1, "hash_ids": [7]}"#,
        ))
        .unwrap();
        let keys: Vec<&str> = recs.iter().map(|r| r.session.as_str()).collect();
        assert_eq!(
            keys,
            ["chat-10", "chat-10", "chat-10", "chat-99", "chat-14"]
        );
        assert_eq!(recs[2].turn, 3);
        assert!((recs[1].at - 0.5).abs() < 1e-12, "seconds from the first");
    }

    #[test]
    fn bad_records_are_named_by_file_and_line() {
        let f = file("{\"timestamp\": 0, \"input_length\": 1}\n");
        let e = TraceReader::open(f.path()).unwrap_err().to_string();
        let at = format!("{}:1:", f.path().display());
        assert!(
            e.starts_with(&at) && e.contains("neither a Mooncake"),
            "{e}"
        );
        assert!(e.contains("input_length, timestamp"), "{e}");

        for (text, line, needle) in [
            ("[1, 2]\n", 1, "not a JSON object"),
            (
                "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\n\n{\"timestamp\": 1, \"input_length\": \"x\", \"output_length\": 1, \"hash_ids\": []}\n",
                3,
                "not a mooncake record: invalid type",
            ),
            (
                "{\"timestamp\": 5, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\n{\"timestamp\": 4, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\n",
                2,
                "timestamps must not decrease",
            ),
            (
                "{\"chat_id\": 1, \"parent_chat_id\": -1, \"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"turn\": 1, \"hash_ids\": [1]}\n",
                1,
                "missing field `type`",
            ),
        ] {
            let f = file(text);
            let e = TraceReader::open(f.path())
                .and_then(|r| r.collect::<Result<Vec<_>, _>>())
                .unwrap_err()
                .to_string();
            let at = format!("{}:{line}: ", f.path().display());
            assert!(e.starts_with(&at) && e.contains(needle), "{text:?}: {e}");
        }
        let e = read("\n\n").unwrap_err().to_string();
        assert!(e.contains("no records"), "{e}");
        let e = TraceReader::open(Path::new("/nonexistent/trace.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--trace /nonexistent/trace.jsonl: "), "{e}");
    }

    #[test]
    fn the_reader_stops_after_an_error() {
        let f = file(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\nnope\n{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\n",
        );
        let mut r = TraceReader::open(f.path()).unwrap();
        assert!(r.next().unwrap().is_ok());
        assert!(r.next().unwrap().is_err());
        assert!(r.next().is_none());
    }
}
