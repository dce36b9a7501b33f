//! The `switchyard` binary: parses the command line and runs it (see [`switchyard::cli`]).

use std::process::ExitCode;

use clap::Parser;

// The system allocator (glibc), not mimalloc (issue 12, measured in one run of
// benches/proxy.sh, docs/results/proxy-streaming-issue12.txt): mimalloc took the router's RSS
// from 12.6 to 22.4 MiB after start and from 59 to 88 MiB with 1,000 open streams, for ~6%
// fewer user-space instructions per request (callgrind: 84.5k vs 90.2k) that did not show in
// the router's CPU per request (kernel time is most of it).

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
