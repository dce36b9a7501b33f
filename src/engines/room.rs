//! How many requests wait in an engine's own queue now, estimated between scrapes, and the
//! signal that an engine's room may have changed (for the router's queue,
//! `--engine-queue-limit`).
//!
//! The estimate starts from the last scraped `vllm:num_requests_waiting` and corrects it by the
//! router's own requests sent or finished since that scrape (`delta`):
//!
//! - **Saturated at the scrape** (`waiting > 0`): every request sent since queued, and every
//!   request finished let a waiting one run, so the queue is `waiting + delta` (never below 0).
//! - **Not saturated at the scrape**: requests sent since run while the engine has free running
//!   slots. The number of slots is learned: the running count the engine stopped at when it
//!   last had requests waiting (raised by any larger running count seen), which is vLLM's
//!   `max_num_seqs` or the KV-cache limit of the moment. The queue is
//!   `running + delta - slots` (never below 0). Until the engine has been seen saturated, its
//!   slots are unknown and it is taken to have room: the router then sends at most one scrape
//!   interval's worth of requests too many, and learns from the next scrape.
//! - **Never scraped** (no `/metrics`, or the first scrape not back yet): no estimate, the
//!   engine is taken to have room.

use std::sync::Arc;

use tokio::sync::Notify;

use super::{Engine, ScrapedStats};

/// Woken when an engine's room may have changed: a request on it finished, new figures were
/// scraped, its health changed, an engine joined or left. Shared by a registry's engines.
#[derive(Debug, Clone, Default)]
pub struct Changes(Arc<Notify>);

impl Changes {
    /// Wakes the one task waiting in [`Changes::changed`], or the next one to wait (several
    /// changes before it wakes count once).
    pub fn notify(&self) {
        self.0.notify_one();
    }

    /// Waits for the next change.
    pub async fn changed(&self) {
        self.0.notified().await;
    }
}

/// The running slots learned from the figures just scraped, given those learned before.
pub(super) fn learn_slots(before: Option<f64>, now: &ScrapedStats) -> Option<f64> {
    if now.waiting > 0.0 {
        // Requests wait: the engine runs as many as it can (its cap, or the KV limit now).
        Some(now.running)
    } else {
        before.map(|slots| slots.max(now.running))
    }
}

impl Engine {
    /// The estimated number of requests waiting in this engine's own queue now (see the
    /// module's documentation); 0 when unknown.
    pub fn estimated_waiting(&self) -> f64 {
        self.queue_beyond_slots().unwrap_or(0.0).max(0.0)
    }

    /// Requests beyond the engine's running slots now: positive, that many wait; negative,
    /// that many slots are free. `None` when unknown (never scraped, or never seen full).
    fn queue_beyond_slots(&self) -> Option<f64> {
        let s = self.stats.load();
        s.scraped_at?;
        let delta = self.in_flight() as f64 - s.in_flight_at_scrape as f64;
        if s.waiting > 0.0 {
            Some(s.waiting + delta)
        } else {
            s.running_slots.map(|slots| s.running + delta - slots)
        }
    }

    /// How many more requests this engine takes while its queue, counting each request sent,
    /// stays below `limit`: with `limit` 1, only as many as it has free running slots (none
    /// waits in the engine); with 2, one more (at most one waits); and so on. An engine whose
    /// slots are not known yet has room.
    pub fn room_below(&self, limit: u32) -> usize {
        let Some(beyond) = self.queue_beyond_slots() else {
            return usize::MAX / 1024;
        };
        let room = f64::from(limit) - 1.0 - beyond;
        if room <= 0.0 {
            0
        } else {
            room.floor() as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn scraped(running: f64, waiting: f64, in_flight_at_scrape: u64) -> ScrapedStats {
        ScrapedStats {
            running,
            waiting,
            scraped_at: Some(Instant::now()),
            in_flight_at_scrape,
            ..Default::default()
        }
    }

    #[test]
    fn a_saturated_engine_queues_what_is_sent_and_runs_one_waiting_per_finish() {
        let e = Arc::new(Engine::new(0, "http://127.0.0.1:1", vec!["m".into()]));
        let mut held: Vec<_> = (0..10).map(|_| e.begin_request()).collect();
        e.set_stats(scraped(8.0, 2.0, 10));
        assert_eq!(e.estimated_waiting(), 2.0);
        assert_eq!(
            e.room_below(4),
            1,
            "2 waiting: one more keeps the queue below 4"
        );
        held.push(e.begin_request());
        assert_eq!(e.estimated_waiting(), 3.0);
        assert_eq!(e.room_below(4), 0);
        held.truncate(7); // four finished: the three waiting ran, and a slot is free
        assert_eq!(e.estimated_waiting(), 0.0);
        assert_eq!(e.room_below(1), 1, "only the free slot");
        assert_eq!(e.room_below(4), 4);
    }

    #[test]
    fn an_engine_with_free_slots_takes_requests_until_its_learned_slots_fill() {
        let e = Arc::new(Engine::new(0, "http://127.0.0.1:1", vec!["m".into()]));
        assert!(e.room_below(1) > 1000, "never scraped: room");
        e.set_stats(scraped(3.0, 0.0, 0));
        let held: Vec<_> = (0..50).map(|_| e.begin_request()).collect();
        assert_eq!(e.estimated_waiting(), 0.0, "slots unknown: room");
        assert!(e.room_below(1) > 1000);
        e.set_stats(scraped(16.0, 34.0, 50)); // saturated at 16 running
        assert_eq!(e.estimated_waiting(), 34.0);
        drop(held);
        e.set_stats(scraped(10.0, 0.0, 0));
        let held: Vec<_> = (0..8).map(|_| e.begin_request()).collect();
        assert_eq!(e.estimated_waiting(), 2.0, "10 running + 8 sent - 16 slots");
        assert_eq!(e.room_below(4), 1);
        assert_eq!(e.room_below(3), 0);
        drop(held);
        e.set_stats(scraped(20.0, 0.0, 0)); // more running than learned: the slots grow
        assert_eq!(e.room_below(1), 0, "20 running, 20 slots: none free");
        let _more: Vec<_> = (0..2).map(|_| e.begin_request()).collect();
        assert_eq!(e.estimated_waiting(), 2.0, "20 + 2 - 20");
    }

    #[test]
    fn changes_wake_the_waiting_task_once_for_many() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = super::super::Registry::new();
            let changes = r.changes();
            let e = r.add("http://127.0.0.1:1", vec!["m".into()]);
            changes.changed().await; // the engine joined
            let g = e.begin_request();
            drop(g);
            e.set_stats(scraped(1.0, 0.0, 0));
            changes.changed().await; // both changes, once
            let woke =
                tokio::time::timeout(std::time::Duration::from_millis(20), changes.changed()).await;
            assert!(woke.is_err(), "no change since");
        });
    }
}
