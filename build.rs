//! Build information for `chitin --version`: the git commit, the build date (UTC) and the
//! rustc version. No network; each falls back to "unknown" when it cannot be found (a source
//! tarball, no git). `SOURCE_DATE_EPOCH` makes the date reproducible.
//!
//! Release builds also lay the `chitin` binary's code out in the order of
//! `release/text-order.txt` and pack its relocations (see [`release_layout`]).

use std::path::Path;
use std::process::Command;

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Days since 1970-01-01 to a civil (proleptic Gregorian) date.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn main() {
    let commit =
        run("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Rebuild the info when the checked-out commit changes (worktrees keep HEAD elsewhere).
    // Only files that exist are named: cargo reruns a script whose named file is missing.
    let watch = |path: String| {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    if let Some(dir) = run("git", &["rev-parse", "--git-dir"]) {
        watch(format!("{dir}/HEAD"));
        if let (Some(r), Some(common)) = (
            run("git", &["symbolic-ref", "-q", "HEAD"]),
            run("git", &["rev-parse", "--git-common-dir"]),
        ) {
            watch(format!("{common}/{r}"));
            watch(format!("{common}/packed-refs"));
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_secs()).ok())
        });
    let date = secs.map_or_else(
        || "unknown".to_string(),
        |s| {
            let (y, m, d) = civil(s.div_euclid(86_400));
            format!("{y:04}-{m:02}-{d:02}")
        },
    );
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = run(&rustc, &["--version"]).unwrap_or_else(|| "rustc unknown".into());
    println!("cargo:rustc-env=CHITIN_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=CHITIN_BUILD_DATE={date}");
    println!("cargo:rustc-env=CHITIN_BUILD_RUSTC={rustc_version}");
    release_layout(&rustc);
}

/// Release builds of `chitin` place the functions the gateway runs, in the order
/// `release/text-order.txt` lists them (start and idle first, then an agent turn), ahead of the
/// rest of its code. The kernel maps a binary's pages as they are first touched, each with the
/// cached pages around it (fault-around), so code touched at start and spread over the whole
/// text kept ~22 MiB of it resident in an idle gateway; packed together it is under 7 MiB
/// (BENCHMARKS.md, issue #21, thirteenth session). Only the layout changes: the same functions,
/// the same code. `scripts/text-order.py` regenerates the list from a release binary; names it
/// no longer finds (renamed code, another rustc) are skipped, so a stale list only costs memory.
/// The list is handed to the linker as `--symbol-ordering-file`, which LLD takes (rustc links
/// with it by default on x86_64 Linux since 1.90; GNU ld does not, and the list is left out).
///
/// They also pack their relative relocations (`-z pack-relative-relocs`, DT_RELR): the loader
/// reads 14 KiB at start instead of ~750 KiB of `.rela.dyn`. The binary then needs glibc 2.36
/// or later where it runs; this is only done when the build is not a cross build and an empty
/// program linked so runs here.
///
/// Each is first tried on an empty program linked the same way; a linker or C library without
/// it only loses the gain. `CHITIN_RELEASE_LAYOUT=off` leaves both out (a binary for an older
/// glibc elsewhere; the baseline of a measurement). Cargo does not rerun this script when only
/// a target's rustflags change (rust-lang/cargo#13003): after switching linkers that way,
/// `cargo clean -p chitin --release`.
fn release_layout(rustc: &str) {
    println!("cargo:rerun-if-env-changed=CHITIN_RELEASE_LAYOUT");
    let (Ok(manifest), Ok(out)) = (
        std::env::var("CARGO_MANIFEST_DIR"),
        std::env::var("OUT_DIR"),
    ) else {
        return;
    };
    let list = Path::new(&manifest).join("release/text-order.txt");
    // Only a file that exists is named: cargo reruns a script whose named file is missing.
    if list.is_file() {
        println!("cargo:rerun-if-changed={}", list.display());
    }
    if std::env::var("PROFILE").as_deref() != Ok("release")
        || std::env::var("CHITIN_RELEASE_LAYOUT").as_deref() == Ok("off")
    {
        return;
    }
    let out = Path::new(&out);
    if list.is_file() {
        let order = [
            format!("-Wl,--symbol-ordering-file={}", list.display()),
            "-Wl,--no-warn-symbol-ordering".to_string(),
        ];
        match links(rustc, out, &order, false) {
            Ok(()) => {
                for arg in order {
                    println!("cargo:rustc-link-arg-bin=chitin={arg}");
                }
            }
            Err(why) => println!(
                "cargo:warning=release/text-order.txt not used: an empty program does not link \
                 with --symbol-ordering-file (LLD takes it; rustc >= 1.90 links with LLD on \
                 x86_64 Linux): {why}. The binary is the same code; an idle gateway keeps more \
                 of it in memory"
            ),
        }
    }
    let relr = ["-Wl,-z,pack-relative-relocs".to_string()];
    let native = std::env::var("HOST").ok() == std::env::var("TARGET").ok();
    if native && links(rustc, out, &relr, true).is_ok() {
        println!("cargo:rustc-link-arg-bin=chitin={}", relr[0]);
    }
}

/// Whether an empty program links with these linker arguments (and runs, if `run`), built by
/// the same rustc for the same target, linker and flags as this package; else what went wrong.
fn links(rustc: &str, out: &Path, link_args: &[String], run: bool) -> Result<(), String> {
    let probe = out.join("link_probe.rs");
    let program = out.join("link_probe");
    std::fs::write(&probe, "fn main() {}\n").map_err(|e| e.to_string())?;
    let mut cmd = Command::new(rustc);
    // Lints the flags may deny (`-D missing_docs`) are not what is being tried.
    cmd.arg("--crate-type=bin")
        .arg("--cap-lints=allow")
        .arg("-o")
        .arg(&program)
        .arg(&probe);
    for arg in link_args {
        cmd.arg(format!("-Clink-arg={arg}"));
    }
    if let Ok(target) = std::env::var("TARGET") {
        cmd.arg(format!("--target={target}"));
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    let linked = cmd.output().map_err(|e| e.to_string())?;
    if !linked.status.success() {
        let err = String::from_utf8_lossy(&linked.stderr);
        return Err(err
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("")
            .trim()
            .to_string());
    }
    if run {
        // In OUT_DIR, with any profile data (coverage or PGO flags) written there too.
        let ran = Command::new(&program)
            .current_dir(out)
            .env("LLVM_PROFILE_FILE", out.join("link_probe.profraw"))
            .output()
            .map_err(|e| e.to_string())?;
        if !ran.status.success() {
            return Err(String::from_utf8_lossy(&ran.stderr).trim().to_string());
        }
    }
    Ok(())
}
