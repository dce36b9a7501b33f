//! One priority band of the queue: deficit round robin (Shreedhar and Varghese, 1995) across
//! tenants by estimated tokens, FIFO within a tenant.
//!
//! Each tenant with requests waiting is a flow in a round-robin list. When a flow's turn
//! comes it is credited `QUANTUM_TOKENS × weight` tokens of deficit; it is served (its oldest
//! request leaves) while that request's cost fits in the deficit, then the turn passes to the
//! next flow and the rest of the deficit is kept for the flow's next turn. A flow that empties
//! loses its deficit (an idle tenant banks no credit). Over any stretch in which two tenants
//! both wait, the tokens they are served differ from the ratio of their weights by at most one
//! quantum plus one request.
//!
//! A request costing more than a flow's deficit makes the flow wait more turns. Instead of
//! walking those turns one by one (the classic algorithm's reason for a quantum no smaller
//! than the largest request), [`Band::pop`] skips a whole run of turns in which nobody could
//! be served in one step ([`Band::skip_idle_rounds`]), so a small quantum costs at most one
//! pass over the waiting tenants per admission.

use std::collections::{HashMap, VecDeque};

use crate::admit::Tenant;

/// The deficit a tenant of weight 1 is credited per turn, in estimated tokens. Smaller than
/// most requests (a prompt estimate plus `max_tokens`), so a turn serves about one request
/// and tenants interleave at the finest grain; a request is never smaller than one token.
pub const QUANTUM_TOKENS: u64 = 256;

/// A waiting request: its id in the queue (increasing with arrival) and its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: u64,
    cost: u64,
}

#[derive(Debug, Default)]
struct Flow {
    deficit: u64,
    /// Whether the flow got its quantum for the turn it is having now (it is at the front).
    credited: bool,
    entries: VecDeque<Entry>,
}

/// The requests of one priority band, per tenant.
#[derive(Debug, Default)]
pub(super) struct Band {
    flows: HashMap<Tenant, Flow>,
    /// The tenants with requests waiting, in round-robin order; the front one has the turn.
    turns: VecDeque<Tenant>,
    len: usize,
}

impl Band {
    /// Requests waiting in this band.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Requests waiting per tenant, in no particular order.
    pub(super) fn tenants(&self) -> impl Iterator<Item = (&Tenant, usize)> {
        self.flows.iter().map(|(t, f)| (t, f.entries.len()))
    }

    /// The oldest waiting request's id (the smallest).
    pub(super) fn oldest(&self) -> Option<u64> {
        self.flows
            .values()
            .filter_map(|f| f.entries.front())
            .map(|e| e.id)
            .min()
    }

    /// Queues request `id` (ids must increase from one call to the next) at the back of its
    /// tenant's line. A cost below one token counts as one.
    pub(super) fn push(&mut self, tenant: &Tenant, id: u64, cost: u64) {
        let entry = Entry {
            id,
            cost: cost.max(1),
        };
        let flow = self.flows.entry(tenant.clone()).or_default();
        if flow.entries.is_empty() {
            self.turns.push_back(tenant.clone());
        }
        flow.entries.push_back(entry);
        self.len += 1;
    }

    /// Takes the next request in deficit-round-robin order: its tenant and id.
    pub(super) fn pop(&mut self, weights: &HashMap<Tenant, u32>) -> Option<(Tenant, u64)> {
        let mut idle_turns = 0;
        loop {
            let tenant = self.turns.front()?;
            let Some(flow) = self.flows.get_mut(tenant) else {
                // A turn without a flow cannot happen; drop it rather than spin.
                self.turns.pop_front();
                continue;
            };
            let Some(head) = flow.entries.front().copied() else {
                let tenant = self.turns.pop_front()?;
                self.flows.remove(&tenant);
                continue;
            };
            if !flow.credited {
                flow.deficit = flow.deficit.saturating_add(quantum(weights, tenant));
                flow.credited = true;
            }
            if head.cost <= flow.deficit {
                flow.deficit -= head.cost;
                flow.entries.pop_front();
                self.len -= 1;
                let tenant = tenant.clone();
                if flow.entries.is_empty() {
                    self.flows.remove(&tenant);
                    self.turns.pop_front();
                }
                return Some((tenant, head.id));
            }
            flow.credited = false;
            self.turns.rotate_left(1);
            idle_turns += 1;
            if idle_turns >= self.turns.len() {
                self.skip_idle_rounds(weights);
                idle_turns = 0;
            }
        }
    }

    /// After a whole round in which no flow could be served (every flow's deficit is below its
    /// oldest request's cost and none is credited), credits every flow at once with the rounds
    /// that would pass before the first of them can be served, less one: the next round serves
    /// exactly the flow the turn-by-turn walk would have served.
    fn skip_idle_rounds(&mut self, weights: &HashMap<Tenant, u32>) {
        let rounds_needed = |tenant: &Tenant, flow: &Flow| {
            let short = flow
                .entries
                .front()
                .map_or(0, |e| e.cost.saturating_sub(flow.deficit));
            short.div_ceil(quantum(weights, tenant))
        };
        let Some(fewest) = self.flows.iter().map(|(t, f)| rounds_needed(t, f)).min() else {
            return;
        };
        let skip = fewest.saturating_sub(1);
        if skip == 0 {
            return;
        }
        for (tenant, flow) in &mut self.flows {
            let credit = quantum(weights, tenant).saturating_mul(skip);
            flow.deficit = flow.deficit.saturating_add(credit);
        }
    }

    /// Removes request `id` of `tenant` if it waits here; whether it did.
    pub(super) fn remove(&mut self, tenant: &Tenant, id: u64) -> bool {
        let Some(flow) = self.flows.get_mut(tenant) else {
            return false;
        };
        let Ok(at) = flow.entries.binary_search_by_key(&id, |e| e.id) else {
            return false;
        };
        flow.entries.remove(at);
        self.len -= 1;
        if flow.entries.is_empty() {
            self.flows.remove(tenant);
            self.turns.retain(|t| t != tenant);
        }
        true
    }

    /// The most recently queued request (the largest id) of any tenant: its tenant and id.
    pub(super) fn newest(&self) -> Option<(Tenant, u64)> {
        self.flows
            .iter()
            .filter_map(|(t, f)| f.entries.back().map(|e| (t, e.id)))
            .max_by_key(|(_, id)| *id)
            .map(|(t, id)| (t.clone(), id))
    }
}

fn quantum(weights: &HashMap<Tenant, u32>, tenant: &Tenant) -> u64 {
    let weight = weights.get(tenant).copied().unwrap_or(1).max(1);
    QUANTUM_TOKENS.saturating_mul(u64::from(weight))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn t(name: &str) -> Tenant {
        Tenant(Arc::from(name))
    }

    fn drain(band: &mut Band, weights: &HashMap<Tenant, u32>) -> Vec<(String, u64)> {
        std::iter::from_fn(|| band.pop(weights))
            .map(|(t, id)| (t.0.to_string(), id))
            .collect()
    }

    #[test]
    fn one_tenant_is_served_first_in_first_out() {
        let mut band = Band::default();
        for (id, cost) in [(1, 5000), (2, 10), (3, 700), (4, 0)] {
            band.push(&t("a"), id, cost);
        }
        let ids: Vec<u64> = drain(&mut band, &HashMap::new())
            .into_iter()
            .map(|p| p.1)
            .collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(band.len(), 0);
        assert!(band.flows.is_empty() && band.turns.is_empty());
    }

    #[test]
    fn equal_tenants_alternate_by_tokens_not_by_requests() {
        // a sends requests of 512 tokens, b of 128: per 512 tokens, one of a's for four of b's.
        let mut band = Band::default();
        for i in 0..4 {
            band.push(&t("a"), i, 512);
        }
        for i in 10..26 {
            band.push(&t("b"), i, 128);
        }
        let order = drain(&mut band, &HashMap::new());
        let tokens_after = |n: usize, who: &str| {
            order[..n]
                .iter()
                .filter(|(t, _)| t == who)
                .map(|(t, _)| if t == "a" { 512 } else { 128 })
                .sum::<u64>()
        };
        // After every prefix, the two tenants' served tokens differ by at most a quantum plus
        // one request.
        for n in 1..=order.len() {
            let (a, b) = (tokens_after(n, "a"), tokens_after(n, "b"));
            assert!(
                a.abs_diff(b) <= QUANTUM_TOKENS + 512,
                "after {n}: a {a} b {b}"
            );
        }
        assert_eq!(tokens_after(order.len(), "a"), 2048);
        assert_eq!(tokens_after(order.len(), "b"), 2048);
    }

    #[test]
    fn large_requests_skip_idle_rounds_and_keep_the_turn_order() {
        // Costs far above the quantum: the skip must pick the same flow the walk would.
        let mut band = Band::default();
        band.push(&t("a"), 1, 100_000);
        band.push(&t("b"), 2, 60_000);
        band.push(&t("c"), 3, 100_000);
        let order = drain(&mut band, &HashMap::new());
        // b needs 235 turns, a and c 391: b first, then a (ahead of c in the round).
        assert_eq!(order, [("b".into(), 2), ("a".into(), 1), ("c".into(), 3)]);
    }

    #[test]
    fn weights_two_to_one_serve_two_to_one() {
        let mut band = Band::default();
        let weights = HashMap::from([(t("heavy"), 2)]);
        let (heavy, light) = (t("heavy"), t("light"));
        for i in 0..300 {
            band.push(if i % 2 == 0 { &heavy } else { &light }, i, 300);
        }
        let order = drain(&mut band, &weights);
        let heavy = order[..90].iter().filter(|(t, _)| t == "heavy").count();
        assert!((59..=61).contains(&heavy), "heavy got {heavy} of 90");
    }

    #[test]
    fn removal_and_newest_keep_the_lines_consistent() {
        let mut band = Band::default();
        band.push(&t("a"), 1, 10);
        band.push(&t("b"), 2, 10);
        band.push(&t("a"), 3, 10);
        assert_eq!(band.newest(), Some((t("a"), 3)));
        assert_eq!(band.oldest(), Some(1));
        assert!(band.remove(&t("a"), 3));
        assert!(!band.remove(&t("a"), 3));
        assert!(!band.remove(&t("c"), 1));
        assert_eq!(band.newest(), Some((t("b"), 2)));
        assert!(band.remove(&t("b"), 2));
        assert_eq!(band.turns, [t("a")]);
        assert_eq!(band.len(), 1);
        assert_eq!(drain(&mut band, &HashMap::new()), [("a".into(), 1)]);
        assert_eq!(band.newest(), None);
    }

    #[test]
    fn a_tenant_that_empties_loses_its_credit() {
        let mut band = Band::default();
        band.push(&t("a"), 1, 1);
        assert_eq!(band.pop(&HashMap::new()), Some((t("a"), 1)));
        // a had 255 tokens of deficit left; coming back, it starts from zero behind b.
        band.push(&t("b"), 2, 256);
        band.push(&t("a"), 3, 256);
        band.push(&t("a"), 4, 256);
        let ids: Vec<u64> = drain(&mut band, &HashMap::new())
            .into_iter()
            .map(|p| p.1)
            .collect();
        assert_eq!(ids, [2, 3, 4]);
    }
}
