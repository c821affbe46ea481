//! Benchmark: 3 local `vshad` processes on 127.0.0.1-3 (loopback only).
//! Prints proposals committed per second (concurrent writers), p50/p99
//! commit latency (one writer at a time), and `Status` p50/p99 through the
//! leader and through a follower, plus the `vsha status` command end to end.
//! Not a test: it asserts nothing about speed, it prints figures.
//!
//! `cargo bench -p vsha-agent --bench cluster`; `VSHA_BENCH_QUICK=1` for a
//! short run.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vsha_proto::v1 as pb;
use vsha_proto::v1::cluster_client::ClusterClient;

const VSHAD: &str = env!("CARGO_BIN_EXE_vshad");
const VSHA: &str = env!("CARGO_BIN_EXE_vsha");

struct Procs(Vec<Child>, tempfile::TempDir);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<44} n={:<5} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        v.len(),
        pct(&v, 0.5).as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3,
        v.last().unwrap().as_secs_f64() * 1e3
    );
}

async fn client(addr: &str) -> ClusterClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = ClusterClient::connect(format!("http://{addr}")).await {
            return c;
        }
        assert!(Instant::now() < deadline, "agent at {addr} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spec(i: u64) -> pb::VserverSpec {
    pb::VserverSpec {
        name: format!("bench-{i}"),
        ip: std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1).to_string(),
        prefix: 24,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("VSHA_BENCH_QUICK").is_some();
    let (seq_n, conc_n, writers, status_n, cli_n) = if quick {
        (50u64, 200u64, 8u64, 50, 5)
    } else {
        (500, 4000, 32, 500, 50)
    };
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (1..=3)
        .map(|i| {
            let ip = format!("127.0.0.{i}");
            let port = TcpListener::bind((ip.as_str(), 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("{ip}:{port}")
        })
        .collect();
    let initial = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Procs(Vec::new(), dir);
    for (i, a) in addrs.iter().enumerate() {
        let child = Command::new(VSHAD)
            .args(["--node-id", &(i + 1).to_string(), "--listen", a])
            .arg("--data-dir")
            .arg(procs.1.path().join(format!("n{}", i + 1)))
            // Plaintext: these figures are raft's and the API's, not TLS's.
            .args([
                "--initial-cluster",
                &initial,
                "--config",
                "/dev/null",
                "--insecure",
            ])
            .env("VSHA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.0.push(child);
    }
    let mut c = client(&addrs[0]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let Ok(s) = c.status(pb::StatusRequest { stale: false }).await {
            let s = s.into_inner();
            if s.leader_id != 0 && !s.cluster_id.is_empty() {
                break s.leader_id as usize;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader_addr = addrs[leader - 1].clone();
    let follower_addr = addrs[leader % 3].clone();
    println!(
        "3 agents, leader node {leader}; fsync on every raft batch; data dir on {}",
        procs.1.path().display()
    );

    // Commit latency: one proposal at a time through the leader.
    let mut lc = client(&leader_addr).await;
    let mut lat = Vec::new();
    for i in 0..seq_n {
        let t = Instant::now();
        lc.add_vserver(pb::AddVserverRequest {
            spec: Some(spec(i)),
        })
        .await
        .expect("proposal");
        lat.push(t.elapsed());
    }
    summary("commit latency, 1 writer, via leader", lat);

    let mut fc = client(&follower_addr).await;
    let mut lat = Vec::new();
    for i in 0..seq_n {
        let t = Instant::now();
        fc.add_vserver(pb::AddVserverRequest {
            spec: Some(spec(1_000_000 + i)),
        })
        .await
        .expect("proposal");
        lat.push(t.elapsed());
    }
    summary("commit latency, 1 writer, via follower", lat);

    // Throughput: concurrent writers on the leader.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let addr = leader_addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&addr).await;
            let mut lat = Vec::new();
            for j in 0..conc_n / writers {
                let i = 2_000_000 + w * 100_000 + j;
                let s = Instant::now();
                c.add_vserver(pb::AddVserverRequest {
                    spec: Some(spec(i)),
                })
                .await
                .expect("proposal");
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<44} {:.0} proposals/s ({} proposals, {writers} writers, {secs:.2} s)",
        "throughput, concurrent writers via leader",
        all.len() as f64 / secs,
        all.len()
    );
    summary(&format!("commit latency, {writers} writers"), all);

    for (name, addr) in [("leader", &leader_addr), ("follower", &follower_addr)] {
        let mut c = client(addr).await;
        let mut lat = Vec::new();
        for _ in 0..status_n {
            let t = Instant::now();
            c.status(pb::StatusRequest { stale: false })
                .await
                .expect("status");
            lat.push(t.elapsed());
        }
        summary(&format!("Status RPC (linearizable) via {name}"), lat);
        let mut lat = Vec::new();
        for _ in 0..status_n {
            let t = Instant::now();
            c.status(pb::StatusRequest { stale: true })
                .await
                .expect("status");
            lat.push(t.elapsed());
        }
        summary(&format!("Status RPC --stale via {name}"), lat);
    }
    let mut lat = Vec::new();
    for _ in 0..cli_n {
        let t = Instant::now();
        let out = Command::new(VSHA)
            .arg("--insecure")
            .args(["--endpoint", &follower_addr, "status", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        lat.push(t.elapsed());
    }
    summary("`vsha status --json` process via follower", lat);
}
