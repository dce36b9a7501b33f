//! The script API: the `Engine` and `Request` types scripts see, their properties (each kept in
//! a table next to its registration, which validation reads too) and methods, and the
//! thread-local through which they reach the request being routed.
//!
//! During one evaluation the request and candidates are published in a thread-local (see
//! [`Ctx`]); the `request` and `engines` views and the built-in functions read them through it,
//! so nothing is copied into Rhai values unless a script asks for it.

use std::cell::{Cell, OnceCell, RefCell};

use rhai::{Array, Dynamic, Engine, EvalAltResult, FLOAT, INT, ImmutableString, Map};

use crate::engines::Candidate;
use crate::policy::builtins::{Inputs, PolicyState};
use crate::policy::kv::{Kv, KvMatches, KvSource};
use crate::policy::stage::Stage;
use crate::request::RequestInfo;
use crate::request::admission::{Admission, Priority, Tenant};

pub(crate) type RhaiResultOf<T> = Result<T, Box<EvalAltResult>>;

/// What the current evaluation routes: published to the script's native functions.
pub(crate) struct Ctx<'a> {
    pub req: &'a RequestInfo,
    pub cands: &'a [Candidate],
    pub state: &'a PolicyState,
    pub kv: &'a Kv<'a>,
    pub stage: Stage<'a>,
    /// The request's tenant and priority as the admission policy sets them; `None` outside
    /// it (they are then read from the request, and cannot be set).
    pub admission: Option<&'a RefCell<Admission>>,
    fields: OnceCell<serde_json::Map<String, serde_json::Value>>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        req: &'a RequestInfo,
        cands: &'a [Candidate],
        state: &'a PolicyState,
        kv: &'a Kv<'a>,
    ) -> Self {
        Ctx {
            req,
            cands,
            state,
            kv,
            stage: Stage::Aggregated,
            admission: None,
            fields: OnceCell::new(),
        }
    }

    /// This evaluation, as the admission policy's, setting the request's tenant and priority
    /// in `admission`.
    pub fn for_admission(mut self, admission: &'a RefCell<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The request's tenant and priority as they stand.
    fn admission_now<R>(&self, f: impl FnOnce(&Admission) -> R) -> R {
        match self.admission {
            Some(cell) => f(&cell.borrow()),
            None => f(&self.req.admission),
        }
    }

    /// This evaluation, for `stage`.
    pub fn for_stage(mut self, stage: Stage<'a>) -> Self {
        self.stage = stage;
        self
    }

    /// The decision's prefix matches, computed now if nothing needed them before (outside the
    /// script's time budget).
    pub fn kv(&self) -> &KvMatches {
        super::excluding_kv_time(self.kv.is_computed(), || (self.kv.get(), true))
    }

    /// Runs a built-in on this evaluation's inputs (computing the prefix matches outside the
    /// script's time budget if the built-in needs them first).
    pub fn run_builtin(&self, f: impl FnOnce(&Inputs<'_>) -> Option<usize>) -> Option<usize> {
        let inputs = Inputs {
            req: self.req,
            cands: self.cands,
            state: self.state,
            kv: self.kv,
            stage: self.stage,
        };
        super::excluding_kv_time(self.kv.is_computed(), || {
            let r = f(&inputs);
            (r, self.kv.is_computed())
        })
    }

    fn fields(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.fields.get_or_init(|| self.req.fields())
    }
}

thread_local! {
    static CTX: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
}

/// Publishes a [`Ctx`] for the duration of one synchronous evaluation; restores the previous
/// one when dropped (also on error or unwinding).
pub(crate) struct CtxGuard {
    prev: *const (),
}

impl CtxGuard {
    pub fn enter(ctx: &Ctx<'_>) -> CtxGuard {
        let prev = CTX.with(|c| c.replace(ctx as *const Ctx<'_> as *const ()));
        CtxGuard { prev }
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        CTX.with(|c| c.set(self.prev));
    }
}

/// Runs `f` with the published [`Ctx`]; an error outside an evaluation.
pub(crate) fn with_ctx<R>(f: impl FnOnce(&Ctx<'_>) -> R) -> RhaiResultOf<R> {
    let p = CTX.with(Cell::get);
    if p.is_null() {
        return Err("request data and built-ins are only available while routing a request".into());
    }
    // SAFETY: a non-null pointer was published by a `CtxGuard` on this thread, pointing to a
    // `Ctx` that outlives the guard; the guard is alive because it is only dropped after the
    // evaluation that is calling us has returned.
    let ctx = unsafe { &*(p as *const Ctx<'_>) };
    Ok(f(ctx))
}

/// Origin of an engine value: the index in [`crate::policy::builtins::BUILTINS`] of the
/// built-in that chose it, or [`ORIGIN_SCRIPT`].
pub(crate) const ORIGIN_SCRIPT: u8 = u8::MAX;

/// The name scripts see for [`EngineRef`] (`type_of(e)`).
pub(crate) const ENGINE_TYPE: &str = "Engine";
/// The name scripts see for the `request` variable's type.
pub(crate) const REQUEST_TYPE: &str = "Request";

/// An engine as scripts see it: an index into the current candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EngineRef {
    pub idx: u32,
    pub origin: u8,
}

/// The `request` variable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestView;

/// The value of a built-in call that chose `picked` (or passed).
pub(crate) fn engine_value(origin: usize, picked: Option<usize>) -> Dynamic {
    match picked {
        Some(i) => Dynamic::from(EngineRef {
            idx: i as u32,
            origin: u8::try_from(origin).unwrap_or(ORIGIN_SCRIPT),
        }),
        None => Dynamic::UNIT,
    }
}

/// The `engines` variable: every candidate, in order.
pub(crate) fn engines_array(n: usize) -> Dynamic {
    let arr: Array = (0..n)
        .map(|i| {
            Dynamic::from(EngineRef {
                idx: i as u32,
                origin: ORIGIN_SCRIPT,
            })
        })
        .collect();
    Dynamic::from_array(arr)
}

fn cand<R>(e: &EngineRef, f: impl FnOnce(&Ctx<'_>, &Candidate) -> R) -> RhaiResultOf<R> {
    with_ctx(|c| c.cands.get(e.idx as usize).map(|cand| f(c, cand)))?
        .ok_or_else(|| "engine is not a candidate of this request".into())
}

fn str_value(s: &str) -> Dynamic {
    Dynamic::from(ImmutableString::from(s))
}

fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i as INT),
            None => Dynamic::from(n.as_f64().unwrap_or(f64::NAN) as FLOAT),
        },
        Value::String(s) => str_value(s),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        Value::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect(),
        ),
    }
}

fn headers_map(req: &RequestInfo) -> Map {
    let mut m = Map::new();
    for (k, v) in &req.headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        match m.get_mut(k.as_str()) {
            Some(prev) => {
                let joined = format!("{prev}, {v}");
                *prev = str_value(&joined);
            }
            None => {
                m.insert(k.as_str().into(), str_value(&v));
            }
        }
    }
    m
}

/// A property of `Engine` values: its name and getter.
pub(crate) type EngineProperty = (
    &'static str,
    fn(&Ctx<'_>, &EngineRef, &Candidate) -> Dynamic,
);

/// The properties of `Engine` values (read-only), registered from this table; validation
/// checks `engines[..].name` against it.
pub(crate) const ENGINE_PROPERTIES: &[EngineProperty] = &[
    ("name", |_, _, c| str_value(&c.engine.name)),
    ("url", |_, _, c| str_value(&c.engine.url)),
    ("role", |_, _, c| str_value(c.engine.role.as_str())),
    ("running", |_, _, c| Dynamic::from(c.load.running as FLOAT)),
    ("waiting", |_, _, c| Dynamic::from(c.load.waiting as FLOAT)),
    ("queue", |_, _, c| Dynamic::from(c.load.queue as FLOAT)),
    ("in_flight", |_, _, c| {
        Dynamic::from(c.load.in_flight as INT)
    }),
    ("in_flight_tokens", |_, _, c| {
        Dynamic::from(c.load.in_flight_tokens as INT)
    }),
    ("kv_usage", |_, _, c| {
        Dynamic::from(c.load.kv_usage as FLOAT)
    }),
    ("stats_age", |_, _, c| {
        Dynamic::from(c.load.stats_age_secs.unwrap_or(-1.0) as FLOAT)
    }),
    ("stale", |_, _, c| Dynamic::from(c.load.stale)),
    ("prefix_match", |ctx, e, _| {
        let m = ctx.kv();
        Dynamic::from(m.tokens.get(e.idx as usize).copied().unwrap_or(0) as INT)
    }),
    ("kv_source", |ctx, e, _| {
        ctx.kv();
        ctx.kv
            .source(e.idx as usize)
            .map_or(Dynamic::UNIT, |s: KvSource| str_value(s.as_str()))
    }),
    ("index", |_, e, _| Dynamic::from(e.idx as INT)),
];

/// A property of the `request` variable: its name and getter.
pub(crate) type RequestProperty = (&'static str, fn(&Ctx<'_>) -> Dynamic);

/// The properties of the `request` variable (read-only), registered from this table;
/// validation checks `request.name` against it.
pub(crate) const REQUEST_PROPERTIES: &[RequestProperty] = &[
    ("model", |c| str_value(&c.req.model)),
    ("path", |c| str_value(&c.req.path)),
    ("stream", |c| Dynamic::from(c.req.stream)),
    ("session_key", |c| {
        c.req
            .session_key
            .as_deref()
            .map_or(Dynamic::UNIT, str_value)
    }),
    ("prompt_chars", |c| Dynamic::from(c.req.prompt.chars as INT)),
    ("prompt_tokens", |c| {
        Dynamic::from(c.kv.prompt_tokens() as INT)
    }),
    ("headers", |c| Dynamic::from_map(headers_map(c.req))),
    ("tenant", |c| c.admission_now(|a| str_value(&a.tenant.0))),
    ("priority", |c| {
        c.admission_now(|a| str_value(a.priority.as_str()))
    }),
    ("stage", |c| str_value(c.stage.as_str())),
    ("decode_engine", |c| match c.stage {
        Stage::Prefill(d) => str_value(&d.candidate().engine.name),
        _ => Dynamic::UNIT,
    }),
    ("decode_uncached_tokens", |c| match c.stage {
        Stage::Prefill(d) => Dynamic::from(d.uncached_tokens() as INT),
        _ => Dynamic::UNIT,
    }),
    ("fields", |c| {
        Dynamic::from_map(
            c.fields()
                .iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect::<Map>(),
        )
    }),
];

/// Registers the `Engine` type: its properties, `==`/`!=` and display.
pub(crate) fn register_engine_type(engine: &mut Engine) {
    engine.register_type_with_name::<EngineRef>(ENGINE_TYPE);
    for &(name, get) in ENGINE_PROPERTIES {
        engine.register_get(name, move |e: &mut EngineRef| {
            cand(e, |ctx, c| get(ctx, e, c))
        });
    }
    engine
        .register_fn("==", |a: EngineRef, b: EngineRef| a.idx == b.idx)
        .register_fn("!=", |a: EngineRef, b: EngineRef| a.idx != b.idx)
        .register_fn("to_string", |e: &mut EngineRef| {
            cand(e, |_, c| c.engine.name.to_string())
        })
        .register_fn("to_debug", |e: &mut EngineRef| {
            cand(e, |_, c| format!("Engine({})", c.engine.name))
        });
}

/// The longest tenant name a script may set (as for the tenant header).
const MAX_TENANT_CHARS: usize = 128;

/// Changes the request's admission, in the admission policy only.
fn set_admission(f: impl FnOnce(&mut Admission) -> Result<(), String>) -> RhaiResultOf<()> {
    with_ctx(|c| {
        match c.admission {
        Some(cell) => f(&mut cell.borrow_mut()).map_err(Into::into),
        None => Err(
            "request.tenant and request.priority can only be set in the policies directory's admission.rhai"
                .into(),
        ),
    }
    })?
}

/// Registers the `Request` type: its properties, `header(name)`, `field(name)` and display.
pub(crate) fn register_request_type(engine: &mut Engine) {
    engine.register_type_with_name::<RequestView>(REQUEST_TYPE);
    for &(name, get) in REQUEST_PROPERTIES {
        engine.register_get(name, move |_: &mut RequestView| with_ctx(get));
    }
    engine
        .register_set("tenant", |_: &mut RequestView, tenant: ImmutableString| {
            set_admission(|a| {
                let t = tenant.trim();
                if t.is_empty() || t.chars().count() > MAX_TENANT_CHARS {
                    return Err(format!(
                        "request.tenant must have 1 to {MAX_TENANT_CHARS} characters"
                    ));
                }
                a.tenant = Tenant(std::sync::Arc::from(t));
                Ok(())
            })
        })
        .register_set("priority", |_: &mut RequestView, priority: ImmutableString| {
            set_admission(|a| {
                a.priority = Priority::from_header(&priority).ok_or_else(|| {
                    format!(
                        "request.priority must be \"critical\", \"standard\" or \"sheddable\", not {:?}",
                        priority.as_str()
                    )
                })?;
                Ok(())
            })
        })
        .register_fn("header", |_: &mut RequestView, name: &str| {
            with_ctx(|c| {
                c.req.headers.get(name).map_or(Dynamic::UNIT, |v| {
                    str_value(&String::from_utf8_lossy(v.as_bytes()))
                })
            })
        })
        .register_fn("field", |_: &mut RequestView, name: &str| {
            with_ctx(|c| c.fields().get(name).map_or(Dynamic::UNIT, json_to_dynamic))
        })
        .register_fn("to_string", |_: &mut RequestView| {
            with_ctx(|c| format!("Request({} {})", c.req.path, c.req.model))
        })
        .register_fn("to_debug", |_: &mut RequestView| {
            with_ctx(|c| format!("Request({} {})", c.req.path, c.req.model))
        });
}
