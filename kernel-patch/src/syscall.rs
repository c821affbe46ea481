//! The mockable kernel boundary (youki's `Syscall` is the model): the
//! lifecycle in [`crate::local`] talks to the kernel only through this
//! trait, so which calls would happen, in which order, is unit-tested
//! without root using [`RecordingSyscall`].

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::cgroup::{CgroupLayout, ContextCgroup, Limits};
use crate::context::{ContextSpec, ExecSpec, Spawned};
use crate::hooks::Phase;
use crate::net::AddrChange;
use crate::patched::Ipv4rootMechanism;
use crate::{Error, Result};

/// The kernel operations the vserver lifecycle uses.
pub trait Syscall: Send + Sync {
    /// Creates the context's cgroups with its limits.
    fn create_cgroup(&self, parent: &str, name: &str, limits: &Limits) -> Result<ContextCgroup>;
    /// Finds the cgroups of an existing context.
    fn locate_cgroup(&self, parent: &str, name: &str) -> Result<ContextCgroup>;
    /// Attaches the ipv4root programs to the context's cgroup.
    fn set_ipv4root(&self, cg: &ContextCgroup, ip: Ipv4Addr, allow_ipv6: bool) -> Result<()>;
    /// How this host pins a context to its address (probed once).
    fn ipv4root_mechanism(&self) -> Ipv4rootMechanism;
    /// Attaches only the IPv6 refusals (with the kernel's set_ipv4root).
    fn deny_ipv6(&self, cg: &ContextCgroup) -> Result<()>;
    fn add_address(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        prefix: u8,
        bcast: Option<Ipv4Addr>,
    ) -> Result<AddrChange>;
    fn del_address(&self, dev: &str, ip: Ipv4Addr, prefix: u8) -> Result<AddrChange>;
    fn promote_secondaries(&self, dev: &str) -> Result<()>;
    /// Gratuitous ARP burst for `ip` on `dev`.
    fn announce(&self, dev: &str, ip: Ipv4Addr) -> Result<()>;
    /// Before taking `ip` over on `dev`: who else answers ARP for it
    /// (`None` = nobody, or probing is disabled).
    fn probe_address(&self, dev: &str, ip: Ipv4Addr) -> Result<Option<crate::net::Mac>>;
    /// `new_s_context`.
    fn spawn_context(&self, spec: &ContextSpec, cg: &ContextCgroup) -> Result<Spawned>;
    /// Runs a command inside a running context and waits for it.
    fn exec_in(&self, init_pid: i32, cg: &ContextCgroup, spec: &ExecSpec) -> Result<i32>;
    /// SIGTERM (optional), wait `grace`, `cgroup.kill`, wait.
    fn terminate(
        &self,
        cg: &ContextCgroup,
        init_pid: Option<i32>,
        grace: Duration,
        signal_init: bool,
    ) -> Result<()>;
    fn remove_cgroup(&self, cg: &ContextCgroup) -> Result<()>;
    fn run_hook(&self, script: &Path, phase: Phase, name: &str) -> Result<()>;
    /// netns mode: a routed veth from the host into the init's namespace.
    fn wire_netns(
        &self,
        init_pid: i32,
        host_if: &str,
        ip: Ipv4Addr,
        uplink: Option<&str>,
    ) -> Result<()>;
    /// Deletes a link (missing is fine).
    fn delete_link(&self, dev: &str) -> Result<()>;
}

/// The real kernel.
#[derive(Debug, Clone)]
pub struct LinuxSyscall {
    pub layout: CgroupLayout,
    /// Gratuitous ARP rounds and their spacing.
    pub garp_count: u32,
    pub garp_interval: Duration,
    /// ARP-probe the address before adding it (how long to listen);
    /// `None` skips the probe (the paper's behaviour).
    pub arp_probe: Option<Duration>,
}

impl LinuxSyscall {
    /// Probes the host's cgroup layout.
    pub fn probe() -> Result<LinuxSyscall> {
        Ok(LinuxSyscall {
            layout: CgroupLayout::probe()?,
            garp_count: 3,
            garp_interval: Duration::from_millis(1000),
            arp_probe: None,
        })
    }
}

impl Syscall for LinuxSyscall {
    fn create_cgroup(&self, parent: &str, name: &str, limits: &Limits) -> Result<ContextCgroup> {
        ContextCgroup::create(&self.layout, parent, name, limits)
    }
    fn locate_cgroup(&self, parent: &str, name: &str) -> Result<ContextCgroup> {
        Ok(ContextCgroup::locate(&self.layout, parent, name))
    }
    fn set_ipv4root(&self, cg: &ContextCgroup, ip: Ipv4Addr, allow_ipv6: bool) -> Result<()> {
        let fd = cg.open_v2()?;
        crate::bpf::set_ipv4root(std::os::fd::AsRawFd::as_raw_fd(&fd), ip, allow_ipv6)
    }
    fn ipv4root_mechanism(&self) -> Ipv4rootMechanism {
        crate::patched::probe()
    }
    fn deny_ipv6(&self, cg: &ContextCgroup) -> Result<()> {
        let fd = cg.open_v2()?;
        crate::bpf::deny_ipv6(std::os::fd::AsRawFd::as_raw_fd(&fd))
    }
    fn add_address(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        prefix: u8,
        bcast: Option<Ipv4Addr>,
    ) -> Result<AddrChange> {
        crate::net::add_address(dev, ip, prefix, bcast)
    }
    fn del_address(&self, dev: &str, ip: Ipv4Addr, prefix: u8) -> Result<AddrChange> {
        crate::net::del_address(dev, ip, prefix)
    }
    fn promote_secondaries(&self, dev: &str) -> Result<()> {
        crate::net::set_promote_secondaries(dev)
    }
    fn announce(&self, dev: &str, ip: Ipv4Addr) -> Result<()> {
        // The first round now (neighbours switch at once, which is what a
        // takeover waits for); the repeats, for lost frames, in the
        // background so the start does not wait out their spacing.
        crate::net::gratuitous_arp(dev, ip, 1, Duration::ZERO)?;
        if self.garp_count > 1 {
            let (dev, count, interval) = (dev.to_string(), self.garp_count - 1, self.garp_interval);
            std::thread::spawn(move || {
                std::thread::sleep(interval);
                if let Err(e) = crate::net::gratuitous_arp(&dev, ip, count, interval) {
                    tracing::warn!(%ip, dev, error = %e, "repeated gratuitous ARP failed");
                }
            });
        }
        Ok(())
    }
    fn probe_address(&self, dev: &str, ip: Ipv4Addr) -> Result<Option<crate::net::Mac>> {
        match self.arp_probe {
            Some(wait) => crate::net::arp_probe(dev, ip, 3, wait),
            None => Ok(None),
        }
    }
    fn spawn_context(&self, spec: &ContextSpec, cg: &ContextCgroup) -> Result<Spawned> {
        crate::context::new_s_context(spec, cg)
    }
    fn exec_in(&self, init_pid: i32, cg: &ContextCgroup, spec: &ExecSpec) -> Result<i32> {
        crate::context::enter(init_pid, cg, spec)?.wait()
    }
    fn terminate(
        &self,
        cg: &ContextCgroup,
        init_pid: Option<i32>,
        grace: Duration,
        signal_init: bool,
    ) -> Result<()> {
        let init = match init_pid {
            Some(p) => crate::sys::pidfd_open(p)
                .ok()
                .map(|pidfd| Spawned { pid: p, pidfd }),
            None => None,
        };
        crate::context::terminate(cg, init.as_ref(), grace, signal_init)
    }
    fn remove_cgroup(&self, cg: &ContextCgroup) -> Result<()> {
        cg.remove()
    }
    fn run_hook(&self, script: &Path, phase: Phase, name: &str) -> Result<()> {
        crate::hooks::run(script, phase, name)
    }
    fn wire_netns(
        &self,
        init_pid: i32,
        host_if: &str,
        ip: Ipv4Addr,
        uplink: Option<&str>,
    ) -> Result<()> {
        crate::net::wire_routed_veth(init_pid, host_if, ip, uplink)
    }
    fn delete_link(&self, dev: &str) -> Result<()> {
        crate::net::delete_link(dev)
    }
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateCgroup {
        parent: String,
        name: String,
        limits: Limits,
    },
    LocateCgroup {
        name: String,
    },
    SetIpv4root {
        ip: Ipv4Addr,
        allow_ipv6: bool,
    },
    AddAddress {
        dev: String,
        ip: Ipv4Addr,
        prefix: u8,
    },
    DelAddress {
        dev: String,
        ip: Ipv4Addr,
        prefix: u8,
    },
    PromoteSecondaries {
        dev: String,
    },
    Announce {
        dev: String,
        ip: Ipv4Addr,
    },
    SpawnContext {
        command: Vec<String>,
        hostname: Option<String>,
        caps: u64,
        /// The child pins itself with the kernel's set_ipv4root.
        ipv4root_call: Option<(i64, Ipv4Addr)>,
    },
    DenyIpv6,
    ExecIn {
        init_pid: i32,
        command: Vec<String>,
    },
    Terminate {
        init_pid: Option<i32>,
        signal_init: bool,
    },
    RemoveCgroup,
    RunHook {
        phase: Phase,
        name: String,
    },
    WireNetns {
        host_if: String,
        ip: Ipv4Addr,
        uplink: Option<String>,
    },
    DeleteLink {
        dev: String,
    },
    ProbeAddress {
        dev: String,
        ip: Ipv4Addr,
    },
}

/// Records calls instead of making them; `fail_on` makes the first call
/// matching the predicate fail with EPERM.
#[derive(Default)]
pub struct RecordingSyscall {
    pub calls: Mutex<Vec<Call>>,
    #[allow(clippy::type_complexity)]
    pub fail_on: Option<Box<dyn Fn(&Call) -> bool + Send + Sync>>,
    /// What `ipv4root_mechanism` answers (a stock kernel by default).
    pub mechanism: Ipv4rootMechanism,
}

impl RecordingSyscall {
    pub fn new() -> RecordingSyscall {
        RecordingSyscall::default()
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn rec(&self, c: Call) -> Result<()> {
        let fail = self.fail_on.as_ref().map(|f| f(&c)).unwrap_or(false);
        let step = format!("{c:?}");
        if let Ok(mut v) = self.calls.lock() {
            v.push(c);
        }
        if fail {
            return Err(Error::Sys {
                step,
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }

    fn fake_cg(name: &str) -> ContextCgroup {
        ContextCgroup {
            v2: Path::new("/nonexistent/vsha").join(name),
            v1: Default::default(),
        }
    }
}

impl Syscall for RecordingSyscall {
    fn create_cgroup(&self, parent: &str, name: &str, limits: &Limits) -> Result<ContextCgroup> {
        self.rec(Call::CreateCgroup {
            parent: parent.into(),
            name: name.into(),
            limits: limits.clone(),
        })?;
        Ok(Self::fake_cg(name))
    }
    fn locate_cgroup(&self, _parent: &str, name: &str) -> Result<ContextCgroup> {
        self.rec(Call::LocateCgroup { name: name.into() })?;
        Ok(Self::fake_cg(name))
    }
    fn set_ipv4root(&self, _cg: &ContextCgroup, ip: Ipv4Addr, allow_ipv6: bool) -> Result<()> {
        self.rec(Call::SetIpv4root { ip, allow_ipv6 })
    }
    fn ipv4root_mechanism(&self) -> Ipv4rootMechanism {
        self.mechanism
    }
    fn deny_ipv6(&self, _cg: &ContextCgroup) -> Result<()> {
        self.rec(Call::DenyIpv6)
    }
    fn add_address(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        prefix: u8,
        _b: Option<Ipv4Addr>,
    ) -> Result<AddrChange> {
        self.rec(Call::AddAddress {
            dev: dev.into(),
            ip,
            prefix,
        })?;
        Ok(AddrChange::Done)
    }
    fn del_address(&self, dev: &str, ip: Ipv4Addr, prefix: u8) -> Result<AddrChange> {
        self.rec(Call::DelAddress {
            dev: dev.into(),
            ip,
            prefix,
        })?;
        Ok(AddrChange::Done)
    }
    fn promote_secondaries(&self, dev: &str) -> Result<()> {
        self.rec(Call::PromoteSecondaries { dev: dev.into() })
    }
    fn announce(&self, dev: &str, ip: Ipv4Addr) -> Result<()> {
        self.rec(Call::Announce {
            dev: dev.into(),
            ip,
        })
    }
    fn probe_address(&self, dev: &str, ip: Ipv4Addr) -> Result<Option<crate::net::Mac>> {
        self.rec(Call::ProbeAddress {
            dev: dev.into(),
            ip,
        })?;
        Ok(None)
    }
    fn spawn_context(&self, spec: &ContextSpec, _cg: &ContextCgroup) -> Result<Spawned> {
        self.rec(Call::SpawnContext {
            command: spec.command.clone(),
            hostname: spec.hostname.clone(),
            caps: spec.caps.0,
            ipv4root_call: spec.ipv4root_call,
        })?;
        // A pidfd of our own process stands in for the context init.
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        Ok(Spawned {
            pid: me,
            pidfd: crate::sys::pidfd_open(me)?,
        })
    }
    fn exec_in(&self, init_pid: i32, _cg: &ContextCgroup, spec: &ExecSpec) -> Result<i32> {
        self.rec(Call::ExecIn {
            init_pid,
            command: spec.command.clone(),
        })?;
        Ok(0)
    }
    fn terminate(
        &self,
        _cg: &ContextCgroup,
        init_pid: Option<i32>,
        _g: Duration,
        signal_init: bool,
    ) -> Result<()> {
        self.rec(Call::Terminate {
            init_pid,
            signal_init,
        })
    }
    fn remove_cgroup(&self, _cg: &ContextCgroup) -> Result<()> {
        self.rec(Call::RemoveCgroup)
    }
    fn run_hook(&self, _script: &Path, phase: Phase, name: &str) -> Result<()> {
        self.rec(Call::RunHook {
            phase,
            name: name.into(),
        })
    }
    fn wire_netns(
        &self,
        _init_pid: i32,
        host_if: &str,
        ip: Ipv4Addr,
        uplink: Option<&str>,
    ) -> Result<()> {
        self.rec(Call::WireNetns {
            host_if: host_if.into(),
            ip,
            uplink: uplink.map(str::to_string),
        })
    }
    fn delete_link(&self, dev: &str) -> Result<()> {
        self.rec(Call::DeleteLink { dev: dev.into() })
    }
}
