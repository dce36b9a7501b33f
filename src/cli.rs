//! The command line: the `switchyard` subcommands (`serve`, the default; `sim`; `check`;
//! `bench`) and what each runs. A leaf: it uses the router core, the simulated engine and the
//! benchmark only through their public APIs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, RouterConfig, ServeArgs};

/// Switchyard: an LLM router whose policy is a hot-reloaded pipeline of TOML and Rhai tiers.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is the default subcommand: its flags may be given without it.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the router (the default). Without backends it starts simulated engines in-process.
    Serve(Box<ServeArgs>),
    /// Run one simulated vLLM engine.
    Sim(Box<crate::sim::SimArgs>),
    /// Compile and validate every policy (and the config file, if given).
    Check(CheckArgs),
    /// The built-in policies: `switchyard policies export DIR` writes them out for editing.
    Policies(PoliciesArgs),
    /// Compare routing policies: replay a seeded workload through the router in front of simulated engines.
    Bench(Box<crate::bench::BenchArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct PoliciesArgs {
    #[command(subcommand)]
    pub command: PoliciesCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PoliciesCommand {
    /// Write the built-in policies into DIR (created if needed), e.g. to edit them and serve
    /// them with --policies-dir DIR.
    Export {
        dir: PathBuf,
        /// Overwrite files of the same names.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Directory of policy files; it must exist [default: ./policies if it exists, else the
    /// built-in policies].
    #[arg(long)]
    pub policies_dir: Option<PathBuf>,
    /// A config file to validate too.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Why a subcommand failed (printed as `switchyard: <error>`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the parsed command line on `runtime`.
pub fn run(cli: Cli, runtime: &tokio::runtime::Runtime) -> Result<ExitCode, BoxError> {
    match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(Command::Serve(args)) => runtime.block_on(serve(*args)),
        Some(Command::Check(args)) => {
            let r = check(&args);
            crate::policy::shipped::remove_builtin_dir();
            r
        }
        Some(Command::Policies(args)) => policies(&args),
        Some(Command::Bench(args)) => {
            init_logging("warn"); // at info, the router logs every start and stop, once per run
            let done = if args.tenants {
                runtime
                    .block_on(crate::bench::tenants::run(*args))
                    .map(|_| ())
            } else {
                runtime.block_on(crate::bench::run(*args)).map(|_| ())
            };
            done.map(|()| ExitCode::SUCCESS).map_err(BoxError::from)
        }
        Some(Command::Sim(args)) => {
            init_logging("info");
            runtime
                .block_on(crate::sim::run_cli(*args))
                .map(|()| ExitCode::SUCCESS)
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("switchyard={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<ExitCode, BoxError> {
    let r = serve_inner(args).await;
    crate::policy::shipped::remove_builtin_dir();
    r
}

async fn serve_inner(args: ServeArgs) -> Result<ExitCode, BoxError> {
    let mut cfg = RouterConfig::resolve(&args)?;
    init_logging(&cfg.log_level);
    if crate::policy::shipped::is_builtin_dir(&cfg.policy.dir) {
        tracing::info!(
            imbalanced_threshold = cfg.imbalanced_threshold,
            "{}",
            crate::policy::shipped::USING_BUILTIN
        );
    } else {
        tracing::info!(dir = %cfg.policy.dir.display(), "policies directory");
    }
    // No backends configured: the embedded demo, simulated engines on free loopback ports.
    let mut demo_engines = Vec::new();
    if cfg.backends.is_empty() && !cfg.discovery.is_dynamic() {
        let model = crate::sim::SimConfig::default().model;
        for i in 0..cfg.demo_engines.max(1) {
            // The demo engines tokenize as the router does (`--tokenizer`), else the stand-in.
            let sim_cfg = crate::sim::SimConfig {
                seed: i as u64 + 1,
                tokenizer: cfg.tokenizer.clone(),
                ..Default::default()
            };
            let sim =
                crate::sim::start(sim_cfg, std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            println!(
                "simulated engine {} serving {model:?} on {}",
                i + 1,
                sim.url()
            );
            cfg.backends.push(config::Backend {
                url: sim.url(),
                models: vec![model.clone()],
                label: None,
            });
            demo_engines.push(sim);
        }
    }
    let loader_args = args.clone();
    let loader: Option<crate::policy::SettingsLoader> = args.config.clone().map(|path| {
        let f: crate::policy::SettingsLoader = Arc::new(move || {
            let file = config::load_file(&path).map_err(|e| e.to_string())?;
            config::policy_settings(&loader_args, &file).map_err(|e| e.to_string())
        });
        f
    });
    // The handlers are installed before the router listens: a SIGTERM sent as soon as it says
    // where it listens drains it instead of killing it.
    let mut signals = Signals::new()?;
    let mut router = crate::proxy::start(cfg, loader).await?;
    let url = router.url();
    for bound in &router.kv_events_bound {
        println!("Switchyard takes KV events on tcp://{bound}");
    }
    println!("Switchyard is routing on {url}");
    if let crate::engines::discovery::ServiceDiscovery::K8s(k) = &router.state.cfg.discovery {
        println!(
            "  engines: Ready pods{} on port {} (see {url}/health)",
            k.label_selector
                .as_deref()
                .map(|s| format!(" matching {s}"))
                .unwrap_or_default(),
            k.port
        );
    } else {
        println!("  curl {url}/v1/completions -H 'content-type: application/json' \\");
        println!(
            "       -d '{{\"model\": \"{}\", \"prompt\": \"Hello\", \"max_tokens\": 8}}'",
            first_model(&router)
        );
    }
    tokio::select! {
        _ = router.wait() => {}
        sig = signals.next() => {
            let grace = router.state.cfg.shutdown_grace;
            tracing::info!(
                signal = sig,
                grace_seconds = grace.as_secs_f64(),
                "shutting down: /health answers 503, no new connections, requests in progress may finish"
            );
            tokio::select! {
                outcome = router.shutdown(grace) => {
                    if outcome.cut == 0 {
                        tracing::info!(connections = outcome.open_at_start, "shut down: every request in progress finished");
                    } else {
                        tracing::warn!(cut = outcome.cut, "shut down: connections still open at the end of the grace were cut");
                    }
                }
                sig = signals.next() => {
                    tracing::warn!(signal = sig, "second signal: exiting at once, cutting the connections still open");
                }
            }
        }
    }
    for sim in demo_engines {
        sim.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (how Kubernetes, Docker and systemd stop a process) and SIGINT (Ctrl-C).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers now, so a signal sent from here on is never missed.
    fn new() -> Result<Signals, BoxError> {
        Ok(Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
            #[cfg(unix)]
            int: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn first_model(router: &crate::proxy::RunningRouter) -> String {
    router
        .state
        .registry
        .models()
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// `switchyard policies export DIR [--force]`.
fn policies(args: &PoliciesArgs) -> Result<ExitCode, BoxError> {
    match &args.command {
        PoliciesCommand::Export { dir, force } => {
            let written = crate::policy::shipped::export(dir, *force)?;
            for p in &written {
                println!("wrote {}", p.display());
            }
            println!(
                "{} policies written: serve them with --policies-dir {}",
                written.len(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `switchyard check`: every policy error (and the config file's) as `file:line:col: message`.
fn check(args: &CheckArgs) -> Result<ExitCode, BoxError> {
    let mut errors = 0usize;
    let mut explicit = args.policies_dir.clone();
    let mut threshold = None;
    if let Some(path) = &args.config {
        match config::load_file(path) {
            Ok(file) => {
                if explicit.is_none() {
                    explicit = file.policies_dir;
                }
                threshold = file.imbalanced_threshold;
            }
            Err(e) => {
                println!("{e}");
                errors += 1;
            }
        }
    }
    let dir = match config::resolve_policies_dir(explicit.as_deref(), threshold) {
        Ok(d) => d,
        Err(e) => {
            println!("{e}");
            println!("{} error(s)", errors + 1);
            return Ok(ExitCode::FAILURE);
        }
    };
    let builtin = crate::policy::shipped::is_builtin_dir(&dir);
    if builtin {
        println!("{}", crate::policy::shipped::USING_BUILTIN);
    }
    for d in crate::policy::PolicyStore::check_dir(&dir) {
        println!("{d}");
        errors += 1;
    }
    if errors == 0 {
        if builtin {
            println!("ok: every built-in policy compiles and validates");
        } else {
            println!(
                "ok: every policy in {} compiles and validates",
                dir.display()
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{errors} error(s)");
        Ok(ExitCode::FAILURE)
    }
}
