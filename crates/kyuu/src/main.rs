//! The `kyuu` command: `kyuu serve` runs the server, `kyuu nat` discovers the NAT in front of
//! this host.

mod cli;
mod nat;
mod serve;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Nat(args) => nat::run(args),
    }
}
