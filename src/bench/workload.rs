//! Workloads: their knobs (flags and TOML files), presets, and seeded generation of every
//! request up-front.
//!
//! Sizes are in tokens of the stand-in tokenizer (4 bytes of text per token) and count the
//! message contents. Arrival times are in simulated seconds from the start of a run; the driver
//! scales them to wall time with the run's time scale.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::text::{TextGen, mix};

/// The shape of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// U users × R rounds of chat over a shared system prompt and a growing per-user history
    /// (vLLM production-stack's multi-round-qa benchmark).
    MultiRoundQa,
    /// G groups × P prompts; each group has its own long prefix, then a short question
    /// (llm-d's shared-prefix benchmark).
    SharedPrefix,
    /// Most requests share one system prompt, the rest are a cold tail of unique prompts
    /// (production-stack issues #957/#990: cache affinity piles everything on one engine).
    HotPrefix,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::MultiRoundQa => "multi-round-qa",
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::HotPrefix => "hot-prefix",
        }
    }
}

/// The knobs of a workload: flags of `switchyard bench`, and keys (with `_`) of a workload
/// file. Unset knobs come from the workload's preset (see [`preset`]).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadKnobs {
    /// The workload kind (only in files: `workload = "shared-prefix"`; the flag is `--workload`).
    #[arg(skip)]
    #[serde(default)]
    pub workload: Option<WorkloadKind>,
    /// Seed of the workload: texts and arrival times [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Target arrival rate, requests per simulated second (Poisson arrivals).
    #[arg(long)]
    pub qps: Option<f64>,
    /// multi-round-qa: number of users (sessions).
    #[arg(long)]
    pub users: Option<usize>,
    /// multi-round-qa: rounds per user.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// multi-round-qa, hot-prefix: tokens of the shared system prompt.
    #[arg(long)]
    pub system_prompt_tokens: Option<usize>,
    /// multi-round-qa: tokens of each user's own history before the first round.
    #[arg(long)]
    pub history_tokens: Option<usize>,
    /// Tokens of each question.
    #[arg(long)]
    pub question_tokens: Option<usize>,
    /// Tokens of each answer (`max_tokens`).
    #[arg(long)]
    pub answer_tokens: Option<usize>,
    /// shared-prefix: number of groups (distinct prefixes).
    #[arg(long)]
    pub groups: Option<usize>,
    /// shared-prefix: prompts per group.
    #[arg(long)]
    pub prompts_per_group: Option<usize>,
    /// shared-prefix: tokens of each group's prefix.
    #[arg(long)]
    pub prefix_tokens: Option<usize>,
    /// hot-prefix: number of requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// hot-prefix: share of requests (0..1) that use the hot system prompt.
    #[arg(long)]
    pub hot_fraction: Option<f64>,
    /// hot-prefix: tokens of each cold request's unique prompt.
    #[arg(long)]
    pub cold_tokens: Option<usize>,
}

/// Why a workload could not be resolved or read.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read workload file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("workload file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{knob}: {message}")]
    Invalid { knob: &'static str, message: String },
}

fn invalid(knob: &'static str, message: impl Into<String>) -> WorkloadError {
    WorkloadError::Invalid {
        knob,
        message: message.into(),
    }
}

/// At most this many requests per run: the load is bounded.
pub const MAX_REQUESTS: usize = 100_000;
/// At most this many tokens per text part.
pub const MAX_TOKENS: usize = 1_000_000;

impl WorkloadKnobs {
    /// Reads a workload file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<WorkloadKnobs, WorkloadError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: shown.clone(),
            source,
        })?;
        WorkloadKnobs::from_toml(&text).map_err(|message| WorkloadError::Parse {
            path: shown,
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<WorkloadKnobs, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// `other`'s set knobs over these.
    pub fn overlay(mut self, other: &WorkloadKnobs) -> WorkloadKnobs {
        macro_rules! over {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        over!(
            workload,
            seed,
            qps,
            users,
            rounds,
            system_prompt_tokens,
            history_tokens,
            question_tokens,
            answer_tokens,
            groups,
            prompts_per_group,
            prefix_tokens,
            requests,
            hot_fraction,
            cold_tokens
        );
        self
    }

    /// The names of the shape knobs that are set.
    fn shape_knobs_set(&self) -> Vec<&'static str> {
        let all: [(&'static str, bool); 10] = [
            ("users", self.users.is_some()),
            ("rounds", self.rounds.is_some()),
            ("system_prompt_tokens", self.system_prompt_tokens.is_some()),
            ("history_tokens", self.history_tokens.is_some()),
            ("groups", self.groups.is_some()),
            ("prompts_per_group", self.prompts_per_group.is_some()),
            ("prefix_tokens", self.prefix_tokens.is_some()),
            ("requests", self.requests.is_some()),
            ("hot_fraction", self.hot_fraction.is_some()),
            ("cold_tokens", self.cold_tokens.is_some()),
        ];
        all.iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The shape knobs that apply to `kind` (seed, qps, question and answer tokens apply to all).
fn shape_knobs(kind: WorkloadKind) -> &'static [&'static str] {
    match kind {
        WorkloadKind::MultiRoundQa => {
            &["users", "rounds", "system_prompt_tokens", "history_tokens"]
        }
        WorkloadKind::SharedPrefix => &["groups", "prompts_per_group", "prefix_tokens"],
        WorkloadKind::HotPrefix => &[
            "requests",
            "hot_fraction",
            "system_prompt_tokens",
            "cold_tokens",
        ],
    }
}

/// The default knobs of `kind`: a full comparison (a few simulated minutes per policy), or
/// with `quick` a first look that finishes in seconds.
pub fn preset(kind: WorkloadKind, quick: bool) -> WorkloadKnobs {
    let base = WorkloadKnobs {
        workload: Some(kind),
        seed: Some(42),
        ..WorkloadKnobs::default()
    };
    match (kind, quick) {
        (WorkloadKind::MultiRoundQa, false) => WorkloadKnobs {
            qps: Some(6.0),
            users: Some(60),
            rounds: Some(8),
            system_prompt_tokens: Some(1000),
            history_tokens: Some(2000),
            question_tokens: Some(50),
            answer_tokens: Some(100),
            ..base
        },
        (WorkloadKind::MultiRoundQa, true) => WorkloadKnobs {
            qps: Some(6.0),
            users: Some(20),
            rounds: Some(4),
            system_prompt_tokens: Some(500),
            history_tokens: Some(1000),
            question_tokens: Some(40),
            answer_tokens: Some(40),
            ..base
        },
        (WorkloadKind::SharedPrefix, false) => WorkloadKnobs {
            qps: Some(12.0),
            groups: Some(16),
            prompts_per_group: Some(24),
            prefix_tokens: Some(2000),
            question_tokens: Some(50),
            answer_tokens: Some(60),
            ..base
        },
        (WorkloadKind::SharedPrefix, true) => WorkloadKnobs {
            qps: Some(12.0),
            groups: Some(6),
            prompts_per_group: Some(10),
            prefix_tokens: Some(1000),
            question_tokens: Some(40),
            answer_tokens: Some(30),
            ..base
        },
        (WorkloadKind::HotPrefix, false) => WorkloadKnobs {
            qps: Some(24.0),
            requests: Some(800),
            hot_fraction: Some(0.9),
            system_prompt_tokens: Some(2000),
            cold_tokens: Some(1000),
            question_tokens: Some(50),
            answer_tokens: Some(60),
            ..base
        },
        (WorkloadKind::HotPrefix, true) => WorkloadKnobs {
            qps: Some(24.0),
            requests: Some(200),
            hot_fraction: Some(0.9),
            system_prompt_tokens: Some(1000),
            cold_tokens: Some(500),
            question_tokens: Some(40),
            answer_tokens: Some(60),
            ..base
        },
    }
}

/// A resolved workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub seed: u64,
    /// Requests per simulated second.
    pub qps: f64,
    pub question_tokens: usize,
    pub answer_tokens: usize,
    #[serde(flatten)]
    pub shape: Shape,
}

/// The kind-specific knobs of a resolved workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Shape {
    MultiRoundQa {
        users: usize,
        rounds: usize,
        system_prompt_tokens: usize,
        history_tokens: usize,
    },
    SharedPrefix {
        groups: usize,
        prompts_per_group: usize,
        prefix_tokens: usize,
    },
    HotPrefix {
        requests: usize,
        hot_fraction: f64,
        system_prompt_tokens: usize,
        cold_tokens: usize,
    },
}

impl WorkloadSpec {
    /// Resolves the workload: the kind is `kind` (the `--workload` flag), else the file's, else
    /// multi-round-qa; knobs are the flags over the file over the preset. A knob that does not
    /// apply to the kind is an error naming it.
    pub fn resolve(
        kind: Option<WorkloadKind>,
        quick: bool,
        file: Option<&WorkloadKnobs>,
        flags: &WorkloadKnobs,
    ) -> Result<WorkloadSpec, WorkloadError> {
        let kind = kind
            .or(file.and_then(|f| f.workload))
            .unwrap_or(WorkloadKind::MultiRoundQa);
        let allowed = shape_knobs(kind);
        for given in file.iter().copied().chain([flags]) {
            if let Some(k) = given
                .shape_knobs_set()
                .into_iter()
                .find(|k| !allowed.contains(k))
            {
                return Err(invalid(
                    k,
                    format!(
                        "does not apply to the {} workload (its knobs: {})",
                        kind.name(),
                        allowed.join(", ")
                    ),
                ));
            }
        }
        let mut k = preset(kind, quick);
        if let Some(f) = file {
            k = k.overlay(f);
        }
        let k = k.overlay(flags);
        let need = |name: &'static str, v: Option<usize>, min: usize| -> Result<usize, _> {
            let v = v.ok_or_else(|| invalid(name, "missing"))?;
            if v < min || v > MAX_TOKENS {
                return Err(invalid(
                    name,
                    format!("must be between {min} and {MAX_TOKENS}, got {v}"),
                ));
            }
            Ok(v)
        };
        let qps = k.qps.ok_or_else(|| invalid("qps", "missing"))?;
        if !(qps.is_finite() && qps > 0.0) {
            return Err(invalid(
                "qps",
                format!("must be a positive number, got {qps}"),
            ));
        }
        let shape = match kind {
            WorkloadKind::MultiRoundQa => Shape::MultiRoundQa {
                users: need("users", k.users, 1)?,
                rounds: need("rounds", k.rounds, 1)?,
                system_prompt_tokens: need("system_prompt_tokens", k.system_prompt_tokens, 0)?,
                history_tokens: need("history_tokens", k.history_tokens, 0)?,
            },
            WorkloadKind::SharedPrefix => Shape::SharedPrefix {
                groups: need("groups", k.groups, 1)?,
                prompts_per_group: need("prompts_per_group", k.prompts_per_group, 1)?,
                prefix_tokens: need("prefix_tokens", k.prefix_tokens, 0)?,
            },
            WorkloadKind::HotPrefix => {
                let hot_fraction = k
                    .hot_fraction
                    .ok_or_else(|| invalid("hot_fraction", "missing"))?;
                if !(0.0..=1.0).contains(&hot_fraction) {
                    return Err(invalid(
                        "hot_fraction",
                        format!("must be between 0 and 1, got {hot_fraction}"),
                    ));
                }
                Shape::HotPrefix {
                    requests: need("requests", k.requests, 1)?,
                    hot_fraction,
                    system_prompt_tokens: need("system_prompt_tokens", k.system_prompt_tokens, 0)?,
                    cold_tokens: need("cold_tokens", k.cold_tokens, 0)?,
                }
            }
        };
        let spec = WorkloadSpec {
            kind,
            seed: k.seed.unwrap_or(42),
            qps,
            question_tokens: need("question_tokens", k.question_tokens, 1)?,
            answer_tokens: need("answer_tokens", k.answer_tokens, 1)?,
            shape,
        };
        let n = spec.requests();
        if n > MAX_REQUESTS {
            return Err(invalid(
                "requests",
                format!("the workload has {n} requests; at most {MAX_REQUESTS} are allowed"),
            ));
        }
        Ok(spec)
    }

    /// Number of requests the workload sends.
    pub fn requests(&self) -> usize {
        match self.shape {
            Shape::MultiRoundQa { users, rounds, .. } => users.saturating_mul(rounds),
            Shape::SharedPrefix {
                groups,
                prompts_per_group,
                ..
            } => groups.saturating_mul(prompts_per_group),
            Shape::HotPrefix { requests, .. } => requests,
        }
    }

    /// A one-line description, e.g. `multi-round-qa: 40 users x 6 rounds, ...`.
    pub fn describe(&self) -> String {
        let common = format!(
            "question {} tok, answer {} tok, {} req/s, seed {}",
            self.question_tokens, self.answer_tokens, self.qps, self.seed
        );
        match self.shape {
            Shape::MultiRoundQa {
                users,
                rounds,
                system_prompt_tokens,
                history_tokens,
            } => format!(
                "multi-round-qa: {users} users x {rounds} rounds, system prompt {system_prompt_tokens} tok, history {history_tokens} tok, {common}"
            ),
            Shape::SharedPrefix {
                groups,
                prompts_per_group,
                prefix_tokens,
            } => format!(
                "shared-prefix: {groups} groups x {prompts_per_group} prompts, prefix {prefix_tokens} tok, {common}"
            ),
            Shape::HotPrefix {
                requests,
                hot_fraction,
                system_prompt_tokens,
                cold_tokens,
            } => format!(
                "hot-prefix: {requests} requests, {:.0}% on a {system_prompt_tokens}-tok system prompt, cold prompts {cold_tokens} tok, {common}",
                hot_fraction * 100.0
            ),
        }
    }
}

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
    use crate::tokens::BYTES_PER_TOKEN;

    fn spec(kind: WorkloadKind, flags: WorkloadKnobs) -> WorkloadSpec {
        WorkloadSpec::resolve(Some(kind), false, None, &flags).unwrap()
    }

    #[test]
    fn presets_resolve_for_every_kind() {
        for kind in [
            WorkloadKind::MultiRoundQa,
            WorkloadKind::SharedPrefix,
            WorkloadKind::HotPrefix,
        ] {
            for quick in [false, true] {
                let s = WorkloadSpec::resolve(Some(kind), quick, None, &WorkloadKnobs::default())
                    .unwrap();
                assert_eq!(s.kind, kind);
                let w = Workload::generate(&s);
                assert_eq!(w.requests(), s.requests());
                assert!(s.requests() > 0);
            }
        }
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

    #[test]
    fn knobs_of_another_kind_are_rejected_by_name() {
        let e = WorkloadSpec::resolve(
            Some(WorkloadKind::SharedPrefix),
            false,
            None,
            &WorkloadKnobs {
                rounds: Some(3),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("rounds: does not apply"), "{e}");
        let e = WorkloadSpec::resolve(
            None,
            false,
            None,
            &WorkloadKnobs {
                qps: Some(0.0),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("qps:"), "{e}");
    }

    #[test]
    fn file_then_flags_over_the_preset() {
        let file = WorkloadKnobs::from_toml(
            "workload = \"hot-prefix\"\nrequests = 10\nhot_fraction = 0.5\nseed = 3\n",
        )
        .unwrap();
        let flags = WorkloadKnobs {
            requests: Some(12),
            ..Default::default()
        };
        let s = WorkloadSpec::resolve(None, true, Some(&file), &flags).unwrap();
        assert_eq!(s.kind, WorkloadKind::HotPrefix);
        assert_eq!(s.requests(), 12);
        assert_eq!(s.seed, 3);
        let quick = preset(WorkloadKind::HotPrefix, true);
        assert_eq!(Some(s.answer_tokens), quick.answer_tokens);
        assert!(WorkloadKnobs::from_toml("requets = 1\n").is_err());
        assert!(WorkloadKnobs::from_toml("workload = \"nope\"\n").is_err());
    }

    #[test]
    fn shipped_workload_files_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let k = WorkloadKnobs::from_file(&path).unwrap();
                assert!(
                    k.workload.is_some(),
                    "{} names its workload",
                    path.display()
                );
                WorkloadSpec::resolve(None, false, Some(&k), &WorkloadKnobs::default())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3);
    }
}
