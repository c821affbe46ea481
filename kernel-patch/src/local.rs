//! The local vserver tools, one function per CLI verb (no cluster needed):
//! `build`, `start`, `stop`, `restart`, `enter`, `exec`, `running`,
//! `status`, `list` (vserver-stat), `ps` (vps), `ctx_exec`
//! (chcontext + chbind + reducecap) and `import` (legacy `.conf` → TOML).
//!
//! Specs live in `<config_dir>/<NAME>.toml` (default /etc/vsha/vservers),
//! the hook script in `<config_dir>/<NAME>.sh`, the run state in
//! `<run_dir>/<NAME>.json` and the console log in `<run_dir>/<NAME>.log`
//! (default /run/vsha). The lifecycle goes through [`Syscall`], so
//! [`start_with`] and [`stop_with`] are unit-tested with a recording kernel.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::capabilities::{self, CapMask};
use crate::cgroup::{CgroupLayout, ContextCgroup, Limits};
use crate::config::{Flag, VserverSpec};
use crate::context::{ContextSpec, ExecSpec, Stdio};
use crate::hooks::{self, Phase};
use crate::netmode::{self, NetState};
use crate::syscall::{LinuxSyscall, Syscall};
use crate::{Error, Result};

/// Where the local tools keep things.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paths {
    /// Vserver specs and hook scripts (`/etc/vsha/vservers`).
    pub config_dir: PathBuf,
    /// Run state and console logs (`/run/vsha`).
    pub run_dir: PathBuf,
    /// Name of the cgroup directory holding the contexts (`vsha`).
    pub cgroup_parent: String,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            config_dir: PathBuf::from("/etc/vsha/vservers"),
            run_dir: PathBuf::from("/run/vsha"),
            cgroup_parent: "vsha".into(),
        }
    }
}

impl Paths {
    pub fn new(config_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Paths {
        Paths {
            config_dir: config_dir.into(),
            run_dir: run_dir.into(),
            ..Paths::default()
        }
    }
    fn state_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.json"))
    }
    /// The console log of a vserver.
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.log"))
    }
}

/// What a running vserver leaves in `<run_dir>/<NAME>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub name: String,
    /// pid of the context's init in the host pid namespace.
    pub init_pid: i32,
    /// Seconds since the epoch when it started.
    pub started_unix: u64,
    /// Context number: the spec's fixed `context`, else the cgroup id.
    pub context: u64,
    pub cgroup: ContextCgroup,
    #[serde(default)]
    pub net: NetState,
    pub ip: Option<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_state(paths: &Paths, name: &str) -> Result<Option<RunState>> {
    let f = paths.state_file(name);
    match std::fs::read_to_string(&f) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::Config {
                file: f.clone(),
                field: "(run state)".into(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Sys {
            step: format!("read {}", f.display()),
            source: e,
        }),
    }
}

fn write_state(paths: &Paths, st: &RunState) -> Result<()> {
    std::fs::create_dir_all(&paths.run_dir)
        .map_err(Error::sys(format!("mkdir {}", paths.run_dir.display())))?;
    let f = paths.state_file(&st.name);
    let tmp = f.with_extension("json.tmp");
    let text =
        serde_json::to_string_pretty(st).map_err(|e| Error::invalid("run state", e.to_string()))?;
    std::fs::write(&tmp, text).map_err(Error::sys(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &f).map_err(Error::sys(format!("rename to {}", f.display())))
}

/// The start command of a spec (see [`VserverSpec::start`]).
pub fn start_command(spec: &VserverSpec) -> Result<Vec<String>> {
    if !spec.start.is_empty() {
        return Ok(spec.start.clone());
    }
    if spec.has_flag(Flag::Fakeinit) {
        return Ok(vec!["/sbin/init".into()]);
    }
    if spec.tree.join("etc/init.d/rc").exists() {
        return Ok(vec!["/etc/init.d/rc".into(), "3".into()]);
    }
    if spec.tree.join("sbin/init").exists() {
        return Ok(vec!["/sbin/init".into()]);
    }
    Err(Error::invalid(
        format!("vserver {}", spec.name),
        "no start command: set `start` or the fakeinit flag",
    ))
}

/// The context spec (`new_s_context` arguments) for a vserver.
pub fn context_spec(spec: &VserverSpec, paths: &Paths) -> Result<ContextSpec> {
    Ok(ContextSpec {
        name: spec.name.clone(),
        root: Some(spec.tree.clone()),
        hostname: Some(spec.hostname.clone().unwrap_or_else(|| spec.name.clone())),
        domainname: spec.domainname.clone().filter(|d| d != "none"),
        caps: capabilities::resolve(true, &spec.caps)?,
        command: start_command(spec)?,
        env: vec![],
        nice: spec.nice,
        new_netns: netmode::for_kind(spec.network).new_netns(),
        user: None,
        setsid: true,
        lock: spec.has_flag(Flag::Lock),
        stdio: Stdio::Log(paths.log_file(&spec.name)),
        // Set from the network mode's setup, just before the spawn.
        ipv4root_call: None,
    })
}

/// The spec's limits; the `sched` flag without an explicit weight gives the
/// context its own CPU group at the default weight (it weighs as one).
fn limits_of(spec: &VserverSpec) -> Limits {
    let mut l = spec.limits.clone();
    if spec.has_flag(Flag::Sched) && l.cpu_weight.is_none() {
        l.cpu_weight = Some(100);
    }
    l
}

/// Starts a vserver from its spec through `sys`:
/// pre-start hook → cgroups with limits → network mode (ipv4root BPF, IP
/// alias) → `new_s_context` → announcement (gratuitous ARP) → run state →
/// post-start hook. Anything that fails undoes what was done.
pub fn start_with(sys: &dyn Syscall, paths: &Paths, spec: &VserverSpec) -> Result<RunState> {
    spec.validate(&paths.config_dir.join(format!("{}.toml", spec.name)))?;
    if let Some(st) = read_state(paths, &spec.name)? {
        let cg = sys.locate_cgroup(&paths.cgroup_parent, &spec.name)?;
        if cg.exists() && cg.populated().unwrap_or(false) {
            return Err(Error::AlreadyRunning(spec.name.clone()));
        }
        tracing::info!(name = %spec.name, "removing stale run state");
        let _ = cleanup(sys, paths, &st);
    }
    let hook = hooks::script_path(&paths.config_dir, &spec.name);
    sys.run_hook(&hook, Phase::PreStart, &spec.name)?;
    let cspec = context_spec(spec, paths)?;
    std::fs::create_dir_all(&paths.run_dir)
        .map_err(Error::sys(format!("mkdir {}", paths.run_dir.display())))?;
    let cg = match sys.create_cgroup(&paths.cgroup_parent, &spec.name, &limits_of(spec)) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // a leftover empty cgroup of a crashed run
            let old = sys.locate_cgroup(&paths.cgroup_parent, &spec.name)?;
            if old.populated().unwrap_or(false) {
                return Err(Error::AlreadyRunning(spec.name.clone()));
            }
            sys.remove_cgroup(&old)?;
            sys.create_cgroup(&paths.cgroup_parent, &spec.name, &limits_of(spec))?
        }
        r => r?,
    };
    let mode = netmode::for_kind(spec.network);
    let net = match mode.before_spawn(sys, spec, &cg) {
        Ok(n) => n,
        Err(e) => {
            let _ = sys.remove_cgroup(&cg);
            return Err(e);
        }
    };
    let mut cspec = cspec;
    cspec.ipv4root_call = net.ipv4root_call;
    let spawned = match sys.spawn_context(&cspec, &cg) {
        Ok(s) => s,
        Err(e) => {
            let _ = mode.teardown(sys, &net);
            let _ = sys.terminate(&cg, None, Duration::ZERO, false);
            let _ = sys.remove_cgroup(&cg);
            return Err(e);
        }
    };
    let st = RunState {
        name: spec.name.clone(),
        init_pid: spawned.pid,
        started_unix: now_unix(),
        context: spec
            .context
            .map(u64::from)
            .unwrap_or_else(|| cg.id().unwrap_or(0)),
        cgroup: cg.clone(),
        net,
        ip: spec.ip.clone(),
    };
    let r = write_state(paths, &st).and_then(|_| mode.after_spawn(sys, spec, &st.net, spawned.pid));
    if let Err(e) = r {
        let _ = cleanup(sys, paths, &st);
        return Err(e);
    }
    if let Err(e) = sys.run_hook(&hook, Phase::PostStart, &spec.name) {
        tracing::warn!(error = %e, "post-start hook failed");
    }
    Ok(st)
}

fn cleanup(sys: &dyn Syscall, paths: &Paths, st: &RunState) -> Result<()> {
    use crate::netmode::NetworkMode;
    let r1 = netmode::SharedStack.teardown(sys, &st.net);
    let r1 = r1.and(netmode::NetNs.teardown(sys, &st.net));
    let r2 = sys.terminate(&st.cgroup, Some(st.init_pid), Duration::ZERO, false);
    let r3 = sys.remove_cgroup(&st.cgroup);
    let _ = std::fs::remove_file(paths.state_file(&st.name));
    r1.and(r2).and(r3)
}

/// Stops a vserver through `sys`: pre-stop hook → the stop command inside
/// the context (or SIGTERM to its init) → wait up to `stop_timeout` for the
/// cgroup to empty → `cgroup.kill` → remove the address alias → remove the
/// cgroups → post-stop hook.
pub fn stop_with(
    sys: &dyn Syscall,
    paths: &Paths,
    spec: &VserverSpec,
    st: &RunState,
) -> Result<()> {
    let hook = hooks::script_path(&paths.config_dir, &spec.name);
    if let Err(e) = sys.run_hook(&hook, Phase::PreStop, &spec.name) {
        tracing::warn!(error = %e, "pre-stop hook failed; stopping anyway");
    }
    let mut signal_init = true;
    if !spec.stop.is_empty() {
        let es = ExecSpec {
            command: spec.stop.clone(),
            caps: capabilities::resolve(true, &spec.caps)?,
            stdio: Stdio::Log(paths.log_file(&spec.name)),
            lock: spec.has_flag(Flag::Lock),
            ipv4root_call: netmode::joiner_ipv4root(sys, spec),
            ..Default::default()
        };
        match sys.exec_in(st.init_pid, &st.cgroup, &es) {
            Ok(code) => {
                tracing::info!(code, "stop command ran");
                signal_init = false;
            }
            Err(e) => tracing::warn!(error = %e, "stop command failed; sending SIGTERM"),
        }
    }
    let grace = Duration::from_secs(spec.stop_timeout);
    sys.terminate(&st.cgroup, Some(st.init_pid), grace, signal_init)?;
    let mode = netmode::for_kind(spec.network);
    let r1 = mode.teardown(sys, &st.net);
    let r2 = sys.remove_cgroup(&st.cgroup);
    let _ = std::fs::remove_file(paths.state_file(&spec.name));
    if let Err(e) = sys.run_hook(&hook, Phase::PostStop, &spec.name) {
        tracing::warn!(error = %e, "post-stop hook failed");
    }
    r1.and(r2)
}

fn linux() -> Result<LinuxSyscall> {
    LinuxSyscall::probe()
}

/// Starts a vserver from a spec held by the caller (the agent keeps specs
/// in the replicated state, not in `config_dir`).
pub fn start_spec(paths: &Paths, spec: &VserverSpec) -> Result<RunState> {
    start_with(&linux()?, paths, spec)
}

/// Stops a vserver started with [`start_spec`]; `Ok(false)` when it was not
/// running. With `hard`, no stop command and no grace period: every process
/// is killed at once (self-fencing must be quick).
pub fn stop_spec(paths: &Paths, spec: &VserverSpec, hard: bool) -> Result<bool> {
    let Some(st) = read_state(paths, &spec.name)? else {
        return Ok(false);
    };
    let mut spec = spec.clone();
    if hard {
        spec.stop.clear();
        spec.stop_timeout = 0;
    }
    stop_with(&linux()?, paths, &spec, &st)?;
    Ok(true)
}

/// The cgroup v2 directory a vserver's context gets under `parent`, known
/// before it starts (so a guard can be told before anything runs).
pub fn cgroup_dir(parent: &str, name: &str) -> Result<PathBuf> {
    let layout = crate::cgroup::CgroupLayout::probe()?;
    Ok(crate::cgroup::ContextCgroup::locate(&layout, parent, name).v2)
}

/// The names of the specs in the config dir, sorted.
pub fn spec_names(paths: &Paths) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(&paths.config_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::sys(format!("read {}", paths.config_dir.display()))(
                e,
            ))
        }
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension().and_then(|x| x.to_str()) == Some("toml"))
                .then(|| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
                .flatten()
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `vsha vserver boot`: starts every vserver whose spec says `onboot` and
/// that does not run yet (a standalone node's boot); one result each.
pub fn boot(paths: &Paths) -> Result<Vec<(String, Result<()>)>> {
    let mut out = Vec::new();
    for name in spec_names(paths)? {
        let spec = match VserverSpec::load(&paths.config_dir, &name) {
            Ok(s) => s,
            Err(e) => {
                out.push((name, Err(e)));
                continue;
            }
        };
        if !spec.onboot || running(paths, &name).unwrap_or(false) {
            continue;
        }
        let r = start_with(&linux()?, paths, &spec).map(|_| ());
        out.push((name, r));
    }
    Ok(out)
}

/// `vsha vserver halt`: stops every running vserver of the config dir.
pub fn halt(paths: &Paths) -> Result<Vec<(String, Result<()>)>> {
    let mut out = Vec::new();
    for name in spec_names(paths)? {
        if running(paths, &name).unwrap_or(false) {
            let r = stop(paths, &name);
            out.push((name, r));
        }
    }
    Ok(out)
}

/// `vsha vserver start NAME`.
pub fn start(paths: &Paths, name: &str) -> Result<RunState> {
    let spec = VserverSpec::load(&paths.config_dir, name)?;
    start_with(&linux()?, paths, &spec)
}

/// `vsha vserver stop NAME`.
pub fn stop(paths: &Paths, name: &str) -> Result<()> {
    let spec = VserverSpec::load(&paths.config_dir, name)?;
    let st = read_state(paths, name)?.ok_or_else(|| Error::NotRunning(name.into()))?;
    stop_with(&linux()?, paths, &spec, &st)
}

/// `vsha vserver restart NAME` (stop if running, then start).
pub fn restart(paths: &Paths, name: &str) -> Result<RunState> {
    if running(paths, name)? {
        stop(paths, name)?;
    }
    start(paths, name)
}

/// Whether the vserver's context has processes (`vsha vserver running`).
pub fn running(paths: &Paths, name: &str) -> Result<bool> {
    let Some(st) = read_state(paths, name)? else {
        return Ok(false);
    };
    Ok(st.cgroup.exists() && st.cgroup.populated().unwrap_or(false))
}

/// Options of `exec`/`enter`.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Run as this uid/gid (the paper's `suexec`).
    pub user: Option<(u32, u32)>,
    /// Where the output goes (default: the caller's terminal).
    pub stdio: Stdio,
    /// Extra environment (`KEY=VALUE`) on top of PATH/HOME/TERM.
    pub env: Vec<String>,
}

fn running_state(paths: &Paths, name: &str) -> Result<RunState> {
    let st = read_state(paths, name)?.ok_or_else(|| Error::NotRunning(name.into()))?;
    if !st.cgroup.exists() || !st.cgroup.populated().unwrap_or(false) {
        return Err(Error::NotRunning(name.into()));
    }
    Ok(st)
}

/// `vsha vserver exec NAME -- CMD...`: runs `cmd` in the running vserver
/// (all its namespaces and cgroups, same capability ceiling); returns its
/// exit code.
pub fn exec(paths: &Paths, name: &str, cmd: &[String], opts: &ExecOptions) -> Result<i32> {
    let spec = VserverSpec::load(&paths.config_dir, name)?;
    exec_spec(paths, &spec, cmd, opts)
}

/// [`exec`] with a spec held by the caller (the agent's health commands).
pub fn exec_spec(
    paths: &Paths,
    spec: &VserverSpec,
    cmd: &[String],
    opts: &ExecOptions,
) -> Result<i32> {
    let name = spec.name.as_str();
    if spec.has_flag(Flag::Private) {
        return Err(Error::invalid(
            format!("vserver {name}"),
            "has the private flag: nobody may enter it (remove the flag and restart)",
        ));
    }
    let st = running_state(paths, name)?;
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
    ];
    if let Ok(t) = std::env::var("TERM") {
        env.push(format!("TERM={t}"));
    }
    env.extend(opts.env.iter().cloned());
    let sys = linux()?;
    let es = ExecSpec {
        command: cmd.to_vec(),
        env,
        caps: capabilities::resolve(true, &spec.caps)?,
        user: opts.user,
        stdio: opts.stdio.clone(),
        lock: spec.has_flag(Flag::Lock),
        ipv4root_call: netmode::joiner_ipv4root(&sys, spec),
    };
    sys.exec_in(st.init_pid, &st.cgroup, &es)
}

/// `vsha vserver enter NAME`: a login shell in the vserver.
pub fn enter(paths: &Paths, name: &str) -> Result<i32> {
    let spec = VserverSpec::load(&paths.config_dir, name)?;
    let shell = if spec.tree.join("bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    exec(
        paths,
        name,
        &[shell.to_string(), "-l".to_string()],
        &ExecOptions::default(),
    )
}

/// `vsha vserver status NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VserverStatus {
    pub name: String,
    pub running: bool,
    pub context: Option<u64>,
    pub init_pid: Option<i32>,
    pub processes: usize,
    pub uptime_secs: Option<u64>,
    pub ip: Option<String>,
    pub dev: Option<String>,
    pub tree: PathBuf,
    pub network: crate::config::NetworkModeKind,
    /// What confines it to its IP on this host: "cgroup-bpf", "kernel
    /// set_ipv4root (syscall N)", "netns" or "none".
    pub ipv4root: String,
}

/// `vsha vserver status NAME`: process count and uptime (as the paper's
/// status), plus the IP and context.
pub fn status(paths: &Paths, name: &str) -> Result<VserverStatus> {
    let spec = VserverSpec::load(&paths.config_dir, name)?;
    let st = read_state(paths, name)?;
    let live = st
        .as_ref()
        .filter(|s| s.cgroup.exists() && s.cgroup.populated().unwrap_or(false));
    Ok(VserverStatus {
        name: name.into(),
        running: live.is_some(),
        context: live.map(|s| s.context),
        init_pid: live.map(|s| s.init_pid),
        processes: live
            .and_then(|s| s.cgroup.procs().ok())
            .map(|p| p.len())
            .unwrap_or(0),
        uptime_secs: live.map(|s| now_unix().saturating_sub(s.started_unix)),
        ip: spec.ip.clone(),
        dev: spec.dev.clone(),
        tree: spec.tree.clone(),
        network: spec.network,
        ipv4root: ipv4root_in_force(&spec),
    })
}

/// The mechanism that confines `spec` to its address on this host.
pub fn ipv4root_in_force(spec: &VserverSpec) -> String {
    match (spec.network, spec.ipv4()) {
        (_, None) => "none".into(),
        (crate::config::NetworkModeKind::Netns, _) => "netns".into(),
        (crate::config::NetworkModeKind::Shared, _) => crate::patched::probe().to_string(),
    }
}

/// One row of `vsha vserver list` (like vserver-stat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListRow {
    pub context: u64,
    pub processes: usize,
    pub uptime_secs: u64,
    pub name: String,
    pub ip: Option<String>,
    pub init_pid: i32,
}

/// `vsha vserver list`: the running vservers.
pub fn list(paths: &Paths) -> Result<Vec<ListRow>> {
    let mut rows = Vec::new();
    let rd = match std::fs::read_dir(&paths.run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(rows),
        Err(e) => {
            return Err(Error::Sys {
                step: format!("read {}", paths.run_dir.display()),
                source: e,
            })
        }
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Ok(Some(st)) = read_state(paths, name) else {
            continue;
        };
        if !st.cgroup.exists() {
            continue;
        }
        let procs = st.cgroup.procs().unwrap_or_default();
        if procs.is_empty() {
            continue;
        }
        rows.push(ListRow {
            context: st.context,
            processes: procs.len(),
            uptime_secs: now_unix().saturating_sub(st.started_unix),
            name: st.name.clone(),
            ip: st.ip.clone(),
            init_pid: st.init_pid,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// One row of `vsha ps` (like vps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PsRow {
    pub pid: i32,
    /// pid inside the vserver's pid namespace.
    pub inner_pid: i32,
    /// 0 for the host.
    pub context: u64,
    /// vserver name, or "host".
    pub vserver: String,
    pub uid: u32,
    pub state: String,
    pub command: String,
}

/// `vsha ps`: every process with its vserver; `only_vservers` drops host rows.
pub fn ps(paths: &Paths, only_vservers: bool) -> Result<Vec<PsRow>> {
    let layout = CgroupLayout::probe().ok();
    let _ = layout;
    let mut ctx = std::collections::BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(&paths.run_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if let Some(name) = p.file_stem().and_then(|s| s.to_str()) {
                if p.extension().and_then(|x| x.to_str()) == Some("json") {
                    if let Ok(Some(st)) = read_state(paths, name) {
                        ctx.insert(name.to_string(), st.context);
                    }
                }
            }
        }
    }
    let prefix = format!("/{}/", paths.cgroup_parent);
    let mut rows = Vec::new();
    for p in crate::proc::all(Path::new("/proc")) {
        let vs = p
            .cgroup
            .strip_prefix(&prefix)
            .map(|r| r.split('/').next().unwrap_or("").to_string());
        if only_vservers && vs.is_none() {
            continue;
        }
        let (vserver, context) = match vs {
            Some(n) => {
                let c = ctx.get(&n).copied().unwrap_or(0);
                (n, c)
            }
            None => ("host".to_string(), 0),
        };
        rows.push(PsRow {
            pid: p.pid,
            inner_pid: p.inner_pid,
            context,
            vserver,
            uid: p.uid,
            state: p.state,
            command: p.command,
        });
    }
    Ok(rows)
}

/// Options of `vsha ctx exec` (chcontext + chbind + reducecap).
#[derive(Debug, Clone, Default)]
pub struct CtxExecOptions {
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// chbind: the ipv4root.
    pub ip: Option<Ipv4Addr>,
    /// Start from the paper's `--secure` ceiling (else all capabilities).
    pub secure: bool,
    /// `CAP_X` adds, `!CAP_X` removes.
    pub caps: Vec<String>,
    /// Context flags (`nproc` uses `nproc_limit`).
    pub flags: Vec<Flag>,
    pub nproc_limit: Option<u64>,
    /// Pivot into this tree; `None` keeps the caller's filesystem view with a
    /// private /proc.
    pub root: Option<PathBuf>,
    pub command: Vec<String>,
    /// cgroup parent directory (default "vsha").
    pub cgroup_parent: Option<String>,
    pub stdio: Stdio,
}

/// `vsha ctx exec [...] -- CMD...`: runs `CMD` in a new, throw-away context
/// and returns its exit code; the context's cgroup (and anything left in it)
/// is removed when the command ends.
pub fn ctx_exec(opts: &CtxExecOptions) -> Result<i32> {
    let sys = linux()?;
    let parent = opts.cgroup_parent.clone().unwrap_or_else(|| "vsha".into());
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("ctx-{me}-{n}");
    let mut limits = Limits::default();
    if opts.flags.contains(&Flag::Nproc) {
        limits.nproc = Some(opts.nproc_limit.unwrap_or(1000));
    }
    let cg = sys.create_cgroup(&parent, &name, &limits)?;
    let run = || -> Result<i32> {
        let ipv4root_call = match opts.ip {
            Some(ip) => netmode::apply_ipv4root(&sys, &cg, ip, false)?,
            None => None,
        };
        let spec = ContextSpec {
            name: name.clone(),
            root: opts.root.clone(),
            hostname: opts.hostname.clone(),
            domainname: opts.domainname.clone(),
            caps: capabilities::resolve(opts.secure, &opts.caps)?,
            command: opts.command.clone(),
            env: vec![],
            nice: None,
            new_netns: false,
            user: None,
            setsid: false,
            lock: opts.flags.contains(&Flag::Lock),
            stdio: opts.stdio.clone(),
            ipv4root_call,
        };
        let child = sys.spawn_context(&spec, &cg)?;
        child.wait()
    };
    let r = run();
    let t = sys.terminate(&cg, None, Duration::ZERO, false);
    let rm = sys.remove_cgroup(&cg);
    let code = r?;
    t?;
    rm?;
    Ok(code)
}

/// `vsha vserver import /etc/vservers/NAME.conf`: the legacy file as a spec
/// (tree `<tree_base>/NAME`, default `/vservers`).
pub fn import(conf: &Path, tree_base: &Path) -> Result<VserverSpec> {
    let text =
        std::fs::read_to_string(conf).map_err(Error::sys(format!("read {}", conf.display())))?;
    crate::config::import_legacy(&text, conf, tree_base)
}

/// Imports and writes `<config_dir>/NAME.toml` (refuses to overwrite);
/// copies a legacy `NAME.sh` hook next to it. Returns the TOML path.
pub fn import_to(paths: &Paths, conf: &Path, tree_base: &Path) -> Result<PathBuf> {
    let spec = import(conf, tree_base)?;
    std::fs::create_dir_all(&paths.config_dir)
        .map_err(Error::sys(format!("mkdir {}", paths.config_dir.display())))?;
    let out = paths.config_dir.join(format!("{}.toml", spec.name));
    if out.exists() {
        return Err(Error::invalid(out.display().to_string(), "already exists"));
    }
    std::fs::write(&out, spec.to_toml()?)
        .map_err(Error::sys(format!("write {}", out.display())))?;
    let legacy_hook = conf.with_extension("sh");
    if legacy_hook.exists() {
        let dst = hooks::script_path(&paths.config_dir, &spec.name);
        std::fs::copy(&legacy_hook, &dst)
            .map_err(Error::sys(format!("copy {}", legacy_hook.display())))?;
    }
    Ok(out)
}

/// Options of `vsha vserver build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the tree goes (default `/vservers/NAME`).
    pub tree: Option<PathBuf>,
    /// Debian's busybox-static binary.
    pub busybox: PathBuf,
    /// Build a full Debian tree with `debootstrap --variant=minbase SUITE`.
    pub debootstrap: Option<String>,
    /// Also write `<config_dir>/NAME.toml` when it does not exist.
    pub write_spec: bool,
}

impl Default for BuildOptions {
    fn default() -> BuildOptions {
        BuildOptions {
            tree: None,
            busybox: PathBuf::from("/bin/busybox"),
            debootstrap: None,
            write_spec: true,
        }
    }
}

/// `vsha vserver build NAME`: a minimal tree from busybox-static (or a
/// debootstrap tree), with the directories a context needs, and a spec.
pub fn build(paths: &Paths, name: &str, opts: &BuildOptions) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !crate::config::valid_name(name) {
        return Err(Error::invalid(
            "vserver name",
            format!("{name:?} is not a valid name"),
        ));
    }
    let tree = opts
        .tree
        .clone()
        .unwrap_or_else(|| Path::new("/vservers").join(name));
    let mk = |d: &str, mode: u32| -> Result<()> {
        let p = tree.join(d);
        std::fs::create_dir_all(&p).map_err(Error::sys(format!("mkdir {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(Error::sys(format!("chmod {}", p.display())))
    };
    if let Some(suite) = &opts.debootstrap {
        let out = std::process::Command::new("debootstrap")
            .args(["--variant=minbase", suite])
            .arg(&tree)
            .output()
            .map_err(Error::sys("run debootstrap (apt-get install debootstrap)"))?;
        if !out.status.success() {
            return Err(Error::invalid(
                "debootstrap",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    } else {
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "etc", "var/run", "var/log", "home",
        ] {
            mk(d, 0o755)?;
        }
        let bb = tree.join("bin/busybox");
        std::fs::copy(&opts.busybox, &bb).map_err(Error::sys(format!(
            "copy {} (apt-get install busybox-static)",
            opts.busybox.display()
        )))?;
        std::fs::set_permissions(&bb, std::fs::Permissions::from_mode(0o755))
            .map_err(Error::sys("chmod busybox"))?;
        let out = std::process::Command::new(&opts.busybox)
            .arg("--list-full")
            .output()
            .map_err(Error::sys(format!(
                "run {} --list-full",
                opts.busybox.display()
            )))?;
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || applet.contains("..") || applet == "bin/busybox" {
                continue;
            }
            let link = tree.join(applet);
            if link.symlink_metadata().is_ok() {
                continue;
            }
            if let Some(parent) = link.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::os::unix::fs::symlink("/bin/busybox", &link)
                .map_err(Error::sys(format!("symlink {}", link.display())))?;
        }
        let files = [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
            ("etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"),
            ("etc/inittab", "::sysinit:/bin/true\n::shutdown:/bin/true\n"),
            ("etc/fstab", "/dev/hdv1 / ext2 defaults 1 1\n"),
        ];
        for (f, text) in files {
            let p = tree.join(f);
            if !p.exists() {
                std::fs::write(&p, text).map_err(Error::sys(format!("write {}", p.display())))?;
            }
        }
        std::fs::write(tree.join("etc/hostname"), format!("{name}\n"))
            .map_err(Error::sys("write etc/hostname"))?;
    }
    mk("proc", 0o555)?;
    mk("dev", 0o755)?;
    mk("tmp", 0o1777)?;
    mk("root", 0o750)?;
    if opts.write_spec {
        let f = paths.config_dir.join(format!("{name}.toml"));
        if !f.exists() {
            let mut spec = VserverSpec::new(name, &tree);
            spec.hostname = Some(name.to_string());
            spec.flags = vec![Flag::Fakeinit];
            std::fs::create_dir_all(&paths.config_dir)
                .map_err(Error::sys(format!("mkdir {}", paths.config_dir.display())))?;
            std::fs::write(&f, spec.to_toml()?)
                .map_err(Error::sys(format!("write {}", f.display())))?;
        }
    }
    tracing::info!(name, tree = %tree.display(), "tree built");
    Ok(tree)
}

/// The capability ceiling a spec gives (for display).
pub fn ceiling(spec: &VserverSpec) -> Result<CapMask> {
    capabilities::resolve(true, &spec.caps)
}
