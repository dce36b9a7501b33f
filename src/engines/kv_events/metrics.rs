//! The `switchyard_kv_events_*` metrics: per engine (label `engine`, its `host:port`) and for
//! the exact index as a whole.

use metrics::{Counter, Gauge};

use crate::prefix::exact::ViewState;

/// Describes the metric families (for `/metrics` HELP lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "switchyard_kv_events_batches_total",
        "KV-event batches applied, per engine (replayed ones included)"
    );
    describe_counter!(
        "switchyard_kv_events_events_total",
        "KV events received, per engine and type (BlockStored, BlockRemoved, AllBlocksCleared, unknown)"
    );
    describe_counter!(
        "switchyard_kv_events_malformed_total",
        "KV-event messages, batches or events that could not be decoded, skipped"
    );
    describe_counter!(
        "switchyard_kv_events_gaps_total",
        "Sequence gaps in an engine's KV-event stream"
    );
    describe_counter!(
        "switchyard_kv_events_replays_total",
        "Replays asked from an engine's replay socket, by result (ok, failed)"
    );
    describe_counter!(
        "switchyard_kv_events_restarts_total",
        "Engine restarts seen in its KV-event stream (the view was dropped)"
    );
    describe_counter!(
        "switchyard_kv_events_unanchored_blocks_total",
        "Stored blocks skipped because their parent block is unknown to the view (and in no recent request the router sent to the engine)"
    );
    describe_counter!(
        "switchyard_kv_events_anchored_blocks_total",
        "Stored blocks whose parent block was unknown to the view but found in a recent request the router sent to the engine: keyed from it"
    );
    describe_counter!(
        "switchyard_kv_events_unknown_removals_total",
        "Removed blocks the view did not hold"
    );
    describe_counter!(
        "switchyard_kv_events_other_groups_total",
        "Events of KV-cache groups other than 0 (hybrid models), not indexed"
    );
    describe_counter!(
        "switchyard_kv_events_oversized_total",
        "KV-event messages over --kv-events-max-message-bytes, read past without buffering and dropped"
    );
    describe_counter!(
        "switchyard_kv_events_unknown_engine_total",
        "Messages on the bound KV-event socket whose topic names no known engine, by reason (unknown, ambiguous, malformed_topic), dropped"
    );
    describe_gauge!(
        "switchyard_kv_events_bound_connections",
        "Publisher connections open on the bound KV-event socket (--kv-events-bind)"
    );
    describe_gauge!(
        "switchyard_kv_events_live",
        "1 while an engine's exact KV view is used for routing (connected, in sequence; complete or partial)"
    );
    describe_gauge!(
        "switchyard_kv_events_complete",
        "1 while an engine's exact KV view is live and complete (followed since the engine's cache state was known); live and 0 is partial (started mid-stream)"
    );
    describe_gauge!(
        "switchyard_kv_events_unkeyed_blocks",
        "Blocks an engine holds that its view cannot key (stored under a parent block the view never saw stored, not removed since); a partial view stays partial while there are any"
    );
    describe_gauge!(
        "switchyard_kv_events_index_bytes",
        "Bytes accounted to the exact KV index"
    );
    describe_gauge!(
        "switchyard_kv_events_index_blocks",
        "Engine blocks held in the exact KV index"
    );
}

/// One engine's handles.
#[derive(Debug)]
pub(super) struct StreamMetrics {
    pub batches: Counter,
    pub stored: Counter,
    pub removed: Counter,
    pub cleared: Counter,
    pub unknown: Counter,
    pub malformed: Counter,
    pub oversized: Counter,
    pub gaps: Counter,
    pub replays_ok: Counter,
    pub replays_failed: Counter,
    pub restarts: Counter,
    pub unanchored: Counter,
    pub anchored: Counter,
    pub unknown_removals: Counter,
    pub other_groups: Counter,
    pub live: Gauge,
    pub complete: Gauge,
    pub unkeyed: Gauge,
    pub index_bytes: Gauge,
    pub index_blocks: Gauge,
}

impl StreamMetrics {
    pub fn new(engine: &str) -> StreamMetrics {
        let e = || engine.to_owned();
        let ev = |t: &'static str| metrics::counter!("switchyard_kv_events_events_total", "engine" => e(), "type" => t);
        let replays = |r: &'static str| metrics::counter!("switchyard_kv_events_replays_total", "engine" => e(), "result" => r);
        let m = StreamMetrics {
            batches: metrics::counter!("switchyard_kv_events_batches_total", "engine" => e()),
            stored: ev("BlockStored"),
            removed: ev("BlockRemoved"),
            cleared: ev("AllBlocksCleared"),
            unknown: ev("unknown"),
            malformed: metrics::counter!("switchyard_kv_events_malformed_total", "engine" => e()),
            oversized: metrics::counter!("switchyard_kv_events_oversized_total", "engine" => e()),
            gaps: metrics::counter!("switchyard_kv_events_gaps_total", "engine" => e()),
            replays_ok: replays("ok"),
            replays_failed: replays("failed"),
            restarts: metrics::counter!("switchyard_kv_events_restarts_total", "engine" => e()),
            unanchored: metrics::counter!("switchyard_kv_events_unanchored_blocks_total", "engine" => e()),
            anchored: metrics::counter!("switchyard_kv_events_anchored_blocks_total", "engine" => e()),
            unknown_removals: metrics::counter!("switchyard_kv_events_unknown_removals_total", "engine" => e()),
            other_groups: metrics::counter!("switchyard_kv_events_other_groups_total", "engine" => e()),
            live: metrics::gauge!("switchyard_kv_events_live", "engine" => e()),
            complete: metrics::gauge!("switchyard_kv_events_complete", "engine" => e()),
            unkeyed: metrics::gauge!("switchyard_kv_events_unkeyed_blocks", "engine" => e()),
            index_bytes: metrics::gauge!("switchyard_kv_events_index_bytes"),
            index_blocks: metrics::gauge!("switchyard_kv_events_index_blocks"),
        };
        // Exported at 0 from the start, as every family is.
        for c in [
            &m.batches,
            &m.stored,
            &m.removed,
            &m.cleared,
            &m.unknown,
            &m.malformed,
            &m.oversized,
            &m.gaps,
            &m.replays_ok,
            &m.replays_failed,
            &m.restarts,
            &m.unanchored,
            &m.anchored,
            &m.unknown_removals,
            &m.other_groups,
        ] {
            c.increment(0);
        }
        m.set_state(ViewState::Off);
        m.unkeyed.set(0.0);
        m
    }

    /// The view's state: `live` and `complete`.
    pub fn set_state(&self, state: ViewState) {
        let bit = |on: bool| if on { 1.0 } else { 0.0 };
        self.live.set(bit(state != ViewState::Off));
        self.complete.set(bit(state == ViewState::Complete));
    }
}
