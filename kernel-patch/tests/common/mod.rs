//! Test scaffolding: root check, network namespaces, per-test cgroup parent
//! and temp dirs, all removed by Drop guards (also on panic).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vsha_kernel::cgroup::CgroupLayout;
use vsha_kernel::local::{BuildOptions, Paths};

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Returns false (and prints the skip line) when not root.
pub fn need_root() -> bool {
    if is_root() {
        true
    } else {
        println!("skipped: needs root");
        false
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for this process and call: "<pid>x<n>".
pub fn tag() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

pub fn sh_ok(cmd: &str) -> String {
    let (ok, out) = sh(cmd);
    assert!(ok, "{cmd}: {out}");
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        sh_ok(&format!("ip netns add {name}"));
        let ns = Netns {
            name: name.to_string(),
        };
        sh_ok(&format!("ip -n {name} link set lo up"));
        ns
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// Moves the calling thread into this namespace.
    pub fn enter(&self) {
        vsha_kernel::net::enter_netns(&self.path()).expect("enter netns");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // kill anything the test left running in it, then delete
        // (never ourselves: with --test-threads=1 the test runs on the main
        // thread, which may be inside this namespace)
        let _ = sh(&format!(
            "ip netns pids {} | grep -vx {} | xargs -r kill -9",
            self.name,
            std::process::id()
        ));
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// Two namespaces joined by a veth: `host` (the vserver's node) holds `va`
/// with 10.77.N.1/24, `peer` holds `vb` with 10.77.N.2/24.
pub struct Pair {
    pub host: Netns,
    pub peer: Netns,
    pub net: u8,
}

impl Pair {
    pub fn new(t: &str) -> Pair {
        static NET: AtomicU32 = AtomicU32::new(0);
        let net = (NET.fetch_add(1, Ordering::SeqCst) % 200 + 20) as u8;
        let host = Netns::new(&format!("vsh{t}a"));
        let peer = Netns::new(&format!("vsh{t}b"));
        sh_ok(&format!(
            "ip -n {} link add va type veth peer name vb netns {}",
            host.name, peer.name
        ));
        sh_ok(&format!(
            "ip -n {} addr add 10.77.{net}.1/24 dev va && ip -n {} link set va up",
            host.name, host.name
        ));
        sh_ok(&format!(
            "ip -n {} addr add 10.77.{net}.2/24 dev vb && ip -n {} link set vb up",
            peer.name, peer.name
        ));
        Pair { host, peer, net }
    }
    pub fn ip(&self, last: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, self.net, last)
    }
}

/// Temp dirs + a cgroup parent unique to the test; removes every cgroup it
/// holds (killing what runs there) on drop.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub paths: Paths,
    pub layout: CgroupLayout,
}

impl Env {
    pub fn new(t: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vsha-kt-{t}-"))
            .tempdir()
            .expect("tempdir");
        let paths = Paths {
            config_dir: dir.path().join("etc"),
            run_dir: dir.path().join("run"),
            cgroup_parent: format!("vsha-test-{t}"),
        };
        std::fs::create_dir_all(&paths.config_dir).unwrap();
        Env {
            dir,
            paths,
            layout: CgroupLayout::probe().expect("cgroup layout"),
        }
    }

    /// Builds a busybox tree named `name` under the temp dir.
    pub fn tree(&self, name: &str) -> PathBuf {
        let opts = BuildOptions {
            tree: Some(self.dir.path().join("trees").join(name)),
            write_spec: false,
            ..BuildOptions::default()
        };
        vsha_kernel::local::build(&self.paths, name, &opts).expect("build tree")
    }

    pub fn v2_parent(&self) -> PathBuf {
        self.layout.v2_root.join(&self.paths.cgroup_parent)
    }
}

fn kill_and_remove(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        kill_and_remove(&self.v2_parent());
        for m in self.layout.v1.values() {
            let p = m.join(&self.paths.cgroup_parent);
            if p.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    for e in rd.flatten() {
                        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

/// Polls `f` until it returns Some or the (generous) deadline passes.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A start command that exits on SIGTERM promptly.
pub fn idle_init() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM; while :; do sleep 1 & wait; done".into(),
    ]
}
