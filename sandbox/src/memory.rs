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
/// arena per core, at least two.
pub fn arena_cap(
    malloc_arena_max: Option<&OsStr>,
    tunables: Option<&OsStr>,
    cores: usize,
) -> Option<usize> {
    let tuned = tunables.is_some_and(|t| {
        t.as_encoded_bytes()
            .split(|b| *b == b':')
            .any(|kv| kv.starts_with(b"glibc.malloc.arena_max="))
    });
    if malloc_arena_max.is_some() || tuned {
        return None;
    }
    Some(cores.max(2))
}

/// Caps the allocator's arenas at `n` (glibc; elsewhere nothing is done). True when set.
/// Call it before the process starts its threads: arenas already made stay.
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
        // Other tunables do not count as an arena setting.
        assert_eq!(
            arena_cap(None, Some(OsStr::new("glibc.malloc.trim_threshold=1")), 2),
            Some(2)
        );
    }
}
