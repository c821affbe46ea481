//! Network modes behind one trait.
//!
//! * [`SharedStack`] — the paper's model: the vserver shares the node's
//!   network stack; its IP is a secondary address on IPROOTDEV and the BPF
//!   ipv4root confines it. Gaps: `listen()` without `bind()` lands on 0.0.0.0
//!   (needs BPF-LSM to close), and the vserver still *sees* every host
//!   address and interface and can reach host services on 127.0.0.1.
//! * [`NetNs`] — a network namespace per vserver (own loopback, no autobind
//!   gap, sees only its interfaces), created by the clone and wired with a
//!   routed veth: `eth0` holds `IP/32` inside, the host routes `IP/32` to the
//!   veth and answers ARP for it on the uplink (proxy ARP, IPv4 forwarding
//!   on), so takeover is the route plus gratuitous ARP from the uplink.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::cgroup::ContextCgroup;
use crate::config::{NetworkModeKind, VserverSpec};
use crate::patched::Ipv4rootMechanism;
use crate::syscall::Syscall;
use crate::Result;

/// What a mode set up on the host (kept in the run state for teardown).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetState {
    /// The address alias we added (dev, ip, prefix); `None` if none or if
    /// it was already there before (then it is not ours to remove).
    #[serde(default)]
    pub alias: Option<(String, Ipv4Addr, u8)>,
    /// netns mode: the host end of the routed veth.
    #[serde(default)]
    pub link: Option<String>,
    /// On a patched kernel: the context's first process pins itself with
    /// `set_ipv4root` (syscall number, address) before it execs.
    #[serde(skip)]
    pub ipv4root_call: Option<(i64, Ipv4Addr)>,
}

/// For a process that joins a running context (exec, stop command): the
/// `set_ipv4root` it must make itself on a patched kernel (with cgroup-BPF
/// the cgroup already confines it).
pub fn joiner_ipv4root(sys: &dyn Syscall, spec: &VserverSpec) -> Option<(i64, Ipv4Addr)> {
    match (spec.network, sys.ipv4root_mechanism(), spec.ipv4()) {
        (NetworkModeKind::Shared, Ipv4rootMechanism::KernelCall { nr }, Some((ip, _))) => {
            Some((nr, ip))
        }
        _ => None,
    }
}

/// Pins a context to `ip` before its first process runs: with the kernel's
/// `set_ipv4root` when the host has the patch (the returned call is for the
/// child to make; IPv6 is still refused by cgroup-BPF unless allowed),
/// otherwise with cgroup-BPF.
pub fn apply_ipv4root(
    sys: &dyn Syscall,
    cg: &ContextCgroup,
    ip: Ipv4Addr,
    allow_ipv6: bool,
) -> Result<Option<(i64, Ipv4Addr)>> {
    match sys.ipv4root_mechanism() {
        Ipv4rootMechanism::KernelCall { nr } => {
            if !allow_ipv6 {
                sys.deny_ipv6(cg)?;
            }
            Ok(Some((nr, ip)))
        }
        Ipv4rootMechanism::CgroupBpf => {
            sys.set_ipv4root(cg, ip, allow_ipv6)?;
            Ok(None)
        }
    }
}

/// One way of giving a vserver its network.
pub trait NetworkMode {
    fn kind(&self) -> NetworkModeKind;
    /// Whether the context gets its own network namespace.
    fn new_netns(&self) -> bool;
    /// Host-side setup before the first process exists (cgroup ready).
    fn before_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        cg: &ContextCgroup,
    ) -> Result<NetState>;
    /// Host-side setup once the init runs (announcements, links).
    fn after_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        state: &NetState,
        init_pid: i32,
    ) -> Result<()>;
    /// Undo `before_spawn`/`after_spawn`.
    fn teardown(&self, sys: &dyn Syscall, state: &NetState) -> Result<()>;
}

/// The paper's shared network stack with the BPF ipv4root.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedStack;

impl NetworkMode for SharedStack {
    fn kind(&self) -> NetworkModeKind {
        NetworkModeKind::Shared
    }
    fn new_netns(&self) -> bool {
        false
    }
    fn before_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        cg: &ContextCgroup,
    ) -> Result<NetState> {
        let mut st = NetState::default();
        let Some((ip, prefix)) = spec.ipv4() else {
            return Ok(st);
        };
        // ipv4root before any process runs in the cgroup
        st.ipv4root_call = apply_ipv4root(sys, cg, ip, spec.allow_ipv6)?;
        if let Some(dev) = &spec.dev {
            refuse_if_taken(sys, dev, ip)?;
            sys.promote_secondaries(dev)?;
            if sys.add_address(dev, ip, prefix, spec.broadcast)? == crate::net::AddrChange::Done {
                st.alias = Some((dev.clone(), ip, prefix));
            }
        }
        Ok(st)
    }
    fn after_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        _state: &NetState,
        _init: i32,
    ) -> Result<()> {
        if let (Some((ip, _)), Some(dev)) = (spec.ipv4(), &spec.dev) {
            sys.announce(dev, ip)?;
        }
        Ok(())
    }
    fn teardown(&self, sys: &dyn Syscall, state: &NetState) -> Result<()> {
        if let Some((dev, ip, prefix)) = &state.alias {
            sys.del_address(dev, *ip, *prefix)?;
        }
        Ok(())
    }
}

/// A network namespace per vserver.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetNs;

impl NetworkMode for NetNs {
    fn kind(&self) -> NetworkModeKind {
        NetworkModeKind::Netns
    }
    fn new_netns(&self) -> bool {
        true
    }
    fn before_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        _cg: &ContextCgroup,
    ) -> Result<NetState> {
        if let (Some((ip, _)), Some(dev)) = (spec.ipv4(), &spec.dev) {
            refuse_if_taken(sys, dev, ip)?;
        }
        Ok(NetState {
            alias: None,
            link: spec.ipv4().map(|_| crate::net::host_veth_name(&spec.name)),
            ipv4root_call: None,
        })
    }
    fn after_spawn(
        &self,
        sys: &dyn Syscall,
        spec: &VserverSpec,
        state: &NetState,
        init_pid: i32,
    ) -> Result<()> {
        let Some((ip, _)) = spec.ipv4() else {
            return Ok(());
        };
        let host_if = state
            .link
            .clone()
            .unwrap_or_else(|| crate::net::host_veth_name(&spec.name));
        sys.wire_netns(init_pid, &host_if, ip, spec.dev.as_deref())?;
        if let Some(dev) = &spec.dev {
            sys.announce(dev, ip)?;
        }
        Ok(())
    }
    fn teardown(&self, sys: &dyn Syscall, state: &NetState) -> Result<()> {
        if let Some(l) = &state.link {
            sys.delete_link(l)?;
        }
        Ok(())
    }
}

/// Fails when another machine answers ARP for `ip` on `dev`.
fn refuse_if_taken(sys: &dyn Syscall, dev: &str, ip: Ipv4Addr) -> Result<()> {
    if let Some(mac) = sys.probe_address(dev, ip)? {
        return Err(crate::Error::invalid(
            format!("address {ip} on {dev}"),
            format!("already in use by {mac}; refusing to take it over"),
        ));
    }
    Ok(())
}

/// The mode object for a spec.
pub fn for_kind(kind: NetworkModeKind) -> Box<dyn NetworkMode> {
    match kind {
        NetworkModeKind::Shared => Box::new(SharedStack),
        NetworkModeKind::Netns => Box::new(NetNs),
    }
}
