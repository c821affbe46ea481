//! vsha: the operator's CLI. Exit codes: 0 ok, 1 error, 2 usage.

mod cert_cmd;
mod client;
mod demo;
mod docs_gen;
mod local;
mod ops;
mod output;
mod sync_cmd;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use vsha_proto::v1 as pb;

use client::{connect, explain, DEFAULT_ENDPOINT};

#[derive(Parser, Debug)]
#[command(name = "vsha", version, about = "Operate a vsha cluster")]
pub(crate) struct Cli {
    /// The agent to talk to.
    #[arg(long, global = true, env = "VSHA_ENDPOINT", default_value = DEFAULT_ENDPOINT, value_name = "HOST:PORT")]
    endpoint: String,
    #[command(flatten)]
    tls: client::TlsArgs,
    #[command(flatten)]
    local: local::LocalPaths,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the cluster: leader, term, nodes, vservers.
    Status {
        #[arg(long)]
        json: bool,
        /// Answer from the agent's local state without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Cluster members.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Vservers known to the cluster.
    #[command(subcommand)]
    Vserver(VserverCmd),
    /// Failover pairs (ordered nodes a vserver may run on).
    #[command(subcommand)]
    Pair(PairCmd),
    /// A 3-node cluster on this machine (in its own network namespace),
    /// shown failing over (root).
    Demo(demo::DemoArgs),
    /// Processes with their vserver (like vps).
    Ps {
        /// Host processes too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Contexts without a vserver spec (chcontext, chbind, reducecap).
    #[command(subcommand)]
    Ctx(local::CtxCmd),
    /// Tree replication between machines (standalone).
    #[command(subcommand)]
    Sync(sync_cmd::SyncCmd),
    /// Move a vserver off a dead node now, to NODE (its lease must be over).
    Failover {
        vserver: String,
        #[arg(long, value_name = "NODE")]
        to: u64,
        /// Take NODE even if its replica is older than max_rpo (or unknown).
        #[arg(long)]
        accept_data_loss: bool,
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Move a running vserver to NODE: pre-copy, stop, final delta, start.
    Migrate {
        vserver: String,
        #[arg(long, value_name = "NODE")]
        to: u64,
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// Cluster events (failovers, fencing, health), from the leader.
    Events {
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// What the cluster would do, without doing it.
    #[command(subcommand)]
    Simulate(ops::SimulateCmd),
    /// Certificates for mTLS: the cluster CA, nodes, operators.
    #[command(subcommand)]
    Cert(cert_cmd::CertCmd),
    /// Shell completions on stdout (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (vsha.1 and one per subcommand) into DIR.
    Manpages { dir: std::path::PathBuf },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Add a node; start it afterwards with `vshad --join`.
    Add {
        id: u64,
        /// The new node's gRPC address.
        addr: String,
        /// Keep it a non-voting learner.
        #[arg(long, conflicts_with = "witness")]
        learner: bool,
        /// A voter that runs no vservers.
        #[arg(long)]
        witness: bool,
        /// Interface that carries vserver IPs on this node.
        #[arg(long, value_name = "DEV")]
        iface: Option<String>,
    },
    /// Remove a node from the cluster.
    Rm { id: u64 },
    /// List nodes.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        stale: bool,
    },
    /// Set a node's admin state.
    Admin { id: u64, state: AdminArg },
    /// Move every vserver off NODE (its admin state becomes draining).
    Drain { id: u64 },
    /// Maintenance on: NODE keeps what it runs but gets nothing new.
    Maintenance { state: ops::OnOff, id: u64 },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AdminArg {
    Active,
    Draining,
    Maintenance,
}

#[derive(Subcommand, Debug)]
enum VserverCmd {
    /// Record a vserver in the cluster (running it comes with failover).
    Add(VserverAdd),
    /// Remove a vserver from the cluster.
    Rm { name: String },
    /// Let the cluster run it (placed and started by the leader).
    Enable { name: String },
    /// Keep it stopped wherever it is placed.
    Disable { name: String },
    /// List the cluster's vservers (--local: the vservers running here).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        stale: bool,
        /// The local vservers of this machine, like vserver-stat.
        #[arg(long, conflicts_with = "stale")]
        local: bool,
    },
    #[command(flatten)]
    Local(local::LocalVserverCmd),
}

#[derive(Args, Debug)]
struct VserverAdd {
    name: String,
    /// IPV4 or IPV4/PREFIX (prefix defaults to 24).
    #[arg(long, value_name = "IPV4[/PREFIX]")]
    ip: String,
    /// Interface that carries the IP (IPROOTDEV).
    #[arg(long, value_name = "DEV")]
    dev: Option<String>,
    /// The vserver's tree (default: VSERVER_ROOT/NAME on each node).
    #[arg(long, value_name = "PATH")]
    tree: Option<String>,
    #[arg(long)]
    hostname: Option<String>,
    /// Command the context runs (split at spaces; default /sbin/init,
    /// /etc/init.d/rc 3 or /bin/sh, whichever the tree has).
    #[arg(long, value_name = "\"CMD ARGS\"")]
    start: Option<String>,
    /// Refuse an automatic failover to a standby whose replica is older.
    #[arg(long, value_name = "SECS")]
    max_rpo: Option<u64>,
    /// Health check: TCP connect to the vserver's IP on this port.
    #[arg(long, value_name = "PORT")]
    health_tcp: Option<u32>,
    /// Health check: this command inside the context must exit 0.
    #[arg(long, value_name = "\"CMD ARGS\"")]
    health_cmd: Option<String>,
    /// Health check interval (default 2000).
    #[arg(long, value_name = "MS")]
    health_interval: Option<u32>,
    /// Failed checks in a row before the vserver counts as failed (default 3).
    #[arg(long, value_name = "N")]
    health_fall: Option<u32>,
    /// Good checks in a row before it counts as healthy again (default 2).
    #[arg(long, value_name = "N")]
    health_rise: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum PairCmd {
    /// Define where a vserver may run, in order of preference.
    Add {
        vserver: String,
        #[arg(long, value_name = "NODE")]
        primary: u64,
        #[arg(long, value_name = "NODE", required = true)]
        standby: Vec<u64>,
        #[arg(long, value_enum, default_value = "never")]
        failback: FailbackArg,
        /// With --failback auto: seconds the primary must be stable.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        failback_after: u64,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Rm {
        vserver: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FailbackArg {
    Never,
    Auto,
    Manual,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Demo(_)) {
        // Before any thread exists: the whole process moves into the
        // demo's own network namespace.
        if let Err(e) = demo::prepare() {
            eprintln!("vsha: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vsha: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("vsha: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("encoding JSON")?
    );
    Ok(())
}

/// Commands that need no agent; the others are returned to be sent.
async fn run_offline(cli: Cli) -> anyhow::Result<Result<i32, Cli>> {
    let code = match cli.cmd {
        Cmd::Demo(args) => demo::run(args).await.map(|()| 0)?,
        Cmd::Ps { all, json } => local::ps(&cli.local, all, json)?,
        Cmd::Ctx(c) => local::ctx(c, &cli.local)?,
        Cmd::Sync(c) => sync_cmd::run(c).await?,
        Cmd::Completions { shell } => {
            docs_gen::completions(shell)?;
            0
        }
        Cmd::Cert(c) => cert_cmd::run(c)?,
        Cmd::Manpages { dir } => {
            let n = docs_gen::manpages(&dir)?;
            println!("{n} man pages written to {}", dir.display());
            0
        }
        Cmd::Vserver(VserverCmd::Local(c)) => local::vserver(c, &cli.local)?,
        Cmd::Vserver(VserverCmd::List {
            json, local: true, ..
        }) => local::list(&cli.local, json)?,
        _ => return Ok(Err(cli)),
    };
    Ok(Ok(code))
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let cli = match run_offline(cli).await? {
        Ok(code) => return Ok(code),
        Err(cli) => cli,
    };
    let ep = cli.endpoint.clone();
    let e = |s: tonic::Status| explain(&ep, s);
    let mut c = connect(&cli.endpoint, &cli.tls.security()?).await?;
    match cli.cmd {
        Cmd::Demo(_)
        | Cmd::Ps { .. }
        | Cmd::Ctx(_)
        | Cmd::Sync(_)
        | Cmd::Completions { .. }
        | Cmd::Manpages { .. }
        | Cmd::Cert(_)
        | Cmd::Vserver(VserverCmd::Local(_)) => unreachable!("handled by run_offline"),
        Cmd::Status { json, stale } => {
            let s = c
                .status(pb::StatusRequest { stale })
                .await
                .map_err(e)?
                .into_inner();
            let j = output::status_json(&s);
            if json {
                print_json(&j)?;
            } else {
                print!("{}", output::status_human(&j));
            }
        }
        Cmd::Node(NodeCmd::Add {
            id,
            addr,
            learner,
            witness,
            iface,
        }) => {
            let role = if learner {
                pb::NodeRole::Learner
            } else if witness {
                pb::NodeRole::Witness
            } else {
                pb::NodeRole::Voter
            };
            c.add_node(pb::AddNodeRequest {
                id,
                addr: addr.clone(),
                role: role as i32,
                iface: iface.unwrap_or_default(),
            })
            .await
            .map_err(e)?;
            println!(
                "node {id} added as {}; start it with: vshad --node-id {id} --listen {addr} --data-dir DIR --join {}",
                output::role(role as i32),
                cli.endpoint
            );
        }
        Cmd::Node(NodeCmd::Rm { id }) => {
            c.remove_node(pb::RemoveNodeRequest { id })
                .await
                .map_err(e)?;
            println!("node {id} removed");
        }
        Cmd::Node(NodeCmd::List { json, stale }) => {
            let nodes = c
                .list_nodes(pb::ListNodesRequest { stale })
                .await
                .map_err(e)?
                .into_inner()
                .nodes;
            let nodes: Vec<_> = nodes.iter().map(output::node_json).collect();
            if json {
                print_json(&nodes)?;
            } else {
                print!("{}", output::nodes_table(&nodes, false));
            }
        }
        Cmd::Failover {
            vserver,
            to,
            accept_data_loss,
            timeout,
        } => return ops::failover(&mut c, &e, &vserver, to, accept_data_loss, secs(timeout)).await,
        Cmd::Migrate {
            vserver,
            to,
            timeout,
        } => return ops::migrate(&mut c, &e, &vserver, to, secs(timeout)).await,
        Cmd::Events { follow, json } => return ops::events(&mut c, &e, follow, json).await,
        Cmd::Simulate(s) => return ops::simulate(&mut c, &e, s).await,
        Cmd::Vserver(VserverCmd::Enable { name }) => {
            return ops::set_desired(&mut c, &e, &name, true).await
        }
        Cmd::Vserver(VserverCmd::Disable { name }) => {
            return ops::set_desired(&mut c, &e, &name, false).await
        }
        Cmd::Node(
            NodeCmd::Admin { id, .. } | NodeCmd::Drain { id } | NodeCmd::Maintenance { id, .. },
        ) => {
            let admin = match cli.cmd {
                Cmd::Node(NodeCmd::Admin { state, .. }) => match state {
                    AdminArg::Active => pb::AdminState::Active,
                    AdminArg::Draining => pb::AdminState::Draining,
                    AdminArg::Maintenance => pb::AdminState::Maintenance,
                },
                Cmd::Node(NodeCmd::Drain { .. }) => pb::AdminState::Draining,
                Cmd::Node(NodeCmd::Maintenance {
                    state: ops::OnOff::On,
                    ..
                }) => pb::AdminState::Maintenance,
                _ => pb::AdminState::Active,
            };
            c.set_node_admin(pb::SetNodeAdminRequest {
                id,
                admin: admin as i32,
            })
            .await
            .map_err(e)?;
            println!("node {id} is now {}", output::admin(admin as i32));
        }
        Cmd::Vserver(VserverCmd::Add(a)) => {
            let (ip, prefix) = match a.ip.split_once('/') {
                Some((ip, p)) => (
                    ip.to_string(),
                    p.parse::<u32>().map_err(|_| {
                        anyhow::anyhow!("invalid prefix: {p:?} is not a number from 1 to 32")
                    })?,
                ),
                None => (a.ip.clone(), 0),
            };
            let spec = pb::VserverSpec {
                name: a.name.clone(),
                ip,
                prefix,
                dev: a.dev.unwrap_or_default(),
                tree: a.tree.unwrap_or_default(),
                hostname: a.hostname.unwrap_or_default(),
                start_command: a
                    .start
                    .map(|s| s.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default(),
                max_rpo_ms: a.max_rpo.unwrap_or(0).saturating_mul(1000),
                health: (a.health_tcp.is_some() || a.health_cmd.is_some()).then(|| {
                    pb::HealthCheck {
                        tcp_port: a.health_tcp.unwrap_or(0),
                        command: a
                            .health_cmd
                            .as_deref()
                            .map(|c| c.split_whitespace().map(str::to_string).collect())
                            .unwrap_or_default(),
                        interval_ms: a.health_interval.unwrap_or(0),
                        timeout_ms: 0,
                        rise: a.health_rise.unwrap_or(0),
                        fall: a.health_fall.unwrap_or(0),
                    }
                }),
                ..Default::default()
            };
            let info = c
                .add_vserver(pb::AddVserverRequest { spec: Some(spec) })
                .await
                .map_err(e)?
                .into_inner();
            let v = output::vserver_json(&info);
            let tree = if v.tree.is_empty() {
                "VSERVER_ROOT/".to_string() + &v.name
            } else {
                v.tree.clone()
            };
            println!(
                "vserver {} recorded: {}/{} tree {tree}",
                v.name, v.ip, v.prefix
            );
        }
        Cmd::Vserver(VserverCmd::Rm { name }) => {
            c.remove_vserver(pb::RemoveVserverRequest { name: name.clone() })
                .await
                .map_err(e)?;
            println!("vserver {name} removed");
        }
        Cmd::Vserver(VserverCmd::List { json, stale, .. }) => {
            let vs = c
                .list_vservers(pb::ListVserversRequest { stale })
                .await
                .map_err(e)?
                .into_inner()
                .vservers;
            let vs: Vec<_> = vs.iter().map(output::vserver_json).collect();
            if json {
                print_json(&vs)?;
            } else {
                print!("{}", output::vservers_table(&vs));
            }
        }
        Cmd::Pair(PairCmd::Add {
            vserver,
            primary,
            standby,
            failback,
            failback_after,
        }) => {
            let mut nodes = vec![primary];
            nodes.extend(standby);
            let failback = match failback {
                FailbackArg::Never => pb::Failback::Never,
                FailbackArg::Auto => pb::Failback::Auto,
                FailbackArg::Manual => pb::Failback::Manual,
            };
            c.set_pair(pb::SetPairRequest {
                vserver: vserver.clone(),
                group: Some(pb::FailoverGroup {
                    nodes: nodes.clone(),
                    failback: failback as i32,
                    failback_stable_ms: failback_after * 1000,
                }),
            })
            .await
            .map_err(e)?;
            let order: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
            println!(
                "vserver {vserver} may run on nodes {} (in that order)",
                order.join(" > ")
            );
        }
        Cmd::Pair(PairCmd::List { json }) => {
            let pairs = c
                .list_pairs(pb::ListPairsRequest { stale: false })
                .await
                .map_err(e)?
                .into_inner()
                .pairs;
            let rows: Vec<(String, output::PairJson)> = pairs
                .iter()
                .map(|p| {
                    let g = p.group.clone().unwrap_or_default();
                    (
                        p.vserver.clone(),
                        output::PairJson {
                            nodes: g.nodes,
                            failback: output::failback(g.failback),
                            failback_stable_ms: g.failback_stable_ms,
                        },
                    )
                })
                .collect();
            if json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(name, p)| serde_json::json!({"vserver": name, "nodes": p.nodes, "failback": p.failback, "failback_stable_ms": p.failback_stable_ms}))
                    .collect();
                print_json(&v)?;
            } else {
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|(name, p)| {
                        vec![
                            name.clone(),
                            p.nodes.first().map(|n| n.to_string()).unwrap_or_default(),
                            p.nodes[1.min(p.nodes.len())..]
                                .iter()
                                .map(|n| n.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            p.failback.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(&["VSERVER", "PRIMARY", "STANDBYS", "FAILBACK"], &table)
                );
            }
        }
        Cmd::Pair(PairCmd::Rm { vserver }) => {
            c.remove_pair(pb::RemovePairRequest {
                vserver: vserver.clone(),
            })
            .await
            .map_err(e)?;
            println!("pair of {vserver} removed");
        }
    }
    Ok(0)
}
