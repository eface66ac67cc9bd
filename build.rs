//! Build information for `chitin --version`: the git commit, the build date (UTC) and the
//! rustc version. No network; each falls back to "unknown" when it cannot be found (a source
//! tarball, no git). `SOURCE_DATE_EPOCH` makes the date reproducible.

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
}
