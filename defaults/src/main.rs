//! The `chorus` binary: see `chorus --help` and `docs/OPERATIONS.md`.

fn main() -> std::process::ExitCode {
    chorus::server::cli::main()
}
