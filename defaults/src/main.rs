//! The `chorus` binary: see `chorus --help` and `docs/OPERATIONS.md`.

/// The server runs on mimalloc: with glibc's allocator, worker threads that free what another
/// thread allocated (requests and records cross threads on every command) wait on its arena
/// locks, which cost about 15% of a quorum put's CPU in profiles (see docs/BENCHMARKS.md).
#[cfg(feature = "server")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chorus::server::cli::main()
}
