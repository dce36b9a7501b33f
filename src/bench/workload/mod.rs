//! Workloads: their knobs (flags and TOML files, [`knobs`]), the resolved specification
//! ([`WorkloadSpec`]), and seeded generation of every request up-front ([`generate`]); or a
//! production trace replayed (`--trace`): its formats and lazy reader ([`trace`]), the token ids
//! of its prompts ([`trace_prompt`]), what is sent and the pass that summarises it
//! ([`trace_plan`]), and its ideal cache-hit rate ([`trace_ideal`]).
//!
//! Sizes are in tokens of the stand-in tokenizer (4 bytes of text per token) and count the
//! message contents. Arrival times are in simulated seconds from the start of a run; the driver
//! scales them to wall time with the run's time scale.

pub mod generate;
pub mod knobs;
pub mod trace;
pub mod trace_ideal;
pub mod trace_plan;
pub mod trace_prompt;

pub use generate::{Chain, Message, Turn, Workload, exp_gap};
pub use knobs::{MAX_REQUESTS, MAX_TOKENS, WorkloadError, WorkloadKind, WorkloadKnobs, preset};
use knobs::{invalid, shape_knobs};

use serde::Serialize;

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
    LongPrompt {
        requests: usize,
        prompt_tokens: usize,
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
            WorkloadKind::LongPrompt => Shape::LongPrompt {
                requests: need("requests", k.requests, 1)?,
                prompt_tokens: need("prompt_tokens", k.prompt_tokens, 1)?,
            },
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
            Shape::HotPrefix { requests, .. } | Shape::LongPrompt { requests, .. } => requests,
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
            Shape::LongPrompt {
                requests,
                prompt_tokens,
            } => format!(
                "long-prompt: {requests} requests, unique prompts of {prompt_tokens} tok, {common}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn presets_resolve_for_every_kind() {
        for kind in [
            WorkloadKind::MultiRoundQa,
            WorkloadKind::SharedPrefix,
            WorkloadKind::HotPrefix,
            WorkloadKind::LongPrompt,
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
