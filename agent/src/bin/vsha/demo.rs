//! `vsha demo`: a real three-node cluster on this machine, shown failing
//! over. The demo moves itself into a network namespace of its own (so
//! nothing it does touches the host's network, and the namespace vanishes
//! with it), starts three `vshad` agents there (node 3 a witness), builds a
//! busybox vserver whose web server counts its hits in its own tree, pairs
//! it on nodes 1 and 2, then kills node 1's agent and shows the vserver
//! answering from node 2 on the same IP, with the measured outage.
//! Everything is removed at the end, also on error or Ctrl-C.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsha_proto::v1 as pb;

use vsha_agent::tls::{Role, Security, TlsPaths};

use crate::client::connect;
use crate::output;

const VS: &str = "web";
const IP: &str = "10.77.0.50";
const COUNTER_CGI: &str = "#!/bin/sh\n\
n=$(cat /var/hits 2>/dev/null || echo 0)\n\
n=$((n+1))\n\
echo $n > /var/hits\n\
printf 'Content-Type: text/plain\\r\\n\\r\\nhits %s\\n' \"$n\"\n";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the cluster running after the demo; Ctrl-C stops it.
    #[arg(long)]
    keep: bool,
    /// Where the nodes' data dirs and logs go (default: a new temp dir,
    /// removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Runs before the async runtime exists, while the process has one
/// thread: moves it into a private network namespace with `lo` up and a
/// veth pair (`vs0` carries the vserver IPs, `vs0p` plays the LAN).
pub fn prepare() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "vsha demo needs root: it creates a private network namespace, cgroups and a vserver context. Run it as root (sudo target/release/vsha demo)"
        );
    }
    use vsha_kernel::net;
    net::unshare_netns().context("creating the demo's network namespace")?;
    net::link_up("lo")?;
    net::create_veth("vs0", "vs0p", std::process::id() as i32)?;
    net::link_up("vs0")?;
    net::link_up("vs0p")?;
    net::add_address("vs0", "10.77.0.1".parse()?, 24, None)?;
    Ok(())
}

struct Node {
    id: u64,
    addr: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Stops every agent, removes their cgroups and the demo dir.
struct Demo {
    dir: PathBuf,
    remove_dir: bool,
    nodes: Vec<Node>,
    vshad: PathBuf,
    initial: String,
    cgroups: Vec<PathBuf>,
    /// The demo's own client certificate (its cluster has its own CA).
    security: Security,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            stop(n);
        }
        vsha_kernel::cgroup::kill_and_remove_trees(&self.cgroups, Duration::from_secs(5));
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGTERM (the agent's guard then stops its vservers), then SIGKILL.
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .with_context(|| format!("creating {}", n.log.display()))?;
        let child = Command::new(&self.vshad)
            .arg("--config")
            .arg(n.dir.join("vshad.toml"))
            .args(["--node-id", &n.id.to_string()])
            .args(["--listen", &n.addr])
            .arg("--data-dir")
            .arg(n.dir.join("data"))
            .args(["--initial-cluster", &self.initial])
            .env(
                "VSHA_LOG",
                "info,raft=warn,raft_engine=warn,h2=warn,vsha_sync=warn",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.vshad.display()))?;
        n.child = Some(child);
        Ok(())
    }
}

async fn status(addrs: &[String], security: &Security) -> Option<pb::StatusResponse> {
    for a in addrs {
        if let Ok(mut c) = connect(a, security).await {
            if let Ok(r) = c.status(pb::StatusRequest { stale: false }).await {
                return Some(r.into_inner());
            }
        }
    }
    None
}

async fn wait_for(
    addrs: &[String],
    security: &Security,
    what: &str,
    f: impl Fn(&pb::StatusResponse) -> bool,
) -> anyhow::Result<pb::StatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(s) = status(addrs, security).await {
            if f(&s) {
                return Ok(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}; the agents' logs are in the demo dir (use --dir to keep them)")
}

fn web(s: &pb::StatusResponse) -> Option<&pb::VserverInfo> {
    s.vservers
        .iter()
        .find(|v| v.spec.as_ref().is_some_and(|s| s.name == VS))
}

/// Held by `node` and reported running.
fn runs_on(s: &pb::StatusResponse, node: u64) -> bool {
    web(s).is_some_and(|v| {
        v.placement.as_ref().is_some_and(|p| p.node == node)
            && v.runtime.as_ref().is_some_and(|r| r.observed == "running")
    })
}

fn has_replica(s: &pb::StatusResponse, node: u64) -> bool {
    web(s)
        .and_then(|v| v.runtime.as_ref())
        .is_some_and(|r| r.lag.iter().any(|l| l.node == node && l.known))
}

fn show(s: &pb::StatusResponse) {
    let j = output::status_json(s);
    for line in output::status_human(&j).lines() {
        println!("    {line}");
    }
}

/// One request to the vserver's web server: its answer, or None.
fn hit() -> Option<String> {
    let addr: SocketAddr = format!("{IP}:80").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    // Short: a request cut by the fencing of the old copy must not stall
    // the outage measurement.
    s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    s.write_all(b"GET /cgi-bin/count HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let text = body.split("\r\n\r\n").nth(1)?.trim().to_string();
    text.starts_with("hits").then_some(text)
}

fn build_tree(tree: &Path) -> anyhow::Result<()> {
    let paths = vsha_kernel::local::Paths::new(
        tree.with_file_name("build-conf"),
        tree.with_file_name("build-run"),
    );
    let opts = vsha_kernel::local::BuildOptions {
        tree: Some(tree.to_path_buf()),
        write_spec: false,
        ..Default::default()
    };
    vsha_kernel::local::build(&paths, VS, &opts).context("building the vserver tree")?;
    let cgi = tree.join("www/cgi-bin");
    std::fs::create_dir_all(&cgi)?;
    std::fs::write(tree.join("www/index.html"), "vsha demo\n")?;
    std::fs::write(cgi.join("count"), COUNTER_CGI)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(cgi.join("count"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(tree.join("var"))?;
    Ok(())
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
    let cg_root = vsha_kernel::cgroup::CgroupLayout::probe()
        .context("finding the cgroup2 mount")?
        .v2_root;
    let pki = dir.join("pki");
    vsha_agent::pki::init_ca(&pki).context("creating the demo's cluster CA")?;
    let client = vsha_agent::pki::issue(&pki, Role::Client, "demo", &[], &[])?;
    let security = Security::load(
        &TlsPaths {
            ca: client.join("ca.crt"),
            cert: client.join("client.crt"),
            key: client.join("client.key"),
        },
        Role::Client,
    )?;
    let mut nodes = Vec::new();
    let mut cgroups = Vec::new();
    for id in 1..=3u64 {
        let node_dir = dir.join(format!("node{id}"));
        std::fs::create_dir_all(node_dir.join("vservers"))?;
        let parent = format!("vsha-demo{}-n{id}", std::process::id());
        let certs = vsha_agent::pki::issue(&pki, Role::Node, &format!("node{id}"), &[], &[])?;
        std::fs::write(
            node_dir.join("vshad.toml"),
            format!(
                "profile = \"fast\"\nvserver_root = \"{}\"\ncgroup_parent = \"{parent}\"\nreplication_interval_ms = 500\n\
                 tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                node_dir.join("vservers").display(),
                certs.join("ca.crt").display(),
                certs.join("node.crt").display(),
                certs.join("node.key").display(),
            ),
        )?;
        cgroups.push(cg_root.join(&parent));
        nodes.push(Node {
            id,
            // The namespace is the demo's own: these ports are free.
            addr: format!("127.0.0.1:{}", 7700 + id),
            dir: node_dir.clone(),
            log: node_dir.join("vshad.log"),
            child: None,
        });
    }
    let initial = nodes
        .iter()
        .map(|n| {
            let role = if n.id == 3 { "/witness" } else { "" };
            format!("{}={}{role}", n.id, n.addr)
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut demo = Demo {
        dir: dir.clone(),
        remove_dir,
        nodes,
        vshad,
        initial,
        cgroups,
        security,
    };
    let interrupted = tokio::select! {
        r = show_failover(&mut demo, args.keep) => { r?; false }
        _ = tokio::signal::ctrl_c() => true,
    };
    println!(
        "\n{}Stopping the agents{}.",
        if interrupted { "Interrupted. " } else { "" },
        if demo.remove_dir {
            " and removing the demo dir"
        } else {
            ""
        }
    );
    drop(demo);
    Ok(())
}

async fn show_failover(demo: &mut Demo, keep: bool) -> anyhow::Result<()> {
    let addrs: Vec<String> = demo.nodes.iter().map(|n| n.addr.clone()).collect();
    let sec = demo.security.clone();
    println!("vsha demo: three agents in a private network namespace (profile fast)");
    println!("  mTLS on every link, with a cluster CA and certificates made as `vsha cert` does");
    println!("  node 1 and node 2 run vservers, node 3 is a witness (votes, runs nothing)");
    println!("  data dirs and logs under {}\n", demo.dir.display());
    for i in 0..3 {
        demo.start(i)?;
    }
    let t0 = Instant::now();
    let s = wait_for(&addrs, &sec, "a leader and three members", |s| {
        s.leader_id != 0 && s.nodes.len() == 3
    })
    .await?;
    println!(
        "1. Raft elected node {} as leader in {:.1} s.",
        s.leader_id,
        t0.elapsed().as_secs_f64()
    );

    let tree = demo.nodes[0].dir.join("vservers").join(VS);
    build_tree(&tree)?;
    let mut c = connect(&addrs[0], &sec).await?;
    let spec = pb::VserverSpec {
        name: VS.into(),
        ip: IP.into(),
        prefix: 24,
        dev: "vs0".into(),
        start_command: vec![
            "/bin/busybox".into(),
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            format!("{IP}:80"),
            "-h".into(),
            "/www".into(),
        ],
        ..Default::default()
    };
    c.add_vserver(pb::AddVserverRequest { spec: Some(spec) })
        .await
        .map_err(|e| anyhow!("adding vserver {VS}: {}", e.message()))?;
    c.set_pair(pb::SetPairRequest {
        vserver: VS.into(),
        group: Some(pb::FailoverGroup {
            nodes: vec![1, 2],
            failback: pb::Failback::Never as i32,
            failback_stable_ms: 0,
        }),
    })
    .await
    .map_err(|e| anyhow!("pairing {VS}: {}", e.message()))?;
    println!("\n2. A busybox vserver with a web server that counts its hits in its own tree:");
    println!("     vsha vserver add {VS} --ip {IP}/24 --dev vs0 --start \"/bin/busybox httpd -f -p {IP}:80 -h /www\"");
    println!("     vsha pair add {VS} --primary 1 --standby 2");
    let s = wait_for(
        &addrs,
        &sec,
        "web running on node 1, replicated to node 2",
        |s| runs_on(s, 1) && has_replica(s, 2),
    )
    .await?;
    show(&s);
    let mut last = String::new();
    for _ in 0..3 {
        last = hit().ok_or_else(|| anyhow!("{IP}:80 does not answer"))?;
        println!("     GET http://{IP}/cgi-bin/count -> {last}");
    }
    // Let a replication round carry the last hits to node 2.
    let before = Instant::now();
    wait_for(&addrs, &sec, "a fresh replica on node 2", |s| {
        web(s)
            .and_then(|v| v.runtime.as_ref())
            .and_then(|r| r.lag.iter().find(|l| l.node == 2 && l.known))
            .is_some_and(|l| (l.lag_ms as u128) < before.elapsed().as_millis())
    })
    .await?;

    println!("\n3. Node 1 dies: SIGKILL of its agent (its guard kills the vserver and withdraws the IP at once).");
    let killed = Instant::now();
    if let Some(mut child) = demo.nodes[0].child.take() {
        child.kill().ok();
        child.wait().ok();
    }
    // First the old copy must be gone (the guard kills it within
    // milliseconds), then the new one answers.
    let mut down_seen = None;
    let answer = loop {
        match hit() {
            Some(a) if down_seen.is_some() => break a,
            Some(_) => {}
            None => {
                down_seen.get_or_insert_with(|| killed.elapsed());
            }
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("{IP} did not answer again within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outage = killed.elapsed();
    let gone = down_seen.unwrap_or_default();
    let s = wait_for(&addrs[1..], &sec, "web running on node 2", |s| {
        runs_on(s, 2)
    })
    .await?;
    println!(
        "   node 1's copy stopped answering after {:.2} s; {IP} answers again after {:.2} s, now from node 2: {answer} (was {last} on node 1)",
        gone.as_secs_f64(),
        outage.as_secs_f64()
    );
    show(&s);

    demo.start(0)?;
    let s = wait_for(&addrs, &sec, "node 1 back as the standby", |s| {
        runs_on(s, 2) && has_replica(s, 1)
    })
    .await?;
    println!("\n4. Node 1 restarts: it does not run {VS} again; it is now the standby and receives its tree from node 2.");
    show(&s);

    if keep {
        println!(
            "\nThe cluster keeps running inside the demo's namespace. From another shell, enter it with\n  nsenter --net=/proc/{}/ns/net target/release/vsha --endpoint {} --tls-ca {pki}/ca.crt --tls-cert {pki}/client.crt status\nCtrl-C stops it.",
            std::process::id(),
            addrs[1],
            pki = demo.dir.join("pki/clients/demo").display(),
        );
        tokio::signal::ctrl_c().await.ok();
    }
    Ok(())
}
