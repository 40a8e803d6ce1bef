//! `tetherd`: the Tether device agent.
//!
//! This is the binary's edge: parse the command line, run, map errors to exit
//! codes. The agent's subcommands (enroll, run, status) arrive with the
//! identity-and-tunnel work; for now it reports its version and protocol.

use clap::Parser;

/// Tether device agent: keeps one outbound mutual-TLS tunnel to the platform.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version = version(), about, long_about = None)]
struct Cli {}

fn version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (tunnel protocol ",
        "1.0",
        ")"
    )
}

fn main() {
    let _cli = Cli::parse();
    eprintln!("tetherd: no subcommand yet; try 'tetherd --help'");
    std::process::exit(64);
}
