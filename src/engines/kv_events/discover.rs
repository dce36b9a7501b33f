//! `--kv-events-discover`: when an engine joins, the router asks it where it publishes
//! (`GET /kv_event_sources`, vLLM 0.32; see [`super::sources`]) and follows each of its
//! data-parallel ranks.
//!
//! - The request is the bounded GET of [`crate::upstream::get`]. While the engine does not
//!   answer (not up yet: refused, timed out, 5xx), it is asked again with backoff
//!   ([`DiscoverOptions::retry_min`] doubling up to `retry_max`), until it answers or leaves.
//! - An answer names each rank's sockets: ranks that bind are followed (wildcard hosts
//!   replaced by the engine's host), ranks whose PUB socket connects out are left to the
//!   router's bound socket (logged at info), disabled ranks are skipped. `{}` means the
//!   engine publishes no KV events.
//! - A 404 (vLLM before 0.32, or another server), another 4xx, an answer over the size cap or
//!   one that is not a map of ranks falls back to the configured endpoints (the engine's
//!   `--static-kv-events` entry, or its pod's `--kv-events-port`), followed as rank 0.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::sources::{self, RankPlan};
use super::subscriber::Target;
use super::{CacheCapacity, KvEndpoints, KvSubscribers};
use crate::upstream::{self, GetError, HttpClient};

/// How engines are asked.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// How long one GET may take [default: 2 s].
    pub timeout: Duration,
    /// The largest answer accepted [default: 256 KiB; vLLM's is ~260 bytes per rank].
    pub max_bytes: usize,
    /// Backoff between attempts while the engine does not answer [default: 250 ms to 5 s].
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            timeout: Duration::from_secs(2),
            max_bytes: 256 << 10,
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// One engine to ask.
pub(super) struct Job {
    /// Weak: the task must not keep the subscribers (which abort it when dropped) alive.
    pub subscribers: Weak<KvSubscribers>,
    pub http: HttpClient,
    pub opts: DiscoverOptions,
    pub engine: u32,
    pub name: Arc<str>,
    pub url: String,
    pub fallback: Option<KvEndpoints>,
    /// Where the engine's cache capacity is read (every rank's subscriber gets it).
    pub capacity: CacheCapacity,
}

/// What an engine's answer (or lack of one) leads to.
#[derive(Debug)]
enum Answer {
    Sources(Vec<RankPlan>),
    /// Use the configured endpoints; why.
    Fallback(String),
}

/// Asks until the engine answers, then starts its subscribers.
pub(super) async fn run(job: Job) {
    let answer = ask(&job).await;
    let Some(subs) = job.subscribers.upgrade() else {
        return;
    };
    let (engine, name) = (job.engine, &job.name);
    match answer {
        Answer::Fallback(why) => match job.fallback {
            Some(endpoints) => {
                tracing::info!(engine = %name, reason = %why, events = %endpoints.events, "no KV-event sources from the engine: following the configured endpoints");
                subs.start_discovered(Target::rank0(engine, name, endpoints, job.capacity.clone()));
            }
            None => {
                tracing::info!(engine = %name, reason = %why, "no KV-event sources from the engine and none configured: kv_lookup uses the approximate index for it");
            }
        },
        Answer::Sources(plans) if plans.is_empty() => {
            tracing::info!(engine = %name, "the engine publishes no KV events (/kv_event_sources is empty)");
        }
        Answer::Sources(plans) => {
            for p in plans {
                match p {
                    RankPlan::Follow {
                        rank,
                        endpoints,
                        topic,
                    } => {
                        tracing::info!(engine = %name, rank, events = %endpoints.events, replay = ?endpoints.replay, topic = %topic, "following the engine's KV events");
                        let label = rank_label(name, rank);
                        if !subs.start_discovered(Target {
                            engine,
                            rank,
                            name: label,
                            endpoints,
                            topic,
                            capacity: job.capacity.clone(),
                        }) {
                            return;
                        }
                    }
                    RankPlan::ConnectsOut { rank, endpoint } => {
                        tracing::info!(engine = %name, rank, endpoint = %endpoint, "the engine's KV-event socket connects out to this address: its events reach the router only on a bound socket there (--kv-events-bind)");
                    }
                    RankPlan::Skip { rank, reason } => {
                        tracing::info!(engine = %name, rank, reason = %reason, "engine rank's KV events not followed");
                    }
                }
            }
        }
    }
}

/// The metric label of an engine's rank: its name for rank 0 (an engine without data
/// parallelism keeps its series), `NAME/dpRANK` for the others.
pub fn rank_label(name: &Arc<str>, rank: u32) -> Arc<str> {
    if rank == 0 {
        Arc::clone(name)
    } else {
        Arc::from(format!("{name}/dp{rank}"))
    }
}

async fn ask(job: &Job) -> Answer {
    let url = format!("{}{}", job.url.trim_end_matches('/'), sources::PATH);
    let Some(host) = sources::engine_host(&job.url) else {
        return Answer::Fallback(format!("no host in the engine's URL {}", job.url));
    };
    let mut backoff = job.opts.retry_min;
    let mut first = true;
    loop {
        match upstream::get(&job.http, &url, job.opts.timeout, job.opts.max_bytes).await {
            Ok(body) => {
                return match sources::parse(&body) {
                    Ok(s) => Answer::Sources(sources::plan(&s, &host)),
                    Err(e) => {
                        tracing::warn!(engine = %job.name, error = %e, "cannot read the engine's /kv_event_sources");
                        Answer::Fallback(format!("unreadable answer: {e}"))
                    }
                };
            }
            Err(GetError::Status(s)) if s.is_client_error() => {
                return Answer::Fallback(format!("{} answers HTTP {s}", sources::PATH));
            }
            Err(e @ (GetError::TooLarge(_) | GetError::Url(_))) => {
                return Answer::Fallback(e.to_string());
            }
            Err(e) => {
                if std::mem::take(&mut first) {
                    tracing::info!(engine = %job.name, error = %e, "the engine does not answer /kv_event_sources yet; asking again until it does");
                } else {
                    tracing::debug!(engine = %job.name, error = %e, "the engine does not answer /kv_event_sources yet; asking again");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(job.opts.retry_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::kv_events::SubscriberOptions;
    use crate::prefix::exact::ExactIndex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP server answering every request with `status` and `body`; its URL.
    async fn stub(status: &'static str, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        url
    }

    fn subscribers() -> Arc<KvSubscribers> {
        let opts = DiscoverOptions {
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            ..DiscoverOptions::default()
        };
        Arc::new(
            KvSubscribers::new(
                Arc::new(ExactIndex::new(1 << 20)),
                SubscriberOptions::default(),
            )
            .with_discovery(
                crate::upstream::build_client(Duration::from_millis(200)),
                opts,
            ),
        )
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn fallback() -> Option<KvEndpoints> {
        Some(KvEndpoints {
            events: "tcp://127.0.0.1:9".into(),
            replay: None,
        })
    }

    #[tokio::test]
    async fn each_rank_listed_gets_a_subscriber() {
        let url = stub(
            "200 OK",
            r#"{"0":{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:7","replay_endpoint":null,"buffer_steps":10000,"hwm":100000,"max_queue_size":100000,"topic":""},"1":{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:8","replay_endpoint":null,"buffer_steps":10000,"hwm":100000,"max_queue_size":100000,"topic":""},"2":{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://10.9.9.9:9","replay_endpoint":null,"buffer_steps":10000,"hwm":100000,"max_queue_size":100000,"topic":"kv@x@m"}}"#,
        )
        .await;
        let subs = subscribers();
        subs.follow(4, "e:1", &url, fallback());
        until("ranks 0 and 1 followed", || subs.streams().len() == 2).await;
        let streams: Vec<(u32, u32, String)> = subs
            .streams()
            .into_iter()
            .map(|(e, r, n)| (e, r, n.to_string()))
            .collect();
        assert_eq!(
            streams,
            [(4, 0, "e:1".to_owned()), (4, 1, "e:1/dp1".to_owned())]
        );
        subs.stop(4);
        assert!(subs.streams().is_empty() && subs.engines().is_empty());
    }

    #[tokio::test]
    async fn a_404_or_a_bad_answer_falls_back_and_empty_means_nothing() {
        for (status, body, want) in [
            ("404 Not Found", r#"{"detail":"Not Found"}"#, 1),
            ("200 OK", "[1, 2]", 1),
            ("200 OK", "{}", 0),
        ] {
            let url = stub(status, body).await;
            let subs = subscribers();
            subs.follow(1, "e:1", &url, fallback());
            until("the engine answered", || {
                subs.tasks()
                    .discovering
                    .get(&1)
                    .is_some_and(|t| t.is_finished())
            })
            .await;
            assert_eq!(subs.streams().len(), want, "{status} {body}");
        }
    }

    #[tokio::test]
    async fn an_engine_that_leaves_before_answering_is_not_asked_any_more() {
        // Nothing listens there: refused, asked again and again.
        let subs = subscribers();
        subs.follow(2, "e:2", "http://127.0.0.1:9", fallback());
        assert!(subs.tasks().discovering.contains_key(&2));
        subs.stop(2);
        assert!(subs.tasks().discovering.is_empty());
        assert!(subs.streams().is_empty());
    }
}
