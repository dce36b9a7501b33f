//! Seeded generation of every request of a workload, up-front.

use std::sync::Arc;

use crate::bench::text::{TextGen, mix};

use super::{Shape, WorkloadSpec};

/// One chat message of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: &'static str,
    pub content: Arc<str>,
}

impl Message {
    fn new(role: &'static str, content: impl Into<Arc<str>>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// One request of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Planned send time, simulated seconds from the start of the run. A turn is never sent
    /// before the previous turn of its chain has been answered.
    pub at: f64,
    /// The user message of this turn.
    pub question: String,
    pub max_tokens: usize,
}

/// A sequence of requests of one user: each turn's request is the preamble, then every
/// earlier turn's question and the answer actually received, then this turn's question.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The session key, sent as the `x-user-id` header.
    pub user: String,
    pub preamble: Vec<Message>,
    pub turns: Vec<Turn>,
}

/// Every request of a run, generated up-front from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub chains: Vec<Chain>,
}

/// Exponentially distributed gap of a Poisson process with `rate` events per second.
pub fn exp_gap(rng: &mut fastrand::Rng, rate: f64) -> f64 {
    -(1.0 - rng.f64()).ln() / rate
}

/// Text-stream ids, so that every part of a workload has its own independent text.
mod stream {
    pub const SYSTEM: u64 = 1;
    pub const TIMES: u64 = 2;
    pub const ORDER: u64 = 3;
    pub const HISTORY: u64 = 1 << 32;
    pub const QUESTION: u64 = 2 << 32;
    pub const PREFIX: u64 = 3 << 32;
    pub const COLD: u64 = 4 << 32;
    pub const LONG: u64 = 5 << 32;
}

impl Workload {
    /// Generates every request of `spec`. Equal specs give equal workloads.
    pub fn generate(spec: &WorkloadSpec) -> Workload {
        let seed = spec.seed;
        let mut times = fastrand::Rng::with_seed(mix(seed, stream::TIMES));
        let question = |i: u64| TextGen::new(seed, stream::QUESTION + i).text(spec.question_tokens);
        let turn = |at: f64, i: u64| Turn {
            at,
            question: question(i),
            max_tokens: spec.answer_tokens,
        };
        let chains = match spec.shape {
            Shape::MultiRoundQa {
                users,
                rounds,
                system_prompt_tokens,
                history_tokens,
            } => {
                let system: Arc<str> =
                    Arc::from(TextGen::new(seed, stream::SYSTEM).text(system_prompt_tokens));
                // Users join as a Poisson process at `qps`; each then sends its rounds as a
                // Poisson process at `qps / users`, so the merged rate is `qps`.
                let per_user_rate = spec.qps / users as f64;
                let mut join = 0.0;
                (0..users)
                    .map(|u| {
                        join += exp_gap(&mut times, spec.qps);
                        let mut at = join;
                        let mut turns = Vec::with_capacity(rounds);
                        for r in 0..rounds {
                            if r > 0 {
                                at += exp_gap(&mut times, per_user_rate);
                            }
                            turns.push(turn(at, (u * rounds + r) as u64));
                        }
                        let history =
                            TextGen::new(seed, stream::HISTORY + u as u64).text(history_tokens);
                        Chain {
                            user: format!("user-{u}"),
                            preamble: vec![
                                Message::new("system", Arc::clone(&system)),
                                Message::new("user", history),
                            ],
                            turns,
                        }
                    })
                    .collect()
            }
            Shape::SharedPrefix {
                groups,
                prompts_per_group,
                prefix_tokens,
            } => {
                let prefixes: Vec<Arc<str>> = (0..groups)
                    .map(|g| {
                        Arc::from(TextGen::new(seed, stream::PREFIX + g as u64).text(prefix_tokens))
                    })
                    .collect();
                let mut order: Vec<(usize, usize)> = (0..groups)
                    .flat_map(|g| (0..prompts_per_group).map(move |p| (g, p)))
                    .collect();
                fastrand::Rng::with_seed(mix(seed, stream::ORDER)).shuffle(&mut order);
                let mut at = 0.0;
                order
                    .into_iter()
                    .map(|(g, p)| {
                        at += exp_gap(&mut times, spec.qps);
                        Chain {
                            user: format!("group-{g}-prompt-{p}"),
                            preamble: vec![Message::new("system", Arc::clone(&prefixes[g]))],
                            turns: vec![turn(at, (g * prompts_per_group + p) as u64)],
                        }
                    })
                    .collect()
            }
            Shape::HotPrefix {
                requests,
                hot_fraction,
                system_prompt_tokens,
                cold_tokens,
            } => {
                let hot_prompt: Arc<str> =
                    Arc::from(TextGen::new(seed, stream::SYSTEM).text(system_prompt_tokens));
                let n_hot = ((requests as f64) * hot_fraction).round() as usize;
                let mut hot: Vec<bool> = (0..requests).map(|i| i < n_hot).collect();
                fastrand::Rng::with_seed(mix(seed, stream::ORDER)).shuffle(&mut hot);
                let mut at = 0.0;
                hot.into_iter()
                    .enumerate()
                    .map(|(i, is_hot)| {
                        at += exp_gap(&mut times, spec.qps);
                        let system = if is_hot {
                            Arc::clone(&hot_prompt)
                        } else {
                            Arc::from(TextGen::new(seed, stream::COLD + i as u64).text(cold_tokens))
                        };
                        Chain {
                            user: format!("request-{i}"),
                            preamble: vec![Message::new("system", system)],
                            turns: vec![turn(at, i as u64)],
                        }
                    })
                    .collect()
            }
            Shape::LongPrompt {
                requests,
                prompt_tokens,
            } => {
                let mut at = 0.0;
                (0..requests)
                    .map(|i| {
                        at += exp_gap(&mut times, spec.qps);
                        let prompt =
                            TextGen::new(seed, stream::LONG + i as u64).text(prompt_tokens);
                        Chain {
                            user: format!("request-{i}"),
                            preamble: vec![Message::new("system", prompt)],
                            turns: vec![turn(at, i as u64)],
                        }
                    })
                    .collect()
            }
        };
        Workload { chains }
    }

    /// Number of requests.
    pub fn requests(&self) -> usize {
        self.chains.iter().map(|c| c.turns.len()).sum()
    }

    /// The latest planned send time, simulated seconds.
    pub fn last_arrival(&self) -> f64 {
        self.chains
            .iter()
            .flat_map(|c| c.turns.iter().map(|t| t.at))
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{WorkloadKind, WorkloadKnobs};
    use crate::tokens::BYTES_PER_TOKEN;

    fn spec(kind: WorkloadKind, flags: WorkloadKnobs) -> WorkloadSpec {
        WorkloadSpec::resolve(Some(kind), false, None, &flags).unwrap()
    }

    #[test]
    fn generation_is_seeded_and_deterministic() {
        for kind in [
            WorkloadKind::MultiRoundQa,
            WorkloadKind::SharedPrefix,
            WorkloadKind::HotPrefix,
        ] {
            let s =
                WorkloadSpec::resolve(Some(kind), true, None, &WorkloadKnobs::default()).unwrap();
            assert_eq!(Workload::generate(&s), Workload::generate(&s));
            let other = WorkloadSpec {
                seed: 7,
                ..s.clone()
            };
            assert_ne!(Workload::generate(&s), Workload::generate(&other));
        }
    }

    #[test]
    fn multi_round_sizes_in_tokens_and_structure() {
        let s = spec(
            WorkloadKind::MultiRoundQa,
            WorkloadKnobs {
                users: Some(5),
                rounds: Some(4),
                system_prompt_tokens: Some(100),
                history_tokens: Some(30),
                question_tokens: Some(7),
                answer_tokens: Some(9),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        assert_eq!(w.chains.len(), 5);
        assert_eq!(w.requests(), 20);
        let system = &w.chains[0].preamble[0].content;
        assert_eq!(system.len(), 100 * BYTES_PER_TOKEN);
        let mut histories = std::collections::BTreeSet::new();
        for c in &w.chains {
            assert_eq!(c.preamble.len(), 2);
            assert_eq!(
                &c.preamble[0].content, system,
                "the system prompt is shared"
            );
            assert_eq!(c.preamble[1].content.len(), 30 * BYTES_PER_TOKEN);
            histories.insert(c.preamble[1].content.clone());
            assert_eq!(c.turns.len(), 4);
            for pair in c.turns.windows(2) {
                assert!(pair[1].at >= pair[0].at, "rounds are in order");
            }
            for t in &c.turns {
                assert_eq!(t.question.len(), 7 * BYTES_PER_TOKEN);
                assert_eq!(t.max_tokens, 9);
            }
        }
        assert_eq!(histories.len(), 5, "each user has its own history");
    }

    #[test]
    fn shared_prefix_groups_share_their_prefix() {
        let s = spec(
            WorkloadKind::SharedPrefix,
            WorkloadKnobs {
                groups: Some(3),
                prompts_per_group: Some(4),
                prefix_tokens: Some(64),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        assert_eq!(w.requests(), 12);
        let mut prefixes = std::collections::BTreeMap::<Arc<str>, usize>::new();
        for c in &w.chains {
            assert_eq!(c.preamble[0].content.len(), 64 * BYTES_PER_TOKEN);
            *prefixes.entry(c.preamble[0].content.clone()).or_default() += 1;
        }
        assert_eq!(prefixes.len(), 3);
        assert!(prefixes.values().all(|&n| n == 4));
    }

    #[test]
    fn hot_prefix_hot_share_is_exact() {
        let s = spec(
            WorkloadKind::HotPrefix,
            WorkloadKnobs {
                requests: Some(200),
                hot_fraction: Some(0.75),
                system_prompt_tokens: Some(50),
                cold_tokens: Some(20),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        let hot = &w
            .chains
            .iter()
            .find(|c| c.preamble[0].content.len() == 50 * BYTES_PER_TOKEN)
            .unwrap()
            .preamble[0]
            .content;
        let n_hot = w
            .chains
            .iter()
            .filter(|c| &c.preamble[0].content == hot)
            .count();
        assert_eq!(n_hot, 150);
        let cold: std::collections::BTreeSet<_> = w
            .chains
            .iter()
            .filter(|c| &c.preamble[0].content != hot)
            .map(|c| {
                assert_eq!(c.preamble[0].content.len(), 20 * BYTES_PER_TOKEN);
                c.preamble[0].content.clone()
            })
            .collect();
        assert_eq!(cold.len(), 50, "cold prompts are unique");
    }

    #[test]
    fn long_prompts_are_unique_and_sized() {
        let s = spec(
            WorkloadKind::LongPrompt,
            WorkloadKnobs {
                requests: Some(30),
                prompt_tokens: Some(300),
                answer_tokens: Some(7),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        assert_eq!(w.requests(), 30);
        let prompts: std::collections::BTreeSet<_> = w
            .chains
            .iter()
            .map(|c| {
                assert_eq!(c.preamble.len(), 1);
                assert_eq!(c.preamble[0].content.len(), 300 * BYTES_PER_TOKEN);
                assert_eq!((c.turns.len(), c.turns[0].max_tokens), (1, 7));
                c.preamble[0].content.clone()
            })
            .collect();
        assert_eq!(prompts.len(), 30, "no prompt is shared");
    }

    #[test]
    fn arrivals_are_poisson_at_the_target_rate() {
        let s = spec(
            WorkloadKind::SharedPrefix,
            WorkloadKnobs {
                qps: Some(5.0),
                groups: Some(40),
                prompts_per_group: Some(100),
                prefix_tokens: Some(1),
                question_tokens: Some(1),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        let mut at: Vec<f64> = w.chains.iter().map(|c| c.turns[0].at).collect();
        at.sort_by(f64::total_cmp);
        let gaps: Vec<f64> = std::iter::once(at[0])
            .chain(at.windows(2).map(|p| p[1] - p[0]))
            .collect();
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        assert!((mean - 0.2).abs() < 0.2 * 0.05, "mean gap {mean}");
        // Exponential gaps: the standard deviation equals the mean.
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((sd / mean - 1.0).abs() < 0.1, "sd {sd} mean {mean}");
        // Multi-round: the merged rate over all users is the target too.
        let s = spec(
            WorkloadKind::MultiRoundQa,
            WorkloadKnobs {
                qps: Some(2.0),
                users: Some(20),
                rounds: Some(200),
                system_prompt_tokens: Some(1),
                history_tokens: Some(1),
                question_tokens: Some(1),
                ..Default::default()
            },
        );
        let w = Workload::generate(&s);
        // Count arrivals while every user is active: after the last join, before any user ends.
        let last_join = w.chains.iter().map(|c| c.turns[0].at).fold(0.0, f64::max);
        let first_end = w
            .chains
            .iter()
            .map(|c| c.turns.last().unwrap().at)
            .fold(f64::INFINITY, f64::min);
        assert!(first_end > last_join + 1000.0);
        let n = w
            .chains
            .iter()
            .flat_map(|c| &c.turns)
            .filter(|t| t.at >= last_join && t.at < first_end)
            .count();
        let rate = n as f64 / (first_end - last_join);
        assert!((rate - 2.0).abs() < 0.1, "rate {rate}");
    }
}
