//! Prefill/decode disaggregation in the benchmark (`--pd P:D`): the split of a run's engines
//! into P prefill engines and D decode engines, their roles (the simulated engines' `--kv-role`
//! and the router's model labels), and the runs' names.
//!
//! A P/D run uses the same number of engines as the aggregated runs beside it: engines
//! `0..P` are prefill engines (label [`PREFILL_LABEL`], `kv_role` producer), engines
//! `P..P+D` decode engines (label [`DECODE_LABEL`], `kv_role` consumer).

use serde::Serialize;

use crate::config::RouterConfig;
use crate::sim::{KvRole, SimConfig};

/// The model label of the prefill engines of a P/D run.
pub const PREFILL_LABEL: &str = "prefill";
/// The model label of the decode engines of a P/D run.
pub const DECODE_LABEL: &str = "decode";

/// The P/D policies compared when `--pd-policies` is not given.
pub const DEFAULT_PD_POLICIES: &[&str] = &["disaggregated_prefill_orchestrated"];

/// A run's split of its engines into prefill and decode engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PdSplit {
    pub prefill: usize,
    pub decode: usize,
}

impl PdSplit {
    /// Parses `P:D` (e.g. `2:2`), both at least 1.
    pub fn parse(s: &str) -> Result<PdSplit, String> {
        let bad = || format!("--pd {s:?}: expected P:D with P, D >= 1 (e.g. 2:2)");
        let (p, d) = s.trim().split_once(':').ok_or_else(bad)?;
        let prefill: usize = p.trim().parse().map_err(|_| bad())?;
        let decode: usize = d.trim().parse().map_err(|_| bad())?;
        if prefill == 0 || decode == 0 {
            return Err(bad());
        }
        Ok(PdSplit { prefill, decode })
    }

    pub fn engines(self) -> usize {
        self.prefill + self.decode
    }

    /// `2P+2D`.
    pub fn label(self) -> String {
        format!("{}P+{}D", self.prefill, self.decode)
    }

    /// The report row of `policy` on this split: `pd 2P+2D / disaggregated_prefill`.
    pub fn run_name(self, policy: &str) -> String {
        format!("pd {} / {policy}", self.label())
    }

    /// Engine `i`'s role.
    pub fn role(self, i: usize) -> KvRole {
        if i < self.prefill {
            KvRole::Producer
        } else {
            KvRole::Consumer
        }
    }

    /// Engine `i`'s model label.
    pub fn label_of(self, i: usize) -> &'static str {
        match self.role(i) {
            KvRole::Producer => PREFILL_LABEL,
            _ => DECODE_LABEL,
        }
    }

    /// Makes engine `i`'s configuration a prefill or decode engine's.
    pub fn configure_engine(self, i: usize, cfg: &mut SimConfig) {
        cfg.kv_role = Some(self.role(i));
        cfg.enable_prompt_tokens_details = true;
    }

    /// Labels the router's static backends (in engine order) and names the two pools.
    pub fn configure_router(self, cfg: &mut RouterConfig) {
        for (i, b) in cfg.backends.iter_mut().enumerate() {
            b.label = Some(self.label_of(i).to_owned());
        }
        cfg.prefill_labels = vec![PREFILL_LABEL.to_owned()];
        cfg.decode_labels = vec![DECODE_LABEL.to_owned()];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_parse_name_and_assign_roles() {
        let s = PdSplit::parse(" 1:3 ").unwrap();
        assert_eq!((s.prefill, s.decode, s.engines()), (1, 3, 4));
        assert_eq!(
            s.run_name("disaggregated_prefill"),
            "pd 1P+3D / disaggregated_prefill"
        );
        assert_eq!(
            (0..4).map(|i| s.label_of(i)).collect::<Vec<_>>(),
            ["prefill", "decode", "decode", "decode"]
        );
        for bad in ["2", "0:2", "2:0", "a:b", "2:2:2", ""] {
            assert!(PdSplit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn engines_and_router_get_their_roles() {
        let s = PdSplit {
            prefill: 2,
            decode: 1,
        };
        let mut c = SimConfig::default();
        s.configure_engine(1, &mut c);
        assert_eq!(c.kv_role, Some(KvRole::Producer));
        s.configure_engine(2, &mut c);
        assert_eq!(c.kv_role, Some(KvRole::Consumer));
        let urls: Vec<String> = (0..3).map(|i| format!("http://127.0.0.1:{i}")).collect();
        let mut r = RouterConfig::for_backends(&urls, "m");
        s.configure_router(&mut r);
        let labels: Vec<_> = r.backends.iter().map(|b| b.label.as_deref()).collect();
        assert_eq!(labels, [Some("prefill"), Some("prefill"), Some("decode")]);
        assert_eq!(
            (r.prefill_labels, r.decode_labels),
            (vec!["prefill".to_owned()], vec!["decode".to_owned()])
        );
    }
}
