//! Workload kinds and knobs: flags, TOML workload files, presets, and their validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

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
    /// Unique long prompts (no prefix shared between requests) with short answers: where
    /// prefill/decode disaggregation is meant to help.
    LongPrompt,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::MultiRoundQa => "multi-round-qa",
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::HotPrefix => "hot-prefix",
            WorkloadKind::LongPrompt => "long-prompt",
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
    /// Seed of the workload: texts and arrival times; with --trace, the prompts' token ids
    /// [default: 42].
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
    /// Tokens of each answer (`max_tokens`); with --tenants, of every request of both tenants.
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
    /// hot-prefix, long-prompt: number of requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// long-prompt, --tenants: tokens of each request's unique prompt.
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
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

pub(super) fn invalid(knob: &'static str, message: impl Into<String>) -> WorkloadError {
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
            cold_tokens,
            prompt_tokens
        );
        self
    }

    /// The names of the shape knobs that are set.
    pub(super) fn shape_knobs_set(&self) -> Vec<&'static str> {
        let all: [(&'static str, bool); 11] = [
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
            ("prompt_tokens", self.prompt_tokens.is_some()),
        ];
        all.iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The shape knobs that apply to `kind` (seed, qps, question and answer tokens apply to all).
pub(super) fn shape_knobs(kind: WorkloadKind) -> &'static [&'static str] {
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
        WorkloadKind::LongPrompt => &["requests", "prompt_tokens"],
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
        // ~8k-token prompts, 128-token answers (vLLM's P/D examples' shape), one request per
        // simulated second per engine of four.
        (WorkloadKind::LongPrompt, false) => WorkloadKnobs {
            qps: Some(4.0),
            requests: Some(400),
            prompt_tokens: Some(8000),
            question_tokens: Some(50),
            answer_tokens: Some(128),
            ..base
        },
        (WorkloadKind::LongPrompt, true) => WorkloadKnobs {
            qps: Some(4.0),
            requests: Some(40),
            prompt_tokens: Some(4000),
            question_tokens: Some(40),
            answer_tokens: Some(32),
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
