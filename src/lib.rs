//! Switchyard: a router for LLM-serving clusters whose routing policy is a hot-reloaded
//! pipeline of tiers written in TOML and Rhai.
//!
//! # Layout
//!
//! The router core, in the order a request meets it:
//!
//! - [`config`]: the settings (flags over the config file over defaults) and their validation.
//! - [`proxy`]: the HTTP server: connections and their limits ([`proxy::conn`]), dispatch of
//!   routes ([`proxy::routes`]), forwarding with retries ([`proxy::forward`]), prefill/decode
//!   disaggregation's bodies ([`proxy::handoff`]: vLLM's NixlConnector hand-off) and its
//!   two-leg flow with its failure rules, a request's
//!   prefix matches from two sources, computed when a policy tier needs them
//!   ([`proxy::kv`]), headers, response bodies, OpenAI-shaped errors and the router's own
//!   metrics.
//! - [`request`]: the routing view of a request body (model, stream, session key, a digest of
//!   the prompt), parsed in one pass without materialising the rest; its tenant and priority
//!   ([`request::admission`]).
//! - [`admit`]: admission, between the parse and the candidates: a request's tenant and
//!   priority from its headers, the per-tenant rate limits ([`admit::rate_limit`]: requests
//!   and tokens per minute, OpenAI's `x-ratelimit-*` headers and 429) and the router-side
//!   queue ([`admit::queue`]: priority bands, deficit round robin across tenants by estimated
//!   tokens, bounded in length and time, sheddable requests refused at saturation), one per
//!   model whose room is its engines' room below `--engine-queue-limit` ([`admit::hold`]).
//! - [`tokens`]: the stand-in tokenizer and the chained block hashes of a prompt; a model's
//!   own tokenizer and chat template (`--tokenizer`): the token ids an engine sees, as many
//!   as prefix matching can use at a cost bounded for any body ([`tokens::bound`]).
//! - [`engines`]: the engines: registry, their roles (aggregated, prefill, decode:
//!   [`engines::role`]), where they come from (static or Kubernetes discovery), health and
//!   ejection, scraped load figures and the queue estimated between scrapes ([`engines::room`]),
//!   model cards, and their KV-cache
//!   events ([`engines::kv_events`]: vLLM's wire format, the router's own ZMTP transport with a
//!   message-size cap, the subscribers (one per engine and data-parallel rank), when a view is
//!   complete or partial, replay requests, the bound socket engines connect to, and each
//!   engine's own account of where it publishes: vLLM's `/kv_event_sources`, asked with
//!   `--kv-events-discover`).
//! - [`prefix`]: the router's approximate index of which engine cached which prompt prefix,
//!   and the exact one ([`prefix::exact`]) built from the engines' own KV events (a partial
//!   view anchoring what it cannot key on the router's own recent requests:
//!   [`prefix::exact::anchor`]).
//! - [`policy`]: the routing decision: policy files, the built-in tiers, Rhai scripts, loading,
//!   validation and hot reload; a disaggregated policy's two pipelines, decode then prefill
//!   ([`policy::stage`]).
//! - [`upstream`]: the pooled HTTP client to the engines and its bounded GET.
//! - [`otel`]: OpenTelemetry tracing: a request's SERVER span, its policy decisions and its
//!   CLIENT attempts on engines (the engine receives a `traceparent` naming its attempt),
//!   W3C trace context continued from the client, parent-based sampling, and the OTLP/HTTP
//!   export off the request path (bounded, drops counted); off unless configured.
//!
//! Data flows one way: request → [`request`] parse → [`admit`] → candidates from [`engines`] →
//! [`policy`] decision (with the [`prefix`] index) → [`proxy`] forward → record.
//!
//! The leaves on top, which use the core only through its public API (the core never imports
//! them; `tests/architecture.rs` checks that the import graph has no circles):
//!
//! - [`cli`]: the `switchyard` command line (`serve`, `sim`, `check`, `bench`).
//! - [`sim`]: a simulated vLLM engine (vLLM V1's step loop with chunked prefill, one KV block
//!   pool shared by running requests and the prefix cache by token ids, preemption under
//!   memory pressure, named calibration profiles ([`sim::profile`]), vLLM's KV events over
//!   ZMQ, bound or connected to a router, one publisher per data-parallel rank,
//!   `/kv_event_sources`, metrics, failure injection, and the prefill or decode side of vLLM's
//!   NixlConnector hand-off ([`sim::nixl`])).
//! - [`bench`]: the routing benchmark: workloads, replay of production traces (Mooncake,
//!   Alibaba Bailian) as token-id prompts, a load driver, statistics, reports, the
//!   exact-against-approximate `kv_lookup` comparison over router replicas, and the noisy/quiet
//!   tenant benchmark of the router's queue ([`bench::tenants`]).

pub mod admit;
pub mod config;
pub mod engines;
pub mod otel;
pub mod policy;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod tokens;
pub mod upstream;

pub mod bench;
pub mod cli;
pub mod sim;
