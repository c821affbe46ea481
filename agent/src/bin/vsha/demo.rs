//! `vsha demo`: three real `vshad` processes on 127.0.0.1, each with its own
//! data dir; shows the election, a replicated write, the loss of the leader
//! (SIGKILL) and its return. Everything is removed at the end unless --keep.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsha_proto::v1 as pb;

use crate::client::connect;
use crate::output;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the cluster running after the demo; Ctrl-C stops it.
    #[arg(long)]
    keep: bool,
    /// Node N listens on 127.0.0.1:(BASE_PORT + N - 1).
    #[arg(long, default_value_t = 7700)]
    base_port: u16,
    /// Where the nodes' data dirs and logs go (default: a new temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

struct Node {
    id: u64,
    addr: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Stops every agent and removes the demo dir, also on error or Ctrl-C.
struct Demo {
    dir: PathBuf,
    remove_dir: bool,
    nodes: Vec<Node>,
    vshad: PathBuf,
    initial: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            stop(n);
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn stop(n: &mut Node) {
    if let Some(mut c) = n.child.take() {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn find_vshad() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the vsha binary")?;
    let beside = me.with_file_name("vshad");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "vshad not found next to {} (build both binaries: cargo build --release --bins)",
        me.display()
    )
}

impl Demo {
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        let log = std::fs::File::create(&n.log)
            .with_context(|| format!("creating {}", n.log.display()))?;
        let child = Command::new(&self.vshad)
            .args(["--node-id", &n.id.to_string()])
            .args(["--listen", &n.addr])
            .arg("--data-dir")
            .arg(&n.data)
            .args(["--initial-cluster", &self.initial])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.vshad.display()))?;
        n.child = Some(child);
        Ok(())
    }
}

async fn status_of(addr: &str, stale: bool) -> Option<pb::StatusResponse> {
    let mut c = connect(addr).await.ok()?;
    c.status(pb::StatusRequest { stale })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Waits until `addrs` all agree on a leader that is not `not`.
async fn wait_leader(addrs: &[String], not: u64) -> anyhow::Result<pb::StatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut leaders = Vec::new();
        let mut last = None;
        for a in addrs {
            if let Some(s) = status_of(a, true).await {
                leaders.push(s.leader_id);
                last = Some(s);
            }
        }
        if let Some(s) = last {
            let l = s.leader_id;
            if l != 0
                && l != not
                && leaders.len() == addrs.len()
                && leaders.iter().all(|x| *x == l)
                && !s.cluster_id.is_empty()
            {
                if let Some(current) = status_of(&addrs[0], false).await {
                    return Ok(current);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no leader agreed on within 30 s; see the logs in the demo dir")
}

fn show(s: &pb::StatusResponse) {
    let j = output::status_json(s);
    for line in output::status_human(&j).lines() {
        println!("    {line}");
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let vshad = find_vshad()?;
    let (dir, remove_dir) = match args.dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("vsha-demo-{}", std::process::id())),
            !args.keep,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let nodes: Vec<Node> = (1..=3u64)
        .map(|id| {
            let port = args.base_port as u64 + id - 1;
            Node {
                id,
                addr: format!("127.0.0.1:{port}"),
                data: dir.join(format!("node{id}")),
                log: dir.join(format!("node{id}.log")),
                child: None,
            }
        })
        .collect();
    for n in &nodes {
        if std::net::TcpListener::bind(&n.addr).is_err() {
            bail!(
                "{} is in use; stop what listens there or pick --base-port",
                n.addr
            );
        }
    }
    let initial = nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.addr))
        .collect::<Vec<_>>()
        .join(",");
    let mut demo = Demo {
        dir: dir.clone(),
        remove_dir,
        nodes,
        vshad,
        initial,
    };
    let addrs: Vec<String> = demo.nodes.iter().map(|n| n.addr.clone()).collect();

    println!("vsha demo: three agents on {}", addrs.join(", "));
    println!("  data dirs and logs under {}\n", dir.display());
    for i in 0..3 {
        demo.start(i)?;
    }
    let t0 = Instant::now();
    let s = wait_leader(&addrs, 0).await?;
    println!(
        "1. Raft elected node {} as leader in {:.1} s (term {}).",
        s.leader_id,
        t0.elapsed().as_secs_f64(),
        s.term
    );
    show(&s);

    let mut c = connect(&addrs[2]).await?;
    let spec = pb::VserverSpec {
        name: "web".into(),
        ip: "10.250.0.10".into(),
        prefix: 24,
        ..Default::default()
    };
    c.add_vserver(pb::AddVserverRequest { spec: Some(spec) })
        .await
        .map_err(|e| anyhow!("adding vserver web: {}", e.message()))?;
    c.set_pair(pb::SetPairRequest {
        vserver: "web".into(),
        group: Some(pb::FailoverGroup {
            nodes: vec![1, 2],
            failback: pb::Failback::Never as i32,
            failback_stable_ms: 0,
        }),
    })
    .await
    .map_err(|e| anyhow!("pairing web: {}", e.message()))?;
    println!("\n2. Through node 3 (a follower, which forwards to the leader): vsha vserver add web --ip 10.250.0.10; vsha pair add web --primary 1 --standby 2");

    let old = s.leader_id;
    let idx = demo
        .nodes
        .iter()
        .position(|n| n.id == old)
        .ok_or_else(|| anyhow!("leader {old} is not a demo node"))?;
    if let Some(mut child) = demo.nodes[idx].child.take() {
        child.kill().ok();
        child.wait().ok();
    }
    let survivors: Vec<String> = demo
        .nodes
        .iter()
        .filter(|n| n.id != old)
        .map(|n| n.addr.clone())
        .collect();
    let t1 = Instant::now();
    let s = wait_leader(&survivors, old).await?;
    let elected = t1.elapsed();
    // Let the new leader's liveness view hear from the survivor.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = s;
    while Instant::now() < deadline {
        if let Some(now) = status_of(&survivors[0], false).await {
            let heard = now.nodes.iter().filter(|n| n.reachable).count();
            s = now;
            if heard >= 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "\n3. SIGKILL of the leader (node {old}): the survivors elected node {} in {:.1} s; the vserver record is still there.",
        s.leader_id,
        elected.as_secs_f64()
    );
    show(&s);

    demo.start(idx)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        if let Some(st) = status_of(&demo.nodes[idx].addr, true).await {
            if st
                .vservers
                .iter()
                .any(|v| v.spec.as_ref().is_some_and(|s| s.name == "web"))
            {
                break st;
            }
        }
        if Instant::now() > deadline {
            bail!("node {old} did not catch up within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "\n4. Node {old} restarted from its data dir and caught up (it sees leader {}, vserver web).",
        back.leader_id
    );
    // The leader's liveness view sees the returned node at its next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        if let Some(s) = status_of(&addrs[0], false).await {
            if s.nodes.iter().all(|n| n.reachable) || Instant::now() > deadline {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    show(&s);

    if args.keep {
        println!("\nThe cluster keeps running. Try:\n  vsha --endpoint {} status\n  vsha --endpoint {} vserver list\nCtrl-C stops it.", addrs[0], addrs[1]);
        tokio::signal::ctrl_c().await.ok();
    }
    println!(
        "\nStopping the agents{}.",
        if demo.remove_dir {
            " and removing the demo dir"
        } else {
            ""
        }
    );
    drop(demo);
    Ok(())
}
