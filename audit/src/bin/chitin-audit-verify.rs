//! `chitin-audit-verify`: offline verification of a Chitin audit export (or database) with
//! only the public key. Built from the audit crate alone, so an auditor needs nothing else.
//!
//! ```text
//! chitin-audit-verify --export FILE --pubkey FILE
//! chitin-audit-verify --db FILE --pubkey FILE [--checkpoints FILE]
//! ```
//! Exit 0 and `ok: N records, head <hex>, last checkpoint <seq>`; exit 1 and
//! `tampered: first bad record <seq>: <reason>`; exit 2 on usage or I/O errors.

use std::path::PathBuf;
use std::process::ExitCode;

use chitin_audit::{PublicKey, Verifier};

const USAGE: &str = "usage: chitin-audit-verify --export FILE --pubkey FILE\n       \
chitin-audit-verify --db FILE --pubkey FILE [--checkpoints FILE]";

fn main() -> ExitCode {
    let mut export: Option<PathBuf> = None;
    let mut db: Option<PathBuf> = None;
    let mut pubkey: Option<PathBuf> = None;
    let mut checkpoints: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.to_str() {
            Some("--export") => &mut export,
            Some("--db") => &mut db,
            Some("--pubkey") => &mut pubkey,
            Some("--checkpoints") => &mut checkpoints,
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
    let result = match (export, db) {
        (Some(x), None) => verifier.verify_export(&x),
        (None, Some(d)) => {
            let cp = checkpoints.unwrap_or_else(|| {
                d.parent().map_or_else(
                    || PathBuf::from(chitin_audit::CHECKPOINT_FILE),
                    |p| p.join(chitin_audit::CHECKPOINT_FILE),
                )
            });
            verifier.verify_db(&d, Some(&cp))
        }
        _ => {
            eprintln!(
                "chitin-audit-verify: give exactly one of --export FILE or --db FILE\n{USAGE}"
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
