//! The gateway's arena cap (`memory::cap_malloc_arenas`), in a process of its own: glibc
//! gives each new thread an arena of its own until the cap, so sixteen threads that allocate
//! at once would make sixteen (they did, with the cap left out: 16 arenas).

use std::sync::{Arc, Barrier};

#[test]
fn sixteen_threads_allocating_at_once_share_the_capped_arenas() {
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
