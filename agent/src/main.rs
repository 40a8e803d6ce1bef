//! `tetherd`: the Tether device agent. All of it lives in the `tether_agent`
//! library; this is the process's entry point.

/// The static builds (musl) use dlmalloc: musl's allocator is compact but
/// slow on the tunnel's path, glibc's is not linked in at all
/// (`docs/decisions.md`, 24).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> std::process::ExitCode {
    tether_agent::cli::main()
}
