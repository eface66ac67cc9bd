//! The `chitin` binary: gateway daemon and operator CLI.

/// mimalloc instead of glibc malloc (issue #21, BENCHMARKS.md "Allocator"): the gateway
/// allocates and frees many small values per turn on several threads, where glibc's arenas
/// spent ~21 % of the process's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chitin::cli::main()
}
