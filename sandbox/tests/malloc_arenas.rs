//! The gateway's arena cap (`memory::cap_malloc_arenas`), in a process of its own: glibc
//! gives each new thread an arena of its own until the cap, so sixteen threads that allocate
//! at once would make sixteen (they did, with the cap left out: 16 arenas).
#![cfg(target_env = "gnu")]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::{Arc, Barrier};

const NAME: &str = "sixteen_threads_allocating_at_once_share_the_capped_arenas";

#[test]
fn sixteen_threads_allocating_at_once_share_the_capped_arenas() {
    // An arena setting in the environment fixes glibc's limit before the test can set its
    // own: then the test runs again in a process without it.
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
            .env_remove("MALLOC_ARENA_MAX")
            .env_remove("GLIBC_TUNABLES")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "{text}");
        return;
    }
    let before = chitin_sandbox::memory::malloc_arenas().unwrap();
    assert!(before <= 2, "arenas before the cap: {before}");
    assert!(chitin_sandbox::memory::cap_malloc_arenas(2));
    let start = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let kept: Vec<Vec<u8>> = (0..64).map(|j| vec![i; 512 + j]).collect();
                // Every thread holds its memory until all have allocated.
                start.wait();
                kept.iter().map(Vec::len).sum::<usize>()
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 16 * (64 * 512 + 63 * 64 / 2));
    let after = chitin_sandbox::memory::malloc_arenas().unwrap();
    assert_eq!(after, 2, "arenas after sixteen threads under a cap of two");
}
