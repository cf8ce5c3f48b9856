//! The `kyuu` command: `kyuu serve` runs the server, `kyuu nat` discovers the NAT in front of
//! this host, `kyuu rawr` and `kyuu lab` are in [`rawr`].

mod admin;
mod cli;
mod nat;
mod rawr;
mod sdnotify;
mod serve;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Nat(args) => nat::run(args),
        cli::Command::Admin(args) => admin::run(args),
        cli::Command::Rawr(args) => block_on(rawr::run(args)),
        cli::Command::Lab(args) => block_on(rawr::run_lab(args)),
    }
}

/// Runs a subcommand future on a multi-threaded runtime; errors print as `error: ...`, exit 1.
fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
