//! Scripts that are nothing but a `??` chain of built-in calls with literal arguments, such as
//! `load_balance(8) ?? kv_lookup() ?? fallback()`, mean exactly the pipeline of those built-in
//! tiers: each call either chooses an engine or yields `()`, and `??` moves to the next call
//! only on `()`. Such scripts are run as that pipeline, natively, instead of being interpreted.
//!
//! They are recognised on Rhai's own AST of the compiled (and validated) script: its only
//! statement is a call, or a `??` chain (`Expr::Coalesce`) of calls, each without a namespace,
//! naming a built-in with literal arguments, and not a function the script defines itself with
//! that name and number of parameters (which Rhai would call instead). The arguments are bound
//! by the built-ins' table, as everywhere else. Anything else is left to the interpreter.

use rhai::{AST, Expr, FnCallExpr, Stmt};

use super::builtins::{Builtin, BuiltinSpec};
use super::script::validate::literal;

/// The built-ins `ast` chains, if it is exactly such a chain.
pub(crate) fn builtin_chain(ast: &AST) -> Option<Vec<Builtin>> {
    let [stmt] = ast.statements() else {
        return None;
    };
    let calls: Vec<&FnCallExpr> = match stmt {
        Stmt::FnCall(call, _) => vec![call],
        Stmt::Expr(e) => match &**e {
            Expr::FnCall(call, _) => vec![call],
            Expr::Coalesce(chain, _) => chain
                .iter()
                .map(|e| match e {
                    Expr::FnCall(call, _) => Some(&**call),
                    _ => None,
                })
                .collect::<Option<_>>()?,
            _ => return None,
        },
        _ => return None,
    };
    calls.into_iter().map(|call| builtin(ast, call)).collect()
}

fn builtin(ast: &AST, call: &FnCallExpr) -> Option<Builtin> {
    if !call.namespace.is_empty() || call.op_token.is_some() || call.capture_parent_scope {
        return None;
    }
    let name = call.name.as_str();
    let n = call.args.len();
    if ast
        .iter_functions()
        .any(|f| f.name == name && f.params.len() == n)
    {
        return None;
    }
    let spec = BuiltinSpec::find(name)?;
    let args = call
        .args
        .iter()
        .map(|a| literal(a).map(Some))
        .collect::<Option<Vec<_>>>()?;
    spec.bind(&args).ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::script::{compile, sandbox};

    /// The chain `src` runs as: each built-in's name and first argument, as text.
    fn chain(src: &str) -> Option<Vec<String>> {
        let sandbox = sandbox::build(Path::new("."));
        let script = compile(&sandbox, src, Path::new("t.rhai"), (1, 1)).expect("compiles");
        builtin_chain(script.ast()).map(|builtins| {
            builtins
                .iter()
                .map(|b| match (b.args().number(0), b.args().header(0)) {
                    (Some(x), _) => format!("{}({x})", b.name()),
                    (_, Some(h)) => format!("{}({h})", b.name()),
                    _ => format!("{}()", b.name()),
                })
                .collect()
        })
    }

    #[test]
    fn recognises_chains_of_builtin_calls_with_literal_arguments() {
        let src = "// header\n/* block /* nested */ */\nload_balance(8) ?? kv_lookup()\n  ?? fallback(); // done\n";
        assert_eq!(
            chain(src).expect("a chain"),
            ["load_balance(8)", "kv_lookup(0.5)", "fallback()"]
        );
        assert_eq!(
            chain(r#"session_hash("X-User") ?? kv_lookup(0.25) ?? load_balance(0)"#)
                .expect("a chain"),
            ["session_hash(x-user)", "kv_lookup(0.25)", "load_balance(0)"]
        );
        assert_eq!(chain("round_robin()").expect("a chain"), ["round_robin()"]);
        // Rhai's own parser and optimizer decide what a literal is.
        assert_eq!(
            chain("load_balance(1_000)").expect("a chain"),
            ["load_balance(1000)"]
        );
        assert_eq!(
            chain("load_balance(0x10)").expect("a chain"),
            ["load_balance(16)"]
        );
        assert_eq!(
            chain("load_balance(4 + 4)").expect("a chain"),
            ["load_balance(8)"]
        );
        // `x ?? ()` is `x`; a constant condition is folded.
        assert_eq!(
            chain("if true { fallback() } else { random() }").expect("a chain"),
            ["fallback()"]
        );
        assert_eq!(
            chain("load_balance(8) ?? ()").expect("a chain"),
            ["load_balance(8)"]
        );
        // A script function of another arity does not hide the built-in.
        assert_eq!(
            chain("fn fallback(x) { x } fallback()").expect("a chain"),
            ["fallback()"]
        );
    }

    #[test]
    fn leaves_everything_else_to_the_interpreter() {
        for src in [
            "()",
            "let x = 8; load_balance(x)",
            "load_balance(8) ?? engines[0]",
            "fn fallback() { () } fallback()",
            "fn load_balance(t) { () } load_balance(8) ?? fallback()",
            "load_balance(8); fallback()",
            "let pick = fallback(); pick",
            "fallback() ?? request.header(\"x\")",
            "if request.stream { fallback() } else { random() }",
        ] {
            assert_eq!(chain(src), None, "{src}");
        }
    }
}
