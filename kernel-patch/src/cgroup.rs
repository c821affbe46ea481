//! cgroups of a context: one cgroup v2 directory per context (identity,
//! `cgroup.kill`, `cgroup.freeze`, BPF attach point) plus, for limits the v2
//! hierarchy cannot enforce (hybrid hosts where v2 offers only hugetlb), v1
//! directories of the same name under the `pids`, `memory` and `cpu`
//! hierarchies. Everything is probed from `/proc/self/mountinfo`.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys::open_dir;
use crate::{Error, Result};

/// Per-context resource limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Maximum number of tasks in the whole context (`nproc` flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU weight 1..=10000 (the `sched` flag: the context weighs as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.nproc.is_none() && self.memory.is_none() && self.cpu_weight.is_none()
    }
}

/// Where the cgroup hierarchies are mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLayout {
    /// cgroup2 mount point (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub v2_root: PathBuf,
    /// Controllers the v2 root offers (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// v1 controller name → mount point (`pids` → `/sys/fs/cgroup/pids`).
    pub v1: BTreeMap<String, PathBuf>,
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut n = 0;
    while n < b.len() {
        if b[n] == b'\\' && n + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[n + 1..n + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                n += 4;
                continue;
            }
        }
        out.push(b[n]);
        n += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl CgroupLayout {
    /// Probes the running host.
    pub fn probe() -> Result<CgroupLayout> {
        let mi = fs::read_to_string("/proc/self/mountinfo")
            .map_err(Error::sys("read /proc/self/mountinfo"))?;
        let mut layout = Self::from_mountinfo(&mi)?;
        let ctl = layout.v2_root.join("cgroup.controllers");
        let c = fs::read_to_string(&ctl).map_err(Error::sys(format!("read {}", ctl.display())))?;
        layout.v2_controllers = c.split_whitespace().map(str::to_string).collect();
        if !layout.v2_root.join("cgroup.kill").exists()
            && !layout.v2_root.join("cgroup.procs").exists()
        {
            return Err(Error::Unsupported {
                what: format!("{} is not a usable cgroup2 mount", layout.v2_root.display()),
                hint: "mount cgroup2 (kernel >= 5.14)".into(),
            });
        }
        Ok(layout)
    }

    /// Parses a mountinfo text (v2 controllers are left empty).
    pub fn from_mountinfo(mountinfo: &str) -> Result<CgroupLayout> {
        let mut v2 = None;
        let mut v1 = BTreeMap::new();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                continue;
            }
            let mnt = PathBuf::from(unescape_mount(pre[4]));
            match post[0] {
                "cgroup2" if v2.is_none() => v2 = Some(mnt),
                "cgroup" => {
                    for opt in post[2].split(',') {
                        if matches!(opt, "pids" | "memory" | "cpu" | "cpuacct" | "freezer") {
                            v1.entry(opt.to_string()).or_insert_with(|| mnt.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let v2_root = v2.ok_or_else(|| Error::Unsupported {
            what: "no cgroup2 mount found in /proc/self/mountinfo".into(),
            hint: "mount -t cgroup2 none /sys/fs/cgroup/unified".into(),
        })?;
        Ok(CgroupLayout {
            v2_root,
            v2_controllers: Vec::new(),
            v1,
        })
    }

    fn v2_has(&self, c: &str) -> bool {
        self.v2_controllers.iter().any(|x| x == c)
    }
}

/// Kills every process under each of `dirs` (cgroup2 directories, e.g. a
/// node's `cgroup_parent`), waits up to `wait` for them to empty, then
/// removes the directories, children first. Best effort: for cleanup
/// (`vsha demo`, test harnesses) where nothing else is left to do on error.
pub fn kill_and_remove_trees(dirs: &[PathBuf], wait: Duration) {
    for d in dirs {
        let _ = fs::write(d.join("cgroup.kill"), "1");
    }
    let populated = |d: &Path| {
        fs::read_to_string(d.join("cgroup.events"))
            .is_ok_and(|s| s.lines().any(|l| l == "populated 1"))
    };
    let end = Instant::now() + wait;
    while dirs.iter().any(|d| populated(d)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    fn remove_tree(dir: &Path) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    for d in dirs {
        remove_tree(d);
    }
}

/// The cgroups of one context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextCgroup {
    /// The context's cgroup v2 directory.
    pub v2: PathBuf,
    /// v1 controller → the context's directory in that hierarchy.
    pub v1: BTreeMap<String, PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(Error::sys(format!("write {value:?} to {}", path.display())))
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Sys {
            step: format!("mkdir {}", path.display()),
            source: e,
        }),
    }
}

impl ContextCgroup {
    /// The paths of the context `name` under `parent` (no I/O beyond checking
    /// which v1 directories exist).
    pub fn locate(layout: &CgroupLayout, parent: &str, name: &str) -> ContextCgroup {
        let mut v1 = BTreeMap::new();
        for (c, m) in &layout.v1 {
            let d = m.join(parent).join(name);
            if d.is_dir() {
                v1.insert(c.clone(), d);
            }
        }
        ContextCgroup {
            v2: layout.v2_root.join(parent).join(name),
            v1,
        }
    }

    /// Creates the cgroups of a context and applies `limits`, on v2 when its
    /// controllers are there, otherwise on the v1 hierarchy of the same name.
    /// Fails with EEXIST when the v2 directory already exists.
    pub fn create(
        layout: &CgroupLayout,
        parent: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<ContextCgroup> {
        let v2_parent = layout.v2_root.join(parent);
        mkdir(&v2_parent)?;
        let wanted: Vec<(&str, &str)> = [
            ("pids", limits.nproc.is_some()),
            ("memory", limits.memory.is_some()),
            ("cpu", limits.cpu_weight.is_some()),
        ]
        .iter()
        .filter(|(_, w)| *w)
        .map(|(c, _)| (*c, *c))
        .collect();
        // Enable the v2 controllers we need (pure v2 hosts).
        for (c, _) in &wanted {
            if layout.v2_has(c) {
                for dir in [&layout.v2_root, &v2_parent] {
                    let f = dir.join("cgroup.subtree_control");
                    let cur = fs::read_to_string(&f).unwrap_or_default();
                    if !cur.split_whitespace().any(|x| x == *c) {
                        write(&f, &format!("+{c}"))?;
                    }
                }
            }
        }
        let v2 = v2_parent.join(name);
        fs::create_dir(&v2).map_err(Error::sys(format!("mkdir {}", v2.display())))?;
        let mut cg = ContextCgroup {
            v2: v2.clone(),
            v1: BTreeMap::new(),
        };
        let r = (|| -> Result<()> {
            for (c, _) in &wanted {
                if !layout.v2_has(c) {
                    let Some(m) = layout.v1.get(*c) else {
                        return Err(Error::Unsupported {
                            what: format!(
                                "limit needs the {c} controller, on neither cgroup v2 nor v1"
                            ),
                            hint: format!("enable the {c} controller or drop the limit"),
                        });
                    };
                    let p = m.join(parent);
                    mkdir(&p)?;
                    let d = p.join(name);
                    mkdir(&d)?;
                    cg.v1.insert(c.to_string(), d);
                }
            }
            if let Some(n) = limits.nproc {
                match cg.v1.get("pids") {
                    Some(d) => write(&d.join("pids.max"), &n.to_string())?,
                    None => write(&v2.join("pids.max"), &n.to_string())?,
                }
            }
            if let Some(m) = limits.memory {
                match cg.v1.get("memory") {
                    Some(d) => write(&d.join("memory.limit_in_bytes"), &m.to_string())?,
                    None => write(&v2.join("memory.max"), &m.to_string())?,
                }
            }
            if let Some(w) = limits.cpu_weight {
                match cg.v1.get("cpu") {
                    // cpu.shares 1024 ~ cpu.weight 100
                    Some(d) => write(
                        &d.join("cpu.shares"),
                        &(w.max(1) * 1024 / 100).max(2).to_string(),
                    )?,
                    None => write(&v2.join("cpu.weight"), &w.to_string())?,
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = cg.remove();
            return Err(e);
        }
        tracing::debug!(v2 = %cg.v2.display(), v1 = ?cg.v1, "context cgroups created");
        Ok(cg)
    }

    /// Opens the v2 directory (for CLONE_INTO_CGROUP and BPF attach).
    pub fn open_v2(&self) -> Result<OwnedFd> {
        open_dir(&self.v2)
    }

    /// Whether the v2 directory exists.
    pub fn exists(&self) -> bool {
        self.v2.is_dir()
    }

    /// The cgroup id (inode of the v2 directory).
    pub fn id(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.v2)
            .map(|m| m.ino())
            .map_err(Error::sys(format!("stat {}", self.v2.display())))
    }

    /// Moves `pid` into the v1 directories (the v2 membership comes from
    /// CLONE_INTO_CGROUP).
    pub fn join_v1(&self, pid: i32) -> Result<()> {
        for d in self.v1.values() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Process ids in the context (`cgroup.procs` of the v2 directory,
    /// descendants included).
    pub fn procs(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        collect_procs(&self.v2, &mut out)?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// `populated` from `cgroup.events`.
    pub fn populated(&self) -> Result<bool> {
        let f = self.v2.join("cgroup.events");
        let s = fs::read_to_string(&f).map_err(Error::sys(format!("read {}", f.display())))?;
        Ok(s.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Waits until `populated 0`; `Ok(false)` on timeout.
    pub fn wait_empty(&self, timeout: Duration, reap: Option<i32>) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = reap {
                let _ = crate::sys::try_reap(pid);
            }
            if !self.populated()? {
                // an exited init of ours is a zombie until reaped
                if let Some(pid) = reap {
                    let until = Instant::now() + Duration::from_secs(5);
                    while crate::sys::try_reap(pid).is_none()
                        && std::path::Path::new(&format!("/proc/{pid}")).exists()
                        && Instant::now() < until
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until no process but `keep` is left (or none); `Ok(false)` on
    /// timeout.
    pub fn wait_only(&self, keep: i32, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.procs()?.iter().all(|&p| p == keep) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `cgroup.kill`: SIGKILL to every process in the context, at once.
    pub fn kill(&self) -> Result<()> {
        write(&self.v2.join("cgroup.kill"), "1")
    }

    /// `cgroup.freeze`.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        write(
            &self.v2.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    /// Removes the v2 directory (child cgroups first; drops the BPF programs)
    /// and the v1 directories. Missing directories are fine.
    pub fn remove(&self) -> Result<()> {
        rmdir_tree(&self.v2)?;
        for d in self.v1.values() {
            rmdir_tree(d)?;
        }
        Ok(())
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    let f = dir.join("cgroup.procs");
    let s = match fs::read_to_string(&f) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Sys {
                step: format!("read {}", f.display()),
                source: e,
            })
        }
    };
    out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_procs(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

/// rmdir of a cgroup directory and its child cgroups, retrying EBUSY for a
/// while (tasks that were just killed may still be leaving).
fn rmdir_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(Error::Sys {
                    step: format!("rmdir {}", dir.display()),
                    source: e,
                })
            }
        }
    }
}

/// The v2 cgroup path of `pid` (from `/proc/PID/cgroup`, the `0::` line).
pub fn v2_path_of(pid: i32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 29 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
38 30 0:34 / /sys/fs/cgroup/memory rw,nosuid shared:18 - cgroup cgroup rw,memory
41 30 0:37 / /sys/fs/cgroup/pids rw,nosuid shared:21 - cgroup cgroup rw,pids
";

    #[test]
    fn hybrid_layout_is_found() {
        let l = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        assert_eq!(l.v2_root, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(l.v1["pids"], PathBuf::from("/sys/fs/cgroup/pids"));
        assert_eq!(l.v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(l.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
    }

    #[test]
    fn pure_v2_and_missing_v2() {
        let l = CgroupLayout::from_mountinfo(
            "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        )
        .unwrap();
        assert_eq!(l.v2_root, PathBuf::from("/sys/fs/cgroup"));
        assert!(l.v1.is_empty());
        let e =
            CgroupLayout::from_mountinfo("24 29 0:22 / /sys rw - sysfs sysfs rw\n").unwrap_err();
        assert!(e.to_string().contains("no cgroup2 mount"), "{e}");
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
