//! failover-bench: how long a vserver's service is unreachable when the
//! node running it dies, and during a planned migration.
//!
//! The cluster is the harness's multi-namespace one: three nodes (the
//! third a witness), each a network namespace on a bridge, and a client
//! namespace. Each trial kills the whole node holding the vserver (cable
//! out, then every process of the node: agent, guard, the vserver) and
//! measures, from a prober inside the client namespace connecting to the
//! vserver's IP every 10 ms, the time until the service answers again on the
//! same IP from another node. The dead node then boots again (its addresses
//! flushed, cable in, agent started) and the next trial waits until it
//! holds a fresh replica. Phases come from the
//! leader's `failover_done` event and the new holder's `started` event.
//!
//! Usage (root; build the binaries first: `cargo build --release --bins`):
//!   failover-bench [--trials K] [--profile fast|default|both] [--json]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vsha_cluster_tests::status::{has_replica, holder, runs_on};
use vsha_cluster_tests::{is_root, Cluster};

const VS: &str = "web";
// The first vserver's IP (vsha_cluster_tests::net::vserver_ip(0)).
const IP: &str = "10.77.0.50";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `failover-bench probe ADDR`: run inside the namespace; prints
/// "up MS" / "down MS" on every change of reachability.
fn probe(addr: &str) -> ! {
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| {
        eprintln!("probe: {addr:?} is not IP:PORT");
        std::process::exit(2)
    });
    let mut up = None;
    loop {
        let ok = TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok();
        if up != Some(ok) {
            println!("{} {}", if ok { "up" } else { "down" }, unix_ms());
            up = Some(ok);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Prober {
    child: Child,
    rx: mpsc::Receiver<(bool, u64)>,
}

impl Prober {
    fn start(c: &Cluster) -> Prober {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = c
            .net
            .client
            .command(&exe)
            .args(["probe", &format!("{IP}:80")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("prober");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut f = line.split(' ');
                let up = f.next() == Some("up");
                let ms = f.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                if tx.send((up, ms)).is_err() {
                    return;
                }
            }
        });
        Prober { child, rx }
    }

    /// The first "up" at or after `since` (unix ms).
    fn up_after(&self, since: u64, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((true, ms)) if ms >= since => return Some(ms),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// The last "down" seen before now, draining the queue.
    fn drain(&self) -> Vec<(bool, u64)> {
        self.rx.try_iter().collect()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    json!({
        "what": name,
        "n": v.len(),
        "p50_ms": percentile(&v, 0.5),
        "p90_ms": percentile(&v, 0.9),
        "p99_ms": percentile(&v, 0.99),
        "max_ms": v.last().copied().unwrap_or(0),
    })
}

fn phase(ev: &Value, name: &str) -> Option<u64> {
    ev["phases"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["ms"]
        .as_u64()
}

fn run_profile(profile: &str, trials: usize) -> Value {
    let mut c = Cluster::new(3)
        .witness(3)
        .config(&format!("profile = \"{profile}\""))
        .config("replication_interval_ms = 500")
        .tag(&profile[..1])
        .start();
    // The counting demo service, as in the tests: its writes (a temp file
    // renamed over the counter) go through every failover and migration.
    c.demo_tree(1, VS);
    c.ok(
        1,
        &[
            "vserver",
            "add",
            VS,
            "--ip",
            &format!("{IP}/24"),
            "--dev",
            "eth0",
            "--start",
            &Cluster::demo_start(IP),
        ],
    );
    c.ok(1, &["pair", "add", VS, "--primary", "1", "--standby", "2"]);
    // The invariant checker runs through the bench too (its requests are
    // what makes the service write); a split brain fails the run.
    c.watch(VS, IP);
    let prober = Prober::start(&c);
    let mut total = Vec::new();
    let mut detect = Vec::new();
    let mut commit = Vec::new();
    let mut start = Vec::new();
    let mut leader_killed = 0;
    for trial in 0..trials {
        let s = c.wait_for("the vserver running with a replica on its standby", |s| {
            let Some(h) = holder(s, VS) else { return false };
            let other = if h == 1 { 2 } else { 1 };
            runs_on(s, VS, h, 0) && has_replica(s, VS, other)
        });
        let h = holder(&s, VS).unwrap_or(1);
        if s["leader"] == h {
            leader_killed += 1;
        }
        // Settle: the service answers before the kill.
        std::thread::sleep(Duration::from_millis(300));
        prober.drain();
        let seq = c.last_event_seq();
        let t_kill = unix_ms();
        c.kill_node(h);
        let Some(t_up) = prober.up_after(t_kill, Duration::from_secs(60)) else {
            eprintln!("trial {trial}: the service did not come back within 60 s");
            c.revive_node(h);
            continue;
        };
        total.push(t_up - t_kill);
        let done = c.wait_event("failover_done", seq);
        if let Some(ms) = phase(&done, "detect+lease wait") {
            detect.push(ms);
        }
        if let Some(ms) = phase(&done, "commit") {
            commit.push(ms);
        }
        if let Some(ev) = c
            .events()
            .into_iter()
            .rev()
            .find(|e| e["kind"] == "started" && e["vserver"] == VS)
        {
            start.push(phase(&ev, "arp probe").unwrap_or(0) + phase(&ev, "start").unwrap_or(0));
        }
        eprintln!(
            "{profile} trial {}: node {h} killed{}, service back after {} ms",
            trial + 1,
            if s["leader"] == h {
                " (the leader)"
            } else {
                ""
            },
            t_up - t_kill
        );
        c.revive_node(h);
    }
    // Planned migrations, back and forth.
    let mut downtime = Vec::new();
    for _ in 0..trials.min(5) {
        let s = c.wait_for("a fresh replica on the other node", |s| {
            let Some(h) = holder(s, VS) else { return false };
            let other = if h == 1 { 2 } else { 1 };
            runs_on(s, VS, h, 0) && has_replica(s, VS, other)
        });
        let h = holder(&s, VS).unwrap_or(1);
        let to = if h == 1 { 2 } else { 1 };
        prober.drain();
        let t0 = unix_ms();
        // A node that has just booted may not hold a live lease yet on
        // the leader's clock: the migration is refused; try again.
        let mut tries = 0;
        loop {
            let out = c.vsha(1, &["migrate", VS, "--to", &to.to_string()]);
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(
                tries < 30,
                "migrate refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        let moves = prober.drain();
        let down = moves.iter().find(|(up, ms)| !up && *ms >= t0).map(|m| m.1);
        let up = moves
            .iter()
            .find(|(up, ms)| *up && down.is_some_and(|d| *ms >= d))
            .map(|m| m.1)
            .or_else(|| down.and_then(|d| prober.up_after(d, Duration::from_secs(30))));
        if let (Some(d), Some(u)) = (down, up) {
            downtime.push(u - d);
        }
    }
    c.finish();
    json!({
        "profile": profile,
        "trials": trials,
        "leader_killed": leader_killed,
        "failover": summary("node death -> service answers on the same IP", total),
        "detect_and_lease_wait": summary("last renewal -> placement proposed (leader's view)", detect),
        "commit": summary("placement proposed -> applied", commit),
        "start": summary("ARP probe + context start on the new node", start),
        "migration_downtime": summary("planned migration: service down -> up", downtime),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("probe") {
        probe(args.get(2).map_or("", String::as_str));
    }
    let mut trials = 10;
    let mut profiles = vec!["fast", "default"];
    let mut as_json = false;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--trials" => {
                trials = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| {
                        eprintln!("--trials: give a number");
                        std::process::exit(2)
                    });
                i += 1;
            }
            "--profile" => {
                profiles = match args.get(i + 1).map(String::as_str) {
                    Some("fast") => vec!["fast"],
                    Some("default") => vec!["default"],
                    Some("both") => vec!["fast", "default"],
                    _ => {
                        eprintln!("--profile: fast, default or both");
                        std::process::exit(2)
                    }
                };
                i += 1;
            }
            "--json" => as_json = true,
            other => {
                eprintln!("unknown argument {other:?}; usage: failover-bench [--trials K] [--profile fast|default|both] [--json]");
                std::process::exit(2)
            }
        }
        i += 1;
    }
    if !is_root() {
        eprintln!("failover-bench needs root (network namespaces, cgroups)");
        std::process::exit(2);
    }
    let results: Vec<Value> = profiles.iter().map(|p| run_profile(p, trials)).collect();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        );
        return;
    }
    for r in &results {
        println!(
            "profile {} ({} trials, {} of them killed the leader's node)",
            r["profile"].as_str().unwrap_or(""),
            r["trials"],
            r["leader_killed"]
        );
        println!(
            "  {:<52} {:>6} {:>6} {:>6} {:>6}",
            "", "p50", "p90", "p99", "max"
        );
        for key in [
            "failover",
            "detect_and_lease_wait",
            "commit",
            "start",
            "migration_downtime",
        ] {
            let s = &r[key];
            println!(
                "  {:<52} {:>6} {:>6} {:>6} {:>6}  ms (n={})",
                s["what"].as_str().unwrap_or(key),
                s["p50_ms"],
                s["p90_ms"],
                s["p99_ms"],
                s["max_ms"],
                s["n"]
            );
        }
    }
}
