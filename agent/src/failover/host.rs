//! The node's hands: starting and stopping clustered vservers through
//! kernel-patch/ (contexts, cgroups, ipv4root, IP alias) with the takeover
//! steps of issue 5 around them — ARP probe first, refuse if anyone
//! answers; tell the guard before anything runs.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vsha_kernel::config::VserverSpec as KernelSpec;
use vsha_kernel::local::{self, Paths};

use crate::model::{NodeRecord, VserverSpec};

use super::guard::Held;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("takeover refused: {ip} is answered by {mac} on {dev}")]
    IpInUse {
        ip: Ipv4Addr,
        dev: String,
        mac: String,
    },
    #[error("no tree for {name} at {path}: nothing replicated here yet")]
    NoTree { name: String, path: String },
    #[error(transparent)]
    Kernel(#[from] vsha_kernel::Error),
}

/// What a start measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartTimes {
    pub probe: Duration,
    pub start: Duration,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub paths: Paths,
    pub vserver_root: PathBuf,
    /// How long to listen for an answer to the ARP probe.
    pub probe_wait: Duration,
}

impl Host {
    pub fn new(
        run_dir: PathBuf,
        vserver_root: PathBuf,
        cgroup_parent: String,
        probe_wait: Duration,
    ) -> Self {
        let mut paths = Paths::new(run_dir.join("conf"), run_dir);
        paths.cgroup_parent = cgroup_parent;
        Host {
            paths,
            vserver_root,
            probe_wait,
        }
    }

    /// The tree a vserver runs from here: the replica when this node has
    /// received one, else the spec's tree, else `VSERVER_ROOT/NAME`.
    pub fn tree(&self, spec: &VserverSpec) -> PathBuf {
        let replica = super::replication::replica_dir(&self.vserver_root).join(&spec.name);
        if replica.exists() {
            return std::fs::canonicalize(&replica).unwrap_or(replica);
        }
        if !spec.tree.is_empty() {
            return PathBuf::from(&spec.tree);
        }
        self.vserver_root.join(&spec.name)
    }

    /// The kernel-level spec of a clustered vserver on this node.
    pub fn kernel_spec(&self, spec: &VserverSpec, node: Option<&NodeRecord>) -> KernelSpec {
        let mut k = KernelSpec::new(&spec.name, self.tree(spec));
        if !spec.ip.is_unspecified() {
            k.ip = Some(format!("{}/{}", spec.ip, spec.prefix));
        }
        let dev = if !spec.dev.is_empty() {
            spec.dev.clone()
        } else {
            node.map(|n| n.iface.clone()).unwrap_or_default()
        };
        if !dev.is_empty() {
            k.dev = Some(dev);
        }
        if !spec.hostname.is_empty() {
            k.hostname = Some(spec.hostname.clone());
        }
        k.caps = spec.capabilities.clone();
        if spec.limits.nproc > 0 {
            k.limits.nproc = Some(spec.limits.nproc);
        }
        if spec.limits.memory_bytes > 0 {
            k.limits.memory = Some(spec.limits.memory_bytes);
        }
        if spec.limits.cpu_weight > 0 {
            k.limits.cpu_weight = Some(spec.limits.cpu_weight as u64);
        }
        k.start = spec.start_command.clone();
        k.stop = spec.stop_command.clone();
        k
    }

    /// What the guard must kill and withdraw if the agent cannot.
    pub fn held(&self, k: &KernelSpec) -> Result<Held, HostError> {
        let cgroup = local::cgroup_dir(&self.paths.cgroup_parent, &k.name)?;
        let alias = match (k.dev.as_ref(), k.ipv4()) {
            (Some(dev), Some((ip, prefix))) => Some((dev.clone(), ip, prefix)),
            _ => None,
        };
        Ok(Held { cgroup, alias })
    }

    /// ARP-probes the IP (when it goes on a device), then starts.
    pub fn start(&self, k: &KernelSpec) -> Result<StartTimes, HostError> {
        let mut t = StartTimes::default();
        if !k.tree.is_dir() {
            return Err(HostError::NoTree {
                name: k.name.clone(),
                path: k.tree.display().to_string(),
            });
        }
        if let (Some(dev), Some((ip, _))) = (k.dev.as_ref(), k.ipv4()) {
            let t0 = Instant::now();
            let answer = vsha_kernel::net::arp_probe(dev, ip, 2, self.probe_wait)?;
            t.probe = t0.elapsed();
            if let Some(mac) = answer {
                return Err(HostError::IpInUse {
                    ip,
                    dev: dev.clone(),
                    mac: mac.to_string(),
                });
            }
        }
        let t0 = Instant::now();
        local::start_spec(&self.paths, k)?;
        t.start = t0.elapsed();
        Ok(t)
    }

    /// Stops it; `hard` kills at once. `Ok(false)`: it was not running.
    pub fn stop(&self, k: &KernelSpec, hard: bool) -> Result<bool, HostError> {
        Ok(local::stop_spec(&self.paths, k, hard)?)
    }

    /// The context's init still runs.
    pub fn running(&self, name: &str) -> bool {
        local::running(&self.paths, name).unwrap_or(false)
    }
}
