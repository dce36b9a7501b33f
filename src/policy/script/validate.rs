//! Validation of a compiled script from its AST (Rhai's `internals`), not from error text: run
//! at load time on every script and imported module, it finds what is wrong whatever the data.
//!
//! - **Calls to functions that do not exist**: a call `f(a, b)` must name a function the script
//!   defines with that many parameters, a function registered on the engine with that many
//!   (ours or a package's, read from the engine's registry: [`KnownFunctions`]), or a language
//!   keyword (`type_of`, `Fn`, `call`, `print`, ...: the names Rhai does not accept as function
//!   names). `alias::f(..)` must name a public function of the module imported as `alias`.
//! - **Built-in calls with literal arguments** are bound with [`BuiltinSpec::bind`], so a
//!   script and a TOML tier reject the same bad argument with the same message; a wrong number
//!   of arguments is reported whatever they are.
//! - **Properties and methods of `request` and engines**: on a value known to be the
//!   `request` or an engine (`engines[i]`, a `for` variable over `engines`, or a variable only
//!   ever bound to engines), a property must be in the type's property table
//!   ([`ENGINE_PROPERTIES`], [`REQUEST_PROPERTIES`]) and a method must be registered for the
//!   type.
//!
//! What it cannot see, and what therefore fails only when it runs (the tier passes and the
//! error is counted): properties and methods of values whose type is only known at run time
//! (function and closure parameters, results of calls, e.g. `engines.filter(|e| e.queu > 1)`),
//! calls through function pointers (`Fn("f").call()`), the types of arguments to registered
//! functions, and built-in arguments computed at run time.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};

use rhai::{AST, ASTFlags, ASTNode, Expr, FnAccess, FnCallExpr, Position, Stmt};

use super::api::{
    ENGINE_PROPERTIES, ENGINE_TYPE, EngineRef, REQUEST_PROPERTIES, REQUEST_TYPE, RequestView,
};
use crate::policy::builtins::{Arg, ArgError, BuiltinSpec};

/// A mistake in a script, at a position in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub pos: Position,
    pub message: String,
}

impl Problem {
    fn new(pos: Position, message: impl Into<String>) -> Problem {
        Problem {
            pos,
            message: message.into(),
        }
    }
}

/// The functions registered on an engine (ours and its packages'), read from the engine's own
/// registry ([`Engine::collect_fn_metadata`]), not from text: for each name, the overloads'
/// number of parameters and first parameter's type.
#[derive(Debug, Default)]
pub(crate) struct KnownFunctions {
    by_name: HashMap<String, Vec<(usize, Option<TypeId>)>>,
}

impl KnownFunctions {
    pub(super) fn of(engine: &rhai::Engine) -> KnownFunctions {
        let mut by_name: HashMap<String, Vec<(usize, Option<TypeId>)>> = HashMap::new();
        let all = engine.collect_fn_metadata(
            None,
            |f| {
                Some((
                    f.metadata.name.to_string(),
                    f.metadata.num_params,
                    f.metadata.param_types.first().copied(),
                ))
            },
            true,
        );
        for (name, arity, first) in all {
            by_name.entry(name).or_default().push((arity, first));
        }
        KnownFunctions { by_name }
    }

    /// Whether a function `name` taking `arity` arguments is registered.
    pub fn has(&self, name: &str, arity: usize) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|v| v.iter().any(|&(n, _)| n == arity))
    }

    /// Whether a function `name` taking `arity` arguments accepts a value of type `first` as
    /// its first argument (registered for that type, or for any value).
    pub fn accepts(&self, name: &str, arity: usize, first: TypeId) -> bool {
        self.by_name.get(name).is_some_and(|v| {
            v.iter().any(|&(n, t)| {
                n == arity && (t == Some(first) || t == Some(TypeId::of::<rhai::Dynamic>()))
            })
        })
    }
}

/// The first problem of `ast`, in source order (statements, then function bodies).
pub(crate) fn check(known: &KnownFunctions, ast: &AST) -> Result<(), Problem> {
    let cx = Cx::new(known, ast);
    let top = ast.statements().as_ptr_range();
    let mut found = None;
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        let result = match path.last() {
            Some(ASTNode::Stmt(Stmt::FnCall(call, pos))) => cx.call(call, *pos),
            Some(ASTNode::Expr(Expr::FnCall(call, pos))) => cx.call(call, *pos),
            Some(ASTNode::Expr(e @ (Expr::Dot(..) | Expr::Index(..))))
                if is_chain_root(path)
                    && matches!(path.first(), Some(ASTNode::Stmt(s)) if top.contains(&(*s as *const Stmt))) =>
            {
                cx.expr_type(e).map(|_| ())
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => true,
            Err(p) => {
                found = Some(p);
                false
            }
        }
    });
    found.map_or(Ok(()), Err)
}

/// The arguments of a built-in call that are literals (`None` for the others).
pub(crate) fn literal(e: &Expr) -> Option<Arg<'_>> {
    match e {
        Expr::IntegerConstant(i, _) => Some(Arg::Number(*i as f64)),
        Expr::FloatConstant(f, _) => Some(Arg::Number(**f)),
        Expr::StringConstant(s, _) => Some(Arg::Str(s)),
        Expr::BoolConstant(..)
        | Expr::CharConstant(..)
        | Expr::Unit(_)
        | Expr::DynamicConstant(..)
        | Expr::Array(..)
        | Expr::Map(..) => Some(Arg::Other),
        _ => None,
    }
}

/// Where a problem with a built-in's arguments is: the argument concerned, else the call.
fn arg_error(e: ArgError, call: &FnCallExpr, pos: Position) -> Problem {
    let at = match e {
        ArgError::Invalid { index, .. } | ArgError::TooMany { index, .. } => {
            call.args.get(index).map_or(pos, Expr::start_position)
        }
        ArgError::Missing { .. } => pos,
    };
    Problem::new(at, e.to_string())
}

/// Whether the chain node at the end of `path` starts a chain, rather than continuing its
/// parent's (in `a.b.c` Rhai nests `b.c` as the right side of `a.(...)`; the `BREAK` flag
/// marks a right side that ends the chain, such as the index in `a[x.y]`).
fn is_chain_root(path: &[ASTNode<'_>]) -> bool {
    let [.., parent, ASTNode::Expr(node)] = path else {
        return true;
    };
    match parent {
        ASTNode::Expr(Expr::Dot(x, flags, _) | Expr::Index(x, flags, _)) => {
            flags.contains(ASTFlags::BREAK) || !std::ptr::eq(&x.rhs, *node)
        }
        _ => true,
    }
}

/// What validation knows a value to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Request,
    Engine,
    /// The `engines` array.
    Engines,
    Unknown,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Request => REQUEST_TYPE,
            Ty::Engine => ENGINE_TYPE,
            Ty::Engines | Ty::Unknown => "",
        }
    }

    fn properties(self) -> Vec<&'static str> {
        match self {
            Ty::Request => REQUEST_PROPERTIES.iter().map(|p| p.0).collect(),
            Ty::Engine => ENGINE_PROPERTIES.iter().map(|p| p.0).collect(),
            Ty::Engines | Ty::Unknown => Vec::new(),
        }
    }

    fn type_id(self) -> Option<TypeId> {
        match self {
            Ty::Request => Some(TypeId::of::<RequestView>()),
            Ty::Engine => Some(TypeId::of::<EngineRef>()),
            Ty::Engines | Ty::Unknown => None,
        }
    }
}

/// How a variable gets a value (the walk's nodes cannot outlive its callback, hence copies).
enum Binding {
    /// `let v = e`, `v = e`.
    Expr(Expr),
    /// `for v in e`.
    Each(Expr),
    /// Anything else (`v += 1`, a `catch` variable, a binding inside a function body, ...).
    Other,
}

struct Cx<'a> {
    known: &'a KnownFunctions,
    /// Functions the script defines: name and number of parameters.
    script_fns: HashSet<(&'a str, usize)>,
    /// Public functions of imported modules, by the alias they are imported as.
    modules: HashMap<&'a str, HashSet<(String, usize)>>,
    /// Whether `request` and `engines` are the context's (the script never rebinds them).
    context: (bool, bool),
    /// Top-level variables only ever bound to engines.
    engine_vars: HashSet<String>,
}

impl<'a> Cx<'a> {
    fn new(known: &'a KnownFunctions, ast: &'a AST) -> Cx<'a> {
        let script_fns = ast
            .iter_functions()
            .map(|f| (f.name, f.params.len()))
            .collect();
        let mut cx = Cx {
            known,
            script_fns,
            modules: modules(ast),
            context: (true, true),
            engine_vars: HashSet::new(),
        };
        let bindings = bindings(ast);
        cx.context = (
            !bindings.contains_key("request"),
            !bindings.contains_key("engines"),
        );
        // The greatest set of variables whose every binding is an engine, given the set.
        let mut vars: HashSet<String> = bindings
            .iter()
            .filter(|(name, b)| {
                !["request", "engines", "params"].contains(&name.as_str())
                    && b.iter().all(|b| !matches!(b, Binding::Other))
            })
            .map(|(name, _)| name.clone())
            .collect();
        loop {
            cx.engine_vars = vars.clone();
            vars.retain(|name| {
                bindings[name.as_str()].iter().all(|b| match b {
                    Binding::Expr(e) => cx.expr_type(e) == Ok(Ty::Engine),
                    Binding::Each(e) => cx.expr_type(e) == Ok(Ty::Engines),
                    Binding::Other => false,
                })
            });
            if vars.len() == cx.engine_vars.len() {
                break;
            }
        }
        cx
    }

    /// A call `name(args)` (or `alias::name(args)`).
    fn call(&self, call: &FnCallExpr, pos: Position) -> Result<(), Problem> {
        let name = call.name.as_str();
        let n = call.args.len();
        if call.op_token.is_some() || !rhai::is_valid_function_name(name) {
            return Ok(()); // an operator or a language keyword, handled by the engine
        }
        if !call.namespace.is_empty() {
            return self.namespaced(call, pos);
        }
        if self.script_fns.contains(&(name, n)) {
            return Ok(());
        }
        if let Some(spec) = BuiltinSpec::find(name) {
            let literals: Vec<Option<Arg<'_>>> = call.args.iter().map(literal).collect();
            let bound = if literals.iter().all(Option::is_some) {
                spec.bind(&literals).map(|_| ())
            } else {
                spec.check_arity(n)
            };
            return bound.map_err(|e| arg_error(e, call, pos));
        }
        if self.known.has(name, n) {
            return Ok(());
        }
        Err(Problem::new(
            pos,
            format!("Function not found: {name} with {}", arguments(n)),
        ))
    }

    fn namespaced(&self, call: &FnCallExpr, pos: Position) -> Result<(), Problem> {
        let [alias] = call.namespace.path.as_slice() else {
            return Ok(());
        };
        let Some(functions) = self.modules.get(alias.name.as_str()) else {
            return Ok(()); // not a module this validation can see
        };
        let (name, n) = (call.name.to_string(), call.args.len());
        if functions.contains(&(name.clone(), n)) {
            return Ok(());
        }
        Err(Problem::new(
            pos,
            format!(
                "Function not found: {}::{name} with {} (module `{}` has no such public function)",
                alias.name,
                arguments(n),
                alias.name
            ),
        ))
    }

    /// What `e` is known to be; a problem if it uses a property or method that the type of
    /// its receiver does not have.
    fn expr_type(&self, e: &Expr) -> Result<Ty, Problem> {
        match e {
            Expr::Variable(x, ..) if x.2.is_empty() => Ok(match x.1.as_str() {
                "request" if self.context.0 => Ty::Request,
                "engines" if self.context.1 => Ty::Engines,
                v if self.engine_vars.contains(v) => Ty::Engine,
                _ => Ty::Unknown,
            }),
            Expr::Dot(x, flags, _) => {
                let base = self.expr_type(&x.lhs)?;
                self.follow(base, true, *flags, &x.rhs)
            }
            Expr::Index(x, flags, _) => {
                let base = self.expr_type(&x.lhs)?;
                self.follow(base, false, *flags, &x.rhs)
            }
            _ => Ok(Ty::Unknown),
        }
    }

    /// The rest of a chain applied to a value of type `ty`, by `.` (`dot`) or `[]`.
    fn follow(&self, ty: Ty, dot: bool, flags: ASTFlags, rhs: &Expr) -> Result<Ty, Problem> {
        let (elem, next) = match rhs {
            Expr::Dot(x, f, _) if !flags.contains(ASTFlags::BREAK) => {
                (&x.lhs, Some((true, *f, &x.rhs)))
            }
            Expr::Index(x, f, _) if !flags.contains(ASTFlags::BREAK) => {
                (&x.lhs, Some((false, *f, &x.rhs)))
            }
            _ => (rhs, None),
        };
        let ty = match (dot, ty) {
            (true, _) => self.member(ty, elem)?,
            (false, Ty::Engines) => Ty::Engine,
            (false, _) => Ty::Unknown,
        };
        match next {
            Some((dot, flags, rest)) => self.follow(ty, dot, flags, rest),
            None => Ok(ty),
        }
    }

    /// `.elem` on a value of type `ty`.
    fn member(&self, ty: Ty, elem: &Expr) -> Result<Ty, Problem> {
        let Some(type_id) = ty.type_id() else {
            return Ok(Ty::Unknown);
        };
        match elem {
            Expr::Property(x, pos) => {
                let known = ty.properties();
                if !known.contains(&x.2.as_str()) {
                    return Err(Problem::new(
                        *pos,
                        format!(
                            "unknown property `{}` of `{}` (known: {})",
                            x.2,
                            ty.name(),
                            known.join(", ")
                        ),
                    ));
                }
            }
            Expr::MethodCall(call, pos) => {
                let (name, n) = (call.name.as_str(), call.args.len());
                let exists = !rhai::is_valid_function_name(name)
                    || self.script_fns.contains(&(name, n))
                    || self.known.accepts(name, n + 1, type_id);
                if !exists {
                    return Err(Problem::new(
                        *pos,
                        format!(
                            "Function not found: `{}` has no method `{name}` taking {}",
                            ty.name(),
                            arguments(n)
                        ),
                    ));
                }
            }
            _ => {}
        }
        Ok(Ty::Unknown)
    }
}

fn arguments(n: usize) -> String {
    match n {
        0 => "no arguments".into(),
        1 => "1 argument".into(),
        n => format!("{n} arguments"),
    }
}

/// Every binding of every variable: top-level ones as written, the others as
/// [`Binding::Other`].
fn bindings(ast: &AST) -> HashMap<String, Vec<Binding>> {
    let top = ast.statements().as_ptr_range();
    let mut out: HashMap<String, Vec<Binding>> = HashMap::new();
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        let at_top =
            matches!(path.first(), Some(ASTNode::Stmt(s)) if top.contains(&(*s as *const Stmt)));
        let mut bind = |name: &str, b: Binding| {
            let b = if at_top { b } else { Binding::Other };
            out.entry(name.to_string()).or_default().push(b);
        };
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(x, ..))) => bind(&x.0.name, Binding::Expr(x.1.clone())),
            Some(ASTNode::Stmt(Stmt::For(x, ..))) => {
                bind(&x.0.name, Binding::Each(x.2.expr.clone()));
                if let Some(counter) = &x.1 {
                    bind(&counter.name, Binding::Other);
                }
            }
            Some(ASTNode::Stmt(Stmt::Assignment(x))) => {
                let (op, target) = &**x;
                if let Expr::Variable(v, ..) = &target.lhs {
                    if op.is_op_assignment() {
                        bind(&v.1, Binding::Other);
                    } else {
                        bind(&v.1, Binding::Expr(target.rhs.clone()));
                    }
                }
            }
            Some(ASTNode::Stmt(Stmt::TryCatch(x, ..))) => {
                if let Expr::Variable(v, ..) = &x.expr {
                    bind(&v.1, Binding::Other);
                }
            }
            _ => {}
        }
        true
    });
    out
}

/// The public functions of the modules `ast` imports (as resolved when it was compiled), by
/// alias.
fn modules(ast: &AST) -> HashMap<&str, HashSet<(String, usize)>> {
    let Some(resolver) = ast.resolver() else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for stmt in ast.statements() {
        let Stmt::Import(x, _) = stmt else { continue };
        let (Expr::StringConstant(path, _), alias) = &**x else {
            continue;
        };
        let Some((_, module)) = resolver.iter().find(|(p, _)| *p == path.as_str()) else {
            continue;
        };
        let functions = module
            .iter_script_fn_info()
            .filter(|f| f.1 == FnAccess::Public)
            .map(|f| (f.2.to_string(), f.3))
            .collect();
        out.insert(alias.name.as_str(), functions);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::sandbox;
    use super::*;

    /// The problem `check` finds in `src`, as "line:col: message".
    fn problem(src: &str) -> Option<String> {
        let sandbox = sandbox::build(Path::new("."));
        let mut scope = rhai::Scope::new();
        for v in ["request", "engines", "params"] {
            scope.push_dynamic(v, rhai::Dynamic::UNIT);
        }
        let ast = sandbox
            .engine
            .compile_with_scope(&scope, src)
            .expect("compiles");
        check(&sandbox.known, &ast).err().map(|p| {
            let (line, col) = (p.pos.line().unwrap_or(0), p.pos.position().unwrap_or(0));
            format!("{line}:{col}: {}", p.message)
        })
    }

    #[test]
    fn accepts_what_exists() {
        for src in [
            "fallback()",
            "let m = #{a: |x| x}; m.a(3)",
            "request.header(\"x\") ?? request.field(\"y\") ?? request.fields.z ?? request.headers[\"a\"]",
            "type_of(request) + engines[0].to_string() + request.to_debug()",
            "let f = Fn(\"fallback\"); f.call() ?? call(f) ?? print(1) ?? debug(1)",
            "is_def_var(\"x\") || is_def_fn(\"f\", 0)",
            "fn fallback() { 1 } fallback()",
            "fn pick(e) { e.queu } pick(engines[0])",
            "engines.filter(|e| e.queu > 1).len()",
            "let x = 0; for i in 0..10 { x += i; } if \"a\" in [\"a\"] { x } else { `${request.model}`.len() }",
            "let x = (); try { throw 1 } catch (err) { x = err }; x",
            "let best = (); for e in engines { if best == () || e.queue < best.queue { best = e; } } best",
            "let request = #{ modle: 1 }; request.modle",
            "let e = engines[0]; e = #{ nme: 1 }; e.nme",
            "engines[0].name.len() + engines[0].url.sub_string(1)",
            "engines.len() + engines[engines.len() - 1].index",
            "let e = engines[0]; e.queue = 1.0; e.queue",
        ] {
            assert_eq!(problem(src), None, "{src}");
        }
    }

    #[test]
    fn finds_what_does_not_exist_wherever_it_is() {
        for (src, expected) in [
            (
                "kv_lookp()",
                "1:1: Function not found: kv_lookp with no arguments",
            ),
            (
                "if request.stream { fallback() } else { sleep(1) }",
                "1:41: Function not found: sleep with 1 argument",
            ),
            (
                "fn f() { nope(1, 2) }\n()",
                "1:10: Function not found: nope with 2 arguments",
            ),
            (
                "fallback(1)",
                "1:10: too many arguments; `fallback` takes no arguments",
            ),
            (
                "kv_lookup(2)",
                "1:11: `min_match` must be a fraction of the prompt's tokens, 0 to 1",
            ),
            (
                "let t = 1; load_balance()",
                "1:12: `load_balance` needs `threshold` (queue spread, e.g. 8)",
            ),
            (
                "let t = 1; kv_lookup(t, t)",
                "1:25: too many arguments; `kv_lookup` takes: min_match",
            ),
            (
                "request.modle",
                "1:9: unknown property `modle` of `Request`",
            ),
            (
                "request.heder(\"x\")",
                "1:9: Function not found: `Request` has no method `heder` taking 1 argument",
            ),
            (
                "engines[1].queu",
                "1:12: unknown property `queu` of `Engine`",
            ),
            (
                "engines[1].name.len() + engines[0].queu",
                "1:36: unknown property `queu` of `Engine`",
            ),
            (
                "for e in engines { e.kv }",
                "1:22: unknown property `kv` of `Engine`",
            ),
            (
                "let b = engines[0];\nfor e in engines { if e.queue < b.queue { b = e; } }\nb.queu",
                "3:3: unknown property `queu` of `Engine`",
            ),
        ] {
            let found = problem(src).unwrap_or_else(|| panic!("nothing found in {src:?}"));
            assert!(found.starts_with(expected), "{src:?}: {found}");
        }
    }
}
