//! A trace as the benchmark replays it: `--trace-limit` (the first N records), arrival times
//! over `--trace-speed`, what is sent for each record (or why it is not), and the summary made
//! by one streaming pass before the runs (counts, tokens, the ideal hit rate).
//!
//! A request must fit the engines' context ([`CONTEXT_TOKENS`], the simulated engine's, as
//! Llama-3.1's 128K): a prompt of at least that many tokens is skipped (no room for one output
//! token); otherwise `max_tokens` (the record's `output_length`, at least 1) is cut so that
//! prompt + `max_tokens` fit. An empty prompt (`input_length` 0) is skipped. All are counted.

use std::path::PathBuf;

use serde::Serialize;

use super::trace::{TraceError, TraceFormat, TraceReader, TraceRecord};
use super::trace_ideal::{BlockHits, IdealCache};
use super::trace_prompt::TracePrompt;

/// The engines' context length: prompt + `max_tokens` must fit.
pub const CONTEXT_TOKENS: usize = 131_072;

/// What to replay.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSpec {
    pub path: PathBuf,
    /// 2 = arrivals twice as fast as in the trace.
    pub speed: f64,
    /// Only the first N records.
    pub limit: Option<usize>,
    /// Seeds the prompts' tokens.
    pub seed: u64,
    /// The engines' KV block size, in tokens (for the ideal hit rate).
    pub engine_block_size: usize,
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// The record's number in the file.
    pub index: usize,
    /// Planned send time, simulated seconds from the start of the run (trace time / speed).
    pub at: f64,
    pub session: String,
    pub turn: usize,
    pub prompt: TracePrompt,
    pub max_tokens: usize,
    /// `max_tokens` was cut to fit the context.
    pub cut: bool,
}

/// Why a record is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    Empty,
    TooLong,
}

/// What becomes of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    Send(TraceRequest),
    Skip(Skip),
}

/// The replay's records, read lazily.
#[derive(Debug)]
pub struct TraceRequests {
    reader: TraceReader,
    left: usize,
    speed: f64,
    seed: u64,
}

impl TraceRequests {
    pub fn format(&self) -> TraceFormat {
        self.reader.format()
    }

    fn plan(&self, r: TraceRecord) -> Planned {
        if r.input_length == 0 {
            return Planned::Skip(Skip::Empty);
        }
        if r.input_length >= CONTEXT_TOKENS {
            return Planned::Skip(Skip::TooLong);
        }
        let wanted = r.output_length.max(1);
        let max_tokens = wanted.min(CONTEXT_TOKENS - r.input_length);
        let prompt = TracePrompt::new(
            self.seed,
            r.index,
            r.input_length,
            &r.hash_ids,
            self.format().block_tokens(),
        );
        Planned::Send(TraceRequest {
            index: r.index,
            at: r.at / self.speed,
            session: r.session,
            turn: r.turn,
            prompt,
            max_tokens,
            cut: max_tokens < wanted,
        })
    }
}

impl Iterator for TraceRequests {
    type Item = Result<(Planned, Vec<u64>), TraceError>;

    /// The next record's fate, with its hash ids.
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.reader.next()?.map(|r| {
            let ids = r.hash_ids.clone();
            (self.plan(r), ids)
        }))
    }
}

/// The trace as replayed, from one pass before the runs (written to `bench.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub path: String,
    pub format: TraceFormat,
    /// Tokens per hash id.
    pub block_tokens: usize,
    pub speed: f64,
    pub limit: Option<usize>,
    pub seed: u64,
    /// Records read (after the limit).
    pub records: usize,
    /// Requests sent per run.
    pub requests: usize,
    /// Records not sent: `input_length` 0, or a prompt of at least the context length.
    pub skipped_empty: usize,
    pub skipped_too_long: usize,
    /// Requests whose `max_tokens` was cut to fit the context.
    pub cut_max_tokens: usize,
    /// Requests with tokens beyond their hash ids' (padded with tokens of their own).
    pub padded: usize,
    /// Prompt tokens and `max_tokens` of the requests sent.
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    /// From the first to the last request's planned time, simulated seconds.
    pub duration_s: f64,
    /// Ideal prefix-cache hit rate: the requests sent, in order, into one unbounded cache of
    /// `ideal_block_size`-token blocks (hit tokens / prompt tokens, as the engines count).
    pub ideal_cache_hit_rate: Option<f64>,
    pub ideal_block_size: usize,
    /// The same at the trace's own blocks: leading hash ids seen before / hash ids.
    pub trace_block_hit_rate: Option<f64>,
    /// Tokens of the distinct prompt prefixes (the working set of the ideal cache).
    pub distinct_tokens: u64,
    /// The largest request's prompt + `max_tokens`, in tokens: the KV memory one engine needs
    /// to serve it at all.
    pub largest_request_tokens: u64,
}

impl TraceSpec {
    /// Opens the trace for one replay.
    pub fn requests(&self) -> Result<TraceRequests, TraceError> {
        Ok(TraceRequests {
            reader: TraceReader::open(&self.path)?,
            left: self.limit.unwrap_or(usize::MAX),
            speed: self.speed,
            seed: self.seed,
        })
    }

    /// Reads the replayed part of the trace once: every record checked (errors name their
    /// line), counted, and put into the ideal caches.
    pub fn summarise(&self) -> Result<TraceSummary, TraceError> {
        let reqs = self.requests()?;
        let format = reqs.format();
        let mut s = TraceSummary {
            path: self.path.display().to_string(),
            format,
            block_tokens: format.block_tokens(),
            speed: self.speed,
            limit: self.limit,
            seed: self.seed,
            records: 0,
            requests: 0,
            skipped_empty: 0,
            skipped_too_long: 0,
            cut_max_tokens: 0,
            padded: 0,
            prompt_tokens: 0,
            max_tokens: 0,
            duration_s: 0.0,
            ideal_cache_hit_rate: None,
            ideal_block_size: self.engine_block_size,
            trace_block_hit_rate: None,
            distinct_tokens: 0,
            largest_request_tokens: 0,
        };
        let mut ideal = IdealCache::new(self.engine_block_size);
        let mut blocks = BlockHits::default();
        let mut first = None;
        for item in reqs {
            let (planned, ids) = item?;
            s.records += 1;
            match planned {
                Planned::Skip(Skip::Empty) => s.skipped_empty += 1,
                Planned::Skip(Skip::TooLong) => s.skipped_too_long += 1,
                Planned::Send(r) => {
                    s.requests += 1;
                    s.cut_max_tokens += usize::from(r.cut);
                    s.padded += usize::from(r.prompt.padded_blocks > 0);
                    s.prompt_tokens += r.prompt.len as u64;
                    s.max_tokens += r.max_tokens as u64;
                    s.largest_request_tokens = s
                        .largest_request_tokens
                        .max((r.prompt.len + r.max_tokens) as u64);
                    s.duration_s = r.at - *first.get_or_insert(r.at);
                    ideal.add(&r.prompt);
                    blocks.add(&ids);
                }
            }
        }
        s.ideal_cache_hit_rate = ideal.hit_rate();
        s.trace_block_hit_rate = blocks.hit_rate();
        s.distinct_tokens = ideal.distinct_tokens();
        Ok(s)
    }
}

impl TraceSummary {
    /// The line stating the ideal hit rates, above the report's tables.
    pub fn ideal_line(&self) -> Option<String> {
        let ideal = self.ideal_cache_hit_rate?;
        let own = self
            .trace_block_hit_rate
            .map(|b| {
                format!(
                    "; {:.1}% at the trace's {}-token blocks",
                    b * 100.0,
                    self.block_tokens
                )
            })
            .unwrap_or_default();
        Some(format!(
            "Ideal cache hit rate (one unbounded cache, {}-token blocks): {:.1}%{own}. \
             `hit/ideal` is each run's cache hit rate over it.",
            self.ideal_block_size,
            ideal * 100.0
        ))
    }

    /// A one-line description, e.g. `trace x.jsonl (mooncake, 512-token blocks): 40 requests ...`.
    pub fn describe(&self) -> String {
        let name = std::path::Path::new(&self.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.clone());
        let mut d = format!(
            "trace {name} ({}, {}-token blocks): {} requests over {:.0} s at speed {}, seed {}",
            self.format.name(),
            self.block_tokens,
            self.requests,
            self.duration_s,
            self.speed,
            self.seed
        );
        if let Some(n) = self.limit {
            d.push_str(&format!(", first {n} records"));
        }
        let skipped = self.skipped_empty + self.skipped_too_long;
        if skipped > 0 {
            d.push_str(&format!(
                ", {skipped} skipped ({} empty, {} longer than the context)",
                self.skipped_empty, self.skipped_too_long
            ));
        }
        if self.cut_max_tokens > 0 {
            d.push_str(&format!(
                ", {} with max_tokens cut to fit the context",
                self.cut_max_tokens
            ));
        }
        if self.padded > 0 {
            d.push_str(&format!(", {} padded beyond their hash ids", self.padded));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn spec(text: &str, speed: f64, limit: Option<usize>) -> (tempfile::NamedTempFile, TraceSpec) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let s = TraceSpec {
            path: f.path().to_owned(),
            speed,
            limit,
            seed: 42,
            engine_block_size: 16,
        };
        (f, s)
    }

    fn line(ts: u64, input: usize, output: usize, ids: &[u64]) -> String {
        format!(
            "{{\"timestamp\": {ts}, \"input_length\": {input}, \"output_length\": {output}, \"hash_ids\": {ids:?}}}\n"
        )
    }

    #[test]
    fn speed_and_limit_schedule_the_first_records() {
        let text: String = (0..10)
            .map(|i| line(1000 + i * 500, 600, 3, &[0, i + 1]))
            .collect();
        let (_f, s) = spec(&text, 2.0, Some(4));
        let sent: Vec<TraceRequest> = s
            .requests()
            .unwrap()
            .map(|r| match r.unwrap().0 {
                Planned::Send(r) => r,
                Planned::Skip(k) => panic!("{k:?}"),
            })
            .collect();
        let at: Vec<f64> = sent.iter().map(|r| r.at).collect();
        assert_eq!(
            at,
            [0.0, 0.25, 0.5, 0.75],
            "0.5 s apart in the trace, at speed 2"
        );
        assert!(
            sent.iter()
                .all(|r| r.max_tokens == 3 && r.prompt.len == 600)
        );
        let sum = s.summarise().unwrap();
        assert_eq!((sum.records, sum.requests), (4, 4));
        assert_eq!(sum.duration_s, 0.75);
        assert_eq!(sum.prompt_tokens, 2400);
        // Block 0 (512 tokens) is shared by all: 3 × 512 hit of 2400.
        assert_eq!(sum.ideal_cache_hit_rate, Some(1536.0 / 2400.0));
        assert_eq!(sum.trace_block_hit_rate, Some(3.0 / 8.0));
        assert_eq!(sum.distinct_tokens, 512 + 4 * 88);
        let (_f, all) = spec(&text, 1.0, None);
        assert_eq!(all.summarise().unwrap().requests, 10);
    }

    #[test]
    fn requests_that_cannot_fit_are_cut_or_skipped_and_counted() {
        let text = [
            line(0, 0, 5, &[]),
            line(0, CONTEXT_TOKENS, 5, &[1]),
            line(0, CONTEXT_TOKENS - 10, 50, &[2]),
            line(0, 100, 0, &[3]),
            line(0, 100, 7, &[]),
        ]
        .concat();
        let (_f, s) = spec(&text, 1.0, None);
        let fates: Vec<Planned> = s.requests().unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(fates[0], Planned::Skip(Skip::Empty));
        assert_eq!(fates[1], Planned::Skip(Skip::TooLong));
        let Planned::Send(cut) = &fates[2] else {
            panic!("{:?}", fates[2])
        };
        assert_eq!((cut.max_tokens, cut.cut), (10, true));
        let Planned::Send(one) = &fates[3] else {
            panic!()
        };
        assert_eq!(
            (one.max_tokens, one.cut),
            (1, false),
            "at least one output token"
        );
        let sum = s.summarise().unwrap();
        assert_eq!(
            (
                sum.records,
                sum.requests,
                sum.skipped_empty,
                sum.skipped_too_long
            ),
            (5, 3, 1, 1)
        );
        assert_eq!((sum.cut_max_tokens, sum.padded), (1, 2));
        let d = sum.describe();
        assert!(
            d.contains("3 requests")
                && d.contains("2 skipped (1 empty, 1 longer than the context)")
                && d.contains("1 with max_tokens cut")
                && d.contains("2 padded"),
            "{d}"
        );
    }
}
