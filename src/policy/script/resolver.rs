//! The module resolver: `import "lib/x"` loads `lib/x.rhai` under the policies directory, read
//! under the rule of [`files::read_policy_text`] (the same as for policy files and script
//! tiers), compiled and validated like a policy script. Imports are resolved when the importing
//! script is compiled.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{AST, Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};

use super::api::RhaiResultOf;
use super::validate::{self, KnownFunctions, Problem};
use crate::policy::files::{self, Refusal};

pub(crate) struct SandboxResolver {
    dir: PathBuf,
    known: Arc<KnownFunctions>,
}

/// A validation problem inside a module, shown with its position in the module.
#[derive(Debug)]
struct InModule(Problem);

impl fmt::Display for InModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0.message, self.0.pos)
    }
}

impl std::error::Error for InModule {}

impl SandboxResolver {
    pub fn new(dir: &Path, known: Arc<KnownFunctions>) -> SandboxResolver {
        SandboxResolver {
            dir: dir.to_path_buf(),
            known,
        }
    }

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
        let in_module = |e: Box<EvalAltResult>| EvalAltResult::ErrorInModule(path.into(), e, pos);
        let mut ast = engine.compile(text).map_err(|e| in_module(e.into()))?;
        if let Err(problem) = validate::check(&self.known, &ast) {
            let err = EvalAltResult::ErrorSystem(String::new(), Box::new(InModule(problem)));
            return Err(in_module(err.into()).into());
        }
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
    ) -> RhaiResultOf<Shared<Module>> {
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
