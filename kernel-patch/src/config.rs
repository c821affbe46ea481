//! The vserver spec: one TOML file per vserver, validated with errors naming
//! file, field and reason; and the import of the legacy shell-variable
//! `/etc/vservers/NAME.conf`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;
use crate::{Error, Result};

/// How the vserver reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkModeKind {
    /// The paper's model: the IP is a secondary address on the node's
    /// device, isolation by the BPF ipv4root.
    #[default]
    Shared,
    /// A network namespace per vserver with a routed veth holding the IP.
    Netns,
}

/// Context flags (S_FLAGS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flag {
    Lock,
    Sched,
    Nproc,
    Private,
    Fakeinit,
    Hideinfo,
    Ulimit,
}

impl Flag {
    pub fn parse(s: &str) -> Option<Flag> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "lock" => Flag::Lock,
            "sched" => Flag::Sched,
            "nproc" => Flag::Nproc,
            "private" => Flag::Private,
            "fakeinit" => Flag::Fakeinit,
            "hideinfo" => Flag::Hideinfo,
            "ulimit" => Flag::Ulimit,
            _ => return None,
        })
    }
}

/// One vserver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VserverSpec {
    pub name: String,
    /// The vserver's root directory.
    pub tree: PathBuf,
    /// `A.B.C.D/prefix` (ipv4root); absent = not tied to one IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Device that carries the IP alias (IPROOTDEV); absent = no alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domainname: Option<String>,
    /// Added to (`CAP_X`) or removed from (`!CAP_X`) the secure ceiling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
    /// Fixed context number (S_CONTEXT), informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u32>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
    /// Start command; default `/sbin/init` with `fakeinit`, else
    /// `/etc/init.d/rc 3` when present, else `/bin/sh`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<String>,
    /// Stop command run inside the context; default SIGTERM to its init.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Seconds between the stop request and `cgroup.kill`.
    #[serde(default = "default_grace")]
    pub stop_timeout: u64,
    #[serde(default)]
    pub onboot: bool,
    #[serde(default)]
    pub network: NetworkModeKind,
    /// Allow IPv6 sockets (otherwise denied by the ipv4root programs).
    #[serde(default)]
    pub allow_ipv6: bool,
}

fn default_grace() -> u64 {
    10
}

fn cerr(file: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Valid vserver name: 1..=48 of `[A-Za-z0-9_.-]`, not starting with `.`/`-`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 48
        && !n.starts_with('.')
        && !n.starts_with('-')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Parses `A.B.C.D/prefix`, `A.B.C.D/255.255.255.0` or a bare address (/32).
pub fn parse_cidr(s: &str) -> std::result::Result<(Ipv4Addr, u8), String> {
    let (a, m) = match s.split_once('/') {
        Some((a, m)) => (a, Some(m)),
        None => (s, None),
    };
    let ip: Ipv4Addr = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let prefix = match m {
        None => 32,
        Some(m) => mask_to_prefix(m)?,
    };
    Ok((ip, prefix))
}

fn mask_to_prefix(m: &str) -> std::result::Result<u8, String> {
    if let Ok(p) = m.trim().parse::<u8>() {
        if p <= 32 {
            return Ok(p);
        }
        return Err(format!("prefix {p} is larger than 32"));
    }
    let mask: Ipv4Addr = m
        .trim()
        .parse()
        .map_err(|_| format!("{m:?} is neither a prefix length nor a netmask"))?;
    let v = u32::from(mask);
    if v.leading_ones() + v.trailing_zeros() != 32 {
        return Err(format!("{m} is not a contiguous netmask"));
    }
    Ok(v.leading_ones() as u8)
}

fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

impl VserverSpec {
    /// A spec with defaults for everything but name and tree.
    pub fn new(name: &str, tree: impl Into<PathBuf>) -> VserverSpec {
        VserverSpec {
            name: name.to_string(),
            tree: tree.into(),
            ip: None,
            dev: None,
            broadcast: None,
            hostname: None,
            domainname: None,
            caps: vec![],
            flags: vec![],
            context: None,
            limits: Limits::default(),
            nice: None,
            start: vec![],
            stop: vec![],
            stop_timeout: default_grace(),
            onboot: false,
            network: NetworkModeKind::Shared,
            allow_ipv6: false,
        }
    }

    /// The parsed IP and prefix, if any.
    pub fn ipv4(&self) -> Option<(Ipv4Addr, u8)> {
        self.ip.as_deref().and_then(|s| parse_cidr(s).ok())
    }

    pub fn has_flag(&self, f: Flag) -> bool {
        self.flags.contains(&f)
    }

    /// Checks every field; `file` names the source in errors.
    pub fn validate(&self, file: &Path) -> Result<()> {
        if !valid_name(&self.name) {
            return Err(cerr(
                file,
                "name",
                format!("{:?}: use 1-48 characters of A-Z a-z 0-9 _ . -", self.name),
            ));
        }
        if !self.tree.is_absolute() {
            return Err(cerr(
                file,
                "tree",
                format!("{} is not an absolute path", self.tree.display()),
            ));
        }
        if let Some(ip) = &self.ip {
            let (a, _) = parse_cidr(ip).map_err(|r| cerr(file, "ip", r))?;
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(cerr(file, "ip", format!("{a} cannot be a vserver address")));
            }
        }
        if self.dev.is_some() && self.ip.is_none() {
            return Err(cerr(file, "dev", "a device without an ip: set ip as well"));
        }
        if let Some(d) = &self.dev {
            if d.is_empty() || d.len() > 15 || d.contains('/') || d.contains(char::is_whitespace) {
                return Err(cerr(file, "dev", format!("{d:?} is not an interface name")));
            }
        }
        if self.network == NetworkModeKind::Netns && self.ip.is_none() {
            return Err(cerr(file, "network", "the netns mode needs an ip"));
        }
        for (f, v) in [
            ("hostname", &self.hostname),
            ("domainname", &self.domainname),
        ] {
            if let Some(h) = v {
                if !hostname_ok(h) {
                    return Err(cerr(file, f, format!("{h:?} is not a valid name")));
                }
            }
        }
        crate::capabilities::resolve(true, &self.caps)
            .map_err(|e| cerr(file, "caps", e.to_string()))?;
        if let Some(n) = self.nice {
            if !(-20..=19).contains(&n) {
                return Err(cerr(file, "nice", format!("{n} is outside -20..19")));
            }
        }
        if self.limits.nproc == Some(0) {
            return Err(cerr(file, "limits.nproc", "0 would forbid the init itself"));
        }
        if let Some(w) = self.limits.cpu_weight {
            if !(1..=10000).contains(&w) {
                return Err(cerr(
                    file,
                    "limits.cpu_weight",
                    format!("{w} is outside 1..10000"),
                ));
            }
        }
        if let Some(m) = self.limits.memory {
            if m < 4 << 20 {
                return Err(cerr(
                    file,
                    "limits.memory",
                    format!("{m} bytes is below 4 MiB"),
                ));
            }
        }
        if let Some(c) = self.context {
            if c <= 1 {
                return Err(cerr(
                    file,
                    "context",
                    "must be > 1 (0 is the host, 1 the spectator)",
                ));
            }
        }
        if self.start.iter().any(|a| a.contains('\0')) || self.stop.iter().any(|a| a.contains('\0'))
        {
            return Err(cerr(file, "start", "arguments must not contain NUL"));
        }
        Ok(())
    }

    /// Parses and validates a TOML text.
    pub fn from_toml(text: &str, file: &Path) -> Result<VserverSpec> {
        let spec: VserverSpec = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("(syntax)")
                .to_string();
            cerr(file, &field, e.to_string().replace('\n', " "))
        })?;
        spec.validate(file)?;
        Ok(spec)
    }

    /// Loads `<dir>/<name>.toml`.
    pub fn load(dir: &Path, name: &str) -> Result<VserverSpec> {
        if !valid_name(name) {
            return Err(Error::invalid(
                "vserver name",
                format!("{name:?} is not a valid name"),
            ));
        }
        let file = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&file)
            .map_err(Error::sys(format!("read {}", file.display())))?;
        let spec = Self::from_toml(&text, &file)?;
        if spec.name != name {
            return Err(cerr(
                &file,
                "name",
                format!("{:?} does not match the file name {name:?}", spec.name),
            ));
        }
        Ok(spec)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::invalid("spec", format!("cannot serialise: {e}")))
    }
}

/// Parses the shell-variable assignments of a legacy `.conf`: `NAME=value`,
/// `NAME="value"`, `NAME='value'`, comments and blank lines. Other shell
/// constructs are ignored.
pub fn parse_shell_vars(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        let l = l.strip_prefix("export ").unwrap_or(l);
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let v = v.trim();
        let val = if let Some(r) = v.strip_prefix('"') {
            r.split('"').next().unwrap_or("").to_string()
        } else if let Some(r) = v.strip_prefix('\'') {
            r.split('\'').next().unwrap_or("").to_string()
        } else {
            v.split('#').next().unwrap_or("").trim().to_string()
        };
        out.push((k.to_string(), val));
    }
    out
}

/// Imports a legacy `/etc/vservers/NAME.conf` into a spec. The name comes
/// from the file name; the tree defaults to `/vservers/NAME`.
pub fn import_legacy(text: &str, file: &Path, tree_base: &Path) -> Result<VserverSpec> {
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| cerr(file, "(file name)", "cannot derive the vserver name"))?
        .to_string();
    let mut spec = VserverSpec::new(&name, tree_base.join(&name));
    let vars = parse_shell_vars(text);
    let get = |k: &str| {
        vars.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let mut mask_prefix = None;
    if let Some(m) = get("IPROOTMASK").filter(|m| !m.is_empty()) {
        mask_prefix = Some(mask_to_prefix(&m).map_err(|r| cerr(file, "IPROOTMASK", r))?);
    }
    if let Some(iproot) = get("IPROOT") {
        let items: Vec<&str> = iproot.split_whitespace().collect();
        if items.len() > 1 {
            return Err(cerr(
                file,
                "IPROOT",
                format!(
                    "{} addresses given; vsha supports one per vserver",
                    items.len()
                ),
            ));
        }
        if let Some(item) = items.first() {
            let (dev, addr) = match item.split_once(':') {
                Some((d, a)) => (Some(d.to_string()), a),
                None => (None, *item),
            };
            if addr != "0.0.0.0" {
                if addr.eq_ignore_ascii_case("ALL") {
                    return Err(cerr(
                        file,
                        "IPROOT",
                        "ALL (every host address) is not supported",
                    ));
                }
                let (ip, p) = parse_cidr(addr).map_err(|r| cerr(file, "IPROOT", r))?;
                let prefix = if addr.contains('/') {
                    p
                } else {
                    mask_prefix.unwrap_or(32)
                };
                spec.ip = Some(format!("{ip}/{prefix}"));
                spec.dev = dev.or_else(|| get("IPROOTDEV").filter(|d| !d.is_empty()));
            }
        }
    }
    if let Some(b) = get("IPROOTBCAST").filter(|b| !b.is_empty()) {
        spec.broadcast = Some(
            b.parse()
                .map_err(|_| cerr(file, "IPROOTBCAST", format!("{b:?} is not an IPv4 address")))?,
        );
    }
    spec.hostname = get("S_HOSTNAME").filter(|h| !h.is_empty());
    spec.domainname = get("S_DOMAINNAME").filter(|h| !h.is_empty());
    if let Some(c) = get("S_CAPS") {
        spec.caps = c
            .split_whitespace()
            .filter(|c| *c != "!CAP_SYS_CHROOT")
            .map(str::to_string)
            .collect();
    }
    if let Some(c) = get("S_CONTEXT").filter(|c| !c.is_empty()) {
        spec.context = Some(
            c.parse()
                .map_err(|_| cerr(file, "S_CONTEXT", format!("{c:?} is not a number")))?,
        );
    }
    if let Some(f) = get("S_FLAGS") {
        for w in f.split_whitespace() {
            let fl = Flag::parse(w)
                .ok_or_else(|| cerr(file, "S_FLAGS", format!("unknown flag {w:?}")))?;
            if !spec.flags.contains(&fl) {
                spec.flags.push(fl);
            }
        }
    }
    if let Some(n) = get("S_NICE").filter(|n| !n.is_empty()) {
        spec.nice = Some(
            n.parse()
                .map_err(|_| cerr(file, "S_NICE", format!("{n:?} is not a number")))?,
        );
    }
    if let Some(u) = get("ULIMIT") {
        let w: Vec<&str> = u.split_whitespace().collect();
        let mut i = 0;
        while i < w.len() {
            // -u N, -HS -u N, -Hu N ...
            if w[i].starts_with('-') && w[i].ends_with('u') {
                let n = w
                    .get(i + 1)
                    .ok_or_else(|| cerr(file, "ULIMIT", "-u without a value"))?;
                spec.limits.nproc = Some(
                    n.parse()
                        .map_err(|_| cerr(file, "ULIMIT", format!("{n:?} is not a number")))?,
                );
                i += 1;
            }
            i += 1;
        }
    }
    if let Some(o) = get("ONBOOT") {
        spec.onboot = o.eq_ignore_ascii_case("yes") || o == "1" || o.eq_ignore_ascii_case("true");
    }
    spec.validate(file)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_forms() {
        assert_eq!(
            parse_cidr("10.0.0.5/24").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 5), 24)
        );
        assert_eq!(parse_cidr("10.0.0.5/255.255.255.192").unwrap().1, 26);
        assert_eq!(parse_cidr("10.0.0.5").unwrap().1, 32);
        assert!(parse_cidr("10.0.0.5/255.0.255.0").is_err());
        assert!(parse_cidr("10.0.0.500/24").is_err());
    }

    #[test]
    fn shell_vars() {
        let v = parse_shell_vars(
            "# c\nIPROOT=\"a b\"\nS_X='q'\nONBOOT=yes # c\n  export Y=1\nif true; then\n",
        );
        assert_eq!(
            v,
            vec![
                ("IPROOT".into(), "a b".into()),
                ("S_X".into(), "q".into()),
                ("ONBOOT".into(), "yes".into()),
                ("Y".into(), "1".into())
            ]
        );
    }
}
