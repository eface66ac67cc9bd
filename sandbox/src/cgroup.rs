//! Per-sandbox cgroup (memory and pids), when the host lets us create one.
//!
//! cgroup v2: a child of our own cgroup if its `cgroup.subtree_control` delegates `memory` and
//! `pids`. cgroup v1: a child of our own cgroup in the `memory` and `pids` hierarchies. When
//! neither is writable the sandbox still runs with rlimits only (RLIMIT_AS / RLIMIT_NPROC) and
//! the outcome says `cgroup: false`; a memory kill is then not reported as `memory`.

use std::fs;
use std::path::{Path, PathBuf};

/// The cgroup(s) of one sandbox run. Removed on drop.
#[derive(Debug, Default)]
pub struct Cgroup {
    /// `cgroup.procs` files the first sandbox process writes itself into.
    pub procs: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    oom_file: Option<(PathBuf, &'static str)>,
}

fn mounts() -> Vec<(String, String, String)> {
    // (mount point, fstype, super options)
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?.to_string();
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let _src = r.next();
            let opts = r.next().unwrap_or("").to_string();
            Some((mp, fstype, opts))
        })
        .collect()
}

fn own_paths() -> Vec<(String, String)> {
    // (controllers, path)
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrl = it.next()?.to_string();
            let path = it.next()?.to_string();
            Some((ctrl, path))
        })
        .collect()
}

fn join(mount: &str, path: &str) -> PathBuf {
    Path::new(mount).join(path.trim_start_matches('/'))
}

impl Cgroup {
    /// Creates the cgroup with the limits, or `None` when the host does not allow it.
    pub fn create(name: &str, memory_bytes: u64, max_procs: u64) -> Option<Self> {
        let mounts = mounts();
        let own = own_paths();
        // v2 first.
        if let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) {
            for (mp, fstype, _) in &mounts {
                if fstype != "cgroup2" {
                    continue;
                }
                let parent = join(mp, path);
                let ctl =
                    fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
                if !(ctl.contains("memory") && ctl.contains("pids")) {
                    continue;
                }
                let dir = parent.join(name);
                if fs::create_dir(&dir).is_err() {
                    continue;
                }
                let mut cg = Cgroup {
                    procs: vec![dir.join("cgroup.procs")],
                    dirs: vec![dir.clone()],
                    oom_file: Some((dir.join("memory.events"), "oom_kill")),
                };
                let ok = fs::write(dir.join("memory.max"), memory_bytes.to_string()).is_ok()
                    && fs::write(dir.join("memory.swap.max"), "0").is_ok()
                    && fs::write(dir.join("pids.max"), max_procs.to_string()).is_ok();
                if ok {
                    return Some(cg);
                }
                cg.remove();
            }
        }
        // v1: memory and pids hierarchies.
        let find = |ctrl: &str| -> Option<PathBuf> {
            let (_, path) = own.iter().find(|(c, _)| c.split(',').any(|x| x == ctrl))?;
            let (mp, _, _) = mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == ctrl))?;
            Some(join(mp, path))
        };
        let mem = find("memory")?;
        let pids = find("pids")?;
        let mut cg = Cgroup::default();
        let mdir = mem.join(name);
        let pdir = pids.join(name);
        if fs::create_dir(&mdir).is_err() {
            return None;
        }
        cg.dirs.push(mdir.clone());
        if fs::create_dir(&pdir).is_err() {
            cg.remove();
            return None;
        }
        cg.dirs.push(pdir.clone());
        let ok = fs::write(mdir.join("memory.limit_in_bytes"), memory_bytes.to_string()).is_ok()
            && fs::write(pdir.join("pids.max"), max_procs.to_string()).is_ok();
        // No swap either, where the kernel accounts it.
        let _ = fs::write(
            mdir.join("memory.memsw.limit_in_bytes"),
            memory_bytes.to_string(),
        );
        if !ok {
            cg.remove();
            return None;
        }
        cg.procs = vec![mdir.join("cgroup.procs"), pdir.join("cgroup.procs")];
        cg.oom_file = Some((mdir.join("memory.oom_control"), "oom_kill"));
        Some(cg)
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some((file, key)) = &self.oom_file else {
            return 0;
        };
        let text = fs::read_to_string(file).unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == *key).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    }

    fn remove(&mut self) {
        for d in self.dirs.drain(..) {
            // Processes leave the cgroup asynchronously after they die: retry briefly.
            for _ in 0..50 {
                if fs::remove_dir(&d).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}
