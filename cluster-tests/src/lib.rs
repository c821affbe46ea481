//! A real vsha cluster on one machine, for tests and the failover
//! benchmark: N `vshad` processes, each in a network namespace of its own
//! (its "machine"), joined by veths to a bridge in a switch namespace; a
//! client namespace on the same LAN probes the vservers (see [`net`] and
//! [`check`]). Agents talk over the bridge (10.77.0.N:7700); each node has
//! its own data dir, vserver root, cgroup parent and `eth0` (IPROOTDEV).
//! Each vserver can run the demo service ([`Cluster::demo_tree`]): busybox
//! httpd whose CGI answers `node=N counter=K end`, the counter persisted in the
//! vserver's tree and incremented on every request. Everything is driven
//! through the real `vsha` CLI.
//!
//! This is test support: setup failures panic with the command and its
//! output. Everything a cluster makes — namespace, processes, cgroups,
//! dirs — is removed when it is dropped, also when a test panics; names
//! carry the process id and a tag so two runs never collide.
//!
//! The binaries are found beside the running executable (`target/*/`),
//! or in `VSHA_BIN_DIR`; build them first (`cargo build --bins`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub mod check;
pub mod nemesis;
pub mod net;

pub use check::{Checker, Sample};
use net::{node_ip, vserver_ip, Net};

/// How long a wait may take on a slow, shared machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The agents' log filter: `VSHA_TEST_AGENT_LOG`, or info with the
/// replication rounds at debug (a failed round is what explains a stalled
/// migration in a failure's log).
fn agent_log_filter() -> String {
    std::env::var("VSHA_TEST_AGENT_LOG").unwrap_or_else(|_| {
        "info,raft=warn,raft_engine=warn,h2=warn,vsha_sync=warn,vsha_agent::failover::replication=debug".into()
    })
}

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

/// `vsha cert ARGS --dir PKI`, which must succeed.
fn make_certificate(args: &[&str], pki: &Path) {
    let out = Command::new(binary("vsha"))
        .arg("cert")
        .args(args)
        .arg("--dir")
        .arg(pki)
        .output()
        .expect("vsha cert");
    assert!(
        out.status.success(),
        "vsha cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills and removes the cgroup trees of the cluster's nodes.
struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        vsha_kernel::cgroup::kill_and_remove_trees(&self.0, Duration::from_secs(5));
    }
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
    /// The node's network namespace.
    pub ns: String,
    child: Option<Child>,
    stopped: bool,
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
            .env("VSHA_LOG", agent_log_filter())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vshad");
        self.child = Some(child);
        self.stopped = false;
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent runs").id() as i32
    }

    pub fn signal(&mut self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("kill");
        match sig {
            Signal::SIGSTOP => self.stopped = true,
            Signal::SIGCONT => self.stopped = false,
            _ => {}
        }
    }

    /// SIGKILL (after SIGCONT, should it be stopped) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
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

/// Unmounts the small vserver roots.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// What to build.
pub struct Builder {
    nodes: u64,
    witnesses: Vec<u64>,
    config: Vec<String>,
    tag: String,
    small_roots: Vec<(u64, String)>,
}

static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Builder {
    /// `id` votes but runs no vservers.
    pub fn witness(mut self, id: u64) -> Self {
        self.witnesses.push(id);
        self
    }

    /// A line for every node's vshad.toml (`profile = "fast"` and
    /// `lease_ms = 2000` are there by default, the lease only when the
    /// test picks no profile; a later line wins).
    pub fn config(mut self, line: &str) -> Self {
        self.config.push(line.to_string());
        self
    }

    /// Distinguishes clusters in logs (names are unique without it).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(2)
            .collect();
        self
    }

    /// Node `id`'s vserver root is a tmpfs of `size` (e.g. "512k"): a
    /// standby whose disk is full.
    pub fn small_root(mut self, id: u64, size: &str) -> Self {
        self.small_roots.push((id, size.to_string()));
        self
    }

    /// Creates everything and starts the agents; waits for a leader and
    /// every member.
    pub fn start(self) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // "v" + pid (≤ 7) + tag (≤ 2) + k: the namespace names add ≤ 3.
        let run = format!("v{}{}{}", std::process::id(), self.tag, k % 10);
        let root = cgroup2_root();
        let mut cgroups = Vec::new();
        for id in 1..=self.nodes {
            cgroups.push(root.join(format!("{run}-n{id}")));
        }
        let cgroups = Cgroups(cgroups);
        let net = Net::new(&run, self.nodes);
        let mut mounts = Mounts(Vec::new());
        let mut agents = Vec::new();
        // The fast profile with a 2 s lease (a node fences after 1.5 s
        // without a renewal): this machine is shared, and under a load of
        // 8-12 on 2 cores the fast 500 ms lease lapsed again and again
        // (agents starved for hundreds of ms), fencing vservers in the
        // middle of tests about migrations and health checks. A test that
        // picks a profile gets that profile's lease.
        let mut profile = vec!["profile = \"fast\"".to_string()];
        if !self.config.iter().any(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| k.trim() == "profile")
        }) {
            profile.push("lease_ms = 2000".to_string());
        }
        profile.extend(self.config.iter().cloned());
        // mTLS as in production, with certificates made by `vsha cert`.
        let pki = dir.path().join("pki");
        make_certificate(&["init"], &pki);
        make_certificate(&["client", "tests"], &pki);
        for id in 1..=self.nodes {
            let node_dir = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(node_dir.join("vservers")).expect("mkdir");
            if let Some((_, size)) = self.small_roots.iter().find(|(n, _)| *n == id) {
                let target = node_dir.join("vservers");
                net::run(
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vsha-test"])
                        .arg(&target),
                );
                mounts.0.push(target);
            }
            let parent = format!("{run}-n{id}");
            let config = node_dir.join("vshad.toml");
            make_certificate(&["node", &format!("n{id}")], &pki);
            let certs = pki.join(format!("nodes/n{id}"));
            let mut text = format!(
                "vserver_root = \"{}\"\ncgroup_parent = \"{parent}\"\n\
                 tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                node_dir.join("vservers").display(),
                certs.join("ca.crt").display(),
                certs.join("node.crt").display(),
                certs.join("node.key").display(),
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
            agents.push(Agent {
                id,
                addr: format!("{}:7700", node_ip(id)),
                dir: node_dir.clone(),
                log: node_dir.join("vshad.log"),
                cgroup: root.join(&parent),
                config,
                ns: net.node(id).0.clone(),
                child: None,
                stopped: false,
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
        let shared = Arc::new(Mutex::new(check::Shared::default()));
        let checker = Checker::start(
            net.client.path(),
            net.nodes.iter().map(|n| n.path()).collect(),
            cgroups.0.clone(),
            shared.clone(),
        );
        let mut c = Cluster {
            checker,
            agents,
            initial,
            shared,
            suspect: BTreeSet::new(),
            _cgroups: cgroups,
            net,
            _mounts: mounts,
            dir,
            vservers: 0,
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
    /// Runs through the whole life of the cluster; see [`check`].
    pub checker: Checker,
    pub agents: Vec<Agent>,
    pub initial: String,
    shared: Arc<Mutex<check::Shared>>,
    /// Nodes under a fault: their view of the cluster is not asked for.
    pub suspect: BTreeSet<u64>,
    // Dropped in this order: checker, agents (above) first, then cgroups,
    // the namespaces (and whatever still runs in them), mounts, the dirs.
    _cgroups: Cgroups,
    pub net: Net,
    _mounts: Mounts,
    pub dir: tempfile::TempDir,
    vservers: usize,
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
            small_roots: Vec::new(),
        }
    }

    pub fn agent(&mut self, id: u64) -> &mut Agent {
        &mut self.agents[id as usize - 1]
    }

    pub fn restart(&mut self, id: u64) {
        let init = self.initial.clone();
        self.agent(id).start(&init);
    }

    /// `vsha` through node `via` (1-based), from inside its namespace;
    /// gives up after 60 s (a stopped agent never answers).
    pub fn vsha(&self, via: u64, args: &[&str]) -> Output {
        let certs = self.dir.path().join("pki/clients/tests");
        Command::new("nsenter")
            .arg(format!("--net={}", self.net.node(via).path()))
            .args(["timeout", "-s", "KILL", "60"])
            .arg(binary("vsha"))
            .args(["--endpoint", &self.agents[via as usize - 1].addr])
            .arg("--tls-ca")
            .arg(certs.join("ca.crt"))
            .arg("--tls-cert")
            .arg(certs.join("client.crt"))
            .arg("--tls-key")
            .arg(certs.join("client.key"))
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

    fn askable(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .agents
            .iter()
            .filter(|a| a.running() && !a.stopped && !self.suspect.contains(&a.id))
            .map(|a| a.id)
            .collect();
        v.extend(
            self.agents
                .iter()
                .filter(|a| a.running() && !a.stopped && self.suspect.contains(&a.id))
                .map(|a| a.id),
        );
        v
    }

    /// `vsha status --json` through any agent that answers (nodes under
    /// a fault last).
    /// A view a node serves as `stale` (it could not confirm it with a
    /// quorum) is used only when no node serves a current one.
    pub fn status(&self) -> Option<Value> {
        let mut stale = None;
        for id in self.askable() {
            let out = self.vsha(id, &["status", "--json"]);
            if out.status.success() {
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    if v["stale"] != true {
                        return Some(v);
                    }
                    stale.get_or_insert(v);
                }
            }
        }
        stale
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
        s.push_str(&self.checker.report());
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
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#}\n{}",
            self.logs()
        );
    }

    /// Waits (generously) for a condition on the machines themselves.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}\n{}", self.logs());
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

    /// A tree with the demo service on node `node`: busybox httpd whose CGI
    /// `/cgi-bin/c` answers `node=N counter=K`; the counter lives in
    /// `data/counter` and grows by one on every request.
    pub fn demo_tree(&self, node: u64, name: &str) -> PathBuf {
        let tree = self.build_tree(
            node,
            name,
            &[
                ("www/index.html", "vsha demo\n"),
                ("www/cgi-bin/c", DEMO_CGI),
                ("data/counter", "0\n"),
            ],
        );
        let cgi = tree.join("www/cgi-bin/c");
        let mut perm = std::fs::metadata(&cgi).expect("cgi").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&cgi, perm).expect("chmod");
        tree
    }

    /// The start command of the demo service on `ip`.
    pub fn demo_start(ip: &str) -> String {
        format!("/bin/busybox httpd -f -p {ip}:80 -h /www")
    }

    /// Records vserver `name` running the demo service on the next free
    /// IP, on `eth0`, paired (`primary`, then `standbys`); the checker
    /// watches it from now on. Returns the IP.
    pub fn add_demo(
        &mut self,
        via: u64,
        name: &str,
        primary: u64,
        standbys: &[u64],
        extra: &[&str],
        pair_extra: &[&str],
    ) -> String {
        let ip = vserver_ip(self.vservers);
        self.vservers += 1;
        let start = Self::demo_start(&ip);
        let ip_arg = format!("{ip}/24");
        let mut args = vec![
            "vserver", "add", name, "--ip", &ip_arg, "--dev", "eth0", "--start", &start,
        ];
        args.extend_from_slice(extra);
        self.ok(via, &args);
        self.watch(name, &ip);
        let p = primary.to_string();
        let ss: Vec<String> = standbys.iter().map(u64::to_string).collect();
        let mut args = vec!["pair", "add", name, "--primary", &p];
        for s in &ss {
            args.push("--standby");
            args.push(s);
        }
        args.extend_from_slice(pair_extra);
        self.ok(via, &args);
        ip
    }

    /// The checker watches vserver `name` on `ip` from now on.
    pub fn watch(&self, name: &str, ip: &str) {
        if let Ok(mut s) = self.shared.lock() {
            s.watched.push((name.to_string(), ip.to_string()));
        }
    }

    /// The replica of `name` that node `node` received.
    pub fn replica(&self, node: u64, name: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("n{node}/vservers/.replicas"))
            .join(name)
    }

    /// The counter in node `node`'s replica of `name`.
    pub fn replica_counter(&self, node: u64, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.replica(node, name).join("data/counter"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `vsha events --json`, parsed.
    pub fn events(&self) -> Vec<Value> {
        for id in self.askable() {
            let out = self.vsha(id, &["events", "--json"]);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
            }
        }
        Vec::new()
    }

    /// Where the leader's event log stands now.
    pub fn last_event_seq(&self) -> EventMark {
        let leader = self
            .status()
            .and_then(|s| s["leader"].as_u64())
            .unwrap_or(0);
        let seq = self
            .events()
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0);
        EventMark { leader, seq }
    }

    /// The first event of `kind` after `after`. Each leader keeps its own
    /// log: once the leader changed, any event of that kind in the new
    /// leader's log counts.
    pub fn wait_event(&self, kind: &str, after: EventMark) -> Value {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let leader = self
                .status()
                .and_then(|s| s["leader"].as_u64())
                .unwrap_or(0);
            let from = if leader == after.leader { after.seq } else { 0 };
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["kind"] == kind && e["seq"].as_u64().unwrap_or(0) > from)
            {
                return e;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {kind} event after {after:?}\n{}", self.logs());
    }

    /// Waits (generously) for an answer on `ip` after the checker's `mark`
    /// that `f` likes; panics with the agents' logs.
    pub fn wait_answer(
        &self,
        ip: &str,
        mark: usize,
        what: &str,
        f: impl FnMut(&Sample) -> bool,
    ) -> Sample {
        match self.checker.try_wait_answer(ip, mark, f) {
            Some(s) => s,
            None => panic!(
                "timed out waiting for {what} on {ip}; last answer {:?}; status {:#}\n{}",
                self.checker.last_answer(ip),
                self.status().unwrap_or_default(),
                self.logs()
            ),
        }
    }

    /// Panics if the invariant checker saw a violation.
    pub fn check(&self) {
        self.checker.check();
    }

    /// Checks the invariant and prints what the client saw.
    pub fn finish(&self) {
        eprintln!("{}", self.checker.report());
        self.checker.check();
    }

    // ---- faults ----

    /// SIGKILL of node `id`'s agent (its guard fences what it ran).
    pub fn kill_agent(&mut self, id: u64) {
        self.agent(id).kill9();
    }

    /// SIGSTOP / SIGCONT of node `id`'s agent.
    pub fn stop_agent(&mut self, id: u64) {
        self.suspect.insert(id);
        self.agent(id).signal(Signal::SIGSTOP);
    }

    pub fn cont_agent(&mut self, id: u64) {
        self.agent(id).signal(Signal::SIGCONT);
        self.suspect.remove(&id);
    }

    /// The whole node dies: its cable is pulled, then every process of
    /// its namespace (agent, guard, vservers) and its cgroups are killed
    /// at once, leaving no one to clean up.
    pub fn kill_node(&mut self, id: u64) {
        self.unplug(id);
        self.net.eth0(id, false);
        let cg = self.agents[id as usize - 1].cgroup.clone();
        for _ in 0..50 {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            let pids = self.net.node(id).pids();
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if pids.is_empty() && !populated(&cg) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent(id).kill9();
    }

    /// The dead node boots again: only its own address on `eth0`, cable
    /// in, agent started.
    pub fn revive_node(&mut self, id: u64) {
        self.net.flush_vserver_ips(id);
        self.net.eth0(id, true);
        self.plug(id);
        self.restart(id);
    }

    /// Node `id`'s cable out (the node runs on, alone).
    pub fn unplug(&mut self, id: u64) {
        self.suspect.insert(id);
        if let Ok(mut s) = self.shared.lock() {
            s.unplugged.insert(id);
        }
        self.net.cable(id, false);
    }

    pub fn plug(&mut self, id: u64) {
        self.net.cable(id, true);
        if let Ok(mut s) = self.shared.lock() {
            s.unplugged.remove(&id);
        }
        self.suspect.remove(&id);
    }

    /// Drop rules: the nodes in `minority` cannot reach the other nodes
    /// (the client still reaches everyone).
    pub fn partition(&mut self, minority: &[u64]) {
        let n = self.agents.len() as u64;
        for &a in minority {
            self.suspect.insert(a);
            for b in 1..=n {
                if !minority.contains(&b) {
                    self.net.cut(a, b);
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.net.heal();
        let unplugged = self
            .shared
            .lock()
            .map(|s| s.unplugged.clone())
            .unwrap_or_default();
        self.suspect.retain(|id| unplugged.contains(id));
    }

    /// `vsha status` of a node's own view (even one under a fault).
    pub fn status_via(&self, id: u64) -> Option<Value> {
        let out = self.vsha(id, &["status", "--json"]);
        if out.status.success() {
            serde_json::from_slice(&out.stdout).ok()
        } else {
            None
        }
    }
}

/// A position in the event log of one leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMark {
    pub leader: u64,
    pub seq: u64,
}

impl EventMark {
    /// Any event counts.
    pub const START: EventMark = EventMark { leader: 0, seq: 0 };
}

/// The demo service's CGI: counter + 1, persisted with a rename, and the
/// node's identity (the last octet of its own address, read from the
/// kernel's view of the namespace it shares).
///
/// It writes the whole response, status line included, in one `printf`:
/// busybox httpd then passes it on in one write(). Given only headers, httpd
/// writes its own status line first and the CGI's output in a second
/// write(), and a copy stopped between the two (a migration's stop, a
/// fence) left the client a `200 OK` with no body, which the checker once
/// took for an answer without a counter. The closing `end` lets the
/// checker refuse anything cut short.
pub const DEMO_CGI: &str = r#"#!/bin/busybox sh
f=/data/counter
n=$(/bin/busybox cat $f 2>/dev/null)
n=$((${n:-0}+1))
echo $n > $f.tmp && /bin/busybox mv $f.tmp $f
node=$(/bin/busybox awk '/\|--/{ip=$2} /host LOCAL/{split(ip,o,"."); if (o[1]==10 && o[2]==77 && o[4]+0<50) {print o[4]; exit}}' /proc/net/fib_trie)
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nnode=%s counter=%s end\n' "$node" "$n"
"#;

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
