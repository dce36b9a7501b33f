//! The two tenants' load of one `--tenants` run: the noisy tenant's closed-loop clients, each
//! sending its next request as soon as the previous one ended, and the quiet tenant's
//! open-loop Poisson arrivals, each request on its own whatever the others do. Every request is
//! a streamed chat completion with a unique prompt, carrying `x-tenant: noisy|quiet` and its
//! client's `x-user-id`; its prompt and answer lengths are drawn uniformly from half to one and
//! a half times `prompt_tokens` and `answer_tokens` (seeded), and the noisy clients start
//! spread over the first half of the warm-up, so that the flood does not run in lockstep waves
//! of equal requests. Both tenants send until the end of the run's window, then the requests in
//! flight are read to their end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::bench::driver::{BenchClient, DriveConfig, SESSION_HEADER, on_client_thread, send};
use crate::bench::stats::{Outcome, RequestRecord};
use crate::bench::text::{TextGen, mix};
use crate::bench::workload::exp_gap;

/// The header naming a request's tenant (the router's `tenant_header`).
pub const TENANT_HEADER: &str = "x-tenant";

/// Text streams (with [`mix`]): each request's prompt is its own.
const NOISY_STREAM: u64 = 1 << 40;
const QUIET_STREAM: u64 = 2 << 40;
const ARRIVALS_STREAM: u64 = 3;
/// The lengths of a request come from its text stream mixed with this.
const SIZES_STREAM: u64 = 4;

/// The two tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantName {
    Noisy,
    Quiet,
}

impl TenantName {
    /// The value of [`TENANT_HEADER`].
    pub fn as_str(self) -> &'static str {
        match self {
            TenantName::Noisy => "noisy",
            TenantName::Quiet => "quiet",
        }
    }
}

/// What the two tenants send in a run. Times are simulated seconds from the run's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantLoad {
    /// The noisy tenant's concurrent clients (0: the quiet tenant alone).
    pub noisy_clients: usize,
    /// The quiet tenant's Poisson rate, requests per simulated second.
    pub quiet_qps: f64,
    /// Mean tokens of a prompt (unique text: no prefix-cache hit) and of an answer; each
    /// request's are uniform in `[⌈n/2⌉, n + ⌊n/2⌋]` (see [`lengths`]).
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    pub seed: u64,
    /// Requests sent before this are the warm-up.
    pub warmup: f64,
    /// The measured window's length: it ends at `warmup + duration`, when sending stops.
    pub duration: f64,
}

impl TenantLoad {
    /// When sending stops, simulated seconds from the run's start.
    pub fn end(&self) -> f64 {
        self.warmup + self.duration
    }

    /// The quiet tenant's send times: a seeded Poisson process over `[0, end)`.
    pub fn quiet_arrivals(&self) -> Vec<f64> {
        let mut rng = fastrand::Rng::with_seed(mix(self.seed, ARRIVALS_STREAM));
        let mut out = Vec::new();
        let mut at = exp_gap(&mut rng, self.quiet_qps);
        while at < self.end() {
            out.push(at);
            at += exp_gap(&mut rng, self.quiet_qps);
        }
        out
    }
}

/// A request's prompt and answer lengths around the means `prompt` and `answer`: each uniform
/// in `[⌈n/2⌉, n + ⌊n/2⌋]` (mean `n` for even `n`), seeded by `seed`.
pub fn lengths(seed: u64, prompt: usize, answer: usize) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(mix(seed, SIZES_STREAM));
    let mut around = |n: usize| rng.usize(n.div_ceil(2).max(1)..=(n + n / 2).max(1));
    let p = around(prompt);
    (p, around(answer))
}

/// One request of a run and its tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantRecord {
    pub tenant: TenantName,
    #[serde(flatten)]
    pub record: RequestRecord,
}

/// Whether an outcome is the router refusing the request (its queue full or timed out, or a
/// rate limit): 429 or 503.
pub fn is_rejection(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Status(429 | 503))
}

/// [`drive`] on the client's own thread and runtime (see
/// [`crate::bench::driver::drive_isolated`]).
pub async fn drive_isolated(
    cfg: DriveConfig,
    load: TenantLoad,
    progress: ProgressBar,
) -> Result<Vec<TenantRecord>, std::io::Error> {
    on_client_thread(move |client| async move { drive(cfg, client, load, progress).await }).await
}

/// Runs both tenants' load against `cfg.url`; returns every request, ordered by send time.
pub async fn drive(
    cfg: DriveConfig,
    client: BenchClient,
    load: TenantLoad,
    progress: ProgressBar,
) -> Vec<TenantRecord> {
    // A short lead so that the first requests are not late because of spawning.
    let t0 = Instant::now() + Duration::from_millis(20);
    let ctx = Arc::new(Ctx {
        cfg,
        client,
        load,
        t0,
        progress,
    });
    let mut tasks: JoinSet<Vec<TenantRecord>> = JoinSet::new();
    for i in 0..ctx.load.noisy_clients {
        tasks.spawn(noisy_client(Arc::clone(&ctx), i));
    }
    for (j, at) in ctx.load.quiet_arrivals().into_iter().enumerate() {
        tasks.spawn(quiet_request(Arc::clone(&ctx), j, at));
    }
    let mut records = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(recs) => records.extend(recs),
            Err(e) => tracing::error!(error = %e, "a benchmark client task failed"),
        }
    }
    records.sort_by(|a, b| a.record.start.total_cmp(&b.record.start));
    records
}

/// What every request task shares.
struct Ctx {
    cfg: DriveConfig,
    client: BenchClient,
    load: TenantLoad,
    t0: Instant,
    progress: ProgressBar,
}

impl Ctx {
    /// The wall instant `at` simulated seconds after the run's start.
    fn at(&self, at: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(at * self.cfg.time_scale)
    }

    /// A streamed chat completion with a unique prompt from text stream `stream`, its lengths
    /// drawn by [`lengths`].
    fn body(&self, stream: u64) -> Option<Bytes> {
        let l = &self.load;
        let (prompt, answer) = lengths(mix(l.seed, stream), l.prompt_tokens, l.answer_tokens);
        let prompt = TextGen::new(l.seed, stream).text(prompt);
        let body = serde_json::json!({
            "model": self.cfg.model,
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": answer,
            "stream": true,
            "ignore_eos": true,
        });
        match serde_json::to_vec(&body) {
            Ok(b) => Some(Bytes::from(b)),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise a request");
                None
            }
        }
    }

    /// Sends one request of `tenant` from client `user`; returns its record and its refusal's
    /// `Retry-After` (seconds), if any.
    async fn send(
        &self,
        tenant: TenantName,
        user: &str,
        index: (usize, usize),
        body: Bytes,
        due: Instant,
    ) -> (TenantRecord, Option<u64>) {
        let headers = [(SESSION_HEADER, user), (TENANT_HEADER, tenant.as_str())];
        let done = send(
            &self.client,
            &self.cfg.url,
            "/v1/chat/completions",
            &headers,
            body,
            self.cfg.request_timeout,
        )
        .await;
        let retry_after = done.exchange.retry_after();
        let record = done.record(index.0, index.1, 0, self.t0, due, self.cfg.time_scale);
        if tenant == TenantName::Quiet {
            // The bar's length is the quiet tenant's requests (the noisy tenant's are not known
            // ahead).
            self.progress.inc(1);
        }
        (TenantRecord { tenant, record }, retry_after)
    }
}

/// Noisy client `i` of `n`: starts at `i / n` of half the warm-up, then sends requests back
/// to back until the window's end. After a refusal or a failure it waits the answer's
/// `Retry-After` (wall seconds, as a client library would), else one simulated second, and
/// never past the window's end.
async fn noisy_client(ctx: Arc<Ctx>, i: usize) -> Vec<TenantRecord> {
    let user = format!("noisy-{i}");
    let end = ctx.at(ctx.load.end());
    let mut records = Vec::new();
    let n = ctx.load.noisy_clients.max(1);
    let mut due = ctx.at(ctx.load.warmup / 2.0 * i as f64 / n as f64);
    tokio::time::sleep_until(due.into()).await;
    for k in 0.. {
        if Instant::now() >= end {
            break;
        }
        let stream = mix(NOISY_STREAM | i as u64, k as u64);
        let Some(body) = ctx.body(stream) else { break };
        let (rec, retry_after) = ctx.send(TenantName::Noisy, &user, (i, k), body, due).await;
        let ok = rec.record.is_ok();
        records.push(rec);
        due = Instant::now();
        if !ok {
            let pause = retry_after.map_or(
                Duration::from_secs_f64(ctx.cfg.time_scale),
                Duration::from_secs,
            );
            due = (due + pause).min(end);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    records
}

/// The quiet tenant's request `j`, sent at `at` simulated seconds.
async fn quiet_request(ctx: Arc<Ctx>, j: usize, at: f64) -> Vec<TenantRecord> {
    let due = ctx.at(at);
    // The body is built just before the request is due (bodies exist only for requests due
    // soon), a little ahead so that building it does not make it late.
    let lead = Duration::from_millis(20);
    tokio::time::sleep_until(due.checked_sub(lead).unwrap_or(due).into()).await;
    let Some(body) = ctx.body(QUIET_STREAM | j as u64) else {
        return Vec::new();
    };
    tokio::time::sleep_until(due.into()).await;
    let user = format!("quiet-{j}");
    let (rec, _) = ctx.send(TenantName::Quiet, &user, (j, 0), body, due).await;
    vec![rec]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(qps: f64) -> TenantLoad {
        TenantLoad {
            noisy_clients: 4,
            quiet_qps: qps,
            prompt_tokens: 10,
            answer_tokens: 5,
            seed: 7,
            warmup: 10.0,
            duration: 90.0,
        }
    }

    #[test]
    fn quiet_arrivals_are_a_seeded_poisson_process_over_the_run() {
        let l = load(2.0);
        let a = l.quiet_arrivals();
        assert_eq!(a, l.quiet_arrivals(), "seeded");
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&t| (0.0..100.0).contains(&t)));
        // 200 expected; a Poisson count's standard deviation is ~14.
        assert!((140..=260).contains(&a.len()), "{}", a.len());
        assert_ne!(a, TenantLoad { seed: 8, ..l }.quiet_arrivals());
    }

    #[test]
    fn lengths_spread_around_their_means() {
        let (mut p_sum, mut a_sum) = (0, 0);
        for s in 0..2000 {
            let (p, a) = lengths(s, 512, 128);
            assert!(
                (256..=768).contains(&p) && (64..=192).contains(&a),
                "{p} {a}"
            );
            p_sum += p;
            a_sum += a;
        }
        // Means within 3 % of 512 and 128.
        assert!((p_sum as f64 / 2000.0 - 512.0).abs() < 15.0, "{p_sum}");
        assert!((a_sum as f64 / 2000.0 - 128.0).abs() < 4.0, "{a_sum}");
        assert_eq!(lengths(3, 512, 128), lengths(3, 512, 128));
        assert_eq!(lengths(3, 1, 1), (1, 1));
        for s in 0..50 {
            let (p, a) = lengths(s, 2, 3);
            assert!((1..=3).contains(&p) && (2..=4).contains(&a), "{p} {a}");
        }
    }

    #[test]
    fn rejections_are_429_and_503_only() {
        assert!(is_rejection(&Outcome::Status(429)));
        assert!(is_rejection(&Outcome::Status(503)));
        assert!(!is_rejection(&Outcome::Status(500)));
        assert!(!is_rejection(&Outcome::Ok));
        assert!(!is_rejection(&Outcome::TimedOut));
        assert_eq!(TenantName::Quiet.as_str(), "quiet");
    }
}
