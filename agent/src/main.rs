//! `tetherd`: the Tether device agent. All of it lives in the `tether_agent`
//! library; this is the process's entry point.

fn main() -> std::process::ExitCode {
    tether_agent::cli::main()
}
