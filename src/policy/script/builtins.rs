//! The built-ins as Rhai functions, registered from [`BUILTINS`]: one function per row and per
//! accepted number of arguments, taking any values. A call binds its arguments with
//! [`BuiltinSpec::bind`], the same validation as a TOML tier's keys, then runs the row's native
//! implementation on the published request and candidates. Literal arguments were already
//! bound when the script was loaded (see `validate`); a bad argument a script computes is a
//! run-time error (carrying the [`crate::policy::builtins::ArgError`], so that its message is
//! the same), so the tier passes and the error is counted.

use rhai::{Dynamic, Engine, EvalAltResult, FLOAT, INT, ImmutableString, Position};

use super::api::{RhaiResultOf, engine_value, with_ctx};
use crate::policy::builtins::{Arg, BUILTINS, BuiltinSpec, MAX_PARAMS, ParamType};

// `register_builtins` registers closures of up to two parameters: extend it for more.
const _: () = assert!(MAX_PARAMS <= 2);

/// Registers every built-in of the table. A function taking a parameter is registered for any
/// value, and also for the parameter's own types (an integer and a float for a number, a
/// string for a header name), which Rhai finds first: the usual call does not go through
/// Rhai's search for a `Dynamic` overload.
pub(crate) fn register_builtins(engine: &mut Engine) {
    for spec in &BUILTINS {
        for arity in spec.required()..=spec.params.len() {
            if arity == 0 {
                engine.register_fn(spec.name, move || run(spec, &[]));
                continue;
            }
            if arity == 2 {
                engine.register_fn(spec.name, move |a: Dynamic, b: Dynamic| call(spec, &[a, b]));
                continue;
            }
            engine.register_fn(spec.name, move |a: Dynamic| call(spec, &[a]));
            match spec.params[0].ty {
                ParamType::Number { .. } => {
                    engine.register_fn(spec.name, move |a: INT| {
                        run(spec, &[Some(Arg::Number(a as f64))])
                    });
                    engine.register_fn(spec.name, move |a: FLOAT| {
                        run(spec, &[Some(Arg::Number(a))])
                    });
                }
                ParamType::HeaderName => {
                    engine.register_fn(spec.name, move |a: ImmutableString| {
                        run(spec, &[Some(Arg::Str(&a))])
                    });
                }
            }
        }
    }
}

/// A value a script passed, as an argument to bind.
fn arg<'a>(value: &Dynamic, text: Option<&'a ImmutableString>) -> Arg<'a> {
    if let Some(s) = text {
        return Arg::Str(s);
    }
    if let Ok(i) = value.as_int() {
        return Arg::Number(i as f64);
    }
    match value.as_float() {
        Ok(x) => Arg::Number(x),
        Err(_) => Arg::Other,
    }
}

/// One call of a built-in from a script, with any values.
fn call(spec: &'static BuiltinSpec, values: &[Dynamic]) -> RhaiResultOf<Dynamic> {
    let texts: [Option<ImmutableString>; MAX_PARAMS] = std::array::from_fn(|i| {
        values
            .get(i)
            .filter(|v| v.is_string())
            .and_then(|v| v.clone().into_immutable_string().ok())
    });
    let mut args: [Option<Arg<'_>>; MAX_PARAMS] = [None; MAX_PARAMS];
    for (i, (slot, value)) in args.iter_mut().zip(values).enumerate() {
        *slot = Some(arg(value, texts.get(i).and_then(Option::as_ref)));
    }
    run(spec, &args)
}

/// Binds `args` and runs the built-in on the published request and candidates.
fn run(spec: &'static BuiltinSpec, args: &[Option<Arg<'_>>]) -> RhaiResultOf<Dynamic> {
    // The error value is the `ArgError` itself, so that the message is the table's, as at load.
    let builtin = spec
        .bind(args)
        .map_err(|e| EvalAltResult::ErrorRuntime(Dynamic::from(e), Position::NONE))?;
    with_ctx(|c| engine_value(builtin.index(), c.run_builtin(|i| builtin.run_on(i))))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use rhai::Dynamic;

    use super::super::api::Ctx;
    use super::super::{ErrorReason, compile, eval, sandbox};
    use crate::policy::builtins::PolicyState;
    use crate::request::RequestInfo;

    #[test]
    fn a_bad_argument_computed_at_run_time_is_a_runtime_error_with_the_tables_message() {
        let sandbox = sandbox::build(Path::new("."));
        let script = compile(
            &sandbox,
            "let t = request.prompt_tokens - 100;\n() ?? load_balance(t)",
            Path::new("t.rhai"),
            (1, 1),
        )
        .expect("a computed argument is only checked when it runs");
        let (req, state) = (RequestInfo::default(), PolicyState::default());
        let kv = crate::policy::kv::Kv::new(None, &req, &[]);
        let ctx = Ctx::new(&req, &[], &state, &kv);
        let err = eval(
            &sandbox.engine,
            &script,
            &ctx,
            &Dynamic::UNIT,
            Duration::from_secs(5),
        )
        .expect_err("-100 is not a threshold");
        assert_eq!(err.reason, ErrorReason::RuntimeError);
        assert_eq!((err.line, err.col), (2, 7));
        assert_eq!(err.message, "`threshold` must be a number ≥ 0");
    }
}
