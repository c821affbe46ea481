//! Benchmark: vserver start (until its first process runs) and stop, p50/p99
//! over N runs, against `unshare` + `chroot` of the same busybox tree.
//!
//! Run as root: `cargo run --release -p vsha-kernel --example bench -- [--runs N | --quick]`.
//! Everything happens in a network namespace created for the run (no
//! address, route or ARP change anywhere else); all cgroups, the namespace
//! and the temp tree are removed at the end.

use std::process::Command;
use std::time::{Duration, Instant};

use vsha_kernel::config::VserverSpec;
use vsha_kernel::local::{self, BuildOptions, Paths};
use vsha_kernel::syscall::LinuxSyscall;

struct NetnsGuard(String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct CgGuard(std::path::PathBuf, Vec<std::path::PathBuf>);
impl Drop for CgGuard {
    fn drop(&mut self) {
        for d in std::iter::once(&self.0).chain(self.1.iter()) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:8.2} ms", d.as_secs_f64() * 1000.0)
}

fn report(what: &str, v: &mut [Duration]) {
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{what:<34} p50 {}  p99 {}  mean {}  (n={})",
        ms(pct(v, 0.5)),
        ms(pct(v, 0.99)),
        ms(mean),
        v.len()
    );
}

fn wait_trap(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let caught = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0);
        if caught & (1 << (15 - 1)) != 0 {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut runs = 100usize;
    if args.iter().any(|a| a == "--quick" || a == "--test") {
        runs = 10;
    }
    if let Some(i) = args.iter().position(|a| a == "--runs") {
        runs = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(runs);
    }
    let uid0 = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !uid0 {
        println!("skipped: needs root");
        return;
    }
    let pid = std::process::id();
    let ns = format!("vshbench{pid}");
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("bench: ip netns add failed");
        std::process::exit(1);
    }
    let _ns = NetnsGuard(ns.clone());
    vsha_kernel::net::enter_netns(std::path::Path::new(&format!("/run/netns/{ns}")))
        .expect("enter netns");

    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths {
        config_dir: dir.path().join("etc"),
        run_dir: dir.path().join("run"),
        cgroup_parent: format!("vsha-bench-{pid}"),
    };
    let sys = LinuxSyscall::probe().expect("probe cgroups");
    let _cg = CgGuard(
        sys.layout.v2_root.join(&paths.cgroup_parent),
        sys.layout
            .v1
            .values()
            .map(|m| m.join(&paths.cgroup_parent))
            .collect(),
    );
    let tree = local::build(
        &paths,
        "bench",
        &BuildOptions {
            tree: Some(dir.path().join("tree")),
            write_spec: false,
            ..BuildOptions::default()
        },
    )
    .expect("build tree");
    let mut spec = VserverSpec::new("bench", &tree);
    spec.ip = Some("10.77.250.5/32".into());
    spec.hostname = Some("bench".into());
    spec.limits.nproc = Some(100);
    spec.start = vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM; while :; do sleep 1 & wait; done".into(),
    ];
    spec.stop_timeout = 5;
    std::fs::create_dir_all(&paths.config_dir).unwrap();

    println!("vsha-kernel benchmark: {runs} runs, busybox tree, 2 vCPU shared; ipv4root BPF + v1 pids limit per start");
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let st = local::start_with(&sys, &paths, &spec).expect("start");
        let t1 = Instant::now();
        // not timed: let the init install its SIGTERM trap (a PID 1 without
        // a handler ignores SIGTERM and stop would wait the whole grace time)
        wait_trap(st.init_pid);
        let t1b = Instant::now();
        local::stop_with(&sys, &paths, &spec, &st).expect("stop");
        let t2 = Instant::now();
        start.push(t1 - t0);
        stop.push(t2 - t1b);
    }
    let (mut bstart, mut bstop) = (Vec::new(), Vec::new());
    let t = tree.to_str().unwrap().to_string();
    for _ in 0..runs {
        // start: unshare + chroot running /bin/true to completion
        let t0 = Instant::now();
        let s = Command::new("unshare")
            .args([
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "chroot",
                &t,
                "/bin/true",
            ])
            .stderr(std::process::Stdio::null())
            .status();
        assert!(
            s.map(|s| s.success()).unwrap_or(false),
            "baseline unshare failed"
        );
        let _ = s;
        bstart.push(t0.elapsed());
        // stop: SIGKILL to a running unshare --kill-child + chroot, until reaped
        let mut c = Command::new("unshare")
            .args([
                "--fork",
                "--pid",
                "--kill-child",
                "--mount",
                "--uts",
                "--ipc",
                "chroot",
                &t,
                "/bin/sleep",
                "1000",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("unshare");
        std::thread::sleep(Duration::from_millis(5));
        let t0 = Instant::now();
        let _ = c.kill();
        let _ = c.wait();
        bstop.push(t0.elapsed());
    }
    report("vserver start (first process runs)", &mut start);
    report("vserver stop (cgroup empty+removed)", &mut stop);
    report("baseline unshare+chroot /bin/true", &mut bstart);
    report("baseline kill unshare+chroot", &mut bstop);
}
