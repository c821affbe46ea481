//! The lease and fencing protocol with real processes: three `vshad` in a
//! network namespace of the test's own (loopback addresses for the agents,
//! a veth carrying the vserver IP), a real vserver context started
//! by the agents, its tree replicated by them. Faults: SIGKILL of the
//! holder's agent, SIGSTOP of the holder's agent for longer than the lease.
//!
//! A watcher samples every 20 ms which nodes have processes in the
//! vserver's cgroup; two at once fails the test. Everything the test makes
//! (namespace, processes, cgroups, dirs) is removed when it ends, also when
//! it fails. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const VSHAD: &str = env!("CARGO_BIN_EXE_vshad");
const VSHA: &str = env!("CARGO_BIN_EXE_vsha");
const PATIENCE: Duration = Duration::from_secs(90);
const VS: &str = "web";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace with lo up and a veth `vs0` for vserver IPs.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns(name.to_string());
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // A veth pair (this kernel has no dummy driver): the vserver IPs go
        // on vs0; vs0p is the "LAN" side, where nobody answers ARP.
        ns.exec(&[
            "ip", "link", "add", "vs0", "type", "veth", "peer", "name", "vs0p",
        ]);
        ns.exec(&["ip", "link", "set", "vs0", "up"]);
        ns.exec(&["ip", "link", "set", "vs0p", "up"]);
        ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "vs0"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args))
    }

    fn has_addr(&self, ip: &str) -> bool {
        let out = self.exec(&["ip", "-4", "-o", "addr", "show", "dev", "vs0"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn cgroup2_root() -> PathBuf {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mi.lines() {
        if let Some((pre, post)) = line.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                return PathBuf::from(pre.split(' ').nth(4).unwrap());
            }
        }
    }
    panic!("no cgroup2 mount");
}

/// Kills and removes the cgroup trees of the test's nodes.
struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(200));
        for dir in &self.0 {
            remove_cgroup_tree(dir);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn populated(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.events"))
        .is_ok_and(|s| s.lines().any(|l| l == "populated 1"))
}

struct Agent {
    id: u64,
    addr: String,
    ns: String,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    cgroup: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self, initial: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the
        // cgroup2 mount from the agent.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args([VSHAD, "--config"])
            .arg(&self.config)
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--initial-cluster", initial])
            .env(
                "VSHA_LOG",
                "info,raft=warn,raft_engine=warn,h2=warn,vsha_sync=warn",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn vshad");
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The vserver has processes in this node's cgroup.
    fn runs(&self) -> bool {
        populated(&self.cgroup.join(VS))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    ns: Netns,
    agents: Vec<Agent>,
    dir: tempfile::TempDir,
    _cgroups: Cgroups,
}

impl Cluster {
    fn vsha(&self, via: usize, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.0))
            .args([VSHA, "--endpoint", &self.agents[via].addr])
            .args(args)
            .output()
            .expect("spawn vsha")
    }

    fn ok(&self, via: usize, args: &[&str]) -> String {
        let out = self.vsha(via, args);
        assert!(
            out.status.success(),
            "vsha {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Status through any agent that answers (some may be down).
    fn status(&self) -> Option<Value> {
        for (i, a) in self.agents.iter().enumerate() {
            if a.child.is_none() {
                continue;
            }
            let out = self.vsha(i, &["status", "--json"]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).ok();
            }
        }
        None
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for a in &self.agents {
            s.push_str(&format!("\n---- log of node {} ----\n", a.id));
            let text = std::fs::read_to_string(&a.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn wait_for(&self, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#}\n{}",
            self.logs()
        );
    }
}

fn vserver(s: &Value) -> &Value {
    s["vservers"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == VS))
        .unwrap_or(&Value::Null)
}

/// Held by node `node` at a generation above `above`, and reported running.
fn runs_on(s: &Value, node: u64, above: u64) -> bool {
    let v = vserver(s);
    v["placement"]["node"] == node
        && v["placement"]["generation"].as_u64().unwrap_or(0) > above
        && v["runtime"]["state"] == "running"
}

fn generation(s: &Value) -> u64 {
    vserver(s)["placement"]["generation"].as_u64().unwrap_or(0)
}

/// Samples which nodes run the vserver; records any instant with two.
struct Watcher {
    stop: Arc<AtomicBool>,
    violation: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(cgroups: Vec<PathBuf>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let violation = Arc::new(Mutex::new(None));
        let (s, v) = (Arc::clone(&stop), Arc::clone(&violation));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let running: Vec<usize> = cgroups
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| populated(&c.join(VS)))
                    .map(|(i, _)| i + 1)
                    .collect();
                if running.len() > 1 {
                    *v.lock().unwrap() = Some(format!("nodes {running:?} ran {VS} at once"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watcher {
            stop,
            violation,
            thread: Some(thread),
        }
    }

    fn check(&self) {
        if let Some(v) = self.violation.lock().unwrap().clone() {
            panic!("split brain: {v}");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cluster(tag: &str, extra_config: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let run = format!("vsf{}{tag}", std::process::id() % 100_000);
    let root = cgroup2_root();
    let ns = Netns::new(&run);
    let mut agents = Vec::new();
    let mut cgroups = Vec::new();
    for id in 1..=3u64 {
        let node_dir = dir.path().join(format!("n{id}"));
        std::fs::create_dir_all(node_dir.join("vservers")).unwrap();
        let parent = format!("{run}-n{id}");
        let config = node_dir.join("vshad.toml");
        std::fs::write(
            &config,
            format!(
                "profile = \"fast\"\nvserver_root = \"{}\"\ncgroup_parent = \"{parent}\"\n{extra_config}\n",
                node_dir.join("vservers").display()
            ),
        )
        .unwrap();
        cgroups.push(root.join(&parent));
        agents.push(Agent {
            id,
            // The namespace is the test's own: fixed ports cannot collide.
            addr: format!("127.0.0.{id}:7700"),
            ns: run.clone(),
            data: node_dir.join("data"),
            config,
            log: node_dir.join("vshad.log"),
            cgroup: root.join(&parent),
            child: None,
        });
    }
    Cluster {
        ns,
        agents,
        dir,
        _cgroups: Cgroups(cgroups),
    }
}

/// Node 3 is a witness: it votes, so the two-node pair 1+2 keeps a
/// majority when either dies, and it never runs the vserver.
fn initial(c: &Cluster) -> String {
    c.agents
        .iter()
        .map(|a| {
            let role = if a.id == 3 { "/witness" } else { "" };
            format!("{}={}{role}", a.id, a.addr)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A busybox tree for the vserver on node 1 only; the others get it by
/// replication.
fn build_tree(c: &Cluster) {
    let tree = c.dir.path().join("n1/vservers").join(VS);
    let cfg = c.dir.path().join("buildcfg");
    let out = Command::new(VSHA)
        .arg("--config-dir")
        .arg(&cfg)
        .args(["vserver", "build", VS, "--tree"])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(tree.join("counter"), "41\n").unwrap();
}

#[test]
fn failover_after_agent_death_and_after_a_stopped_agent() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: run scripts/setup (busybox-static)"
    );
    let mut c = cluster("a", "replication_interval_ms = 300");
    build_tree(&c);
    let init = initial(&c);
    for a in c.agents.iter_mut() {
        a.start(&init);
    }
    let watcher = Watcher::start(c.agents.iter().map(|a| a.cgroup.clone()).collect());
    c.wait_for("a leader and three members", |s| {
        s["leader"].as_u64().unwrap_or(0) != 0
            && s["nodes"].as_array().is_some_and(|n| n.len() == 3)
    });
    c.ok(
        0,
        &[
            "vserver",
            "add",
            VS,
            "--ip",
            "10.77.0.50/24",
            "--dev",
            "vs0",
            "--start",
            "/bin/busybox sleep 100000",
        ],
    );
    c.ok(0, &["pair", "add", VS, "--primary", "1", "--standby", "2"]);

    // Placed on the primary, started, its IP up, replicated to the standby.
    let s = c.wait_for("web running on node 1 with a replica on node 2", |s| {
        runs_on(s, 1, 0) && vserver(s)["runtime"]["replicas"][0]["lag_ms"].is_u64()
    });
    let g1 = generation(&s);
    assert!(c.agents[0].runs());
    assert!(c.ns.has_addr("10.77.0.50"));
    let replica = c
        .dir
        .path()
        .join("n2/vservers/.replicas")
        .join(VS)
        .join("counter");
    assert_eq!(std::fs::read_to_string(&replica).unwrap(), "41\n");

    // What-if: node 1 down moves web to node 2.
    let sim = c.ok(1, &["simulate", "node-down", "1", "--json"]);
    let sim: Value = serde_json::from_str(&sim).unwrap();
    assert_eq!(sim["moves"][0]["to"], 2, "{sim:#}");

    // 1. The holder's agent is SIGKILLed: its guard kills the vserver at
    // once, and the survivors restart it on node 2 after the lease.
    c.agents[0].kill9();
    let s = c.wait_for("web running on node 2", |s| runs_on(s, 2, g1));
    let g2 = generation(&s);
    assert!(c.agents[1].runs());
    assert!(
        !c.agents[0].runs(),
        "node 1 still runs web after its agent died"
    );
    assert!(c.ns.has_addr("10.77.0.50"), "the IP moved with the vserver");
    watcher.check();

    // The old node comes back and does not run it; it becomes the standby
    // and gets the tree from node 2 (the direction reversed).
    c.agents[0].start(&init);
    c.wait_for("node 1 back with a fresh replica", |s| {
        runs_on(s, 2, g1)
            && vserver(s)["runtime"]["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x["node"] == 1 && x["lag_ms"].is_u64()))
    });
    assert!(!c.agents[0].runs());
    watcher.check();

    // 2. The holder's agent is stopped (SIGSTOP) beyond its lease: its
    // guard fences the vserver; the cluster moves it back to node 1.
    c.agents[1].signal(nix::sys::signal::Signal::SIGSTOP);
    let s = c.wait_for("web running on node 1 again", |s| runs_on(s, 1, g2));
    assert!(
        !c.agents[1].runs(),
        "the stopped agent's vserver still runs"
    );
    let g3 = generation(&s);
    assert!(g3 > g2);
    c.agents[1].signal(nix::sys::signal::Signal::SIGCONT);
    // Resumed, node 2 learns it lost the vserver and never runs it again.
    std::thread::sleep(Duration::from_secs(2));
    let s = c.wait_for("web still on node 1", |s| runs_on(s, 1, g2));
    assert_eq!(generation(&s), g3);
    assert!(!c.agents[1].runs());
    assert!(!c.agents[2].runs(), "the witness ran the vserver");
    let s = c.status().unwrap();
    let witness = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 3)
        .unwrap();
    assert_eq!(witness["role"], "witness");
    watcher.check();

    // The events tell the story.
    let ev = c.ok(0, &["events", "--json"]);
    eprintln!("{ev}\n{}", c.ok(0, &["events"]));
    for kind in ["node_lost", "failover_done", "started"] {
        assert!(
            ev.contains(&format!("\"kind\":\"{kind}\"")),
            "no {kind} event in:\n{ev}"
        );
    }
    drop(watcher);
}

fn events(c: &Cluster) -> Vec<Value> {
    c.ok(0, &["events", "--json"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_event(c: &Cluster, kind: &str, after: u64) -> Value {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Some(e) = events(c)
            .into_iter()
            .find(|e| e["kind"] == kind && e["seq"].as_u64().unwrap_or(0) > after)
        {
            return e;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no {kind} event after seq {after}\n{}", c.logs());
}

fn last_seq(c: &Cluster) -> u64 {
    events(c)
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn health_restart_migration_drain_and_refused_takeover() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: run scripts/setup (busybox-static)"
    );
    // Rounds are rare here, so the final delta of a migration is what
    // carries the last write; restarts never run out.
    let mut c = cluster("b", "replication_interval_ms = 4000\nmax_restarts = 1000");
    build_tree(&c);
    let init = initial(&c);
    for a in c.agents.iter_mut() {
        a.start(&init);
    }
    let watcher = Watcher::start(c.agents.iter().map(|a| a.cgroup.clone()).collect());
    c.wait_for("a leader and three members", |s| {
        s["leader"].as_u64().unwrap_or(0) != 0
            && s["nodes"].as_array().is_some_and(|n| n.len() == 3)
    });
    c.ok(
        2,
        &[
            "vserver",
            "add",
            VS,
            "--ip",
            "10.77.0.50/24",
            "--dev",
            "vs0",
            "--start",
            "/bin/busybox sleep 100000",
            "--health-cmd",
            "/bin/busybox test ! -e /fail",
            "--health-interval",
            "300",
            "--health-fall",
            "2",
            "--health-rise",
            "1",
        ],
    );
    c.ok(2, &["pair", "add", VS, "--primary", "1", "--standby", "2"]);
    let s = c.wait_for("web on node 1 with a replica on node 2", |s| {
        runs_on(s, 1, 0) && vserver(s)["runtime"]["replicas"][0]["lag_ms"].is_u64()
    });
    let g1 = generation(&s);
    let tree1 = c.dir.path().join("n1/vservers").join(VS);

    // Health: a failing check restarts it in place; fixed, it runs on.
    let seq = last_seq(&c);
    std::fs::write(tree1.join("fail"), "").unwrap();
    let ev = wait_event(&c, "health_failed", seq);
    assert!(
        ev["message"].as_str().unwrap().contains("exited with 1"),
        "{ev}"
    );
    wait_event(&c, "restarted", seq);
    std::fs::remove_file(tree1.join("fail")).unwrap();
    let s = c.wait_for("web healthy again on node 1", |s| {
        runs_on(s, 1, 0) && vserver(s)["runtime"]["restarts"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(
        generation(&s),
        g1,
        "a restart in place keeps the generation"
    );

    // Planned migration: the last write before it arrives on node 2.
    std::fs::write(tree1.join("counter"), "42\n").unwrap();
    let out = c.ok(0, &["migrate", VS, "--to", "2"]);
    assert!(out.contains("migrated to node 2"), "{out}");
    let s = c.wait_for("web on node 2", |s| runs_on(s, 2, g1));
    let g2 = generation(&s);
    let tree2 = c.dir.path().join("n2/vservers/.replicas").join(VS);
    assert_eq!(
        std::fs::read_to_string(tree2.join("counter")).unwrap(),
        "42\n",
        "the migration lost a write"
    );
    assert!(c.agents[1].runs() && !c.agents[0].runs());

    // Drain node 2: everything goes back to node 1.
    c.ok(0, &["node", "drain", "2"]);
    let s = c.wait_for("web back on node 1", |s| runs_on(s, 1, g2));
    let g3 = generation(&s);
    c.ok(0, &["node", "admin", "2", "active"]);

    // Disable, then an address conflict: the takeover is refused with an
    // event; once the other owner is gone, it starts.
    c.ok(0, &["vserver", "disable", VS]);
    c.wait_for("web stopped", |s| {
        vserver(s)["runtime"]["state"] == "stopped"
    });
    assert!(!c.agents[0].runs());
    let seq = last_seq(&c);
    c.ns.exec(&["ip", "addr", "add", "10.77.0.50/24", "dev", "vs0p"]);
    c.ok(0, &["vserver", "enable", VS]);
    let ev = wait_event(&c, "takeover_refused", seq);
    assert!(
        ev["message"].as_str().unwrap().contains("10.77.0.50"),
        "{ev}"
    );
    assert!(!c.agents[0].runs());
    c.ns.exec(&["ip", "addr", "del", "10.77.0.50/24", "dev", "vs0p"]);
    let s = c.wait_for("web running after the conflict is gone", |s| {
        vserver(s)["runtime"]["state"] == "running"
    });
    assert_eq!(generation(&s), g3);
    watcher.check();
    drop(watcher);
}
