//! The `switchyard` binary: parses the command line and runs it (see [`switchyard::cli`]).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the router allocates many small, short-lived buffers per request; glibc's malloc
/// spent ~5% of the router's CPU on them under load (perf, benches/proxy.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = switchyard::cli::Cli::parse();
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
    match switchyard::cli::run(cli, &runtime) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}
