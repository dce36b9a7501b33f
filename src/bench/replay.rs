//! The open-loop replay of a trace (`switchyard bench --trace`): one dispatcher reads the trace
//! lazily and sends each request at its planned time (trace time / `--trace-speed`, scaled by
//! the time scale), whatever the answers to earlier ones; a Bailian turn does not wait for its
//! parent's answer (the trace's timestamps are when production traffic sent it). Each request's
//! body (`/v1/completions`, a token-id prompt) is generated just before it is sent ([`LEAD`]
//! ahead of its time, so that building it does not make it late), on the client's own thread
//! ([`super::driver::on_client_thread`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use super::driver::{BenchClient, DriveConfig, SESSION_HEADER, on_client_thread, send};
use super::stats::RequestRecord;
use super::workload::trace_plan::{Planned, TraceSpec};

/// How long before its time a request's task starts and builds its body (wall time): bodies
/// exist only for the requests due within it.
const LEAD: Duration = Duration::from_millis(20);

/// [`replay`] on the client's own thread and runtime (see [`super::driver::drive_isolated`]).
pub async fn replay_isolated(
    cfg: DriveConfig,
    trace: TraceSpec,
    progress: ProgressBar,
) -> Result<Vec<RequestRecord>, std::io::Error> {
    on_client_thread(move |client| async move { replay(&cfg, &client, &trace, &progress).await })
        .await?
}

/// Sends every request of `trace` to `cfg.url` (request `k` to replica `k mod replicas`) and
/// returns what the client saw, ordered by send time.
pub async fn replay(
    cfg: &DriveConfig,
    client: &BenchClient,
    trace: &TraceSpec,
    progress: &ProgressBar,
) -> Result<Vec<RequestRecord>, std::io::Error> {
    let model: Arc<str> = serde_json::to_string(&cfg.model)
        .map_err(std::io::Error::other)?
        .into();
    let requests = trace.requests().map_err(std::io::Error::other)?;
    let ts = cfg.time_scale;
    // A short lead so that the first arrivals are not late because of spawning.
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut tasks = JoinSet::new();
    let mut records = Vec::new();
    let mut sent = 0usize;
    for item in requests {
        let r = match item {
            Ok((Planned::Send(r), _)) => r,
            Ok((Planned::Skip(_), _)) => continue,
            Err(e) => {
                // The trace was read whole before the runs: it changed since.
                tracing::error!(error = %e, "the trace cannot be read any further");
                break;
            }
        };
        while let Some(done) = tasks.try_join_next() {
            collect(done, &mut records);
        }
        let due = t0 + Duration::from_secs_f64(r.at * ts);
        tokio::time::sleep_until(due.checked_sub(LEAD).unwrap_or(due).into()).await;
        let replica = sent % cfg.replicas();
        sent += 1;
        let url = cfg.replica_url(replica).to_owned();
        let (client, model, progress) = (client.clone(), Arc::clone(&model), progress.clone());
        let timeout = cfg.request_timeout;
        tasks.spawn(async move {
            let body = Bytes::from(r.prompt.completion_body(&model, r.max_tokens));
            drop(r.prompt);
            tokio::time::sleep_until(due.into()).await;
            let headers = [(SESSION_HEADER, r.session.as_str())];
            let done = send(&client, &url, "/v1/completions", &headers, body, timeout).await;
            progress.inc(1);
            done.record(r.index, r.turn, replica, t0, due, ts)
        });
    }
    while let Some(done) = tasks.join_next().await {
        collect(done, &mut records);
    }
    records.sort_by(|a, b| a.start.total_cmp(&b.start));
    Ok(records)
}

fn collect(done: Result<RequestRecord, tokio::task::JoinError>, records: &mut Vec<RequestRecord>) {
    match done {
        Ok(r) => records.push(r),
        Err(e) => tracing::error!(error = %e, "a benchmark client task failed"),
    }
}
