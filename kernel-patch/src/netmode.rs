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
        sys.set_ipv4root(cg, ip, spec.allow_ipv6)?;
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
