//! The built-in tiers: one table, [`BUILTINS`], is their single definition. Each row gives the
//! built-in's name, its parameters (type, valid values, default), a one-line doc and its native
//! implementation. Everything else reads the table:
//!
//! - TOML loading binds a `builtin = "..."` tier's keys to the parameters by name;
//! - the Rhai engine registers one function per row and accepted arity, which binds its
//!   arguments the same way when it is called;
//! - script validation binds the literal arguments of built-in calls at load time, so a script
//!   and a TOML tier reject the same bad argument with the same message;
//! - a script that is a bare `??` chain of built-in calls becomes the pipeline of those rows.
//!
//! [`BuiltinSpec::bind`] is the one place where arguments are validated.

mod native;

use std::fmt;

use http::HeaderName;

use super::kv::Kv;
use super::stage::{SKIP_PREFILL, Stage};
use crate::engines::Candidate;
use crate::request::RequestInfo;

pub use native::{
    PolicyState, kv_lookup, kv_lookup_matches, least_loaded, load_balance, min_cost, power_of_two,
    random, round_robin, session_hash,
};

/// `kv_lookup()`'s default minimum match: half of the prompt's tokens.
pub const DEFAULT_KV_MIN_MATCH: f64 = 0.5;

/// The most parameters a built-in takes.
pub const MAX_PARAMS: usize = 2;

/// What a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamType {
    /// An integer or a float in `min..=max` (NaN is never valid).
    Number { min: f64, max: f64 },
    /// A string that is a valid HTTP header name (matched case-insensitively).
    HeaderName,
}

/// What a parameter is when it is not given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IfAbsent {
    /// It must be given; the text says what it is (e.g. "queue spread, e.g. 8").
    Required(&'static str),
    /// This number.
    Number(f64),
    /// Nothing: the implementation does without (the text says what it does instead).
    Nothing(&'static str),
}

/// One parameter of a built-in.
#[derive(Debug)]
pub struct Param {
    /// Its name: the TOML key, and the name used in messages.
    pub name: &'static str,
    pub ty: ParamType,
    /// What a valid value is, completing "`name` must be ...".
    pub must_be: &'static str,
    pub if_absent: IfAbsent,
}

/// A validated argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Not given, and the parameter has no default value.
    Absent,
    Number(f64),
    Header(HeaderName),
}

/// A built-in's validated arguments, by parameter position.
#[derive(Debug, Clone, PartialEq)]
pub struct Args([Value; MAX_PARAMS]);

impl Args {
    /// Parameter `i` if it is a number.
    pub fn number(&self, i: usize) -> Option<f64> {
        match self.0.get(i) {
            Some(Value::Number(x)) => Some(*x),
            _ => None,
        }
    }

    /// Parameter `i` if it is a header name.
    pub fn header(&self, i: usize) -> Option<&HeaderName> {
        match self.0.get(i) {
            Some(Value::Header(h)) => Some(h),
            _ => None,
        }
    }
}

/// What a built-in decides on: the request, the candidates, the policy's state and the
/// decision's prefix matches (computed when a built-in first reads them).
pub struct Inputs<'a> {
    pub req: &'a RequestInfo,
    pub cands: &'a [Candidate],
    pub state: &'a PolicyState,
    pub kv: &'a Kv<'a>,
    /// The stage the decision is for.
    pub stage: Stage<'a>,
}

/// A built-in's native implementation: the chosen candidate's index, or `None` to pass.
pub type Run = fn(&Args, &Inputs<'_>) -> Option<usize>;

/// One row of [`BUILTINS`].
pub struct BuiltinSpec {
    /// The name in TOML (`builtin = "..."`), in scripts (`name(...)`) and as the deciding tier.
    pub name: &'static str,
    /// One line for the documentation.
    pub doc: &'static str,
    /// Parameters in call order; required ones first.
    pub params: &'static [Param],
    /// The native implementation.
    run: Run,
}

impl fmt::Debug for BuiltinSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinSpec")
            .field("name", &self.name)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

const ANY_NUMBER_FROM_0: ParamType = ParamType::Number {
    min: 0.0,
    max: f64::INFINITY,
};

/// The built-ins. Their position in this table identifies them (as the origin of an engine a
/// script's built-in call chose, and as a tier label).
pub static BUILTINS: [BuiltinSpec; 11] = [
    BuiltinSpec {
        name: "load_balance",
        doc: "if the spread of queues (max − min) is at least `threshold`, the least-queued \
              engine (ties rotate); otherwise pass",
        params: &[Param {
            name: "threshold",
            ty: ANY_NUMBER_FROM_0,
            must_be: "a number ≥ 0",
            if_absent: IfAbsent::Required("queue spread, e.g. 8"),
        }],
        run: |args, i| load_balance(i.cands, args.number(0)?, i.state),
    },
    BuiltinSpec {
        name: "kv_lookup",
        doc: "the engine with the longest cached prefix of the prompt, if it covers at least \
              `min_match` of the prompt's tokens (ties to the less loaded); otherwise pass",
        params: &[Param {
            name: "min_match",
            ty: ParamType::Number { min: 0.0, max: 1.0 },
            must_be: "a fraction of the prompt's tokens, 0 to 1",
            if_absent: IfAbsent::Number(DEFAULT_KV_MIN_MATCH),
        }],
        run: |args, i| {
            let min_match = args.number(0)?;
            let m = i.kv.get();
            kv_lookup_matches(i.cands, &m.tokens, m.prompt_tokens, min_match, i.state)
        },
    },
    BuiltinSpec {
        name: "session_hash",
        doc: "rendezvous hashing of the session key (or of the header `header`) over the \
              engines' names; pass without a key",
        params: &[Param {
            name: "header",
            ty: ParamType::HeaderName,
            must_be: "a valid header name",
            if_absent: IfAbsent::Nothing("the request's session key"),
        }],
        run: |args, i| {
            let key = match args.header(0) {
                Some(h) => i.req.headers.get(h).map(|v| v.as_bytes()),
                None => i.req.session_key.as_deref().map(str::as_bytes),
            };
            session_hash(i.cands, key)
        },
    },
    BuiltinSpec {
        name: "fallback",
        doc: "the least loaded engine (as `least_loaded`), named for a pipeline's last tier",
        params: &[],
        run: |_, i| least_loaded(i.cands, i.state),
    },
    BuiltinSpec {
        name: "round_robin",
        doc: "the candidates in URL order, one after the other",
        params: &[],
        run: |_, i| round_robin(i.cands, i.state),
    },
    BuiltinSpec {
        name: "least_loaded",
        doc: "the engine with the smallest queue, then the fewest in-flight requests; ties rotate",
        params: &[],
        run: |_, i| least_loaded(i.cands, i.state),
    },
    BuiltinSpec {
        name: "random",
        doc: "a uniformly random candidate",
        params: &[],
        run: |_, i| random(i.cands),
    },
    BuiltinSpec {
        name: "power_of_two",
        doc: "the less loaded of two distinct random candidates",
        params: &[],
        run: |_, i| power_of_two(i.cands),
    },
    BuiltinSpec {
        name: "min_cost",
        doc: "the engine of least `prefill_weight × (prompt tokens not cached there) + \
              load_weight × (prompt tokens of the router's requests in flight there)` \
              (Dynamo's KV-router cost, in tokens; ties to the less loaded); passes only without \
              candidates",
        params: &[
            Param {
                name: "prefill_weight",
                ty: ANY_NUMBER_FROM_0,
                must_be: "a number ≥ 0",
                if_absent: IfAbsent::Number(1.0),
            },
            Param {
                name: "load_weight",
                ty: ANY_NUMBER_FROM_0,
                must_be: "a number ≥ 0",
                if_absent: IfAbsent::Number(1.0),
            },
        ],
        run: |args, i| {
            let (prefill_weight, load_weight) = (args.number(0)?, args.number(1)?);
            let m = i.kv.get();
            min_cost(
                i.cands,
                &m.tokens,
                m.prompt_tokens,
                prefill_weight,
                load_weight,
                i.state,
            )
        },
    },
    BuiltinSpec {
        name: "skip_prefill",
        doc: "in a prefill pipeline: no prefill leg (the decode engine computes the prompt \
              itself) when fewer than `min_uncached` prompt tokens are uncached on the chosen \
              decode engine (llm-d's prefix-based decider); otherwise, and in other pipelines, pass",
        params: &[Param {
            name: "min_uncached",
            ty: ANY_NUMBER_FROM_0,
            must_be: "a number of tokens ≥ 0",
            if_absent: IfAbsent::Required("uncached prompt tokens worth a prefill leg, e.g. 256"),
        }],
        run: |args, i| match i.stage {
            Stage::Prefill(d) if (d.uncached_tokens() as f64) < args.number(0)? => {
                Some(SKIP_PREFILL)
            }
            _ => None,
        },
    },
    BuiltinSpec {
        name: "no_prefill",
        doc: "in a prefill pipeline: no prefill leg (the decode engine computes the prompt \
              itself); in other pipelines, pass",
        params: &[],
        run: |_, i| matches!(i.stage, Stage::Prefill(_)).then_some(SKIP_PREFILL),
    },
];

// The table's invariants: at most `MAX_PARAMS` parameters, required ones first, and few enough
// rows for a `u8` index.
const _: () = {
    assert!(BUILTINS.len() < u8::MAX as usize);
    let mut i = 0;
    while i < BUILTINS.len() {
        let params = BUILTINS[i].params;
        assert!(params.len() <= MAX_PARAMS);
        let mut j = 1;
        while j < params.len() {
            let prev_required = matches!(params[j - 1].if_absent, IfAbsent::Required(_));
            let required = matches!(params[j].if_absent, IfAbsent::Required(_));
            assert!(prev_required || !required);
            j += 1;
        }
        i += 1;
    }
};

/// An argument as written or passed, before validation: a TOML value, a literal in a script,
/// or a value a script computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg<'a> {
    /// An integer or a float.
    Number(f64),
    Str(&'a str),
    /// Anything else (a boolean, an array, `()`, ...).
    Other,
}

/// Why arguments do not fit a built-in. Displayed as the diagnostic's message, the same for a
/// TOML tier and a script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// A required parameter is missing.
    #[error("`{builtin}` needs `{param}` ({what})")]
    Missing {
        builtin: &'static str,
        param: &'static str,
        what: &'static str,
    },
    /// Argument `index` is not a valid value.
    #[error("`{param}` must be {must_be}")]
    Invalid {
        index: usize,
        param: &'static str,
        must_be: &'static str,
    },
    /// More arguments than parameters; `index` is the first extra one.
    #[error("too many arguments; {takes}")]
    TooMany { index: usize, takes: String },
}

impl BuiltinSpec {
    /// The row named `name`.
    pub fn find(name: &str) -> Option<&'static BuiltinSpec> {
        BUILTINS.iter().find(|b| b.name == name)
    }

    /// This row's position in [`BUILTINS`] (every `BuiltinSpec` is a row: the type has a
    /// private field, so no other can be made).
    pub fn index(&self) -> usize {
        let offset = (self as *const Self as usize).wrapping_sub(BUILTINS.as_ptr() as usize);
        let index = offset / std::mem::size_of::<Self>();
        debug_assert!(BUILTINS.get(index).is_some_and(|b| std::ptr::eq(b, self)));
        index
    }

    /// How many parameters must be given.
    pub fn required(&self) -> usize {
        self.params
            .iter()
            .filter(|p| matches!(p.if_absent, IfAbsent::Required(_)))
            .count()
    }

    /// The index of the parameter named `name`.
    pub fn param(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// What the built-in takes, for messages: "`fallback` takes no arguments",
    /// "`load_balance` takes: threshold".
    pub fn takes(&self) -> String {
        if self.params.is_empty() {
            format!("`{}` takes no arguments", self.name)
        } else {
            let names: Vec<&str> = self.params.iter().map(|p| p.name).collect();
            format!("`{}` takes: {}", self.name, names.join(", "))
        }
    }

    /// Whether `n` arguments (values not known yet) can fit: the error [`Self::bind`] would
    /// give whatever they are.
    pub fn check_arity(&self, n: usize) -> Result<(), ArgError> {
        if n > self.params.len() {
            return Err(self.too_many(self.params.len()));
        }
        match self.params.get(n..).and_then(|rest| {
            rest.iter().find_map(|p| match p.if_absent {
                IfAbsent::Required(what) => Some((p.name, what)),
                _ => None,
            })
        }) {
            Some((param, what)) => Err(ArgError::Missing {
                builtin: self.name,
                param,
                what,
            }),
            None => Ok(()),
        }
    }

    fn too_many(&self, index: usize) -> ArgError {
        ArgError::TooMany {
            index,
            takes: self.takes(),
        }
    }

    /// Validates `args` (by parameter position; `None` = not given) and binds them: the one
    /// validation of built-in arguments, for TOML tiers, script literals and values scripts
    /// compute.
    pub fn bind(&'static self, args: &[Option<Arg<'_>>]) -> Result<Builtin, ArgError> {
        if let Some(index) = args
            .iter()
            .enumerate()
            .skip(self.params.len())
            .find_map(|(i, a)| a.is_some().then_some(i))
        {
            return Err(self.too_many(index));
        }
        let mut values: [Value; MAX_PARAMS] = std::array::from_fn(|_| Value::Absent);
        for (index, (param, slot)) in self.params.iter().zip(values.iter_mut()).enumerate() {
            *slot = match args.get(index).copied().flatten() {
                Some(arg) => param.check(arg).ok_or(ArgError::Invalid {
                    index,
                    param: param.name,
                    must_be: param.must_be,
                })?,
                None => match param.if_absent {
                    IfAbsent::Required(what) => {
                        return Err(ArgError::Missing {
                            builtin: self.name,
                            param: param.name,
                            what,
                        });
                    }
                    IfAbsent::Number(x) => Value::Number(x),
                    IfAbsent::Nothing(_) => Value::Absent,
                },
            };
        }
        Ok(Builtin {
            index: self.index() as u8,
            args: Args(values),
        })
    }
}

impl Param {
    /// `arg` as a valid value of this parameter.
    fn check(&self, arg: Arg<'_>) -> Option<Value> {
        match (self.ty, arg) {
            (ParamType::Number { min, max }, Arg::Number(x)) if x >= min && x <= max => {
                Some(Value::Number(x))
            }
            (ParamType::HeaderName, Arg::Str(s)) => {
                HeaderName::from_bytes(s.as_bytes()).ok().map(Value::Header)
            }
            _ => None,
        }
    }
}

/// A built-in with validated arguments: a tier, or one call of a script.
#[derive(Debug, Clone, PartialEq)]
pub struct Builtin {
    index: u8,
    args: Args,
}

impl Builtin {
    /// Its row in [`BUILTINS`].
    pub fn spec(&self) -> &'static BuiltinSpec {
        &BUILTINS[usize::from(self.index)]
    }

    /// Its position in [`BUILTINS`].
    pub fn index(&self) -> usize {
        usize::from(self.index)
    }

    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    pub fn args(&self) -> &Args {
        &self.args
    }

    /// Runs the built-in on the candidates' own prefix matches: the chosen candidate index,
    /// or `None` to pass.
    pub fn run(&self, req: &RequestInfo, cands: &[Candidate], st: &PolicyState) -> Option<usize> {
        let kv = Kv::new(None, req, cands);
        self.run_on(&Inputs {
            req,
            cands,
            state: st,
            kv: &kv,
            stage: Stage::Aggregated,
        })
    }

    /// Runs the built-in on a decision's inputs.
    pub fn run_on(&self, inputs: &Inputs<'_>) -> Option<usize> {
        (self.spec().run)(&self.args, inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(name: &str, args: &[Option<Arg<'_>>]) -> Result<Builtin, ArgError> {
        BuiltinSpec::find(name).expect("a built-in").bind(args)
    }

    #[test]
    fn binds_defaults_numbers_and_headers() {
        let kv = bind("kv_lookup", &[]).expect("default");
        assert_eq!(kv.args().number(0), Some(DEFAULT_KV_MIN_MATCH));
        assert_eq!(kv.name(), "kv_lookup");
        let lb = bind("load_balance", &[Some(Arg::Number(8.0))]).expect("8");
        assert_eq!((lb.index(), lb.args().number(0)), (0, Some(8.0)));
        let sh = bind("session_hash", &[Some(Arg::Str("X-User"))]).expect("header");
        assert_eq!(sh.args().header(0).map(HeaderName::as_str), Some("x-user"));
        assert_eq!(
            bind("session_hash", &[None])
                .expect("none")
                .args()
                .header(0),
            None
        );
        for (i, b) in BUILTINS.iter().enumerate() {
            assert_eq!(b.index(), i);
        }
    }

    #[test]
    fn rejects_what_does_not_fit() {
        assert_eq!(
            bind("load_balance", &[]).unwrap_err().to_string(),
            "`load_balance` needs `threshold` (queue spread, e.g. 8)"
        );
        for bad in [
            Arg::Number(-1.0),
            Arg::Number(f64::NAN),
            Arg::Str("8"),
            Arg::Other,
        ] {
            assert_eq!(
                bind("load_balance", &[Some(bad)]).unwrap_err().to_string(),
                "`threshold` must be a number ≥ 0"
            );
        }
        assert!(bind("load_balance", &[Some(Arg::Number(f64::INFINITY))]).is_ok());
        assert!(bind("kv_lookup", &[Some(Arg::Number(1.5))]).is_err());
        assert!(bind("session_hash", &[Some(Arg::Str("no spaces"))]).is_err());
        assert_eq!(
            bind("fallback", &[Some(Arg::Number(1.0))])
                .unwrap_err()
                .to_string(),
            "too many arguments; `fallback` takes no arguments"
        );
        assert_eq!(
            bind("kv_lookup", &[None, Some(Arg::Number(1.0))]),
            Err(ArgError::TooMany {
                index: 1,
                takes: "`kv_lookup` takes: min_match".into()
            })
        );
    }
}
