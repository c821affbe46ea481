//! A real vsha cluster on one machine, for tests and the failover
//! benchmark: N `vshad` processes in a network namespace of the run's own
//! (agents on 127.0.0.N, a veth `vs0` carrying vserver IPs whose peer `vs0p`
//! plays the LAN), each node with its own data dir, vserver root and cgroup
//! parent, driven through the real `vsha` CLI.
//!
//! This is test support: setup failures panic with the command and its
//! output. Everything a cluster makes — namespace, processes, cgroups,
//! dirs — is removed when it is dropped, also when a test panics; names
//! carry the process id and a tag so two runs never collide.
//!
//! The binaries are found beside the running executable (`target/*/`),
//! or in `VSHA_BIN_DIR`; build them first (`cargo build --bins`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How long a wait may take on a slow, shared machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `vshad` or `vsha`.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("VSHA_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found near {}: run `cargo build --bins` first (or set VSHA_BIN_DIR)",
        exe.display()
    );
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

/// A network namespace with lo up and a veth pair `vs0`/`vs0p`.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Netns {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns(name.to_string());
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // The kernel here has no dummy driver; a veth pair does: vserver
        // IPs go on vs0, vs0p is the LAN side where nobody answers ARP.
        ns.exec(&[
            "ip", "link", "add", "vs0", "type", "veth", "peer", "name", "vs0p",
        ]);
        ns.exec(&["ip", "link", "set", "vs0", "up"]);
        ns.exec(&["ip", "link", "set", "vs0p", "up"]);
        ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "vs0"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args))
    }

    /// A command in the namespace's network only (`ip netns exec` would
    /// remount /sys and hide the cgroup2 mount).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0)).arg(program);
        c
    }

    pub fn has_addr(&self, ip: &str) -> bool {
        let out = self.exec(&["ip", "-4", "-o", "addr", "show", "dev", "vs0"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn cgroup2_root() -> PathBuf {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in mi.lines() {
        if let Some((pre, post)) = line.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                if let Some(mnt) = pre.split(' ').nth(4) {
                    return PathBuf::from(mnt);
                }
            }
        }
    }
    panic!("no cgroup2 mount");
}

/// Kills and removes the cgroup trees of the cluster's nodes.
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

pub fn populated(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.events"))
        .is_ok_and(|s| s.lines().any(|l| l == "populated 1"))
}

pub struct Agent {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// This node's cgroup parent directory.
    pub cgroup: PathBuf,
    config: PathBuf,
    ns: String,
    child: Option<Child>,
}

impl Agent {
    pub fn start(&mut self, initial: &str) {
        assert!(self.child.is_none(), "node {} already runs", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(binary("vshad"))
            .arg("--config")
            .arg(&self.config)
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--initial-cluster", initial])
            .env(
                "VSHA_LOG",
                "info,raft=warn,raft_engine=warn,h2=warn,vsha_sync=warn",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vshad");
        self.child = Some(child);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent runs").id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGKILL (after SIGCONT, should it be stopped) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The vserver `name` has processes on this node.
    pub fn runs(&self, name: &str) -> bool {
        populated(&self.cgroup.join(name))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What to build.
pub struct Builder {
    nodes: u64,
    witnesses: Vec<u64>,
    config: Vec<String>,
    tag: String,
}

impl Builder {
    /// `id` votes but runs no vservers.
    pub fn witness(mut self, id: u64) -> Self {
        self.witnesses.push(id);
        self
    }

    /// A line for every node's vshad.toml (`profile = "fast"` is there by
    /// default; a later line wins).
    pub fn config(mut self, line: &str) -> Self {
        self.config.push(line.to_string());
        self
    }

    /// Distinguishes clusters of one process.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.to_string();
        self
    }

    /// Creates everything and starts the agents; waits for a leader and
    /// every member.
    pub fn start(self) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = format!("vsc{}{}", std::process::id() % 100_000, self.tag);
        let root = cgroup2_root();
        let ns = Netns::new(&run);
        let mut agents = Vec::new();
        let mut cgroups = Vec::new();
        let mut profile = vec!["profile = \"fast\"".to_string()];
        profile.extend(self.config.iter().cloned());
        for id in 1..=self.nodes {
            let node_dir = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(node_dir.join("vservers")).expect("mkdir");
            let parent = format!("{run}-n{id}");
            let config = node_dir.join("vshad.toml");
            let mut text = format!(
                "vserver_root = \"{}\"\ncgroup_parent = \"{parent}\"\n",
                node_dir.join("vservers").display()
            );
            // TOML refuses a key twice: the last setting of a key wins here.
            let mut seen = std::collections::BTreeMap::new();
            for l in &profile {
                if let Some((k, _)) = l.split_once('=') {
                    seen.insert(k.trim().to_string(), l.clone());
                }
            }
            for l in seen.values() {
                text.push_str(l);
                text.push('\n');
            }
            std::fs::write(&config, text).expect("config");
            cgroups.push(root.join(&parent));
            agents.push(Agent {
                id,
                // The namespace is the run's own: fixed ports cannot collide.
                addr: format!("127.0.0.{id}:7700"),
                dir: node_dir.clone(),
                log: node_dir.join("vshad.log"),
                cgroup: root.join(&parent),
                config,
                ns: run.clone(),
                child: None,
            });
        }
        let initial = agents
            .iter()
            .map(|a| {
                let role = if self.witnesses.contains(&a.id) {
                    "/witness"
                } else {
                    ""
                };
                format!("{}={}{role}", a.id, a.addr)
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            agents,
            initial,
            _cgroups: Cgroups(cgroups),
            ns,
            dir,
        };
        for i in 0..c.agents.len() {
            let init = c.initial.clone();
            c.agents[i].start(&init);
        }
        let n = self.nodes as usize;
        c.wait_for("a leader and every member", |s| {
            s["leader"].as_u64().unwrap_or(0) != 0
                && s["nodes"].as_array().is_some_and(|v| v.len() == n)
        });
        c
    }
}

pub struct Cluster {
    pub agents: Vec<Agent>,
    pub initial: String,
    // Dropped in this order: agents (above) first, then cgroups, the
    // namespace, the dirs.
    _cgroups: Cgroups,
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `Cluster::new(3).witness(3).config("max_restarts = 9").start()`
    #[allow(clippy::new_ret_no_self)]
    pub fn new(nodes: u64) -> Builder {
        Builder {
            nodes,
            witnesses: Vec::new(),
            config: Vec::new(),
            tag: String::new(),
        }
    }

    pub fn agent(&mut self, id: u64) -> &mut Agent {
        &mut self.agents[id as usize - 1]
    }

    pub fn restart(&mut self, id: u64) {
        let init = self.initial.clone();
        self.agent(id).start(&init);
    }

    /// `vsha` through node `via` (1-based).
    pub fn vsha(&self, via: u64, args: &[&str]) -> Output {
        self.ns
            .command(&binary("vsha"))
            .args(["--endpoint", &self.agents[via as usize - 1].addr])
            .args(args)
            .output()
            .expect("spawn vsha")
    }

    pub fn ok(&self, via: u64, args: &[&str]) -> String {
        let out = self.vsha(via, args);
        assert!(
            out.status.success(),
            "vsha {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vsha status --json` through any agent that answers.
    pub fn status(&self) -> Option<Value> {
        for a in &self.agents {
            if !a.running() {
                continue;
            }
            let out = self.vsha(a.id, &["status", "--json"]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).ok();
            }
        }
        None
    }

    /// The last lines of every agent's log.
    pub fn logs(&self) -> String {
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

    pub fn wait_for(&self, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#}\n{}",
            self.logs()
        );
    }

    /// A busybox tree for `name` on node `node` (`vsha vserver build`),
    /// with `files` written into it.
    pub fn build_tree(&self, node: u64, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let tree = self.dir.path().join(format!("n{node}/vservers")).join(name);
        let out = Command::new(binary("vsha"))
            .arg("--config-dir")
            .arg(self.dir.path().join("buildcfg"))
            .args(["vserver", "build", name, "--tree"])
            .arg(&tree)
            .output()
            .expect("vsha vserver build");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (path, text) in files {
            let p = tree.join(path);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).expect("mkdir");
            }
            std::fs::write(p, text).expect("write");
        }
        tree
    }

    /// The replica of `name` that node `node` received.
    pub fn replica(&self, node: u64, name: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("n{node}/vservers/.replicas"))
            .join(name)
    }

    /// `vsha events --json`, parsed.
    pub fn events(&self) -> Vec<Value> {
        for a in &self.agents {
            if !a.running() {
                continue;
            }
            let out = self.vsha(a.id, &["events", "--json"]);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
            }
        }
        Vec::new()
    }

    pub fn last_event_seq(&self) -> u64 {
        self.events()
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// The first event of `kind` after `after` (a leader change restarts
    /// the numbering: then any event of that kind counts).
    pub fn wait_event(&self, kind: &str, after: u64) -> Value {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["kind"] == kind && e["seq"].as_u64().unwrap_or(0) > after)
            {
                return e;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {kind} event after seq {after}\n{}", self.logs());
    }

    /// Watches the cgroups of every node for `name`.
    pub fn watch(&self, name: &str) -> Watcher {
        Watcher::start(self.agents.iter().map(|a| a.cgroup.join(name)).collect())
    }
}

/// Views of a `vsha status --json` document.
pub mod status {
    use serde_json::Value;

    pub fn vserver<'a>(s: &'a Value, name: &str) -> &'a Value {
        s["vservers"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .unwrap_or(&Value::Null)
    }

    /// Held by `node` at a generation above `above`, reported running.
    pub fn runs_on(s: &Value, name: &str, node: u64, above: u64) -> bool {
        let v = vserver(s, name);
        v["placement"]["node"] == node
            && v["placement"]["generation"].as_u64().unwrap_or(0) > above
            && v["runtime"]["state"] == "running"
    }

    pub fn generation(s: &Value, name: &str) -> u64 {
        vserver(s, name)["placement"]["generation"]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn holder(s: &Value, name: &str) -> Option<u64> {
        vserver(s, name)["placement"]["node"].as_u64()
    }

    /// `node` has a complete replica of `name`.
    pub fn has_replica(s: &Value, name: &str, node: u64) -> bool {
        vserver(s, name)["runtime"]["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["node"] == node && x["lag_ms"].is_u64()))
    }
}

/// Samples every 20 ms which nodes have processes of one vserver; any
/// instant with two is recorded as a split brain.
pub struct Watcher {
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
                    .filter(|(_, c)| populated(c))
                    .map(|(i, _)| i + 1)
                    .collect();
                if running.len() > 1 {
                    if let Ok(mut g) = v.lock() {
                        *g = Some(format!("nodes {running:?} ran it at once"));
                    }
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

    /// Panics if a split brain was seen.
    pub fn check(&self) {
        if let Some(v) = self.violation.lock().ok().and_then(|g| g.clone()) {
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
