//! `chitin-sandbox-launch`: the small sandbox launcher of the tool path (see
//! `chitin_sandbox::launcher`). A binary of the `chitin` package so that `cargo install`, the
//! tests and the benches get it next to `chitin`; it links only the jailer.

fn main() -> std::process::ExitCode {
    chitin_sandbox::launcher::main()
}
