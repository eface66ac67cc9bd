//! The allocator settings of a long-running process (the gateway).
//!
//! glibc gives each new thread an arena of its own until there are eight per core. The
//! gateway's blocking pool grows to twenty threads and more under load; each arena keeps
//! the memory freed in it, in pieces it cannot hand back to the kernel, so a gateway after a
//! burst held several MiB more than the same work needs with an arena per core (measured in
//! BENCHMARKS.md, issue #21, fourteenth session). An operator's own setting
//! (`MALLOC_ARENA_MAX`, or `malloc.arena_max` in `GLIBC_TUNABLES`) is left as it is.

use std::ffi::OsStr;

/// The arena cap for a process on `cores` cores, unless the environment already sets one
/// (`malloc_arena_max`: the value of `MALLOC_ARENA_MAX`; `tunables`: `GLIBC_TUNABLES`): one
/// arena per core, at least two. A setting glibc ignores (empty, zero, not a number) does
/// not count.
pub fn arena_cap(
    malloc_arena_max: Option<&OsStr>,
    tunables: Option<&OsStr>,
    cores: usize,
) -> Option<usize> {
    let positive = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    };
    let tuned = tunables.is_some_and(|t| {
        t.as_encoded_bytes()
            .split(|b| *b == b':')
            .filter_map(|kv| kv.strip_prefix(b"glibc.malloc.arena_max="))
            .any(positive)
    });
    if malloc_arena_max.is_some_and(|v| positive(v.as_encoded_bytes())) || tuned {
        return None;
    }
    Some(cores.max(2))
}

/// Caps the allocator's arenas at `n` (glibc; elsewhere nothing is done). True when glibc
/// took the value. Call it before the process starts threads: glibc fixes the limit the first
/// time a thread needs an arena of its own, and a later call changes nothing.
pub fn cap_malloc_arenas(n: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        libc::c_int::try_from(n).is_ok_and(crate::sys::malloc_arena_max)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = n;
        false
    }
}

/// How many arenas the allocator has now (glibc's `malloc_info`).
pub fn malloc_arenas() -> std::io::Result<usize> {
    #[cfg(target_env = "gnu")]
    {
        Ok(crate::sys::malloc_info()?.matches("<heap nr=").count())
    }
    #[cfg(not(target_env = "gnu"))]
    {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_one_arena_per_core_and_at_least_two() {
        assert_eq!(arena_cap(None, None, 2), Some(2));
        assert_eq!(arena_cap(None, None, 1), Some(2));
        assert_eq!(arena_cap(None, None, 16), Some(16));
    }

    #[test]
    fn an_operators_own_arena_setting_is_left_as_it_is() {
        assert_eq!(arena_cap(Some(OsStr::new("8")), None, 2), None);
        assert_eq!(
            arena_cap(
                None,
                Some(OsStr::new(
                    "glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=4"
                )),
                2
            ),
            None
        );
        // Other tunables do not count as an arena setting, nor do values glibc ignores.
        assert_eq!(
            arena_cap(None, Some(OsStr::new("glibc.malloc.trim_threshold=1")), 2),
            Some(2)
        );
        assert_eq!(
            arena_cap(None, Some(OsStr::new("glibc.malloc.arena_max=0")), 2),
            Some(2)
        );
        for ignored in ["", "0", "many"] {
            assert_eq!(arena_cap(Some(OsStr::new(ignored)), None, 2), Some(2));
        }
    }
}
