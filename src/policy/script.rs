//! Rhai scripts: the sandboxed engine, the context types scripts see, compilation and
//! evaluation.
//!
//! The engine is built once per store (again only if the policies directory changes) with only
//! what scripts need: arithmetic, logic, math, strings, arrays, maps and function pointers; no
//! `eval`, no file or network access, no `sleep`, and `import` only from inside the policies
//! directory (under the rule of [`super::files`]), resolved at compile time. Limits bound
//! operations, call depth, expression depth, and string, array and map sizes; a wall-clock
//! budget per evaluation bounds its time (see [`TimeBudget`]), since one operation may be a
//! native call over a whole array.
//!
//! During one evaluation the request and candidates are published in a thread-local (see
//! [`Ctx`]); the `request` and `engines` views and the built-in functions read them through it,
//! so nothing is copied into Rhai values unless a script asks for it.

use std::cell::{Cell, OnceCell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage,
    BasicMathPackage, BasicStringPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{
    AST, Array, Dynamic, Engine, EvalAltResult, FLOAT, INT, ImmutableString, Map, Module,
    ModuleResolver, OptimizationLevel, Position, Scope, Shared,
};

type RhaiResultOf<T> = Result<T, Box<EvalAltResult>>;
type SharedModule = Shared<Module>;

use super::builtins::{self, BuiltinKind, DEFAULT_KV_MIN_MATCH, PolicyState};
use super::files::{self, Refusal};
use crate::engines::Candidate;
use crate::request::RequestInfo;

/// Operations one evaluation may perform before it is stopped.
pub const MAX_OPERATIONS: u64 = 50_000;
/// Maximum function call depth.
pub const MAX_CALL_LEVELS: usize = 16;
/// Maximum expression nesting depth (global, inside functions).
pub const MAX_EXPR_DEPTHS: (usize, usize) = (64, 32);
/// Maximum string length in bytes.
pub const MAX_STRING_SIZE: usize = 16 * 1024;
/// Maximum array length.
pub const MAX_ARRAY_SIZE: usize = 4096;
/// Maximum object-map size.
pub const MAX_MAP_SIZE: usize = 1024;
/// Maximum number of variables in scope.
pub const MAX_VARIABLES: usize = 256;
/// Maximum number of imported modules.
pub const MAX_MODULES: usize = 16;
/// Time budget of the validation run of each script at load, and of the evaluation of the
/// modules it imports at compile time (not on the request path; generous, so that a slow
/// machine does not skip the validation).
pub const VALIDATION_TIME_BUDGET: Duration = Duration::from_millis(250);
/// An evaluation compares the clock with its deadline every this many operations (a power of
/// two). One operation can be a native call over a whole (bounded) array, so the budget is
/// overshot by at most this many such calls.
const CLOCK_CHECK_EVERY: u64 = 8;

/// What the current evaluation routes: published to the script's native functions.
pub(crate) struct Ctx<'a> {
    pub req: &'a RequestInfo,
    pub cands: &'a [Candidate],
    pub state: &'a PolicyState,
    fields: OnceCell<serde_json::Map<String, serde_json::Value>>,
}

impl<'a> Ctx<'a> {
    pub fn new(req: &'a RequestInfo, cands: &'a [Candidate], state: &'a PolicyState) -> Self {
        Ctx {
            req,
            cands,
            state,
            fields: OnceCell::new(),
        }
    }

    fn fields(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.fields.get_or_init(|| self.req.fields())
    }
}

thread_local! {
    static CTX: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
    static SCOPE: RefCell<Scope<'static>> = RefCell::new(Scope::new());
}

/// Publishes a [`Ctx`] for the duration of one synchronous evaluation; restores the previous
/// one when dropped (also on error or unwinding).
struct CtxGuard {
    prev: *const (),
}

impl CtxGuard {
    fn enter(ctx: &Ctx<'_>) -> CtxGuard {
        let prev = CTX.with(|c| c.replace(ctx as *const Ctx<'_> as *const ()));
        CtxGuard { prev }
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        CTX.with(|c| c.set(self.prev));
    }
}

thread_local! {
    /// When the evaluation running on this thread must stop; `None`: no deadline.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The wall-clock budget of one evaluation: sets this thread's deadline for as long as it
/// lives (restoring the previous one when dropped, also on error or unwinding). The engine's
/// progress callback ([`past_deadline`]) stops the evaluation once the deadline has passed.
pub(crate) struct TimeBudget {
    prev: Option<Instant>,
}

impl TimeBudget {
    pub fn start(budget: Duration) -> TimeBudget {
        let deadline = Instant::now().checked_add(budget);
        TimeBudget {
            prev: DEADLINE.with(|d| d.replace(deadline)),
        }
    }
}

impl Drop for TimeBudget {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.prev));
    }
}

/// The token an evaluation stopped by its time budget terminates with.
#[derive(Debug, Clone, Copy)]
struct OutOfTime;

/// The engine's progress callback: called with the operation count after every operation;
/// reads the clock only every [`CLOCK_CHECK_EVERY`] operations.
fn past_deadline(ops: u64) -> Option<Dynamic> {
    if !ops.is_multiple_of(CLOCK_CHECK_EVERY) {
        return None;
    }
    let deadline = DEADLINE.with(Cell::get)?;
    (Instant::now() >= deadline).then(|| Dynamic::from(OutOfTime))
}

/// Why a script failed, as the `reason` label of `switchyard_policy_script_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorReason {
    /// Stopped by the wall-clock budget (`--script-time-budget`).
    TimeBudget,
    /// Stopped by the operation limit ([`MAX_OPERATIONS`]).
    Operations,
    /// Another limit: data size, call depth, variables, modules.
    Limit,
    /// The script threw or failed at run time.
    RuntimeError,
    /// The script returned something that is not an engine, a candidate's name or `()`.
    BadResult,
    /// Evaluation panicked (a bug; the request is routed anyway).
    Panic,
}

impl ErrorReason {
    pub fn label(self) -> &'static str {
        match self {
            ErrorReason::TimeBudget => "time_budget",
            ErrorReason::Operations => "operations",
            ErrorReason::Limit => "limit",
            ErrorReason::RuntimeError => "runtime_error",
            ErrorReason::BadResult => "bad_result",
            ErrorReason::Panic => "panic",
        }
    }

    fn of(err: &EvalAltResult) -> ErrorReason {
        match err.unwrap_inner() {
            EvalAltResult::ErrorTerminated(token, _) if token.is::<OutOfTime>() => {
                ErrorReason::TimeBudget
            }
            EvalAltResult::ErrorTooManyOperations(_) => ErrorReason::Operations,
            EvalAltResult::ErrorDataTooLarge(..)
            | EvalAltResult::ErrorStackOverflow(_)
            | EvalAltResult::ErrorTooManyVariables(_)
            | EvalAltResult::ErrorTooManyModules(_) => ErrorReason::Limit,
            _ => ErrorReason::RuntimeError,
        }
    }
}

fn with_ctx<R>(f: impl FnOnce(&Ctx<'_>) -> R) -> RhaiResultOf<R> {
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

/// Origin of an engine value: the built-in that chose it, or [`ORIGIN_SCRIPT`].
pub(crate) const ORIGIN_SCRIPT: u8 = u8::MAX;

/// An engine as scripts see it: an index into the current candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EngineRef {
    pub idx: u32,
    pub origin: u8,
}

/// The `request` variable.
#[derive(Debug, Clone, Copy)]
struct RequestView;

fn engine_value(kind: BuiltinKind, picked: Option<usize>) -> Dynamic {
    match picked {
        Some(i) => Dynamic::from(EngineRef {
            idx: i as u32,
            origin: kind as u8,
        }),
        None => Dynamic::UNIT,
    }
}

fn cand<R>(e: &EngineRef, f: impl FnOnce(&Candidate) -> R) -> RhaiResultOf<R> {
    with_ctx(|c| c.cands.get(e.idx as usize).map(f))?
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

fn register_engine_type(engine: &mut Engine) {
    engine
        .register_type_with_name::<EngineRef>("Engine")
        .register_get("name", |e: &mut EngineRef| {
            cand(e, |c| ImmutableString::from(&*c.engine.name))
        })
        .register_get("url", |e: &mut EngineRef| {
            cand(e, |c| ImmutableString::from(&*c.engine.url))
        })
        .register_get("running", |e: &mut EngineRef| cand(e, |c| c.load.running))
        .register_get("waiting", |e: &mut EngineRef| cand(e, |c| c.load.waiting))
        .register_get("queue", |e: &mut EngineRef| cand(e, |c| c.load.queue))
        .register_get("in_flight", |e: &mut EngineRef| {
            cand(e, |c| c.load.in_flight as INT)
        })
        .register_get("kv_usage", |e: &mut EngineRef| cand(e, |c| c.load.kv_usage))
        .register_get("stats_age", |e: &mut EngineRef| {
            cand(e, |c| c.load.stats_age_secs.unwrap_or(-1.0))
        })
        .register_get("stale", |e: &mut EngineRef| cand(e, |c| c.load.stale))
        .register_get("prefix_match", |e: &mut EngineRef| {
            cand(e, |c| c.prefix_match_tokens as INT)
        })
        .register_get("index", |e: &mut EngineRef| e.idx as INT)
        .register_fn("==", |a: EngineRef, b: EngineRef| a.idx == b.idx)
        .register_fn("!=", |a: EngineRef, b: EngineRef| a.idx != b.idx)
        .register_fn("to_string", |e: &mut EngineRef| {
            cand(e, |c| c.engine.name.to_string())
        })
        .register_fn("to_debug", |e: &mut EngineRef| {
            cand(e, |c| format!("Engine({})", c.engine.name))
        });
}

fn register_request_type(engine: &mut Engine) {
    engine
        .register_type_with_name::<RequestView>("Request")
        .register_get("model", |_: &mut RequestView| {
            with_ctx(|c| ImmutableString::from(c.req.model.as_str()))
        })
        .register_get("path", |_: &mut RequestView| {
            with_ctx(|c| ImmutableString::from(c.req.path.as_str()))
        })
        .register_get("stream", |_: &mut RequestView| with_ctx(|c| c.req.stream))
        .register_get("session_key", |_: &mut RequestView| {
            with_ctx(|c| {
                c.req
                    .session_key
                    .as_deref()
                    .map_or(Dynamic::UNIT, str_value)
            })
        })
        .register_get("prompt_chars", |_: &mut RequestView| {
            with_ctx(|c| c.req.prompt.chars as INT)
        })
        .register_get("prompt_tokens", |_: &mut RequestView| {
            with_ctx(|c| c.req.prompt_tokens() as INT)
        })
        .register_get("headers", |_: &mut RequestView| {
            with_ctx(|c| headers_map(c.req))
        })
        .register_fn("header", |_: &mut RequestView, name: &str| {
            with_ctx(|c| {
                c.req.headers.get(name).map_or(Dynamic::UNIT, |v| {
                    str_value(&String::from_utf8_lossy(v.as_bytes()))
                })
            })
        })
        .register_get("fields", |_: &mut RequestView| {
            with_ctx(|c| {
                c.fields()
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                    .collect::<Map>()
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

fn register_builtins(engine: &mut Engine) {
    use BuiltinKind as K;
    engine
        .register_fn("load_balance", |t: INT| {
            with_ctx(|c| {
                engine_value(
                    K::LoadBalance,
                    builtins::load_balance(c.cands, t as f64, c.state),
                )
            })
        })
        .register_fn("load_balance", |t: FLOAT| {
            with_ctx(|c| engine_value(K::LoadBalance, builtins::load_balance(c.cands, t, c.state)))
        })
        .register_fn("kv_lookup", || {
            with_ctx(|c| {
                let tokens = c.req.prompt_tokens();
                engine_value(
                    K::KvLookup,
                    builtins::kv_lookup(c.cands, tokens, DEFAULT_KV_MIN_MATCH, c.state),
                )
            })
        })
        .register_fn("kv_lookup", |m: FLOAT| {
            with_ctx(|c| {
                let tokens = c.req.prompt_tokens();
                engine_value(
                    K::KvLookup,
                    builtins::kv_lookup(c.cands, tokens, m, c.state),
                )
            })
        })
        .register_fn("kv_lookup", |m: INT| {
            with_ctx(|c| {
                let tokens = c.req.prompt_tokens();
                engine_value(
                    K::KvLookup,
                    builtins::kv_lookup(c.cands, tokens, m as f64, c.state),
                )
            })
        })
        .register_fn("session_hash", || {
            with_ctx(|c| {
                let key = c.req.session_key.as_deref().map(str::as_bytes);
                engine_value(K::SessionHash, builtins::session_hash(c.cands, key))
            })
        })
        .register_fn("session_hash", |header: &str| {
            with_ctx(|c| {
                let key = c.req.headers.get(header).map(|v| v.as_bytes());
                engine_value(K::SessionHash, builtins::session_hash(c.cands, key))
            })
        })
        .register_fn("fallback", || {
            with_ctx(|c| engine_value(K::Fallback, builtins::least_loaded(c.cands, c.state)))
        })
        .register_fn("least_loaded", || {
            with_ctx(|c| engine_value(K::LeastLoaded, builtins::least_loaded(c.cands, c.state)))
        })
        .register_fn("round_robin", || {
            with_ctx(|c| engine_value(K::RoundRobin, builtins::round_robin(c.cands, c.state)))
        })
        .register_fn("random", || {
            with_ctx(|c| engine_value(K::Random, builtins::random(c.cands)))
        })
        .register_fn("power_of_two", || {
            with_ctx(|c| engine_value(K::PowerOfTwo, builtins::power_of_two(c.cands)))
        });
}

/// Resolves `import "lib/x"` to `lib/x.rhai` under the policies directory, read under the rule
/// of [`files::read_policy_text`] (the same as for policy files and script tiers).
struct SandboxResolver {
    dir: PathBuf,
}

impl SandboxResolver {
    fn load(&self, engine: &Engine, path: &str, pos: Position) -> RhaiResultOf<AST> {
        let refused = |why: String| -> Box<EvalAltResult> {
            EvalAltResult::ErrorModuleNotFound(format!("{path} ({why})"), pos).into()
        };
        let Some(mut file) = files::join_relative(&self.dir, path) else {
            return Err(refused(
                "imports are limited to the policies directory".into(),
            ));
        };
        file.set_extension("rhai");
        let text = match files::read_policy_text(&self.dir, &file) {
            Ok(t) => t,
            Err(r) if r.is_not_found() => {
                return Err(EvalAltResult::ErrorModuleNotFound(path.to_string(), pos).into());
            }
            Err(Refusal::Outside { real }) => {
                return Err(refused(format!(
                    "imports are limited to the policies directory; it resolves to {}",
                    real.display()
                )));
            }
            Err(r) => return Err(refused(format!("module {r}"))),
        };
        let mut ast = engine
            .compile(text)
            .map_err(|e| EvalAltResult::ErrorInModule(path.to_string(), e.into(), pos))?;
        ast.set_source(path);
        Ok(ast)
    }
}

impl ModuleResolver for SandboxResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> RhaiResultOf<SharedModule> {
        let ast = self.load(engine, path, pos)?;
        Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map(Into::into)
            .map_err(|e| EvalAltResult::ErrorInModule(path.to_string(), e, pos).into())
    }

    fn resolve_ast(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Option<RhaiResultOf<AST>> {
        Some(self.load(engine, path, pos))
    }
}

/// Builds the sandboxed engine for scripts in `dir`.
pub(crate) fn build_engine(dir: &Path) -> Engine {
    let mut engine = Engine::new_raw();
    for module in [
        ArithmeticPackage::new().as_shared_module(),
        BasicStringPackage::new().as_shared_module(),
        BasicIteratorPackage::new().as_shared_module(),
        BasicFnPackage::new().as_shared_module(),
        LogicPackage::new().as_shared_module(),
        BasicMathPackage::new().as_shared_module(),
        BasicArrayPackage::new().as_shared_module(),
        BasicMapPackage::new().as_shared_module(),
        MoreStringPackage::new().as_shared_module(),
    ] {
        engine.register_global_module(module);
    }
    engine
        .set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(MAX_EXPR_DEPTHS.0, MAX_EXPR_DEPTHS.1)
        .set_max_string_size(MAX_STRING_SIZE)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_variables(MAX_VARIABLES)
        .set_max_modules(MAX_MODULES)
        .set_strict_variables(true)
        .set_optimization_level(OptimizationLevel::Simple)
        .set_module_resolver(SandboxResolver {
            dir: dir.to_path_buf(),
        })
        .disable_symbol("eval");
    engine.on_progress(past_deadline);
    engine.on_print(|s| tracing::debug!(target: "switchyard::policy::script", "{s}"));
    engine.on_debug(|s, src, pos| {
        tracing::debug!(target: "switchyard::policy::script", source = src.unwrap_or(""), %pos, "{s}")
    });
    register_engine_type(&mut engine);
    register_request_type(&mut engine);
    register_builtins(&mut engine);
    engine
}

/// Which context variables a script mentions (a conservative textual check: only the ones it
/// mentions are built for each evaluation).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Uses {
    request: bool,
    engines: bool,
    params: bool,
}

pub(crate) fn mentions(src: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    src.match_indices(word).any(|(i, _)| {
        !ident(src[..i].chars().next_back()) && !ident(src[i + word.len()..].chars().next())
    })
}

/// A compiled script and where its text sits in its file (for diagnostics).
#[derive(Debug)]
pub(crate) struct Script {
    ast: AST,
    uses: Uses,
    pub file: PathBuf,
    /// 1-based line and column of the script's first character in `file`.
    pub origin: (usize, usize),
}

/// A script error located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptError {
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// A call to an unknown function or property: a mistake in the script, not in the data.
    pub unknown_name: bool,
    pub reason: ErrorReason,
}

impl Script {
    /// Maps a position in the script to a line and column in its file.
    pub fn locate(&self, pos: Position) -> (usize, usize) {
        locate(self.origin, pos)
    }

    fn error(&self, err: &EvalAltResult) -> ScriptError {
        let (line, col) = self.locate(err.position());
        let reason = ErrorReason::of(err);
        let message = match reason {
            ErrorReason::TimeBudget => "script stopped: it exceeded its time budget".to_string(),
            _ => message_without_position(err),
        };
        ScriptError {
            line,
            col,
            message,
            unknown_name: false,
            reason,
        }
    }
}

/// The error's message without its trailing ` (line N, position M)`, on one line.
fn message_without_position(err: &EvalAltResult) -> String {
    let mut s = err.to_string();
    let pos = err.position();
    if !pos.is_none()
        && let Some(stripped) = s.strip_suffix(&format!(" ({pos})"))
    {
        s = stripped.to_string();
    }
    s.replace('\n', " ")
}

fn locate(origin: (usize, usize), pos: Position) -> (usize, usize) {
    let line = pos.line().unwrap_or(1);
    let col = pos.position().unwrap_or(1);
    if line == 1 {
        (origin.0, origin.1 + col - 1)
    } else {
        (origin.0 + line - 1, col)
    }
}

/// Compiles `src` (found in `file` at `origin`), resolving (and evaluating) its imports now,
/// within [`VALIDATION_TIME_BUDGET`].
pub(crate) fn compile(
    engine: &Engine,
    src: &str,
    file: &Path,
    origin: (usize, usize),
) -> Result<Script, ScriptError> {
    let mut scope = Scope::new();
    scope.push_dynamic("request", Dynamic::UNIT);
    scope.push_dynamic("engines", Dynamic::UNIT);
    scope.push_dynamic("params", Dynamic::UNIT);
    let uses = Uses {
        request: mentions(src, "request"),
        engines: mentions(src, "engines"),
        params: mentions(src, "params"),
    };
    let _budget = TimeBudget::start(VALIDATION_TIME_BUDGET);
    match engine.compile_into_self_contained(&scope, src) {
        Ok(ast) => Ok(Script {
            ast,
            uses,
            file: file.to_path_buf(),
            origin,
        }),
        Err(e) => {
            let (line, col) = locate(origin, e.position());
            let message = match &*e {
                EvalAltResult::ErrorParsing(p, _) => p.to_string(),
                other => message_without_position(other),
            };
            Err(ScriptError {
                line,
                col,
                message,
                unknown_name: false,
                reason: ErrorReason::of(&e),
            })
        }
    }
}

/// What a script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Candidate index and origin (a built-in kind or [`ORIGIN_SCRIPT`]).
    Engine(usize, u8),
    Pass,
}

fn engines_array(n: usize) -> Dynamic {
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

fn run_in_scope(
    engine: &Engine,
    script: &Script,
    ctx: &Ctx<'_>,
    params: &Dynamic,
    scope: &mut Scope<'static>,
) -> Result<Dynamic, Box<EvalAltResult>> {
    scope.clear();
    if script.uses.request {
        scope.push("request", RequestView);
    }
    if script.uses.engines {
        scope.push_dynamic("engines", engines_array(ctx.cands.len()));
    }
    if script.uses.params {
        scope.push_dynamic("params", params.clone());
    }
    let r = engine.eval_ast_with_scope::<Dynamic>(scope, &script.ast);
    scope.clear();
    r
}

/// Evaluates `script` for one request, stopping it once `budget` has passed. Errors (including
/// hitting a limit or the budget) are returned for the caller to count and log; the tier then
/// passes.
pub(crate) fn eval(
    engine: &Engine,
    script: &Script,
    ctx: &Ctx<'_>,
    params: &Dynamic,
    budget: Duration,
) -> Result<Outcome, ScriptError> {
    let _guard = CtxGuard::enter(ctx);
    let _budget = TimeBudget::start(budget);
    let result = SCOPE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scope) => run_in_scope(engine, script, ctx, params, &mut scope),
        Err(_) => run_in_scope(engine, script, ctx, params, &mut Scope::new()),
    });
    let value = result.map_err(|e| script.error(&e))?;
    interpret(value, ctx.cands).map_err(|message| {
        let (line, col) = script.origin;
        ScriptError {
            line,
            col,
            message,
            unknown_name: false,
            reason: ErrorReason::BadResult,
        }
    })
}

fn interpret(value: Dynamic, cands: &[Candidate]) -> Result<Outcome, String> {
    if value.is_unit() {
        return Ok(Outcome::Pass);
    }
    if value.is::<EngineRef>() {
        let e = value.cast::<EngineRef>();
        return if (e.idx as usize) < cands.len() {
            Ok(Outcome::Engine(e.idx as usize, e.origin))
        } else {
            Err("script returned an engine that is not a candidate".into())
        };
    }
    if value.is_string() {
        let name = value.into_immutable_string().unwrap_or_default();
        return cands
            .iter()
            .position(|c| *c.engine.name == *name || *c.engine.url == *name)
            .map(|i| Outcome::Engine(i, ORIGIN_SCRIPT))
            .ok_or_else(|| format!("script returned \"{name}\", which names no candidate engine"));
    }
    Err(format!(
        "script returned a value of type {}, expected an engine, an engine name or ()",
        value.type_name()
    ))
}

/// Runs `script` once against a synthetic request and two idle engines to catch calls to
/// unknown functions or properties (which the compiler cannot see), within
/// [`VALIDATION_TIME_BUDGET`]. Other runtime errors depend on the data and are not reported.
/// The engines are unregistered: validation leaves no trace in `/metrics`.
pub(crate) fn dry_run(engine: &Engine, script: &Script, params: &Dynamic) -> Option<ScriptError> {
    use std::sync::Arc;
    let engines = [
        Arc::new(crate::engines::Engine::unregistered(
            0,
            "http://dry-run-a:1",
            vec!["m".into()],
        )),
        Arc::new(crate::engines::Engine::unregistered(
            1,
            "http://dry-run-b:1",
            vec!["m".into()],
        )),
    ];
    let cands: Vec<Candidate> = engines
        .iter()
        .map(|e| Candidate {
            engine: Arc::clone(e),
            load: e.snapshot(),
            prefix_match_tokens: 0,
        })
        .collect();
    let req = RequestInfo {
        path: "/v1/completions".into(),
        model: "m".into(),
        body: bytes::Bytes::from_static(br#"{"model":"m","prompt":""}"#),
        ..Default::default()
    };
    let state = PolicyState::default();
    let ctx = Ctx::new(&req, &cands, &state);
    let _guard = CtxGuard::enter(&ctx);
    let _budget = TimeBudget::start(VALIDATION_TIME_BUDGET);
    let mut scope = Scope::new();
    let err = run_in_scope(engine, script, &ctx, params, &mut scope).err()?;
    if names_unknown_thing(&err) {
        let mut e = script.error(&err);
        e.unknown_name = true;
        Some(e)
    } else {
        None
    }
}

/// Whether `err` is a mistake whatever the data: a call with no `()` argument to a function
/// that does not exist for those argument types (the context's types are fixed; `()` arguments
/// may come from missing data), or a property the `Engine` and `Request` types do not have.
fn names_unknown_thing(err: &EvalAltResult) -> bool {
    match err.unwrap_inner() {
        EvalAltResult::ErrorFunctionNotFound(sig, _) => {
            // `name (type, type)`; `name ()` for no arguments.
            let args = sig
                .split_once(" (")
                .map_or("", |(_, rest)| rest.strip_suffix(')').unwrap_or(rest));
            !args.split(", ").any(|a| a == "()")
        }
        EvalAltResult::ErrorDotExpr(msg, _) => {
            msg.contains("not registered for type 'Engine'")
                || msg.contains("not registered for type 'Request'")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_is_word_bounded() {
        assert!(mentions("for e in engines { }", "engines"));
        assert!(!mentions("let my_engines = 1;", "engines"));
        assert!(!mentions("enginesx", "engines"));
        assert!(mentions("params.x", "params"));
    }

    #[test]
    fn locate_offsets_first_line_only() {
        assert_eq!(locate((10, 5), Position::new(1, 3)), (10, 7));
        assert_eq!(locate((10, 5), Position::new(3, 2)), (12, 2));
        assert_eq!(locate((1, 1), Position::NONE), (1, 1));
    }
}
