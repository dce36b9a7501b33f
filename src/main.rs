//! The `switchyard` binary: `serve` (default), `sim`, `check`, `bench`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use switchyard::config::{self, Cli, Command, RouterConfig, ServeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(Command::Serve(args)) => runtime.block_on(serve(*args)),
        Some(Command::Check(args)) => check(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("switchyard={level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<ExitCode, BoxError> {
    let cfg = RouterConfig::resolve(&args)?;
    init_logging(&cfg.log_level);
    let loader_args = args.clone();
    let loader: Option<switchyard::policy::SettingsLoader> = args.config.clone().map(|path| {
        let f: switchyard::policy::SettingsLoader = Arc::new(move || {
            let file = config::load_file(&path).map_err(|e| e.to_string())?;
            Ok(config::policy_settings(&loader_args, &file))
        });
        f
    });
    let mut router = switchyard::proxy::start(cfg, loader).await?;
    let url = router.url();
    println!("Switchyard is routing on {url}");
    println!("  curl {url}/v1/completions -H 'content-type: application/json' \\");
    println!(
        "       -d '{{\"model\": \"{}\", \"prompt\": \"Hello\", \"max_tokens\": 8}}'",
        first_model(&router)
    );
    tokio::select! {
        _ = router.wait() => {}
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            router.shutdown(Duration::from_secs(10)).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn first_model(router: &switchyard::proxy::RunningRouter) -> String {
    router
        .state
        .registry
        .models()
        .into_iter()
        .next()
        .unwrap_or_default()
}

fn check(args: &config::CheckArgs) -> Result<ExitCode, BoxError> {
    let mut errors = 0usize;
    if let Some(path) = &args.config
        && let Err(e) = config::load_file(path)
    {
        println!("{e}");
        errors += 1;
    }
    if errors == 0 {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}
