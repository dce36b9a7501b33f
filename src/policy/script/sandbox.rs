//! The sandboxed engine, built once per store (again only if the policies directory changes)
//! with only what scripts need: arithmetic, logic, math, strings, arrays, maps and function
//! pointers; no `eval`, no file or network access, no `sleep`, and `import` only from inside
//! the policies directory (see [`super::resolver`]), resolved at compile time. Limits bound
//! operations, call depth, expression depth, and string, array and map sizes; a wall-clock
//! budget per evaluation bounds its time (see [`super::TimeBudget`]), since one operation may
//! be a native call over a whole array.
//!
//! The functions the engine knows are read back from its own registry
//! ([`super::validate::KnownFunctions`]) for validation.

use std::path::Path;
use std::sync::Arc;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage,
    BasicMathPackage, BasicStringPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Engine, OptimizationLevel};

use super::api::{register_engine_type, register_request_type};
use super::builtins::register_builtins;
use super::resolver::SandboxResolver;
use super::validate::KnownFunctions;

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
