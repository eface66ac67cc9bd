//! Data lifecycle costs: sealing/opening a message with the vault, a retention run, erasing
//! one subject, creating and verifying a backup. `cargo bench --bench lifecycle`
//! (`LIFECYCLE_BENCH_ROWS` sets the number of messages, default 20000).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "benchmark"
)]

#[path = "../tests/lifecycle_support/mod.rs"]
mod lifecycle_support;

use std::time::Instant;

use chitin::config::retention::{Period, RetentionConfig};
use chitin::lifecycle::{backup, erase, retention};
use chitin::vault::Subject;
use lifecycle_support::*;
use rusqlite::params;

fn main() {
    let rows: usize = std::env::var("LIFECYCLE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let h = harness();
    let alice = user("alice");
    let body = vec![b'x'; 1024];

    // Warm the key.
    h.lc.vault.seal(&alice, &body).unwrap();
    let n = 20_000;
    let t = Instant::now();
    let mut sealed = Vec::with_capacity(n);
    for _ in 0..n {
        sealed.push(h.lc.vault.seal(&alice, &body).unwrap());
    }
    let seal_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for s in &sealed {
        h.lc.vault.open(&alice, s).unwrap();
    }
    let open_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "vault seal 1 KiB: {seal_us:.2} us/op; open: {open_us:.2} us/op (includes the vault.keys stat)"
    );
    let t = Instant::now();
    for i in 0..100 {
        h.lc.vault
            .seal(&user(&format!("new{i}")), b"first")
            .unwrap();
    }
    println!(
        "vault first seal of a new subject (key created, vault.keys rewritten + fsync): {:.2} ms/op",
        t.elapsed().as_secs_f64() * 1e3 / 100.0
    );

    // 100 subjects, `rows` messages, half of them 100 days old.
    let now = T0 + 500 * DAY;
    {
        let mut conn = h.lc.store.conn().unwrap();
        let tx = conn.transaction().unwrap();
        for s in 0..100 {
            let subject = user(&format!("u{s}"));
            tx.execute(
                "INSERT INTO sessions (key, user_id, subject, channel, created_ms, updated_ms) VALUES (?1, ?2, ?3, 'web', ?4, ?4)",
                params![format!("s{s}"), format!("u{s}"), subject, now],
            )
            .unwrap();
        }
        for i in 0..rows {
            let s = i % 100;
            let subject = user(&format!("u{s}"));
            let at = if i % 2 == 0 {
                now - 100 * DAY
            } else {
                now - DAY
            };
            let b = h.lc.vault.seal(&subject, &body).unwrap();
            tx.execute(
                "INSERT INTO messages (session_key, subject, seq, role, class, created_ms, size, body) VALUES (?1, ?2, ?3, 'user', 'transcript', ?4, 1024, ?5)",
                params![format!("s{s}"), subject, i as i64, at, b],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    h.clock.set(now);
    let cfg = RetentionConfig {
        transcripts: Period::Ms(90 * DAY),
        ..RetentionConfig::default()
    };
    let t = Instant::now();
    let r = retention::run(&h.lc, &cfg, "bench", false).unwrap();
    println!(
        "retention run: deleted {} of {rows} messages in {:.0} ms (count, audit record, delete, VACUUM, WAL truncate)",
        r.classes[0].deleted,
        t.elapsed().as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let e = erase::erase(&h.lc, &Subject::parse(&user("u7")).unwrap(), "bench", false).unwrap();
    println!(
        "erase one subject ({} messages among {} rows): {:.0} ms (delete, key destroy, audit payloads, VACUUM x2, receipt)",
        e.plan.messages,
        rows / 2,
        t.elapsed().as_secs_f64() * 1e3
    );

    let id = h.home.parent().unwrap().join("id.txt");
    let recipient = backup::keygen(&id, T0).unwrap();
    let out = h.home.parent().unwrap().join("b.age");
    let t = Instant::now();
    let m = backup::create(&h.home, &h.lc.store, &h.lc.audit, &recipient, &out, now).unwrap();
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let size = std::fs::metadata(&out).unwrap().len();
    let t = Instant::now();
    let opened = backup::open(&out, &backup::load_identity(&id).unwrap()).unwrap();
    backup::check(opened, &h.lc.audit.public_key()).unwrap();
    println!(
        "backup create: {create_ms:.0} ms, {} files, {:.1} MiB; verify (decrypt, digests, signature, integrity_check, audit chain): {:.0} ms",
        m.members.len(),
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64() * 1e3
    );
}
