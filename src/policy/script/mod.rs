//! Rhai scripts: compilation (with validation) and evaluation within a time budget.
//!
//! - [`sandbox`]: the engine, its packages and limits, and the functions it knows;
//! - [`resolver`]: `import` of modules from inside the policies directory;
//! - [`api`]: the `Engine` and `Request` types scripts see, and how they reach the request;
//! - [`builtins`]: the built-ins as Rhai functions, registered from their table;
//! - [`validate`]: the load-time checks on a compiled script's AST;
//! - here: [`compile`], [`eval`] and the wall-clock [`TimeBudget`].

pub(crate) mod api;
mod builtins;
mod resolver;
pub(crate) mod sandbox;
pub(crate) mod validate;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rhai::{AST, Dynamic, Engine, EvalAltResult, Position, Scope};

use crate::policy::builtins::ArgError;
use crate::policy::stage::{SKIP_PREFILL, Stage};
use api::{Ctx, CtxGuard, EngineRef, ORIGIN_SCRIPT, RequestView, engines_array};
use sandbox::Sandbox;

/// Time budget of the compilation of each script at load, including the evaluation of the
/// modules it imports (not on the request path; generous, so that a slow machine does not fail
/// a policy).
pub const VALIDATION_TIME_BUDGET: Duration = Duration::from_millis(250);
/// An evaluation compares the clock with its deadline every this many operations (a power of
/// two). One operation can be a native call over a whole (bounded) array, so the budget is
/// overshot by at most this many such calls.
const CLOCK_CHECK_EVERY: u64 = 8;

thread_local! {
    /// When the evaluation running on this thread must stop; `None`: no deadline.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static SCOPE: RefCell<Scope<'static>> = RefCell::new(Scope::new());
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

/// Runs `f`, a native call of the script; if `f` computed the decision's prefix matches
/// (`computed` tells, after the call, whether it did), the time it took does not count against
/// the evaluation's budget: the deadline moves by that much. Matching may tokenize a long
/// prompt, which is the router's work, not the script's.
pub(crate) fn excluding_kv_time<R>(computed_before: bool, f: impl FnOnce() -> (R, bool)) -> R {
    if computed_before {
        return f().0;
    }
    let start = Instant::now();
    let (r, computed) = f();
    if computed {
        let spent = start.elapsed();
        DEADLINE.with(|d| {
            if let Some(deadline) = d.get() {
                d.set(Some(deadline.checked_add(spent).unwrap_or(deadline)));
            }
        });
    }
    r
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
    /// Stopped by the operation limit ([`sandbox::MAX_OPERATIONS`]).
    Operations,
    /// Another limit: data size, call depth, variables, modules.
    Limit,
    /// The script threw or failed at run time (including a bad argument to a built-in).
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

/// Which context variables a script mentions (a conservative textual check: only the ones it
/// mentions are built for each evaluation; text, rather than the AST, so that no construct
/// the AST walk does not visit can hide a use).
#[derive(Debug, Clone, Copy, Default)]
struct Uses {
    request: bool,
    engines: bool,
    params: bool,
}

/// Whether `word` occurs in `src` as a whole identifier.
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
    pub reason: ErrorReason,
}

impl Script {
    /// The compiled script.
    pub fn ast(&self) -> &AST {
        &self.ast
    }

    fn error(&self, err: &EvalAltResult) -> ScriptError {
        let (line, col) = locate(self.origin, err.position());
        let reason = ErrorReason::of(err);
        let message = match (reason, err.unwrap_inner()) {
            (ErrorReason::TimeBudget, _) => {
                "script stopped: it exceeded its time budget".to_string()
            }
            // A built-in's bad argument: the table's message, as when it is found at load.
            (_, EvalAltResult::ErrorRuntime(value, _)) if value.is::<ArgError>() => value
                .read_lock::<ArgError>()
                .map_or_else(|| message_without_position(err), |e| e.to_string()),
            _ => message_without_position(err),
        };
        ScriptError {
            line,
            col,
            message,
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

/// Maps a position in a script whose first character is at `origin` in its file to a line
/// and column in the file.
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
/// within [`VALIDATION_TIME_BUDGET`], and validates it ([`validate::check`]).
pub(crate) fn compile(
    sandbox: &Sandbox,
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
    let compiled = {
        let _budget = TimeBudget::start(VALIDATION_TIME_BUDGET);
        sandbox.engine.compile_into_self_contained(&scope, src)
    };
    let ast = compiled.map_err(|e| {
        let (line, col) = locate(origin, e.position());
        let message = match &*e {
            EvalAltResult::ErrorParsing(p, _) => p.to_string(),
            other => message_without_position(other),
        };
        ScriptError {
            line,
            col,
            message,
            reason: ErrorReason::of(&e),
        }
    })?;
    validate::check(&sandbox.known, &ast).map_err(|p| {
        let (line, col) = locate(origin, p.pos);
        ScriptError {
            line,
            col,
            message: p.message,
            reason: ErrorReason::RuntimeError,
        }
    })?;
    Ok(Script {
        ast,
        uses,
        file: file.to_path_buf(),
        origin,
    })
}

/// What a script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Candidate index and origin (a built-in's index or [`ORIGIN_SCRIPT`]).
    Engine(usize, u8),
    Pass,
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
    interpret(value, ctx).map_err(|message| {
        let (line, col) = script.origin;
        ScriptError {
            line,
            col,
            message,
            reason: ErrorReason::BadResult,
        }
    })
}

/// Evaluates `script` for its effect only (the admission policy: it sets the request's
/// tenant and priority), within `budget`; its value is ignored.
pub(crate) fn run_for_effect(
    engine: &Engine,
    script: &Script,
    ctx: &Ctx<'_>,
    params: &Dynamic,
    budget: Duration,
) -> Result<(), ScriptError> {
    let _guard = CtxGuard::enter(ctx);
    let _budget = TimeBudget::start(budget);
    let result = SCOPE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scope) => run_in_scope(engine, script, ctx, params, &mut scope),
        Err(_) => run_in_scope(engine, script, ctx, params, &mut Scope::new()),
    });
    result.map(drop).map_err(|e| script.error(&e))
}

fn interpret(value: Dynamic, ctx: &Ctx<'_>) -> Result<Outcome, String> {
    let cands = ctx.cands;
    if value.is_unit() {
        return Ok(Outcome::Pass);
    }
    if value.is::<EngineRef>() {
        let e = value.cast::<EngineRef>();
        if e.idx as usize == SKIP_PREFILL as u32 as usize {
            // Only the prefill stage's built-ins make it (`skip_prefill`, `no_prefill`).
            return if matches!(ctx.stage, Stage::Prefill(_)) {
                Ok(Outcome::Engine(SKIP_PREFILL, e.origin))
            } else {
                Err("script returned no_prefill outside a prefill pipeline".into())
            };
        }
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
