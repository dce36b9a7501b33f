//! An inference's answer, shaped like vLLM's: the OpenAI completion and chat bodies, whole
//! ([`complete`]) or as a stream of SSE frames ([`stream_response`]).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use super::super::Engine;
use super::super::nixl::{HandOff, KvLoadFailurePolicy, RemoteBlocks};
use super::super::scheduler::Job;
use super::{
    ErrorBody, ErrorDetail, FRAME_TOKENS, Inner, Kind, SimBody, error, json_response, response,
};
use crate::tokens;

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    /// With `enable_prompt_tokens_details`, as vLLM's `--enable-prompt-tokens-details`.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

/// vLLM 0.32's `PromptTokenUsageInfo`, every field present.
#[derive(Serialize, Clone, Copy)]
struct PromptTokensDetails {
    cached_tokens: usize,
    created_cache_tokens: Option<()>,
    multimodal_tokens: Option<()>,
}

/// vLLM's message for a request that finished with an error (`GenerationError`).
const GENERATION_ERROR: &str = "Internal server error";

/// Why a request ends before its first token.
enum Unstarted {
    Stopped,
    /// D could not load its prompt's KV and the failure policy is `fail`.
    LoadFailed,
}

#[derive(Serialize)]
struct Envelope<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    /// With a KV role: the hand-off of a P leg, else null (as vLLM with a connector).
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<Option<HandOff>>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct DeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct MessageChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

/// One request's output, streamed or not.
pub(super) struct Output {
    pub(super) kind: Kind,
    pub(super) id: String,
    /// vLLM's internal request id (a hand-off's `remote_request_id`).
    pub(super) internal_id: String,
    /// A D leg that loaded its prompt: the `cached_tokens` it reports (P's).
    pub(super) reported_cached: Option<usize>,
    pub(super) created: u64,
    pub(super) include_usage: bool,
    pub(super) engine: Arc<Engine>,
    pub(super) job: Job,
    /// A D leg's blocks on P, until loaded.
    pub(super) remote: Option<RemoteBlocks>,
    pub(super) started: bool,
    pub(super) finished: bool,
}

impl Output {
    fn usage(&self) -> Usage {
        let (p, c) = (self.job.prompt_tokens(), self.job.max_tokens());
        Usage {
            prompt_tokens: p,
            total_tokens: p + c,
            completion_tokens: c,
            prompt_tokens_details: self.engine.kv.prompt_tokens_details.then(|| {
                PromptTokensDetails {
                    cached_tokens: self
                        .reported_cached
                        .unwrap_or_else(|| self.job.cached_tokens()),
                    created_cache_tokens: None,
                    multimodal_tokens: None,
                }
            }),
        }
    }

    /// A finished request's `kv_transfer_params`: `None` without a KV role.
    fn kv_transfer_params(&self) -> Option<Option<HandOff>> {
        self.engine.kv.role?;
        Some(self.job.handed_off().map(|(blocks, tokens)| {
            HandOff::new(
                &self.engine.kv.engine_id,
                &self.internal_id,
                self.engine.addr,
                blocks.clone(),
                *tokens,
                self.job.cached_tokens(),
            )
        }))
    }

    /// Loads a D leg's KV from P, then queues the request.
    async fn begin(&mut self) -> Result<(), Unstarted> {
        if let Some(remote) = self.remote.take() {
            match super::handoff::load_remote(&self.engine, &mut self.job, &remote).await {
                // vLLM 0.32's D reports P's own cache hit as its cached tokens (the usage
                // rewrite a router would do), whatever it loaded.
                Ok(()) => self.reported_cached = Some(remote.prefill_cached_tokens.unwrap_or(0)),
                Err(_) if self.engine.kv.failure_policy == KvLoadFailurePolicy::Fail => {
                    return Err(Unstarted::LoadFailed);
                }
                Err(_) => {}
            }
        }
        self.job.start().await.map_err(|_| Unstarted::Stopped)
    }

    fn envelope<C>(
        &self,
        object: &'static str,
        choices: C,
        usage: Option<Usage>,
    ) -> Envelope<'_, C> {
        Envelope {
            id: &self.id,
            object,
            created: self.created,
            model: &self.engine.model,
            choices,
            usage,
            kv_transfer_params: None,
        }
    }

    fn push_event<T: Serialize>(buf: &mut Vec<u8>, v: &T) {
        buf.extend_from_slice(b"data: ");
        if let Err(e) = serde_json::to_writer(&mut *buf, v) {
            tracing::error!("serialising an SSE event: {e}");
        }
        buf.extend_from_slice(b"\n\n");
    }

    fn push_role(&self, buf: &mut Vec<u8>) {
        let choice = DeltaChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: "",
            },
            logprobs: None,
            finish_reason: None,
        };
        Self::push_event(buf, &self.envelope("chat.completion.chunk", [choice], None));
    }

    fn push_tokens(&self, range: std::ops::Range<usize>, last_is_final: bool, buf: &mut Vec<u8>) {
        let end = range.end;
        for i in range {
            let text = self.engine.words.word(i);
            let finish_reason = (last_is_final && i + 1 == end).then_some("length");
            match self.kind {
                Kind::Completion => {
                    let choice = TextChoice {
                        index: 0,
                        text,
                        logprobs: None,
                        finish_reason,
                        stop_reason: None,
                    };
                    Self::push_event(buf, &self.envelope("text_completion", [choice], None));
                }
                Kind::Chat => {
                    let choice = DeltaChoice {
                        index: 0,
                        delta: Delta {
                            role: None,
                            content: text,
                        },
                        logprobs: None,
                        finish_reason,
                    };
                    Self::push_event(buf, &self.envelope("chat.completion.chunk", [choice], None));
                }
            }
        }
    }

    fn push_usage(&self, buf: &mut Vec<u8>) {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let none: [(); 0] = [];
        Self::push_event(buf, &self.envelope(object, none, Some(self.usage())));
    }

    /// The next SSE frame: every event due now. `None` once the stream is over.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let mut buf = Vec::with_capacity(512);
        if !self.started {
            self.started = true;
            match self.begin().await {
                Ok(()) => {}
                Err(Unstarted::Stopped) => {
                    self.finished = true;
                    return None;
                }
                Err(Unstarted::LoadFailed) => {
                    // vLLM's streamed `GenerationError`: an error event, then the end.
                    let e = ErrorBody {
                        error: ErrorDetail {
                            message: GENERATION_ERROR,
                            kind: "InternalServerError",
                            param: None,
                            code: 500,
                        },
                    };
                    Self::push_event(&mut buf, &e);
                    buf.extend_from_slice(b"data: [DONE]\n\n");
                    self.finished = true;
                    return Some(Bytes::from(buf));
                }
            }
            if self.kind == Kind::Chat {
                self.push_role(&mut buf);
            }
        }
        let range = self.job.next_tokens(FRAME_TOKENS).await;
        let done = self.job.is_done();
        self.push_tokens(range, done, &mut buf);
        if done {
            if self.include_usage {
                self.push_usage(&mut buf);
            }
            buf.extend_from_slice(b"data: [DONE]\n\n");
            self.finished = true;
        }
        Some(Bytes::from(buf))
    }
}

/// A streamed answer: SSE frames as the tokens come due.
pub(super) fn stream_response(out: Output) -> Response<SimBody> {
    let stream = futures_util::stream::unfold(out, |mut out| async move {
        let frame = out.next_frame().await?;
        Some((frame, out))
    });
    let mut r = response(
        StatusCode::OK,
        "text/event-stream; charset=utf-8",
        SimBody(Inner::Stream(Box::pin(stream))),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// A complete answer, once every token is generated.
pub(super) async fn complete(mut out: Output) -> Response<SimBody> {
    match out.begin().await {
        Ok(()) => {}
        Err(Unstarted::Stopped) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the simulated engine is shutting down",
            );
        }
        Err(Unstarted::LoadFailed) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, GENERATION_ERROR);
        }
    }
    while !out.job.is_done() {
        out.job.next_tokens(usize::MAX).await;
    }
    let mut text = String::with_capacity(out.job.max_tokens() * tokens::BYTES_PER_TOKEN);
    out.engine.words.push(0, out.job.max_tokens(), &mut text);
    let usage = Some(out.usage());
    let kv = out.kv_transfer_params();
    let body = match out.kind {
        Kind::Completion => {
            let choice = TextChoice {
                index: 0,
                text: &text,
                logprobs: None,
                finish_reason: Some("length"),
                stop_reason: None,
            };
            let mut e = out.envelope("text_completion", [choice], usage);
            e.kv_transfer_params = kv;
            serde_json::to_vec(&e)
        }
        Kind::Chat => {
            let choice = MessageChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: &text,
                },
                logprobs: None,
                finish_reason: "length",
                stop_reason: None,
            };
            let mut e = out.envelope("chat.completion", [choice], usage);
            e.kv_transfer_params = kv;
            serde_json::to_vec(&e)
        }
    };
    match body {
        Ok(b) => json_response(StatusCode::OK, b),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
