//! The sandboxed engine, built once per store (again only if the policies directory changes)
//! with only what scripts need: arithmetic, logic, math, strings, arrays, maps and function
//! pointers; no `eval`, no file or network access, no `sleep`, and `import` only from inside
//! the policies directory (see [`super::resolver`]), resolved at compile time. Limits bound
//! operations, call depth, expression depth, and string, array and map sizes; a wall-clock
//! budget per evaluation bounds its time (see [`super::TimeBudget`]), since one operation may
//! be a native call over a whole array.
//!
//! The functions the engine knows are read back from its own registry
//! ([`KnownFunctions`]) for validation.

use std::any::TypeId;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage,
    BasicMathPackage, BasicStringPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, OptimizationLevel};

use super::api::{register_engine_type, register_request_type};
use super::builtins::register_builtins;
use super::resolver::SandboxResolver;

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

/// The functions registered on an engine (ours and its packages'), read from the engine's own
/// registry ([`Engine::collect_fn_metadata`]), not from text: for each name, the overloads'
/// number of parameters and first parameter's type.
#[derive(Debug, Default)]
pub(crate) struct KnownFunctions {
    by_name: HashMap<String, Vec<(usize, Option<TypeId>)>>,
}

impl KnownFunctions {
    fn of(engine: &Engine) -> KnownFunctions {
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
                n == arity && (t == Some(first) || t == Some(TypeId::of::<Dynamic>()))
            })
        })
    }
}

/// The engine scripts of one policies directory run in, with what it knows.
pub(crate) struct Sandbox {
    pub engine: Engine,
    pub known: Arc<KnownFunctions>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").finish_non_exhaustive()
    }
}

/// Builds the sandboxed engine for scripts in `dir`.
pub(crate) fn build(dir: &Path) -> Sandbox {
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
        .disable_symbol("eval");
    engine.on_progress(super::past_deadline);
    engine.on_print(|s| tracing::debug!(target: "switchyard::policy::script", "{s}"));
    engine.on_debug(|s, src, pos| {
        tracing::debug!(target: "switchyard::policy::script", source = src.unwrap_or(""), %pos, "{s}")
    });
    register_engine_type(&mut engine);
    register_request_type(&mut engine);
    register_builtins(&mut engine);
    let known = Arc::new(KnownFunctions::of(&engine));
    engine.set_module_resolver(SandboxResolver::new(dir, Arc::clone(&known)));
    Sandbox { engine, known }
}
