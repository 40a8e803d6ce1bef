//! `tetherd`: the Tether device agent.
//!
//! This is the binary's edge: parse the command line, run, map errors to exit
//! codes (64 for usage errors, 1 otherwise). The agent's subcommands (enroll,
//! run, status) arrive with the identity-and-tunnel work; for now it reports
//! its version and the tunnel protocol it speaks.

use std::process::ExitCode;

use clap::Parser;

/// Exit code for command-line usage errors (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Tether device agent: keeps one outbound mutual-TLS tunnel to the platform
/// and carries editor access, MQTT and control traffic over it.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version = VERSION)]
struct Cli {}

/// The agent's version and the tunnel protocol version it speaks. `concat!`
/// takes only literals, so a test checks the protocol part against
/// `tether_proto::PROTOCOL_VERSION`.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (tunnel protocol 1.0)");

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!(
        "tetherd: no command given\nhelp: run 'tetherd --help' to see what this version can do"
    );
    ExitCode::from(EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_the_protocol_this_build_speaks() {
        let expected = format!("(tunnel protocol {})", tether_proto::PROTOCOL_VERSION);
        assert!(VERSION.ends_with(&expected), "{VERSION}");
    }
}
