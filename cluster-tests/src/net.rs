//! The network of a test cluster, all inside namespaces of the run's own:
//! a switch namespace holding a bridge `br0`, one namespace per node whose
//! `eth0` is a veth joined to the bridge, a client namespace, and (on
//! demand) a "foreign" machine. One private subnet, [`SUBNET`].0/24, exists
//! only inside them; nothing is added to the machine's root namespace.
//!
//! Links live only inside the run's namespaces, so their names (`eth0`,
//! `pN`) never collide between runs; namespace names carry the run prefix.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

/// The first three octets of the private subnet.
pub const SUBNET: &str = "10.77.0";

/// Node `id`'s address (its agent listens there).
pub fn node_ip(id: u64) -> String {
    format!("{SUBNET}.{id}")
}

/// The client's address.
pub const CLIENT_IP: &str = "10.77.0.200";

/// The client's second address: its ARP probes alternate their sender
/// address between the two (see [`crate::check`]).
pub const CLIENT_IP2: &str = "10.77.0.199";

/// The foreign machine's address.
pub const FOREIGN_IP: &str = "10.77.0.201";

/// The address of the `k`-th vserver (k = 0, 1, ...).
pub fn vserver_ip(k: usize) -> String {
    format!("{SUBNET}.{}", 50 + k)
}

/// Node `id`'s MAC on its `eth0`; [`node_of_mac`] reverses it.
pub fn node_mac(id: u64) -> String {
    format!("02:77:00:00:00:{id:02x}")
}

/// The node whose `eth0` has `mac`; None for any other machine (the
/// client is ..:c8, the foreign machine ..:c9).
pub fn node_of_mac(mac: &str) -> Option<u64> {
    let m = mac.to_ascii_lowercase();
    let last = m.strip_prefix("02:77:00:00:00:")?;
    u64::from_str_radix(last, 16)
        .ok()
        .filter(|id| (1..0xc8).contains(id))
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace with lo up; deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Netns {
        assert!(name.len() <= 15, "namespace name {name:?} too long");
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns(name.to_string());
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.0]).args(args))
    }

    /// `ip -n NS ARGS`, whatever comes of it.
    pub fn ip_try(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A command in the namespace's network only (`ip netns exec` would
    /// remount /sys and hide the cgroup2 mount).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// The IPv4 addresses on `dev`.
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        let out = self.ip(&["-4", "-o", "addr", "show", "dev", dev]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                f.position(|w| w == "inet")?;
                f.next()?.split('/').next().map(str::to_string)
            })
            .collect()
    }

    pub fn has_addr(&self, ip: &str) -> bool {
        self.addrs("eth0").iter().any(|a| a == ip)
    }

    /// The inode of the namespace (what `/proc/PID/ns/net` names).
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).map_or(0, |m| m.ino())
    }

    /// Every process whose network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        let want = format!("net:[{}]", self.inode());
        let mut pids = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if std::fs::read_link(e.path().join("ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == want)
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in here (a prober, a vserver) goes first.
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The switch, the nodes' and the client's namespaces.
pub struct Net {
    pub prefix: String,
    pub switch: Netns,
    pub client: Netns,
    pub nodes: Vec<Netns>,
    pub foreign: Option<Netns>,
}

impl Net {
    /// `prefix` + "s", + "c", + "nID": at most 15 characters.
    pub fn new(prefix: &str, nodes: u64) -> Net {
        let switch = Netns::new(&format!("{prefix}s"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        // No STP delay, no multicast snooping surprises.
        switch.ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let client = Netns::new(&format!("{prefix}c"));
        let mut net = Net {
            prefix: prefix.to_string(),
            switch,
            client,
            nodes: Vec::new(),
            foreign: None,
        };
        net.plug(&net.client.0.clone(), "pc", "02:77:00:00:00:c8", CLIENT_IP);
        net.client
            .ip(&["addr", "add", &format!("{CLIENT_IP2}/24"), "dev", "eth0"]);
        for id in 1..=nodes {
            let ns = Netns::new(&format!("{prefix}n{id}"));
            let name = ns.0.clone();
            net.nodes.push(ns);
            net.plug(&name, &format!("p{id}"), &node_mac(id), &node_ip(id));
        }
        net
    }

    /// A veth from the bridge (port `port`) to `eth0` in namespace `ns`.
    fn plug(&self, ns: &str, port: &str, mac: &str, ip: &str) {
        self.switch.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        self.switch.ip(&["link", "set", port, "master", "br0"]);
        self.switch.ip(&["link", "set", port, "up"]);
        let n = Command::new("ip")
            .args(["-n", ns, "link", "set", "eth0", "address", mac])
            .output();
        assert!(n.is_ok_and(|o| o.status.success()), "set mac in {ns}");
        run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]));
        run(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]));
    }

    pub fn node(&self, id: u64) -> &Netns {
        &self.nodes[id as usize - 1]
    }

    /// The foreign machine (created on first use), on the same LAN.
    pub fn foreign(&mut self) -> &Netns {
        if self.foreign.is_none() {
            let ns = Netns::new(&format!("{}x", self.prefix));
            let name = ns.0.clone();
            self.foreign = Some(ns);
            self.plug(&name, "px", "02:77:00:00:00:c9", FOREIGN_IP);
        }
        self.foreign.as_ref().expect("foreign")
    }

    /// Node `id`'s bridge port up or down (its cable).
    pub fn cable(&self, id: u64, up: bool) {
        self.switch.ip(&[
            "link",
            "set",
            &format!("p{id}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// Drop rules inside node namespaces: node `a` and node `b` cannot
    /// reach each other (blackhole routes both ways).
    pub fn cut(&self, a: u64, b: u64) {
        self.node(a)
            .ip_try(&["route", "add", "blackhole", &format!("{}/32", node_ip(b))]);
        self.node(b)
            .ip_try(&["route", "add", "blackhole", &format!("{}/32", node_ip(a))]);
    }

    /// Removes every drop rule.
    pub fn heal(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            for j in 1..=self.nodes.len() as u64 {
                if j != i as u64 + 1 {
                    n.ip_try(&["route", "del", "blackhole", &format!("{}/32", node_ip(j))]);
                }
            }
        }
    }

    /// What a reboot leaves on node `id`'s `eth0`: its own address only.
    pub fn flush_vserver_ips(&self, id: u64) {
        let n = self.node(id);
        for a in n.addrs("eth0") {
            if a != node_ip(id) {
                n.ip_try(&["addr", "del", &format!("{a}/24"), "dev", "eth0"]);
            }
        }
    }

    pub fn eth0(&self, id: u64, up: bool) {
        self.node(id)
            .ip_try(&["link", "set", "eth0", if up { "up" } else { "down" }]);
    }
}
