//! Named engine profiles: the cost model and capacity of one GPU serving one model under vLLM,
//! each with its source. A profile sets the fields of [`SimConfig`] it calibrates; flags given
//! after it (`switchyard sim --profile NAME --itl-ms …`) override them.
//!
//! The step cost model (see `engine_loop`): one engine step that schedules `n` sequences
//! (decodes and prefill chunks alike) and `p` prefill tokens, of which `k` requests have
//! their prefill chunk in it, lasts
//!
//! ```text
//! itl_ms × (1 + batch_slowdown × (n − 1) / max_num_seqs) + prefill_ms_per_token × p
//!   + prefill_overhead_ms × k
//! ```
//!
//! simulated milliseconds (× `speed_factor`). `itl_ms` is thus the step time of one decoding
//! sequence and `itl_ms × batch_slowdown / max_num_seqs` the cost of each further sequence.

use super::SimConfig;

/// A named calibration of the simulated engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Llama-3-8B (BF16) on one H100 80GB SXM under vLLM: decode and prefill costs fitted to
    /// LambdaLabsML/vllm-benchmark's measurements, vLLM's H100 defaults, KV capacity derived
    /// from the model's KV bytes per token. See `docs/sim.md`.
    #[value(name = "llama3-8b-h100")]
    Llama3_8bH100,
    /// The constants the simulator had before the step model (Llama-3.1-8B on one A100 40GB;
    /// see `docs/sim.md`), mapped onto the step model, with vLLM's defaults for that GPU.
    #[value(name = "legacy-a100")]
    LegacyA100,
}

/// The fitted figures of [`Profile::Llama3_8bH100`].
pub mod h100 {
    /// Step time with one decoding sequence, ms: 7.0 fixed + 0.0225 per sequence (fit).
    pub const ITL_MS: f64 = 7.0225;
    /// Per further sequence 0.0225 ms = `ITL_MS × BATCH_SLOWDOWN / MAX_NUM_SEQS`.
    pub const BATCH_SLOWDOWN: f64 = 0.0225 * MAX_NUM_SEQS as f64 / ITL_MS;
    /// 24.7k prefill tokens/s: (62.4 ms TTFT − 7.0 ms step) / 1,369 tokens.
    pub const PREFILL_MS_PER_TOKEN: f64 = 0.0405;
    /// vLLM's `EngineArgs.get_batch_defaults` for the OpenAI server on GPUs of ≥ 70 GiB that
    /// are not A100s.
    pub const MAX_NUM_SEQS: usize = 1024;
    /// Same source.
    pub const MAX_NUM_BATCHED_TOKENS: usize = 8192;
    /// (81,559 MiB × 0.9 − 15,317 MiB of weights − 2,048 MiB of activations (assumed))
    /// / 2 MiB per 16-token block of Llama-3-8B (128 KiB per token) = 28,019.
    pub const NUM_BLOCKS: usize = 28_019;
}

impl Profile {
    /// Every profile, in the order they are documented.
    pub const ALL: [Profile; 2] = [Profile::Llama3_8bH100, Profile::LegacyA100];

    /// The profile's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Llama3_8bH100 => "llama3-8b-h100",
            Profile::LegacyA100 => "legacy-a100",
        }
    }

    /// Sets the fields this profile calibrates; leaves every other field as it is.
    pub fn apply(self, cfg: &mut SimConfig) {
        use super::defaults as d;
        match self {
            Profile::Llama3_8bH100 => {
                cfg.itl_ms = h100::ITL_MS;
                cfg.batch_slowdown = h100::BATCH_SLOWDOWN;
                cfg.prefill_ms_per_token = h100::PREFILL_MS_PER_TOKEN;
                cfg.prefill_overhead_ms = 0.0;
                cfg.max_num_seqs = h100::MAX_NUM_SEQS;
                cfg.max_num_batched_tokens = h100::MAX_NUM_BATCHED_TOKENS;
                cfg.num_blocks = h100::NUM_BLOCKS;
            }
            Profile::LegacyA100 => {
                cfg.itl_ms = d::ITL_MS;
                cfg.batch_slowdown = d::BATCH_SLOWDOWN;
                cfg.prefill_ms_per_token = d::PREFILL_MS_PER_TOKEN;
                cfg.prefill_overhead_ms = d::PREFILL_OVERHEAD_MS;
                cfg.max_num_seqs = d::MAX_NUM_SEQS;
                cfg.max_num_batched_tokens = d::MAX_NUM_BATCHED_TOKENS;
                cfg.num_blocks = d::NUM_BLOCKS;
            }
        }
    }

    /// A default configuration with this profile applied.
    pub fn config(self) -> SimConfig {
        let mut cfg = SimConfig::default();
        self.apply(&mut cfg);
        cfg
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Simulated milliseconds of one engine step (before `speed_factor`): `seqs` sequences
/// scheduled, `prefill_tokens` prompt (or recomputed) tokens among their tokens, and
/// `prefill_reqs` of them with a prefill chunk. An empty step costs nothing.
pub fn step_ms(cfg: &StepCost, seqs: usize, prefill_tokens: usize, prefill_reqs: usize) -> f64 {
    if seqs == 0 {
        return 0.0;
    }
    let extra = (seqs - 1) as f64 / cfg.max_num_seqs.max(1) as f64;
    cfg.itl_ms * (1.0 + cfg.batch_slowdown * extra)
        + cfg.prefill_ms_per_token * prefill_tokens as f64
        + cfg.prefill_overhead_ms * prefill_reqs as f64
}

/// The cost-model fields of a [`SimConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub itl_ms: f64,
    pub batch_slowdown: f64,
    pub max_num_seqs: usize,
    pub prefill_ms_per_token: f64,
    pub prefill_overhead_ms: f64,
}

impl StepCost {
    pub fn of(cfg: &SimConfig) -> StepCost {
        StepCost {
            itl_ms: cfg.itl_ms,
            batch_slowdown: cfg.batch_slowdown,
            max_num_seqs: cfg.max_num_seqs,
            prefill_ms_per_token: cfg.prefill_ms_per_token,
            prefill_overhead_ms: cfg.prefill_overhead_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// The H100 profile against the measurements it was fitted to (decode step = 1/10 of a
    /// streamed chunk of `num_scheduler_steps` 10; see docs/sim.md): within 6 %.
    #[test]
    fn h100_step_times_fit_the_published_measurements() {
        let c = StepCost::of(&Profile::Llama3_8bH100.config());
        for (batch, measured_ms) in [(1, 7.05), (10, 7.36), (70, 8.3), (250, 12.7)] {
            let model = step_ms(&c, batch, 0, 0);
            assert!(
                close(model, measured_ms, measured_ms * 0.06),
                "batch {batch}: model {model:.2} ms, measured {measured_ms} ms"
            );
        }
        // Ten prompts, 1,369 tokens, prefilled in one step: TTFT 62.4 ms measured.
        let ttft = step_ms(&c, 10, 1369, 10);
        assert!(close(ttft, 62.4, 1.5), "{ttft}");
        let cfg = Profile::Llama3_8bH100.config();
        assert_eq!(
            (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.num_blocks),
            (1024, 8192, 28_019)
        );
    }

    /// Today's constants: one sequence decodes in `itl_ms`, a full batch in
    /// `itl_ms × (1 + batch_slowdown)`, a lone prefill adds its overhead and per-token cost.
    #[test]
    fn legacy_profile_keeps_todays_constants() {
        let cfg = Profile::LegacyA100.config();
        assert_eq!(cfg, SimConfig::default());
        let c = StepCost::of(&cfg);
        assert!(close(step_ms(&c, 1, 0, 0), 13.3, 1e-9));
        assert!(close(
            step_ms(&c, 256, 0, 0),
            13.3 * (1.0 + 7.75 * 255.0 / 256.0),
            1e-9
        ));
        assert!(close(step_ms(&c, 1, 1000, 1), 13.3 + 10.0 + 100.0, 1e-9));
        assert_eq!(step_ms(&c, 0, 0, 0), 0.0);
        assert_eq!(cfg.max_num_batched_tokens, 2048);
    }
}
