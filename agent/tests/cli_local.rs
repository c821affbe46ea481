//! The `vsha` binary's local verbs (vsha-kernel) and `vsha sync`
//! (vsha-sync), end to end through the real binary. The libraries' own
//! tests cover the mechanisms; these check the wiring: arguments, output,
//! exit codes. Root-only parts say so and skip elsewhere.

use std::net::TcpListener;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const VSHA: &str = env!("CARGO_BIN_EXE_vsha");

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A cgroup parent of this test run's own, removed at the end.
fn cgroup_parent() -> String {
    format!("vsha-clitest-{}", std::process::id())
}

struct CgroupParents;
impl Drop for CgroupParents {
    fn drop(&mut self) {
        for h in [
            "unified",
            "pids",
            "memory",
            "cpu",
            "cpu,cpuacct",
            "freezer",
            "",
        ] {
            let d = std::path::Path::new("/sys/fs/cgroup")
                .join(h)
                .join(cgroup_parent());
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn vsha(dirs: &tempfile::TempDir, args: &[&str]) -> Output {
    Command::new(VSHA)
        .env("VSHA_CGROUP_PARENT", cgroup_parent())
        .arg("--config-dir")
        .arg(dirs.path().join("cfg"))
        .arg("--run-dir")
        .arg(dirs.path().join("run"))
        .args(args)
        .output()
        .expect("run vsha")
}

fn ok(dirs: &tempfile::TempDir, args: &[&str]) -> String {
    let out = vsha(dirs, args);
    assert!(
        out.status.success(),
        "vsha {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Stops the vserver if the test fails half-way.
struct Stop<'a>(&'a tempfile::TempDir, &'a str);
impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let _ = vsha(self.0, &["vserver", "stop", self.1]);
    }
}

#[test]
fn local_vserver_lifecycle_through_the_cli() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    if !std::path::Path::new("/bin/busybox").exists() {
        panic!("/bin/busybox missing: run scripts/setup (busybox-static)");
    }
    let _parents = CgroupParents;
    let d = tempfile::tempdir().unwrap();
    let name = format!("clit{}", std::process::id());
    let tree = d.path().join("tree");
    ok(
        &d,
        &["vserver", "build", &name, "--tree", tree.to_str().unwrap()],
    );
    assert!(d.path().join("cfg").join(format!("{name}.toml")).exists());
    let _stop = Stop(&d, &name);
    ok(&d, &["vserver", "start", &name]);
    let out = vsha(&d, &["vserver", "running", &name]);
    assert_eq!(out.status.code(), Some(0));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&d, &["vserver", "status", &name, "--json"])).unwrap();
    assert_eq!(status["running"], true);
    // Stock kernel: an IP is confined by cgroup-BPF (a patched kernel would
    // say "kernel set_ipv4root"); without one there is nothing to confine.
    let want = if status["ip"].is_null() {
        "none"
    } else {
        "cgroup-bpf"
    };
    assert_eq!(status["ipv4root"], want, "{status}");
    // Inside: its own hostname, and only its own processes.
    let inside = ok(
        &d,
        &[
            "vserver",
            "exec",
            &name,
            "--",
            "/bin/sh",
            "-c",
            "hostname; ps -o pid | wc -l",
        ],
    );
    let mut lines = inside.lines();
    assert_eq!(lines.next(), Some(name.as_str()));
    let count: usize = lines.next().unwrap().trim().parse().unwrap();
    assert!(count <= 5, "the vserver sees host processes: {inside}");
    // The exit code of the command comes back.
    let out = vsha(
        &d,
        &["vserver", "exec", &name, "--", "/bin/sh", "-c", "exit 7"],
    );
    assert_eq!(out.status.code(), Some(7));
    let list = ok(&d, &["vserver", "list", "--local"]);
    assert!(list.contains(&name), "{list}");
    let ps = ok(&d, &["ps"]);
    assert!(ps.contains(&name), "{ps}");
    ok(&d, &["vserver", "stop", &name]);
    let out = vsha(&d, &["vserver", "running", &name]);
    assert_eq!(out.status.code(), Some(1));
    // Unknown vserver: a clear error, exit 1.
    let out = vsha(&d, &["vserver", "start", "does-not-exist"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist"));
}

#[test]
fn ctx_exec_through_the_cli() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _parents = CgroupParents;
    let d = tempfile::tempdir().unwrap();
    let out = ok(
        &d,
        &[
            "ctx",
            "exec",
            "--hostname",
            "boxy",
            "--secure",
            "--",
            "/bin/sh",
            "-c",
            "hostname; grep CapBnd /proc/self/status",
        ],
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("boxy"));
    let bnd = lines.next().unwrap();
    let mask = u64::from_str_radix(bnd.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(mask & (1 << 21), 0, "CAP_SYS_ADMIN must be dropped: {bnd}");
    let bad = vsha(&d, &["ctx", "exec", "--flag", "bogus", "--", "/bin/true"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--flag"));
}

struct Serve(Child);
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sync_push_serve_verify_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "web\n").unwrap();
    std::fs::write(src.join("big"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("etc/hostname", src.join("link")).unwrap();
    let dst = d.path().join("dst");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _serve = Serve(
        Command::new(VSHA)
            .args(["sync", "serve", "--listen", &addr, "--dir"])
            .arg(&dst)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let pushed = loop {
        let out = Command::new(VSHA)
            .args(["sync", "push"])
            .arg(&src)
            .args(["--to", &addr, "--name", "web"])
            .output()
            .unwrap();
        if out.status.success() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "push never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(String::from_utf8_lossy(&pushed.stdout).contains("web"));
    let copy = dst.join("web");
    let out = Command::new(VSHA)
        .args(["sync", "verify"])
        .arg(&src)
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A difference is listed and exits 1.
    std::fs::write(src.join("etc/hostname"), "db\n").unwrap();
    let out = Command::new(VSHA)
        .args(["sync", "verify"])
        .arg(&src)
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("etc/hostname"));
}

/// `vsha vserver boot` starts the onboot vservers only; `halt` stops all.
#[test]
fn boot_starts_onboot_vservers_and_halt_stops_them() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _parents = CgroupParents;
    let d = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let (a, b) = (format!("boota{pid}"), format!("bootb{pid}"));
    for n in [&a, &b] {
        let tree = d.path().join(n);
        ok(
            &d,
            &["vserver", "build", n, "--tree", tree.to_str().unwrap()],
        );
    }
    struct StopAll<'a>(&'a tempfile::TempDir);
    impl Drop for StopAll<'_> {
        fn drop(&mut self) {
            let _ = vsha(self.0, &["vserver", "halt"]);
        }
    }
    let _stop = StopAll(&d);
    let spec = d.path().join("cfg").join(format!("{a}.toml"));
    let text = std::fs::read_to_string(&spec).unwrap();
    assert!(text.contains("onboot = false"), "{text}");
    std::fs::write(&spec, text.replace("onboot = false", "onboot = true")).unwrap();
    let out = ok(&d, &["vserver", "boot"]);
    assert!(out.contains(&format!("vserver {a} started")), "{out}");
    assert_eq!(vsha(&d, &["vserver", "running", &a]).status.code(), Some(0));
    assert_eq!(vsha(&d, &["vserver", "running", &b]).status.code(), Some(1));
    // Booting again starts nothing twice.
    assert_eq!(ok(&d, &["vserver", "boot"]).trim(), "nothing to do");
    let out = ok(&d, &["vserver", "halt"]);
    assert!(out.contains(&format!("vserver {a} stopped")), "{out}");
    assert_eq!(vsha(&d, &["vserver", "running", &a]).status.code(), Some(1));
}
