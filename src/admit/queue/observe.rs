//! What the queue shows: its metrics (`switchyard_queue_*`) with a bounded tenant label, and
//! the snapshot for `/health`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::Refused;
use crate::admit::{Priority, Tenant};

/// Tenants that get their own `tenant` label on `switchyard_queue_length`, besides those with
/// a configured weight: the first ones the queue sees. The rest share the label `other`.
pub const TENANT_LABELS: usize = 16;

/// The label shared by tenants past [`TENANT_LABELS`].
pub const OTHER_TENANTS: &str = "other";

/// Tenants listed per band in a [`QueueSnapshot`], those with the most requests waiting.
pub const SNAPSHOT_TENANTS: usize = 10;

/// Describes the metric families (for `/metrics` HELP lines).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "switchyard_queue_length",
        "Requests waiting in the router's queue, by priority and tenant (the first 16 tenants seen and those with a configured weight by name, the rest as \"other\")"
    );
    metrics::describe_histogram!(
        "switchyard_queue_wait_seconds",
        metrics::Unit::Seconds,
        "Time admitted requests waited in the router's queue (0 for those admitted at once), by priority and tenant (labelled as in switchyard_queue_length)"
    );
    metrics::describe_counter!(
        "switchyard_queue_rejections_total",
        "Requests the router's queue refused, by reason (full, timed_out, shed, displaced)"
    );
}

/// Registers the families at zero so dashboards read 0 before the first request waits: the
/// rejection reasons, and the length and wait series of the anonymous tenant per priority.
pub fn register_metrics() {
    for reason in Refused::ALL {
        metrics::counter!("switchyard_queue_rejections_total", "reason" => reason.reason())
            .increment(0);
    }
    for priority in [Priority::Critical, Priority::Standard, Priority::Sheddable] {
        let (p, t) = (priority.as_str(), crate::request::admission::ANONYMOUS);
        metrics::gauge!("switchyard_queue_length", "priority" => p, "tenant" => t).increment(0.0);
        // Registered, not recorded: the family shows with a count of 0.
        let _ =
            metrics::histogram!("switchyard_queue_wait_seconds", "priority" => p, "tenant" => t);
    }
}

pub(super) fn count_rejection(refused: Refused) {
    metrics::counter!("switchyard_queue_rejections_total", "reason" => refused.reason())
        .increment(1);
}

/// The queue-length gauge's series: which label each tenant has and how many wait per label.
#[derive(Debug, Default)]
pub(super) struct Lengths {
    labels: HashMap<Tenant, usize>,
    /// Per label (index as in `labels`; `other` is created when first needed): its name and
    /// the requests waiting per priority.
    series: Vec<(Arc<str>, [usize; 3])>,
    other: Option<usize>,
}

impl Lengths {
    /// The series of `tenant`, given it a label of its own if there is room or it has a
    /// configured weight.
    pub(super) fn series_of(&mut self, tenant: &Tenant, weighted: bool) -> usize {
        if let Some(&at) = self.labels.get(tenant) {
            return at;
        }
        if weighted || self.labels.len() < TENANT_LABELS {
            self.series.push((tenant.0.clone(), [0; 3]));
            let at = self.series.len() - 1;
            self.labels.insert(tenant.clone(), at);
            return at;
        }
        *self.other.get_or_insert_with(|| {
            self.series.push((Arc::from(OTHER_TENANTS), [0; 3]));
            self.series.len() - 1
        })
    }

    /// One more (`up`) or one fewer request waits in `series` at `priority`.
    pub(super) fn change(&mut self, series: usize, priority: Priority, up: bool) {
        let Some((name, counts)) = self.series.get_mut(series) else {
            return;
        };
        let count = &mut counts[priority as usize];
        if !up && *count == 0 {
            return;
        }
        *count = if up { *count + 1 } else { *count - 1 };
        // Changed, not set: the per-model queues share the series.
        let gauge = metrics::gauge!(
            "switchyard_queue_length",
            "priority" => priority.as_str(),
            "tenant" => name.clone()
        );
        if up {
            gauge.increment(1.0);
        } else {
            gauge.decrement(1.0);
        }
    }

    /// Records how long a request of `series` waited before it was admitted.
    pub(super) fn record_wait(&self, series: usize, priority: Priority, waited: Duration) {
        let tenant = self
            .series
            .get(series)
            .map_or_else(|| Arc::from(OTHER_TENANTS), |(name, _)| name.clone());
        metrics::histogram!(
            "switchyard_queue_wait_seconds",
            "priority" => priority.as_str(),
            "tenant" => tenant
        )
        .record(waited.as_secs_f64());
    }
}

/// The queue at one moment, for `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    /// Requests waiting, all bands.
    pub queued: usize,
    /// The bound on `queued` (`--max-queued`).
    pub max_queued: usize,
    /// Requests admitted whose [`Admitted`](super::Admitted) guard is still held.
    pub admitted: usize,
    /// Per priority, critical first.
    pub bands: Vec<BandSnapshot>,
}

/// One priority band of a [`QueueSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BandSnapshot {
    pub priority: &'static str,
    pub queued: usize,
    /// How long the oldest request of the band has waited, 0 if none waits.
    pub oldest_wait_ms: u64,
    /// The [`SNAPSHOT_TENANTS`] tenants with the most requests waiting, most first (ties by
    /// name).
    pub tenants: Vec<TenantSnapshot>,
}

/// One tenant's requests waiting in a band.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantSnapshot {
    pub tenant: String,
    pub queued: usize,
    pub weight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_bounded_but_weighted_tenants_keep_theirs() {
        let mut lengths = Lengths::default();
        let t = |i: usize| Tenant(Arc::from(format!("t{i}")));
        let own: Vec<usize> = (0..TENANT_LABELS)
            .map(|i| lengths.series_of(&t(i), false))
            .collect();
        assert_eq!(own, (0..TENANT_LABELS).collect::<Vec<_>>());
        let other = lengths.series_of(&t(100), false);
        assert_eq!(lengths.series[other].0.as_ref(), OTHER_TENANTS);
        assert_eq!(lengths.series_of(&t(101), false), other);
        let weighted = lengths.series_of(&t(102), true);
        assert_eq!(lengths.series[weighted].0.as_ref(), "t102");
        assert_eq!(lengths.series_of(&t(3), false), 3);
        lengths.change(other, Priority::Standard, true);
        lengths.change(other, Priority::Standard, true);
        lengths.change(other, Priority::Standard, false);
        assert_eq!(lengths.series[other].1, [0, 1, 0]);
    }
}
