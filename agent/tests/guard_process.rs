//! The guard process (`vshad guard`) on its own: it kills the cgroups it
//! holds when the lease deadline it was given passes, or at once when the
//! agent's pipe closes — unless told to detach. Real cgroups, real
//! processes; needs root. Each test's cgroup is removed at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use vsha_agent::failover::clock::mono_ms;
use vsha_agent::failover::guard::{GuardMsg, Held};

const VSHAD: &str = env!("CARGO_BIN_EXE_vshad");

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn cgroup2_root() -> PathBuf {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines()
        .filter_map(|l| l.split_once(" - "))
        .find(|(_, post)| post.starts_with("cgroup2 "))
        .and_then(|(pre, _)| pre.split(' ').nth(4).map(PathBuf::from))
        .expect("a cgroup2 mount")
}

/// A cgroup with one `sleep` in it; killed and removed on drop.
struct Victim {
    cg: PathBuf,
    child: Child,
}

impl Victim {
    fn new(tag: &str) -> Victim {
        let cg = cgroup2_root().join(format!("vsha-guard-test-{}-{tag}", std::process::id()));
        std::fs::create_dir(&cg).unwrap();
        let child = Command::new("/bin/sleep").arg("1000").spawn().unwrap();
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        Victim { cg, child }
    }

    /// The sleep was killed (and is reaped here).
    fn dead_within(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cg);
    }
}

fn guard() -> (Child, ChildStdin) {
    let mut g = Command::new(VSHAD)
        .arg("guard")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = g.stdin.take().unwrap();
    (g, stdin)
}

fn send(pipe: &mut ChildStdin, m: GuardMsg) {
    pipe.write_all(m.encode().as_bytes()).unwrap();
    pipe.flush().unwrap();
}

fn hold(cg: &Path) -> GuardMsg {
    GuardMsg::Hold(
        "victim".into(),
        Held {
            cgroup: cg.to_path_buf(),
            alias: None,
        },
    )
}

#[test]
fn the_guard_fences_at_the_deadline_even_if_the_agent_says_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut v = Victim::new("deadline");
    let (mut g, mut pipe) = guard();
    send(&mut pipe, GuardMsg::Deadline(mono_ms() + 60_000));
    send(&mut pipe, hold(&v.cg));
    assert!(
        !v.dead_within(Duration::from_millis(300)),
        "killed under a valid lease"
    );
    // A short deadline, then silence: as if the agent were stopped.
    send(&mut pipe, GuardMsg::Deadline(mono_ms() + 300));
    assert!(
        v.dead_within(Duration::from_secs(20)),
        "not fenced after the deadline"
    );
    drop(pipe);
    g.wait().unwrap();
}

#[test]
fn the_guard_fences_when_the_agent_goes_away_unless_detached() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut v = Victim::new("eof");
    let (mut g, mut pipe) = guard();
    send(&mut pipe, GuardMsg::Deadline(mono_ms() + 60_000));
    send(&mut pipe, hold(&v.cg));
    drop(pipe);
    assert!(v.dead_within(Duration::from_secs(20)), "survived its agent");
    g.wait().unwrap();

    // Detach: the vserver outlives its agent, never its lease.
    let mut v = Victim::new("detach");
    let (mut g, mut pipe) = guard();
    send(&mut pipe, GuardMsg::Detach);
    send(&mut pipe, GuardMsg::Deadline(mono_ms() + 1500));
    send(&mut pipe, hold(&v.cg));
    drop(pipe);
    assert!(
        !v.dead_within(Duration::from_millis(500)),
        "detach policy: the vserver must outlive its agent"
    );
    assert!(v.dead_within(Duration::from_secs(20)), "outlived its lease");
    g.wait().unwrap();
}

#[test]
fn a_hold_under_a_lapsed_lease_is_killed_at_once() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut v = Victim::new("lapsed");
    let (mut g, mut pipe) = guard();
    send(&mut pipe, GuardMsg::Deadline(mono_ms().saturating_sub(1)));
    send(&mut pipe, hold(&v.cg));
    assert!(v.dead_within(Duration::from_secs(20)));
    drop(pipe);
    g.wait().unwrap();
}
