//! `chitin-audit-verify`: offline verification of a Chitin audit export (or database) with
//! only the public key. Built from the audit crate alone, so an auditor needs nothing else.
//!
//! ```text
//! chitin-audit-verify --export FILE --pubkey FILE
//! chitin-audit-verify --db FILE --pubkey FILE [--checkpoints FILE]
//! chitin-audit-verify --postgres URL --pubkey FILE [--checkpoints FILE]...   (feature `postgres`)
//! ```
//! With `--postgres`, each `--checkpoints FILE` is one gateway's `audit.checkpoints` (the
//! checkpoints it signed, kept outside the database); give those you have.
//! Exit 0 and `ok: N records, head <hex>, last checkpoint <seq>`; exit 1 and
//! `tampered: first bad record <seq>: <reason>`; exit 2 on usage or I/O errors.

use std::path::PathBuf;
use std::process::ExitCode;

use chitin_audit::{PublicKey, Verifier};

#[cfg(not(feature = "postgres"))]
const USAGE: &str = "usage: chitin-audit-verify --export FILE --pubkey FILE\n       \
chitin-audit-verify --db FILE --pubkey FILE [--checkpoints FILE]";
#[cfg(feature = "postgres")]
const USAGE: &str = "usage: chitin-audit-verify --export FILE --pubkey FILE\n       \
chitin-audit-verify --db FILE --pubkey FILE [--checkpoints FILE]\n       \
chitin-audit-verify --postgres URL --pubkey FILE [--checkpoints FILE]...";

fn main() -> ExitCode {
    let mut export: Option<PathBuf> = None;
    let mut db: Option<PathBuf> = None;
    let mut pubkey: Option<PathBuf> = None;
    let mut checkpoints: Vec<PathBuf> = Vec::new();
    #[cfg_attr(
        not(feature = "postgres"),
        allow(unused_mut, reason = "only --postgres sets it")
    )]
    let mut postgres: Option<PathBuf> = None;
    let mut next_checkpoint: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if let Some(c) = next_checkpoint.take() {
            checkpoints.push(c);
        }
        let slot = match a.to_str() {
            Some("--export") => &mut export,
            Some("--db") => &mut db,
            Some("--pubkey") => &mut pubkey,
            Some("--checkpoints") => &mut next_checkpoint,
            #[cfg(feature = "postgres")]
            Some("--postgres") => &mut postgres,
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("chitin-audit-verify: unexpected argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        match args.next() {
            Some(v) => *slot = Some(PathBuf::from(v)),
            None => {
                eprintln!("chitin-audit-verify: {a:?} needs a value\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    checkpoints.extend(next_checkpoint);
    let Some(pubkey) = pubkey else {
        eprintln!("chitin-audit-verify: --pubkey FILE is required (the log's audit.pub)\n{USAGE}");
        return ExitCode::from(2);
    };
    let key = match PublicKey::load(&pubkey) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("chitin-audit-verify: {e}");
            return ExitCode::from(2);
        }
    };
    let verifier = Verifier::new(key);
    let result = match (export, db, postgres) {
        (Some(x), None, None) => verifier.verify_export(&x),
        (None, Some(d), None) => {
            if checkpoints.len() > 1 {
                eprintln!(
                    "chitin-audit-verify: a SQLite log has one checkpoint file; give --checkpoints once\n{USAGE}"
                );
                return ExitCode::from(2);
            }
            let cp = checkpoints.pop().unwrap_or_else(|| {
                d.parent().map_or_else(
                    || PathBuf::from(chitin_audit::CHECKPOINT_FILE),
                    |p| p.join(chitin_audit::CHECKPOINT_FILE),
                )
            });
            verifier.verify_db(&d, Some(&cp))
        }
        #[cfg(feature = "postgres")]
        (None, None, Some(url)) => {
            let config = match url
                .to_str()
                .ok_or_else(|| {
                    chitin_audit::AuditError::InvalidInput("the URL is not UTF-8".into())
                })
                .and_then(chitin_audit::PgConfig::from_url)
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("chitin-audit-verify: {e}");
                    return ExitCode::from(2);
                }
            };
            let files: Vec<&std::path::Path> = checkpoints.iter().map(PathBuf::as_path).collect();
            verifier.verify_postgres(&config, &files)
        }
        _ => {
            eprintln!(
                "chitin-audit-verify: give exactly one of --export FILE or --db FILE (or --postgres URL, in a build with the `postgres` feature)\n{USAGE}"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(Ok(report)) => {
            println!("{}", report.ok_line());
            ExitCode::SUCCESS
        }
        Ok(Err(tamper)) => {
            println!("{tamper}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("chitin-audit-verify: {e}");
            ExitCode::from(2)
        }
    }
}
