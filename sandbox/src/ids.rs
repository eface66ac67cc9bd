//! Which host uid/gid a sandboxed command runs as.
//!
//! An unprivileged launcher maps the sandbox's uid 1000 to itself (the only id it may map).
//! A root launcher must not: the command would be host root, able to read every root-only
//! file the view contains. It maps the sandbox to an unprivileged host id instead: the first
//! id of the `/etc/subuid` / `/etc/subgid` range of a dedicated user (`sandbox.subid_user`,
//! default `chitin`) when the host has one, else `nobody`/`nogroup` (65534).

use std::fmt;
use std::path::Path;

/// The default user whose subordinate ids a root launcher uses (`sandbox.subid_user`).
pub const DEFAULT_SUBID_USER: &str = "chitin";

/// `nobody` / `nogroup`.
pub const NOBODY: u32 = 65534;

/// Where the sandbox's host ids come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    /// An unprivileged launcher: the sandbox is the launcher's own euid/egid.
    Launcher,
    /// A root launcher: the first id of `user`'s `/etc/subuid` and `/etc/subgid` ranges.
    SubId { user: String },
    /// A root launcher without a subordinate range for the configured user.
    Nobody { user: String },
}

/// The host ids of the sandboxed command, and how the workspace is made writable for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIds {
    /// The launcher's effective uid.
    pub launcher_euid: u32,
    pub uid: u32,
    pub gid: u32,
    pub source: IdSource,
}

impl HostIds {
    /// The launcher is root: the command runs as `uid`/`gid`, the workspace and `--rw` paths
    /// are ID-mapped for it.
    pub fn remapped(&self) -> bool {
        self.source != IdSource::Launcher
    }
}

impl fmt::Display for HostIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            IdSource::Launcher => write!(
                f,
                "sandbox uid 1000 = host uid {} (the launcher's own, unprivileged)",
                self.uid
            ),
            IdSource::SubId { user } => write!(
                f,
                "sandbox uid 1000 = host uid {}/gid {} (first of the /etc/subuid and /etc/subgid ranges of `{user}`; the launcher is root)",
                self.uid, self.gid
            ),
            IdSource::Nobody { user } => write!(
                f,
                "sandbox uid 1000 = host uid {}/gid {} (nobody/nogroup: no /etc/subuid and /etc/subgid range for `{user}`; the launcher is root)",
                self.uid, self.gid
            ),
        }
    }
}

/// The first id of `user`'s range in a subordinate-id file (`name_or_id:start:count` lines),
/// when it is usable: not 0, and the whole range fits below `u32::MAX`.
pub fn first_subid(text: &str, user: &str, user_id: Option<u32>) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut it = line.trim().split(':');
        let (owner, start, count) = (it.next()?, it.next()?, it.next()?);
        let mine = owner == user || user_id.is_some_and(|id| owner == id.to_string());
        let start: u32 = start.parse().ok()?;
        let count: u32 = count.parse().ok()?;
        (mine && start != 0 && count >= 1 && start.checked_add(count).is_some()).then_some(start)
    })
}

/// The numeric id of `name` in a passwd/group-format file.
fn id_of(file: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split(':');
        (it.next()? == name)
            .then(|| it.nth(1)?.parse().ok())
            .flatten()
    })
}

/// The ids for a launcher with effective ids `euid`/`egid`.
pub fn host_ids(euid: u32, egid: u32, subid_user: &str) -> HostIds {
    if euid != 0 {
        return HostIds {
            launcher_euid: euid,
            uid: euid,
            gid: egid,
            source: IdSource::Launcher,
        };
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    // The user's numeric id, read once for both files.
    let user_id = id_of(Path::new("/etc/passwd"), subid_user);
    let uid = first_subid(&read("/etc/subuid"), subid_user, user_id);
    let gid = first_subid(&read("/etc/subgid"), subid_user, user_id);
    match (uid, gid) {
        (Some(uid), Some(gid)) => HostIds {
            launcher_euid: euid,
            uid,
            gid,
            source: IdSource::SubId {
                user: subid_user.to_string(),
            },
        },
        _ => HostIds {
            launcher_euid: euid,
            uid: NOBODY,
            gid: NOBODY,
            source: IdSource::Nobody {
                user: subid_user.to_string(),
            },
        },
    }
}

/// The ids the current process would give a sandbox.
pub fn current(subid_user: &str) -> HostIds {
    host_ids(crate::sys::geteuid(), crate::sys::getegid(), subid_user)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_first_usable_range_of_the_user_is_taken() {
        let t = "root:100000:65536\nchitin:200000:65536\n";
        assert_eq!(first_subid(t, "chitin", None), Some(200_000));
        assert_eq!(
            first_subid("1001:300000:10\n", "chitin", Some(1001)),
            Some(300_000)
        );
        assert_eq!(first_subid(t, "other", None), None);
        assert_eq!(first_subid("chitin:0:65536\n", "chitin", None), None);
        assert_eq!(first_subid("chitin:4294967295:1\n", "chitin", None), None);
        assert_eq!(
            first_subid("chitin:x:1\nchitin:5:0\n", "chitin", None),
            None
        );
    }

    #[test]
    fn an_unprivileged_launcher_keeps_its_own_ids() {
        let ids = host_ids(1234, 99, "chitin");
        assert_eq!((ids.uid, ids.gid, ids.remapped()), (1234, 99, false));
    }

    #[test]
    fn a_root_launcher_never_maps_the_sandbox_to_root() {
        let ids = host_ids(0, 0, "no-such-user-for-chitin-tests");
        assert_eq!((ids.uid, ids.gid, ids.remapped()), (NOBODY, NOBODY, true));
        assert!(ids.to_string().contains("nobody"), "{ids}");
    }
}
