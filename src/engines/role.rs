//! Which requests an engine takes part in: the whole of a request (aggregated), or one stage of
//! a disaggregated one (prefill or decode), from the engine's model label
//! (`--static-model-labels`, or a Kubernetes pod's model label) matched against
//! `--prefill-model-labels` / `--decode-model-labels` (production-stack's convention), or from
//! llm-d's pod label `llm-d.ai/role`.

/// llm-d's pod label naming an engine's stage: `prefill`, `decode` or `both`.
pub const LLMD_ROLE_LABEL: &str = "llm-d.ai/role";

/// An engine's part in serving requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Serves whole requests (prefill and decode); the default.
    #[default]
    Aggregated,
    /// Computes the prompts of disaggregated requests (vLLM's KV producer).
    Prefill,
    /// Decodes disaggregated requests from a prefill engine's KV (vLLM's KV consumer).
    Decode,
}

impl Role {
    /// `aggregated`, `prefill` or `decode`: shown in `/health` and to scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    /// The role an llm-d `llm-d.ai/role` label value names (`both`: aggregated); `None` for
    /// another value.
    pub fn from_llmd(value: &str) -> Option<Role> {
        match value.trim().to_ascii_lowercase().as_str() {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            "both" | "prefill-decode" | "prefill_decode" => Some(Role::Aggregated),
            _ => None,
        }
    }
}

/// The model labels that make an engine a prefill or a decode engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleLabels {
    /// `--prefill-model-labels`.
    pub prefill: Vec<String>,
    /// `--decode-model-labels`.
    pub decode: Vec<String>,
}

impl RoleLabels {
    /// The role of an engine with model label `label`: prefill if the label is a prefill
    /// label, decode if it is a decode label, else aggregated.
    pub fn role_of(&self, label: Option<&str>) -> Role {
        match label {
            Some(l) if self.prefill.iter().any(|p| p == l) => Role::Prefill,
            Some(l) if self.decode.iter().any(|d| d == l) => Role::Decode,
            _ => Role::Aggregated,
        }
    }

    /// Whether any label makes engines prefill or decode engines.
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_llmd_values_name_roles() {
        let l = RoleLabels {
            prefill: vec!["llama-prefill".into()],
            decode: vec!["llama-decode".into()],
        };
        assert_eq!(l.role_of(Some("llama-prefill")), Role::Prefill);
        assert_eq!(l.role_of(Some("llama-decode")), Role::Decode);
        assert_eq!(l.role_of(Some("llama")), Role::Aggregated);
        assert_eq!(l.role_of(None), Role::Aggregated);
        assert_eq!(Role::from_llmd("prefill"), Some(Role::Prefill));
        assert_eq!(Role::from_llmd("Decode"), Some(Role::Decode));
        assert_eq!(Role::from_llmd("both"), Some(Role::Aggregated));
        assert_eq!(Role::from_llmd("encode"), None);
    }
}
