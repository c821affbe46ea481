//! Checks of operator input that need no cluster state. Each error names the
//! field and says why, so the CLI can print it as is.

use std::net::{Ipv4Addr, SocketAddr};

use crate::model::NodeId;
use crate::state::StateError;

pub fn node_id(id: NodeId) -> Result<NodeId, StateError> {
    if id == 0 {
        return Err(StateError::invalid("id", "node ids start at 1"));
    }
    Ok(id)
}

/// HOST:PORT, where HOST is an IP address or a DNS name.
pub fn addr(field: &str, a: &str) -> Result<String, StateError> {
    let a = a.trim();
    if a.parse::<SocketAddr>().is_ok() {
        return Ok(a.to_string());
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(StateError::invalid(
            field,
            format!("{a:?} is not HOST:PORT"),
        ));
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !port_ok {
        return Err(StateError::invalid(
            field,
            format!("{port:?} is not a port (1-65535)"),
        ));
    }
    if !host_ok {
        return Err(StateError::invalid(
            field,
            format!("{host:?} is not a host name or IP address"),
        ));
    }
    Ok(a.to_string())
}

/// Vserver names become directory, cgroup and file names.
pub fn vserver_name(name: &str) -> Result<String, StateError> {
    let ok_len = (1..=63).contains(&name.len());
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.');
    if !ok_len || !first_ok || !rest_ok {
        return Err(StateError::invalid(
            "name",
            format!("{name:?} must be 1-63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit"),
        ));
    }
    Ok(name.to_string())
}

/// IPV4 or IPV4/PREFIX; the prefix defaults to 24.
pub fn ipv4_with_prefix(s: &str) -> Result<(Ipv4Addr, u8), StateError> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => {
            let p: u8 = p
                .parse()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| {
                    StateError::invalid(
                        "prefix",
                        format!("{p:?} is not a prefix length from 1 to 32"),
                    )
                })?;
            (ip, p)
        }
        None => (s, 24),
    };
    Ok((ipv4(ip)?, prefix))
}

pub fn ipv4(s: &str) -> Result<Ipv4Addr, StateError> {
    let ip: Ipv4Addr = s
        .trim()
        .parse()
        .map_err(|_| StateError::invalid("ip", format!("{s:?} is not an IPv4 address")))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(StateError::invalid(
            "ip",
            format!(
                "{ip} cannot be a vserver address (unspecified, broadcast, multicast or loopback)"
            ),
        ));
    }
    Ok(ip)
}

pub fn prefix(p: u32) -> Result<u8, StateError> {
    u8::try_from(p)
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| {
            StateError::invalid("prefix", format!("{p} is not a prefix length from 1 to 32"))
        })
}

/// Interface names: at most 15 bytes, no '/', no white space (IFNAMSIZ).
pub fn dev(d: &str) -> Result<String, StateError> {
    if d.is_empty() {
        return Ok(String::new());
    }
    if d.len() > 15 || d.contains('/') || d.chars().any(|c| c.is_whitespace() || c == ':') {
        return Err(StateError::invalid(
            "dev",
            format!(
                "{d:?} is not an interface name (at most 15 characters, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(d.to_string())
}

pub fn tree(t: &str) -> Result<String, StateError> {
    if !t.starts_with('/') {
        return Err(StateError::invalid(
            "tree",
            format!("{t:?} must be an absolute path"),
        ));
    }
    if t.split('/').any(|c| c == "..") || t.contains('\0') {
        return Err(StateError::invalid(
            "tree",
            format!("{t:?} must not contain '..' or NUL"),
        ));
    }
    Ok(t.to_string())
}

pub fn hostname(h: &str) -> Result<String, StateError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(StateError::invalid(
            "hostname",
            format!("{h:?} is not a host name (letters, digits, '-', dots; at most 64)"),
        ));
    }
    Ok(h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: StateError) -> String {
        match e {
            StateError::Invalid { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ips() {
        assert_eq!(
            ipv4_with_prefix("10.1.2.3").unwrap(),
            ("10.1.2.3".parse().unwrap(), 24)
        );
        assert_eq!(ipv4_with_prefix("10.1.2.200/28").unwrap().1, 28);
        assert_eq!(field(ipv4_with_prefix("10.1.2/24").unwrap_err()), "ip");
        assert_eq!(
            field(ipv4_with_prefix("10.1.2.3/33").unwrap_err()),
            "prefix"
        );
        assert_eq!(field(ipv4_with_prefix("127.0.0.5").unwrap_err()), "ip");
        assert_eq!(field(ipv4_with_prefix("0.0.0.0").unwrap_err()), "ip");
        assert_eq!(field(ipv4_with_prefix("224.0.0.1").unwrap_err()), "ip");
    }

    #[test]
    fn names_and_paths() {
        assert!(vserver_name("web-1").is_ok());
        for bad in ["", "Web", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert_eq!(field(vserver_name(bad).unwrap_err()), "name", "{bad:?}");
        }
        assert!(tree("/srv/web").is_ok());
        assert_eq!(field(tree("srv/web").unwrap_err()), "tree");
        assert_eq!(field(tree("/srv/../etc").unwrap_err()), "tree");
        assert!(dev("eth0").is_ok());
        assert_eq!(field(dev("eth0:1").unwrap_err()), "dev");
        assert_eq!(field(dev("averyveryverylongname").unwrap_err()), "dev");
        assert!(hostname("web.example").is_ok());
        assert_eq!(field(hostname("web_1").unwrap_err()), "hostname");
    }

    #[test]
    fn addrs() {
        assert!(addr("addr", "127.0.0.1:7700").is_ok());
        assert!(addr("addr", "node-1.example:7700").is_ok());
        assert_eq!(field(addr("addr", "127.0.0.1").unwrap_err()), "addr");
        assert_eq!(field(addr("addr", "host:0").unwrap_err()), "addr");
        assert_eq!(field(addr("addr", "ho st:1").unwrap_err()), "addr");
        assert_eq!(field(node_id(0).unwrap_err()), "id");
    }
}
