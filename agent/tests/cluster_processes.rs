//! Real `vshad` processes on 127.0.0.1-3 (loopback only), each with its own
//! data dir, driven through the real `vsha` CLI, with mTLS on every link (as
//! in production). Every process is killed and every dir removed when the
//! test ends, also when it fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use vsha_agent::pki;
use vsha_agent::tls::Role;

const VSHAD: &str = env!("CARGO_BIN_EXE_vshad");
const VSHA: &str = env!("CARGO_BIN_EXE_vsha");
/// Generous: the machine may be busy; tests wait for conditions, not times.
const PATIENCE: Duration = Duration::from_secs(60);

/// One cluster CA for this test binary (every test cluster trusts it), in
/// the target's temp dir so it is made once and never left in /tmp.
fn pki_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-processes-pki");
        let _ = std::fs::remove_dir_all(&dir);
        pki::init_ca(&dir).unwrap();
        pki::issue(&dir, Role::Client, "tests", &[], &[]).unwrap();
        dir
    })
}

/// `--tls-*` flags for node `id` (its certificate is made on first use).
fn node_tls(id: u64) -> Vec<String> {
    static ISSUE: Mutex<()> = Mutex::new(());
    let bundle = pki_dir().join("nodes").join(format!("n{id}"));
    {
        let _one_at_a_time = ISSUE.lock().unwrap_or_else(|e| e.into_inner());
        if !bundle.exists() {
            pki::issue(pki_dir(), Role::Node, &format!("n{id}"), &[], &[]).unwrap();
        }
    }
    let f = |name: &str| bundle.join(name).display().to_string();
    vec![
        "--tls-ca".into(),
        f("ca.crt"),
        "--tls-cert".into(),
        f("node.crt"),
        "--tls-key".into(),
        f("node.key"),
    ]
}

fn client_bundle() -> PathBuf {
    pki_dir().join("clients").join("tests")
}

struct Agent {
    id: u64,
    addr: String,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(VSHAD)
            .arg("--config")
            .arg(&self.config)
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr])
            .arg("--data-dir")
            .arg(&self.data)
            .args(node_tls(self.id))
            .args(extra)
            .env("VSHA_LOG", "info,raft=warn,raft_engine=warn,h2=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn vshad");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the graceful path.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "node {} exited with {status} on SIGTERM",
                        self.id
                    );
                    return;
                }
                if Instant::now() >= deadline {
                    // Never leave it behind, even when the test fails here.
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("node {} ignored SIGTERM", self.id);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Owns the processes and their dir; Drop kills what is left.
struct Cluster {
    _dir: tempfile::TempDir,
    agents: Vec<Agent>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill9();
        }
        if std::thread::panicking() {
            for a in &self.agents {
                eprintln!("---- log of node {} ----\n{}", a.id, a.log_text());
            }
        }
    }
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Nodes 1..=n on 127.0.0.1..n, plus `spare` more configured but not started.
    fn new(n: u64, spare: u64) -> Cluster {
        // Small snapshot interval: new nodes catch up by snapshot.
        Cluster::with_config(
            n,
            spare,
            "snapshot_interval = 4\nheartbeat_interval_ms = 200\n",
        )
    }

    fn with_config(n: u64, spare: u64, toml: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let agents: Vec<Agent> = (1..=n + spare)
            .map(|id| {
                let ip = format!("127.0.0.{id}");
                let addr = format!("{ip}:{}", free_port(&ip));
                let config = dir.path().join(format!("node{id}.toml"));
                std::fs::write(&config, toml).unwrap();
                Agent {
                    id,
                    addr,
                    data: dir.path().join(format!("node{id}")),
                    config,
                    log: dir.path().join(format!("node{id}.log")),
                    child: None,
                }
            })
            .collect();
        let initial = agents[..n as usize]
            .iter()
            .map(|a| format!("{}={}", a.id, a.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster { _dir: dir, agents };
        for a in &mut c.agents[..n as usize] {
            a.start(&["--initial-cluster", &initial]);
        }
        c
    }

    fn agent(&mut self, id: u64) -> &mut Agent {
        &mut self.agents[id as usize - 1]
    }

    fn addr(&self, id: u64) -> String {
        self.agents[id as usize - 1].addr.clone()
    }
}

fn vsha(endpoint: &str, args: &[&str]) -> Output {
    let b = client_bundle();
    Command::new(VSHA)
        .env("VSHA_TLS_CA", b.join("ca.crt"))
        .env("VSHA_TLS_CERT", b.join("client.crt"))
        .env("VSHA_TLS_KEY", b.join("client.key"))
        .args(["--endpoint", endpoint])
        .args(args)
        .output()
        .expect("run vsha")
}

fn vsha_ok(endpoint: &str, args: &[&str]) -> String {
    let out = vsha(endpoint, args);
    assert!(
        out.status.success(),
        "vsha {args:?} via {endpoint} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(endpoint: &str, args: &[&str]) -> Option<Value> {
    let out = vsha(endpoint, args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every listed agent's `vsha status --json` names the same
/// leader (not `not`) and returns it.
fn agreed_leader(c: &Cluster, ids: &[u64], not: u64) -> u64 {
    wait_for("agreement on a leader", || {
        let leaders: Vec<u64> = ids
            .iter()
            .filter_map(|id| json(&c.addr(*id), &["status", "--json"]))
            // Bootstrapped: the first leader's member list is applied.
            .filter(|v| v["cluster_id"].as_str().is_some_and(|s| !s.is_empty()))
            .filter_map(|v| v["leader"].as_u64())
            .collect();
        let first = *leaders.first()?;
        (leaders.len() == ids.len()
            && first != 0
            && first != not
            && leaders.iter().all(|l| *l == first))
        .then_some(first)
    })
}

fn vserver_names(endpoint: &str) -> Option<Vec<String>> {
    let v = json(endpoint, &["vserver", "list", "--json"])?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|x| x["name"].as_str().map(String::from))
            .collect(),
    )
}

fn membership(endpoint: &str, id: u64) -> Option<String> {
    let v = json(endpoint, &["node", "list", "--json"])?;
    v.as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
        .and_then(|n| n["membership"].as_str().map(String::from))
}

#[test]
fn three_agents_elect_survive_restart_and_change_membership() {
    let mut c = Cluster::new(3, 1);

    // A leader is elected, and every agent's status agrees on it.
    let leader = agreed_leader(&c, &[1, 2, 3], 0);
    let status = json(&c.addr(1), &["status", "--json"]).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["role"], "voter");
        assert!(n["addr"].as_str().unwrap().starts_with("127.0.0."));
    }
    assert!(status["term"].as_u64().unwrap() >= 1);
    // The leader's liveness view comes to see every node, with the way
    // each confines vservers to their IP (stock kernels here: cgroup-BPF).
    wait_for("all nodes reachable", || {
        let s = json(&c.addr(leader), &["status", "--json"])?;
        s["nodes"]
            .as_array()?
            .iter()
            .all(|n| n["reachable"] == true && n["ipv4root"] == "cgroup-bpf")
            .then_some(())
    });
    vsha_ok(
        &c.addr(2),
        &["vserver", "add", "web", "--ip", "10.20.0.5/24"],
    );

    // SIGKILL the leader: the survivors elect another, and a write through a
    // survivor succeeds.
    c.agent(leader).kill9();
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    let new_leader = agreed_leader(&c, &survivors, leader);
    assert_ne!(new_leader, leader);
    let via = c.addr(survivors[0]);
    vsha_ok(&via, &["vserver", "add", "db", "--ip", "10.20.0.6"]);
    let s = json(&via, &["status", "--json"]).unwrap();
    let dead = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"].as_u64() == Some(leader))
        .unwrap()
        .clone();
    assert_eq!(
        dead["reachable"], false,
        "a killed node must not look reachable"
    );

    // The killed node comes back from its data dir and catches up.
    c.agent(leader).start(&[]);
    wait_for("the restarted node to see both vservers", || {
        let names = vserver_names(&c.addr(leader))?;
        (names == ["db", "web"]).then_some(())
    });

    // Restart all three (graceful): nothing is lost.
    for id in 1..=3 {
        c.agent(id).stop();
    }
    for id in 1..=3 {
        c.agent(id).start(&[]);
    }
    agreed_leader(&c, &[1, 2, 3], 0);
    for id in 1..=3 {
        let names = wait_for("vservers after a full restart", || {
            vserver_names(&c.addr(id))
        });
        assert_eq!(names, ["db", "web"], "node {id} lost state over a restart");
    }

    // Add node 4: a learner until it runs and catches up, then a voter.
    let a4 = c.addr(4);
    vsha_ok(&c.addr(1), &["node", "add", "4", &a4]);
    assert_eq!(membership(&c.addr(1), 4).as_deref(), Some("learner"));
    let join = c.addr(2);
    c.agent(4).start(&["--join", &join]);
    wait_for("node 4 to become a voter", || {
        (membership(&c.addr(1), 4)? == "voter").then_some(())
    });
    let names = wait_for("node 4 to hold the state", || {
        let n = vserver_names(&a4)?;
        (n.len() == 2).then_some(n)
    });
    assert_eq!(names, ["db", "web"]);
    // Its log was compacted away long ago: it caught up by snapshot over Peer.
    assert!(
        c.agent(4)
            .log_text()
            .contains("installed snapshot from the leader"),
        "node 4 should have caught up by snapshot"
    );

    // Remove node 4 again.
    vsha_ok(&c.addr(3), &["node", "rm", "4"]);
    wait_for("node 4 gone from the member list", || {
        membership(&c.addr(1), 4).is_none().then_some(())
    });
    c.agent(4).kill9();
    let s = json(&c.addr(1), &["status", "--json"]).unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3);
    // The cluster still takes writes with its three voters.
    vsha_ok(&c.addr(3), &["vserver", "rm", "db"]);
    assert_eq!(vserver_names(&c.addr(1)).unwrap(), ["web"]);
}

#[test]
fn bad_requests_name_the_field_and_change_nothing() {
    let c = Cluster::new(3, 0);
    agreed_leader(&c, &[1, 2, 3], 0);
    let ep = c.addr(3);
    vsha_ok(&ep, &["vserver", "add", "web", "--ip", "10.30.0.5"]);
    let before = vsha_ok(&ep, &["status", "--json"]);
    let before: Value = serde_json::from_str(&before).unwrap();

    let cases: &[(&[&str], &str)] = &[
        (&["vserver", "add", "web", "--ip", "10.30.0.6"], "name"),
        (&["vserver", "add", "other", "--ip", "10.30.0.5"], "ip"),
        (&["vserver", "add", "bad", "--ip", "10.30.0"], "ip"),
        (&["vserver", "add", "bad", "--ip", "10.30.0.9/40"], "prefix"),
        (&["vserver", "add", "Bad Name", "--ip", "10.30.0.9"], "name"),
        (&["vserver", "rm", "nope"], "name"),
        (&["node", "rm", "9"], "id"),
        (&["node", "add", "5", "127.0.0.1"], "addr"),
        (&["node", "add", "2", "127.0.0.9:7000"], "id"),
        (
            &["pair", "add", "web", "--primary", "1", "--standby", "9"],
            "nodes",
        ),
    ];
    for (args, field) in cases {
        let out = vsha(&ep, args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "vsha {args:?} should fail with exit 1"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field),
            "error for {args:?} should name `{field}`: {err}"
        );
    }
    let after: Value = serde_json::from_str(&vsha_ok(&ep, &["status", "--json"])).unwrap();
    assert_eq!(
        before["vservers"], after["vservers"],
        "a refused request changed vservers"
    );
    assert_eq!(
        before["nodes"].as_array().unwrap().len(),
        after["nodes"].as_array().unwrap().len()
    );

    // Usage errors exit 2.
    let out = vsha(&ep, &["vserver", "add", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn lost_quorum_is_unavailable_and_stale_reads_still_answer() {
    let mut c = Cluster::new(3, 0);
    let leader = agreed_leader(&c, &[1, 2, 3], 0);
    vsha_ok(&c.addr(1), &["vserver", "add", "web", "--ip", "10.40.0.5"]);
    wait_for("node 3 applied the write", || {
        (vserver_names(&c.addr(3))? == ["web"]).then_some(())
    });
    // Keep node 3 only (it may or may not have led): no majority is left.
    let _ = leader;
    c.agent(1).kill9();
    c.agent(2).kill9();
    let ep = c.addr(3);
    let out = vsha(&ep, &["vserver", "add", "db", "--ip", "10.40.0.6"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unavailable") && err.contains("quorum"),
        "a write without quorum must say so: {err}"
    );
    let out = vsha(&ep, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stale"));
    // The local view still answers, and shows what was committed.
    let s = json(&ep, &["status", "--json", "--stale"]).expect("stale status answers");
    assert_eq!(s["stale"], true);
    assert_eq!(s["vservers"].as_array().unwrap().len(), 1);
    assert_eq!(s["vservers"][0]["name"], "web");
}

#[test]
fn no_agent_and_bad_config_are_explained() {
    // Nothing listens here: the CLI says which address it tried and how to start one.
    let port = free_port("127.0.0.1");
    let ep = format!("127.0.0.1:{port}");
    let out = vsha(&ep, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&ep) && err.contains("vshad"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad: &[(&str, &str)] = &[
        ("node_id = 1\nlisten = \"nowhere\"\n", "listen"),
        ("node_id = 0\n", "node_id"),
        ("node_id = 1\nmax_voters = 12\n", "max_voters"),
        ("node_id = 1\nunknown_key = 3\n", "unknown_key"),
        (
            "node_id = 1\ninitial_cluster = \"2=127.0.0.2:7700\"\n",
            "initial_cluster",
        ),
    ];
    for (text, field) in bad {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(VSHAD)
            .arg("--config")
            .arg(&p)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "config {text:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "config {text:?}: {err}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "a bad config must not create anything"
    );
    let missing = Command::new(VSHAD)
        .args(["--config", "/nonexistent/vshad.toml", "--node-id", "1"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    // No cluster state and neither --initial-cluster nor --join: refused clearly.
    let out = Command::new(VSHAD)
        .args([
            "--node-id",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", free_port("127.0.0.1")),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("empty"))
        .arg("--config")
        .arg(Path::new("/dev/null"))
        .arg("--insecure")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--initial-cluster"));
}

#[test]
fn corrupt_raft_log_stops_the_agent_with_a_clear_error() {
    // Default snapshot interval: the entries are still in the live log.
    let mut c = Cluster::with_config(1, 0, "");
    agreed_leader(&c, &[1], 0);
    for i in 1..=20 {
        vsha_ok(
            &c.addr(1),
            &[
                "vserver",
                "add",
                &format!("v{i}"),
                "--ip",
                &format!("10.50.0.{i}"),
            ],
        );
    }
    c.agent(1).stop();
    // Flip one byte inside an early entry (not the tail, which raft-engine
    // may legitimately treat as a torn write after a crash).
    let raft_dir = c.agent(1).data.join("raft");
    let log = std::fs::read_dir(&raft_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .expect("a raft log file");
    let mut bytes = std::fs::read(&log).unwrap();
    let needle = b"\"name\":\"v3\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("entry of v3 in the log file");
    bytes[at + 3] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();

    let a = c.agent(1);
    let mut child = Command::new(VSHAD)
        .arg("--config")
        .arg(&a.config)
        .args(["--node-id", "1", "--listen", &a.addr])
        .arg("--data-dir")
        .arg(&a.data)
        .args(node_tls(1))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the agent started on a corrupt log");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "a corrupt log must stop the agent: {err}"
    );
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        !err.contains("panicked"),
        "a clean refusal, not a panic: {err}"
    );
}

/// `metrics_listen`: Prometheus gets the raft figures and the leader's
/// lease table from a real agent.
#[test]
fn metrics_are_served_over_http() {
    let port = free_port("127.0.0.1");
    let mut c = Cluster::with_config(1, 0, &format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    agreed_leader(&c, &[1], 0);
    let scrape = || -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    };
    let text = wait_for("a scrape showing node 1 leading with a lease", || {
        scrape().filter(|t| {
            t.contains("vsha_raft_leader 1") && t.contains("vsha_lease_age_seconds{node=\"1\"}")
        })
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for family in [
        "vsha_raft_term",
        "vsha_raft_commit_index",
        "vsha_failovers_total",
        "# EOF",
    ] {
        assert!(text.contains(family), "no {family} in:\n{text}");
    }
    c.agent(1).stop();
}

/// mTLS refuses what the cluster CA did not sign, and the `Peer` service
/// (raft messages, leases, replication) takes node certificates only.
#[test]
fn peers_and_clients_without_a_cluster_certificate_are_refused() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use vsha_proto::v1 as pb;
    use vsha_proto::v1::cluster_client::ClusterClient;
    use vsha_proto::v1::peer_client::PeerClient;

    let c = Cluster::with_config(1, 0, "");
    agreed_leader(&c, &[1], 0);
    let addr = c.addr(1);

    let other = tempfile::tempdir().unwrap();
    pki::init_ca(other.path()).unwrap();
    let foreign_node = pki::issue(other.path(), Role::Node, "n1", &[], &[]).unwrap();
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let ca = Certificate::from_pem(read(pki_dir().join("ca.crt")));
    let identity = |dir: &Path, stem: &str| {
        Identity::from_pem(
            read(dir.join(format!("{stem}.crt"))),
            read(dir.join(format!("{stem}.key"))),
        )
    };
    let endpoint = |id: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name(vsha_agent::tls::NODE_NAME);
        if let Some(id) = id {
            tls = tls.identity(id);
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(10))
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Status over the Cluster service: who may ask.
        async fn status(ep: Endpoint) -> Result<(), String> {
            let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
            ClusterClient::new(ch)
                .status(pb::StatusRequest { stale: true })
                .await
                .map(|_| ())
                .map_err(|s| format!("{s:?}"))
        }
        status(endpoint(Some(identity(&client_bundle(), "client"))))
            .await
            .expect("a client certificate of this cluster is served");
        let no_cert = status(endpoint(None)).await;
        assert!(no_cert.is_err(), "no client certificate must be refused");
        let foreign = status(endpoint(Some(identity(&foreign_node, "node")))).await;
        assert!(
            foreign.is_err(),
            "a certificate of another CA must be refused"
        );

        // The Peer service: a client certificate is authenticated but may
        // not speak for a node.
        let ch = endpoint(Some(identity(&client_bundle(), "client")))
            .connect()
            .await
            .unwrap();
        let denied = PeerClient::new(ch)
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        let foreign = endpoint(Some(identity(&foreign_node, "node")))
            .connect()
            .await;
        if let Ok(ch) = foreign {
            let r = PeerClient::new(ch)
                .heartbeat(pb::HeartbeatRequest::default())
                .await;
            assert!(
                r.is_err(),
                "a node certificate of another CA must be refused"
            );
        }
    });

    // Plaintext to a TLS agent fails with a hint, and changes nothing.
    let out = vsha(
        &addr,
        &["--insecure", "vserver", "add", "x", "--ip", "10.60.0.1"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure"), "{err}");
    assert_eq!(vserver_names(&addr), Some(vec![]));

    // An agent whose files are missing does not start, and says what to do.
    let out = Command::new(VSHAD)
        .args(["--node-id", "9", "--config", "/dev/null"])
        .args(["--tls-cert", "/nonexistent/node.crt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls_") && err.contains("vsha cert node"),
        "{err}"
    );
}
