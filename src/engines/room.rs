//! How many requests wait in an engine's own queue now, estimated between scrapes, and the
//! signal that an engine's room may have changed (for the router's queue,
//! `--engine-queue-limit`).
//!
//! The estimate starts from the last scraped `vllm:num_requests_running` and
//! `vllm:num_requests_waiting` and corrects them by the router's own requests sent or finished
//! since that scrape (`delta`), against the engine's running slots:
//!
//! - **The slots** are learned: the most requests the engine has been seen running, known once
//!   it has been seen with requests waiting (full); vLLM's `max_num_seqs` when memory allows.
//!   Never lowered (see `learn_slots`).
//! - **The queue beyond the slots** is `running + waiting + delta - slots`: positive, that many
//!   wait; negative, that many slots are free. A request that has just arrived counts as
//!   waiting until the engine's next step even when a slot is free for it: counting running and
//!   waiting together against the slots keeps such a scrape from hiding free slots.
//! - **Slots not known yet**: if requests were waiting at the scrape, the queue is
//!   `waiting + delta` (every request sent since queued, every one finished let a waiting one
//!   run); otherwise the engine is taken to have room: the router then sends at most one scrape
//!   interval's worth of requests too many, and learns from the next scrape.
//! - **Never scraped** (no `/metrics`, or the first scrape not back yet): the engine is taken to
//!   have room.
//!
//! An engine held below its learned slots by its KV memory (long prompts) shows requests
//! waiting with fewer running; the estimate then counts its free slots that are not, and lets
//! that many more requests wait in it than the limit says until memory frees up.

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

/// The running slots learned from the figures just scraped, given those learned before and the
/// most requests seen running so far (`running_max`, before this scrape).
///
/// The slots are the most requests the engine has been seen running, known once it has been
/// seen with requests waiting (full). Never lowered: a request that has just arrived counts as
/// waiting until the engine's next step even when a slot is free, so one scrape's running count
/// with requests waiting may be below the engine's real slots; taken as the slots, it would
/// keep the router from ever sending more (with a limit of 1 the engine would then never be
/// seen running more). An engine whose real limit has dropped (KV memory) shows requests
/// waiting at its next scrape, and the estimate then uses them.
pub(super) fn learn_slots(
    before: Option<f64>,
    running_max: f64,
    now: &ScrapedStats,
) -> Option<f64> {
    let most = running_max.max(now.running);
    if now.waiting > 0.0 {
        Some(before.map_or(most, |slots| slots.max(most)))
    } else {
        before.map(|slots| slots.max(most))
    }
}

/// Whether the figures just scraped confirm the slots learned (see
/// [`ScrapedStats::slots_confirmed`]): requests waiting while as many run as the slots, and as
/// many as at the scrape before. Requests caught between their arrival and the engine's next
/// step make a scrape show some waiting while the running count is still growing; a full
/// engine's running count stays put.
pub(super) fn confirms_slots(before: &ScrapedStats, now: &ScrapedStats) -> bool {
    before.slots_confirmed
        || (now.waiting > 0.0
            && before.scraped_at.is_some()
            && now.running == before.running
            && now.running_slots.is_some_and(|slots| now.running >= slots))
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
        match s.running_slots {
            Some(slots) => Some(s.running + s.waiting + delta - slots),
            None if s.waiting > 0.0 => Some(s.waiting + delta),
            None => None,
        }
    }

    /// How many more requests this engine takes while its queue, counting each request sent,
    /// stays below `limit`: with `limit` 1, only as many as it has free running slots (none
    /// waits in the engine); with 2, one more (at most one waits); and so on. An engine whose
    /// slots are not known yet has room.
    ///
    /// Until the slots are confirmed, after a scrape that saw nothing waiting, one request
    /// more: the slots learned may be fewer than the engine's (learned from a scrape that caught requests between their
    /// arrival and the engine's next step, while slots were still free); that request runs if
    /// they are, and the next scrape learns the higher count, one slot per scrape. Without it a
    /// limit of 1 would never let the engine be seen running more than the count learned.
    pub fn room_below(&self, limit: u32) -> usize {
        let Some(beyond) = self.queue_beyond_slots() else {
            return usize::MAX / 1024;
        };
        let s = self.stats.load();
        let probe = if s.waiting > 0.0 || s.slots_confirmed {
            0.0
        } else {
            1.0
        };
        let room = f64::from(limit) - 1.0 + probe - beyond;
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
        e.set_stats(scraped(12.0, 2.0, 50)); // arrivals not yet scheduled: not fewer slots
        assert_eq!(e.stats().running_slots, Some(16.0));
        assert!(!e.stats().slots_confirmed, "running moved: not confirmed");
        drop(held);
        e.set_stats(scraped(10.0, 0.0, 0));
        let held: Vec<_> = (0..8).map(|_| e.begin_request()).collect();
        assert_eq!(e.estimated_waiting(), 2.0, "10 running + 8 sent - 16 slots");
        // Nothing waited at the scrape: one more than the limit allows, to probe for slots.
        assert_eq!(e.room_below(4), 2);
        assert_eq!(e.room_below(3), 1);
        assert_eq!(e.room_below(2), 0);
        drop(held);
        e.set_stats(scraped(20.0, 0.0, 0)); // more running than learned: the slots grow
        assert_eq!(e.stats().running_slots, Some(20.0));
        assert_eq!(e.room_below(1), 1, "20 running, 20 slots: one probe");
        e.set_stats(scraped(21.0, 0.0, 0)); // it ran: 21 slots, and one more probe
        assert_eq!(e.stats().running_slots, Some(21.0));
        assert_eq!(e.room_below(1), 1);
        e.set_stats(scraped(21.0, 1.0, 0)); // the next one waits at the same running count
        assert!(e.stats().slots_confirmed, "21 slots it is");
        e.set_stats(scraped(21.0, 0.0, 0));
        assert_eq!(e.room_below(1), 0, "confirmed: no more probes");
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
