//! `chitin-fs-helper`: the file tools' helper (`chitin::tools::helper`), run *inside* the
//! sandbox, as a small binary of its own. The same code as the hidden `chitin __fs-helper`
//! (the fallback when this binary is not installed next to `chitin`), without exec'ing the
//! whole gateway binary in every sandboxed file operation (issue #21).

fn main() -> std::process::ExitCode {
    chitin::tools::helper::main()
}
