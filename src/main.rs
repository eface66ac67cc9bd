//! The `chitin` binary: gateway daemon and operator CLI.

fn main() -> std::process::ExitCode {
    chitin::cli::main()
}
