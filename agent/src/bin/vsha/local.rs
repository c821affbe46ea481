//! The local tools of the original vserver system, no cluster needed:
//! build, start, stop, enter, exec... on the vservers whose TOML lives in
//! the config dir, `vsha ps`, and `vsha ctx exec` (chcontext + chbind +
//! reducecap in one). Everything here calls `vsha_kernel::local`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use vsha_kernel::config::Flag;
use vsha_kernel::local::{self, BuildOptions, CtxExecOptions, ExecOptions, Paths};

use crate::output::table;

/// Where local vservers' specs and run state live.
#[derive(Args, Debug, Clone)]
pub struct LocalPaths {
    /// Directory of the local vservers' NAME.toml (and NAME.sh hooks).
    #[arg(
        long,
        global = true,
        env = "VSHA_CONFIG_DIR",
        default_value = "/etc/vsha/vservers",
        value_name = "DIR"
    )]
    pub config_dir: PathBuf,
    /// Run-state directory.
    #[arg(
        long,
        global = true,
        env = "VSHA_RUN_DIR",
        default_value = "/run/vsha",
        value_name = "DIR"
    )]
    pub run_dir: PathBuf,
    /// Parent cgroup (under each hierarchy) of the local contexts.
    #[arg(
        long,
        global = true,
        env = "VSHA_CGROUP_PARENT",
        default_value = "vsha",
        value_name = "NAME"
    )]
    pub cgroup_parent: String,
}

impl LocalPaths {
    pub fn paths(&self) -> Paths {
        let mut p = Paths::new(self.config_dir.clone(), self.run_dir.clone());
        p.cgroup_parent = self.cgroup_parent.clone();
        p
    }
}

#[derive(Subcommand, Debug)]
pub enum LocalVserverCmd {
    /// Build a minimal tree (busybox-static) and its spec, or a Debian tree.
    Build {
        name: String,
        #[arg(long, value_name = "DIR")]
        tree: Option<PathBuf>,
        /// Build a full Debian tree with debootstrap --variant=minbase SUITE.
        #[arg(long, value_name = "SUITE")]
        debootstrap: Option<String>,
    },
    /// Start a local vserver (its context, IP, limits, hooks).
    Start {
        name: String,
    },
    /// Stop it: stop command or SIGTERM, then kill whatever is left.
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    /// A login shell inside the vserver.
    Enter {
        name: String,
    },
    /// Run a command inside the running vserver.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Exit 0 if running, 1 if not.
    Running {
        name: String,
    },
    /// State of one local vserver.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Start every vserver whose spec says `onboot = true` (a standalone
    /// node's boot; the vsha-onboot systemd unit runs it).
    Boot,
    /// Stop every running vserver of the config dir.
    Halt,
    /// Convert a legacy /etc/vservers/NAME.conf into the TOML spec.
    Import {
        conf: PathBuf,
        /// Where the trees live (the legacy layout's /vservers).
        #[arg(long, default_value = "/vservers", value_name = "DIR")]
        tree_base: PathBuf,
        /// Write NAME.toml into the config dir instead of printing it.
        #[arg(long)]
        write: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CtxCmd {
    /// Run a command in a new context: chcontext + chbind + reducecap.
    Exec(CtxExecArgs),
}

#[derive(Args, Debug)]
pub struct CtxExecArgs {
    #[arg(long)]
    hostname: Option<String>,
    #[arg(long)]
    domainname: Option<String>,
    /// Bind the context to this IPv4 address (ipv4root).
    #[arg(long, value_name = "IPV4")]
    ip: Option<Ipv4Addr>,
    /// Start from the paper's --secure capability ceiling.
    #[arg(long)]
    secure: bool,
    /// Add a capability (CAP_X), or remove one (!CAP_X).
    #[arg(long = "cap", value_name = "CAP")]
    caps: Vec<String>,
    /// Context flags: lock, sched, nproc, private, fakeinit, hideinfo, ulimit.
    #[arg(long = "flag", value_name = "FLAG")]
    flags: Vec<String>,
    /// With --flag nproc: the process limit.
    #[arg(long, value_name = "N")]
    nproc: Option<u64>,
    /// Pivot into this tree (default: keep the filesystem view, own /proc).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs a local verb; returns the process exit code.
pub fn vserver(cmd: LocalVserverCmd, lp: &LocalPaths) -> anyhow::Result<i32> {
    let paths = lp.paths();
    match cmd {
        LocalVserverCmd::Build {
            name,
            tree,
            debootstrap,
        } => {
            let opts = BuildOptions {
                tree,
                debootstrap,
                ..Default::default()
            };
            let tree = local::build(&paths, &name, &opts)?;
            println!(
                "built {} (spec {}/{name}.toml); start it with: vsha vserver start {name}",
                tree.display(),
                paths.config_dir.display()
            );
        }
        LocalVserverCmd::Start { name } => {
            let st = local::start(&paths, &name)?;
            println!(
                "vserver {name} started: context {}, init pid {}{}",
                st.context,
                st.init_pid,
                st.ip.map(|ip| format!(", ip {ip}")).unwrap_or_default()
            );
        }
        LocalVserverCmd::Stop { name } => {
            local::stop(&paths, &name)?;
            println!("vserver {name} stopped");
        }
        ref which @ (LocalVserverCmd::Boot | LocalVserverCmd::Halt) => {
            let (verb, results) = if matches!(which, LocalVserverCmd::Boot) {
                ("started", local::boot(&paths)?)
            } else {
                ("stopped", local::halt(&paths)?)
            };
            let mut failed = 0;
            for (name, r) in &results {
                match r {
                    Ok(()) => println!("vserver {name} {verb}"),
                    Err(e) => {
                        failed += 1;
                        eprintln!("vserver {name}: {e}");
                    }
                }
            }
            if results.is_empty() {
                println!("nothing to do");
            }
            return Ok(i32::from(failed > 0));
        }
        LocalVserverCmd::Restart { name } => {
            let st = local::restart(&paths, &name)?;
            println!(
                "vserver {name} restarted: context {}, init pid {}",
                st.context, st.init_pid
            );
        }
        LocalVserverCmd::Enter { name } => return Ok(local::enter(&paths, &name)?),
        LocalVserverCmd::Exec { name, command } => {
            return Ok(local::exec(
                &paths,
                &name,
                &command,
                &ExecOptions::default(),
            )?)
        }
        LocalVserverCmd::Running { name } => {
            let up = local::running(&paths, &name)?;
            println!(
                "vserver {name} is {}",
                if up { "running" } else { "stopped" }
            );
            return Ok(if up { 0 } else { 1 });
        }
        LocalVserverCmd::Status { name, json } => {
            let s = local::status(&paths, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let rows = vec![vec![
                    s.name.clone(),
                    if s.running { "running" } else { "stopped" }.into(),
                    s.context
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.init_pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.processes.to_string(),
                    s.uptime_secs
                        .map(|u| format!("{u}s"))
                        .unwrap_or_else(|| "-".into()),
                    s.ip.clone().unwrap_or_else(|| "-".into()),
                    s.ipv4root.clone(),
                    s.tree.display().to_string(),
                ]];
                print!(
                    "{}",
                    table(
                        &[
                            "NAME", "STATE", "CTX", "INIT", "PROCS", "UPTIME", "IP", "IPV4ROOT",
                            "TREE"
                        ],
                        &rows
                    )
                );
            }
        }
        LocalVserverCmd::Import {
            conf,
            tree_base,
            write,
        } => {
            if write {
                let out = local::import_to(&paths, &conf, &tree_base)?;
                println!("imported {} to {}", conf.display(), out.display());
            } else {
                let spec = local::import(&conf, &tree_base)?;
                print!("{}", spec.to_toml()?);
            }
        }
    }
    Ok(0)
}

/// Prints `rows` as JSON, or as a table with `header` and one row of cells each.
fn print_rows<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        let t: Vec<Vec<String>> = rows.iter().map(cells).collect();
        print!("{}", table(header, &t));
    }
    Ok(0)
}

/// `vsha vserver list --local`: like vserver-stat.
pub fn list(lp: &LocalPaths, json: bool) -> anyhow::Result<i32> {
    let rows = local::list(&lp.paths())?;
    print_rows(&rows, json, &["CTX", "PROC", "UPTIME", "NAME", "IP"], |r| {
        vec![
            r.context.to_string(),
            r.processes.to_string(),
            format!("{}s", r.uptime_secs),
            r.name.clone(),
            r.ip.clone().unwrap_or_else(|| "-".into()),
        ]
    })
}

/// `vsha ps`: processes with their vserver, like vps.
pub fn ps(lp: &LocalPaths, all: bool, json: bool) -> anyhow::Result<i32> {
    let rows = local::ps(&lp.paths(), !all)?;
    print_rows(
        &rows,
        json,
        &["PID", "VPID", "CTX", "VSERVER", "UID", "STAT", "COMMAND"],
        |r| {
            vec![
                r.pid.to_string(),
                r.inner_pid.to_string(),
                r.context.to_string(),
                r.vserver.clone(),
                r.uid.to_string(),
                r.state.clone(),
                r.command.clone(),
            ]
        },
    )
}

pub fn ctx(cmd: CtxCmd, lp: &LocalPaths) -> anyhow::Result<i32> {
    let CtxCmd::Exec(a) = cmd;
    let flags = a
        .flags
        .iter()
        .map(|f| Flag::parse(f).ok_or_else(|| anyhow!("invalid --flag: {f:?} is not a context flag (lock, sched, nproc, private, fakeinit, hideinfo, ulimit)")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = CtxExecOptions {
        hostname: a.hostname,
        domainname: a.domainname,
        ip: a.ip,
        secure: a.secure,
        caps: a.caps,
        flags,
        nproc_limit: a.nproc,
        root: a.root,
        command: a.command,
        cgroup_parent: Some(lp.cgroup_parent.clone()),
        ..Default::default()
    };
    local::ctx_exec(&opts)
        .context("vsha ctx exec")
        .map_err(|e| anyhow!("{e:#}"))
}
