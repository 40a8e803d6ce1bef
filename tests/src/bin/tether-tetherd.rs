//! `tetherd` itself, built with the end-to-end tests so that they can run
//! it as a process of its own and kill it (`tests/tests/mqtt_crash.rs`).

fn main() -> std::process::ExitCode {
    tether_agent::cli::main()
}
