//! IP alias and announcement: rtnetlink add/remove of the vserver IP on its
//! device (raw NETLINK_ROUTE sockets), `promote_secondaries`, gratuitous ARP
//! bursts and an RFC 5227 style ARP probe over AF_PACKET.
//!
//! Everything acts on the network namespace of the calling thread.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys::cstring;
use crate::{Error, Result};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_LABEL: u16 = 3;
const IFA_BROADCAST: u16 = 4;
const IFA_F_SECONDARY: u8 = 0x01;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Interface index of `dev` in the caller's network namespace.
pub fn ifindex(dev: &str) -> Result<u32> {
    let c = cstring(dev, "device")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(Error::last_os(format!("if_nametoindex({dev})")));
    }
    Ok(i)
}

/// Hardware address of `dev` (SIOCGIFHWADDR).
pub fn hwaddr(dev: &str) -> Result<Mac> {
    let sock = socket(
        libc::AF_INET,
        libc::SOCK_DGRAM,
        0,
        "socket(AF_INET) for SIOCGIFHWADDR",
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(Error::invalid("device", format!("{dev:?} is too long")));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
    if r < 0 {
        return Err(Error::last_os(format!("ioctl(SIOCGIFHWADDR, {dev})")));
    }
    // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(Mac(m))
}

fn socket(domain: i32, ty: i32, proto: i32, step: &str) -> Result<OwnedFd> {
    // SAFETY: socket() with integer arguments.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(Error::last_os(step));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// An IPv4 address on an interface, as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IfAddr {
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub secondary: bool,
    pub label: String,
}

/// The outcome of an address add/remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AddrChange {
    Done,
    /// Add: EEXIST, the address is already ours. Remove: it was not there.
    AlreadyThere,
}

/// Messages (type, payload) of a reply, or the kernel's errno.
type NlReply = std::result::Result<Vec<(u16, Vec<u8>)>, i32>;

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Netlink> {
        let fd = socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW,
            libc::NETLINK_ROUTE,
            "socket(AF_NETLINK, NETLINK_ROUTE)",
        )?;
        Ok(Netlink { fd, seq: 1 })
    }

    fn send(&mut self, ty: u16, flags: u16, payload: &[u8]) -> Result<u32> {
        self.seq += 1;
        let mut m = Vec::with_capacity(16 + payload.len());
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 addresses the kernel.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sends our buffer to the kernel address.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr() as *const libc::c_void,
                m.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(Error::last_os("netlink sendto"));
        }
        Ok(self.seq)
    }

    /// Receives messages for `seq` until ACK/DONE; returns (type, payload)s
    /// or the kernel's error code.
    fn recv(&mut self, seq: u32) -> Result<NlReply> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receives into our buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                if crate::capabilities::errno() == libc::EINTR {
                    continue;
                }
                return Err(Error::last_os("netlink recv"));
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or([0; 4]));
                if len < 16 || off + len > n {
                    break;
                }
                let payload = &buf[off + 16..off + len];
                if mseq == seq {
                    match ty {
                        NLMSG_ERROR => {
                            let code =
                                i32::from_ne_bytes(payload[..4].try_into().unwrap_or([0; 4]));
                            return Ok(if code == 0 { Ok(out) } else { Err(-code) });
                        }
                        NLMSG_DONE => return Ok(Ok(out)),
                        _ => out.push((ty, payload.to_vec())),
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn ifaddrmsg(prefix: u8, index: u32) -> Vec<u8> {
    let mut p = vec![libc::AF_INET as u8, prefix, 0, 0];
    p.extend_from_slice(&index.to_ne_bytes());
    p
}

fn addr_msg(
    ip: Ipv4Addr,
    prefix: u8,
    index: u32,
    bcast: Option<Ipv4Addr>,
    label: Option<&str>,
) -> Vec<u8> {
    let mut p = ifaddrmsg(prefix, index);
    push_attr(&mut p, IFA_LOCAL, &ip.octets());
    push_attr(&mut p, IFA_ADDRESS, &ip.octets());
    if let Some(b) = bcast {
        push_attr(&mut p, IFA_BROADCAST, &b.octets());
    }
    if let Some(l) = label {
        let mut v = l.as_bytes().to_vec();
        v.push(0);
        push_attr(&mut p, IFA_LABEL, &v);
    }
    p
}

/// Broadcast address of `ip/prefix`.
pub fn broadcast(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    if prefix >= 31 {
        return ip;
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ipv4Addr::from(u32::from(ip) | !mask)
}

/// Adds `ip/prefix` to `dev` (RTM_NEWADDR). EEXIST → `AlreadyThere`.
pub fn add_address(
    dev: &str,
    ip: Ipv4Addr,
    prefix: u8,
    bcast: Option<Ipv4Addr>,
) -> Result<AddrChange> {
    let index = ifindex(dev)?;
    let mut nl = Netlink::open()?;
    let b = bcast.unwrap_or_else(|| broadcast(ip, prefix));
    let flags = (libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let seq = nl.send(
        RTM_NEWADDR,
        flags,
        &addr_msg(ip, prefix, index, Some(b), None),
    )?;
    match nl.recv(seq)? {
        Ok(_) => {
            tracing::info!(%ip, prefix, dev, "address added");
            Ok(AddrChange::Done)
        }
        Err(libc::EEXIST) => Ok(AddrChange::AlreadyThere),
        Err(e) => Err(Error::Sys {
            step: format!("rtnetlink RTM_NEWADDR {ip}/{prefix} dev {dev}"),
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// Removes `ip/prefix` from `dev` (RTM_DELADDR). Not there → `AlreadyThere`.
pub fn del_address(dev: &str, ip: Ipv4Addr, prefix: u8) -> Result<AddrChange> {
    let index = ifindex(dev)?;
    let mut nl = Netlink::open()?;
    let seq = nl.send(
        RTM_DELADDR,
        libc::NLM_F_ACK as u16,
        &addr_msg(ip, prefix, index, None, None),
    )?;
    match nl.recv(seq)? {
        Ok(_) => {
            tracing::info!(%ip, prefix, dev, "address removed");
            Ok(AddrChange::Done)
        }
        Err(libc::EADDRNOTAVAIL) | Err(libc::ENOENT) => Ok(AddrChange::AlreadyThere),
        Err(e) => Err(Error::Sys {
            step: format!("rtnetlink RTM_DELADDR {ip}/{prefix} dev {dev}"),
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// All IPv4 addresses (RTM_GETADDR dump).
pub fn list_addresses() -> Result<Vec<IfAddr>> {
    let mut nl = Netlink::open()?;
    let seq = nl.send(
        RTM_GETADDR,
        (libc::NLM_F_ROOT | libc::NLM_F_MATCH) as u16,
        &ifaddrmsg(0, 0),
    )?;
    let msgs = nl.recv(seq)?.map_err(|e| Error::Sys {
        step: "rtnetlink RTM_GETADDR".into(),
        source: std::io::Error::from_raw_os_error(e),
    })?;
    let mut out = Vec::new();
    for (ty, p) in msgs {
        if ty != RTM_NEWADDR || p.len() < 8 || p[0] != libc::AF_INET as u8 {
            continue;
        }
        let prefix = p[1];
        let flags = p[2];
        let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
        let mut off = 8;
        let (mut addr, mut label) = (None, String::new());
        while off + 4 <= p.len() {
            let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
            let aty = u16::from_ne_bytes([p[off + 2], p[off + 3]]);
            if len < 4 || off + len > p.len() {
                break;
            }
            let d = &p[off + 4..off + len];
            match aty {
                IFA_LOCAL if d.len() == 4 => addr = Some(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
                IFA_ADDRESS if d.len() == 4 && addr.is_none() => {
                    addr = Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
                }
                IFA_LABEL => {
                    label = String::from_utf8_lossy(d)
                        .trim_end_matches('\0')
                        .to_string()
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
        if let Some(addr) = addr {
            out.push(IfAddr {
                ifindex: index,
                addr,
                prefix,
                secondary: flags & IFA_F_SECONDARY != 0,
                label,
            });
        }
    }
    Ok(out)
}

/// Sets `net.ipv4.conf.DEV.promote_secondaries=1` (so removing the primary
/// address does not take the vserver IPs with it).
pub fn set_promote_secondaries(dev: &str) -> Result<()> {
    if dev.contains('/') || dev.contains("..") {
        return Err(Error::invalid(
            "device",
            format!("{dev:?} is not a device name"),
        ));
    }
    let p = format!("/proc/sys/net/ipv4/conf/{dev}/promote_secondaries");
    std::fs::write(&p, "1").map_err(Error::sys(format!("write 1 to {p}")))
}

const ETH_P_ARP: u16 = 0x0806;

fn packet_socket(dev: &str) -> Result<(OwnedFd, u32, Mac)> {
    let index = ifindex(dev)?;
    let mac = hwaddr(dev)?;
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        ETH_P_ARP.to_be() as i32,
        "socket(AF_PACKET, SOCK_RAW)",
    )?;
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: binds our socket to a valid sockaddr_ll.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(Error::last_os(format!("bind AF_PACKET to {dev}")));
    }
    Ok((fd, index, mac))
}

/// An ARP frame (42 bytes: Ethernet header + ARP for IPv4).
pub fn arp_frame(
    op: u16,
    src_mac: Mac,
    sha: Mac,
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
    dst: [u8; 6],
) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha.0);
    f[28..32].copy_from_slice(&spa.octets());
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa.octets());
    f
}

fn send_frame(fd: &OwnedFd, index: u32, frame: &[u8]) -> Result<()> {
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = index as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[0..6]);
    // SAFETY: sends our frame to a valid link-layer address.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(Error::last_os("sendto AF_PACKET"));
    }
    Ok(())
}

/// Gratuitous ARP burst for `ip` on `dev`: `count` rounds spaced by
/// `interval`, each a broadcast request and a broadcast reply.
pub fn gratuitous_arp(dev: &str, ip: Ipv4Addr, count: u32, interval: Duration) -> Result<()> {
    let (fd, index, mac) = packet_socket(dev)?;
    let bc = [0xff; 6];
    for n in 0..count {
        if n > 0 {
            std::thread::sleep(interval);
        }
        send_frame(&fd, index, &arp_frame(1, mac, mac, ip, [0; 6], ip, bc))?;
        send_frame(&fd, index, &arp_frame(2, mac, mac, ip, mac.0, ip, bc))?;
    }
    tracing::info!(%ip, dev, count, "gratuitous ARP sent");
    Ok(())
}

/// RFC 5227 style probe: ARP requests with sender IP 0.0.0.0 asking for
/// `ip`; returns the MAC of another machine that answers (or that probes or
/// announces the same address), `None` when nobody does within `wait`.
pub fn arp_probe(dev: &str, ip: Ipv4Addr, probes: u32, wait: Duration) -> Result<Option<Mac>> {
    let (fd, index, mac) = packet_socket(dev)?;
    let bc = [0xff; 6];
    let deadline = Instant::now() + wait;
    let per = wait / probes.max(1);
    let mut next_probe = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 128];
    loop {
        let now = Instant::now();
        if sent < probes && now >= next_probe {
            send_frame(
                &fd,
                index,
                &arp_frame(1, mac, mac, Ipv4Addr::UNSPECIFIED, [0; 6], ip, bc),
            )?;
            sent += 1;
            next_probe = now + per;
        }
        if now >= deadline {
            return Ok(None);
        }
        let until = if sent < probes {
            next_probe.min(deadline)
        } else {
            deadline
        };
        let ms = until
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, 1000) as i32;
        let Some(f) = recv_arp(&fd, &mut buf, ms) else {
            continue;
        };
        let sha: [u8; 6] = f[22..28].try_into().unwrap_or([0; 6]);
        let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
        let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
        let op = u16::from_be_bytes([f[20], f[21]]);
        if sha == mac.0 {
            continue;
        }
        // A reply or announcement from the IP, or another host probing it.
        if spa == ip || (op == 1 && spa.is_unspecified() && tpa == ip) {
            tracing::warn!(%ip, holder = %Mac(sha), dev, "ARP probe: address in use");
            return Ok(Some(Mac(sha)));
        }
    }
}

/// Asks on `dev` who has each of `ips` (one broadcast ARP request each,
/// sender address `sender`) and collects every reply that arrives within
/// `wait`: for each IP, in the order of `ips`, the distinct MACs that
/// answered, in order of arrival. Unlike [`arp_probe`] it does not stop at
/// the first answer: two machines holding one address both show up.
///
/// Only replies to this call count: frames queued before the requests go
/// out are discarded, and a reply must be addressed to `sender` (Linux
/// echoes the request's sender address as the reply's target address), so
/// a caller alternating `sender` between two addresses of its own cannot
/// mistake a late reply to its previous call for one to this call.
/// Gratuitous announcements are not replies to us and are ignored. A
/// `sender` of 0.0.0.0 works too, but other hosts' [`arp_probe`] take such
/// a request for a rival claim on the address (RFC 5227) and refuse it.
pub fn arp_who_has(
    dev: &str,
    ips: &[Ipv4Addr],
    sender: Ipv4Addr,
    wait: Duration,
) -> Result<Vec<Vec<Mac>>> {
    let (fd, index, mac) = packet_socket(dev)?;
    let mut buf = [0u8; 128];
    // Whatever arrived between socket() and now predates our requests.
    while recv_now(&fd, &mut buf) >= 0 {}
    let bc = [0xff; 6];
    for ip in ips {
        send_frame(&fd, index, &arp_frame(1, mac, mac, sender, [0; 6], *ip, bc))?;
    }
    let mut out: Vec<Vec<Mac>> = vec![Vec::new(); ips.len()];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(out);
        }
        let ms = left.as_millis().clamp(1, 1000) as i32;
        let Some(f) = recv_arp(&fd, &mut buf, ms) else {
            continue;
        };
        let op = u16::from_be_bytes([f[20], f[21]]);
        if op != 2 {
            continue;
        }
        let sha: [u8; 6] = f[22..28].try_into().unwrap_or([0; 6]);
        let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
        let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
        if sha == mac.0 || tpa != sender {
            continue;
        }
        for (i, ip) in ips.iter().enumerate() {
            if *ip == spa && !out[i].contains(&Mac(sha)) {
                out[i].push(Mac(sha));
            }
        }
    }
}

/// One frame from `fd` into `buf` without blocking: its length, or -1.
fn recv_now(fd: &OwnedFd, buf: &mut [u8]) -> isize {
    // SAFETY: receives into the caller's buffer, at most its length, without blocking.
    unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    }
}

/// Waits up to `ms` for one frame on the packet socket `fd`; the frame if
/// it is a complete ARP packet.
fn recv_arp<'b>(fd: &OwnedFd, buf: &'b mut [u8], ms: i32) -> Option<&'b [u8]> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    let n = recv_now(fd, buf);
    if n < 42 {
        return None;
    }
    let f = &buf[..n as usize];
    (f[12..14] == ETH_P_ARP.to_be_bytes()).then_some(f)
}

/// Opens (and closes) a raw IPv4 ICMP socket: whether the caller holds
/// CAP_NET_RAW in its network namespace. Used to check that a context cannot.
pub fn raw_socket() -> Result<()> {
    socket(
        libc::AF_INET,
        libc::SOCK_RAW,
        libc::IPPROTO_ICMP,
        "socket(AF_INET, SOCK_RAW)",
    )
    .map(|_| ())
}

/// Gives the calling thread a new, empty network namespace; threads and
/// processes it creates afterwards share it. Call it before any other
/// thread exists to move the whole process (`vsha demo` does, so the
/// namespace lives exactly as long as the demo and its children).
pub fn unshare_netns() -> Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET affects the calling
    // thread's network namespace and nothing in this process's memory.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if r < 0 {
        return Err(Error::last_os("unshare(CLONE_NEWNET)".to_string()));
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path` (e.g.
/// `/run/netns/NAME`). Only this thread changes namespace.
pub fn enter_netns(path: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(Error::sys(format!("open {}", path.display())))?;
    // SAFETY: setns on an fd we hold, restricted to network namespaces.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r < 0 {
        return Err(Error::last_os(format!(
            "setns({}, CLONE_NEWNET)",
            path.display()
        )));
    }
    Ok(())
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut p = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    p.extend_from_slice(&(index as i32).to_ne_bytes());
    p.extend_from_slice(&flags.to_ne_bytes());
    p.extend_from_slice(&change.to_ne_bytes());
    p
}

fn name_attr(buf: &mut Vec<u8>, name: &str) {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    push_attr(buf, IFLA_IFNAME, &v);
}

fn nl_do(
    ty: u16,
    flags: u16,
    payload: &[u8],
    step: String,
) -> Result<std::result::Result<(), i32>> {
    let mut nl = Netlink::open()?;
    let seq = nl.send(ty, flags | libc::NLM_F_ACK as u16, payload)?;
    match nl.recv(seq)? {
        Ok(_) => Ok(Ok(())),
        Err(e) => {
            tracing::debug!(step, errno = e, "rtnetlink request refused");
            Ok(Err(e))
        }
    }
}

fn nl_must(ty: u16, flags: u16, payload: &[u8], step: String) -> Result<()> {
    match nl_do(ty, flags, payload, step.clone())? {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::Sys {
            step,
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// Creates a veth pair `host_if` (here) ↔ `peer_if` (in the network
/// namespace of process `peer_pid`).
pub fn create_veth(host_if: &str, peer_if: &str, peer_pid: i32) -> Result<()> {
    let mut peer = ifinfomsg(0, 0, 0);
    name_attr(&mut peer, peer_if);
    push_attr(&mut peer, IFLA_NET_NS_PID, &(peer_pid as u32).to_ne_bytes());
    let mut data = Vec::new();
    push_attr(&mut data, VETH_INFO_PEER | NLA_F_NESTED, &peer);
    let mut info = Vec::new();
    push_attr(&mut info, IFLA_INFO_KIND, b"veth\0");
    push_attr(&mut info, IFLA_INFO_DATA | NLA_F_NESTED, &data);
    let mut p = ifinfomsg(0, 0, 0);
    name_attr(&mut p, host_if);
    push_attr(&mut p, IFLA_LINKINFO | NLA_F_NESTED, &info);
    nl_must(
        RTM_NEWLINK,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        &p,
        format!("rtnetlink RTM_NEWLINK veth {host_if} peer {peer_if} netns pid {peer_pid}"),
    )
}

/// Sets `dev` up.
pub fn link_up(dev: &str) -> Result<()> {
    let index = ifindex(dev)?;
    let up = libc::IFF_UP as u32;
    nl_must(
        RTM_NEWLINK,
        0,
        &ifinfomsg(index, up, up),
        format!("rtnetlink set {dev} up"),
    )
}

/// Deletes the link `dev`; a missing link is fine.
pub fn delete_link(dev: &str) -> Result<()> {
    let index = match ifindex(dev) {
        Ok(i) => i,
        Err(_) => return Ok(()),
    };
    match nl_do(
        RTM_DELLINK,
        0,
        &ifinfomsg(index, 0, 0),
        format!("delete {dev}"),
    )? {
        Ok(()) | Err(libc::ENODEV) => Ok(()),
        Err(e) => Err(Error::Sys {
            step: format!("rtnetlink RTM_DELLINK {dev}"),
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// Adds a route `dst/prefix` out of `dev`, via `gateway` or on-link.
pub fn add_route(dst: Ipv4Addr, prefix: u8, dev: &str, gateway: Option<Ipv4Addr>) -> Result<()> {
    let index = ifindex(dev)?;
    let scope = if gateway.is_some() { 0u8 } else { 253u8 }; // universe / link
    let mut p = vec![libc::AF_INET as u8, prefix, 0, 0, 254, 3, scope, 1];
    p.extend_from_slice(&0u32.to_ne_bytes());
    if prefix > 0 {
        push_attr(&mut p, RTA_DST, &dst.octets());
    }
    push_attr(&mut p, RTA_OIF, &index.to_ne_bytes());
    if let Some(g) = gateway {
        push_attr(&mut p, RTA_GATEWAY, &g.octets());
    }
    match nl_do(
        RTM_NEWROUTE,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        &p,
        String::new(),
    )? {
        Ok(()) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(Error::Sys {
            step: format!("rtnetlink RTM_NEWROUTE {dst}/{prefix} dev {dev}"),
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// Writes an IPv4 sysctl of the caller's network namespace
/// (`conf/DEV/proxy_arp`, `ip_forward`).
pub fn set_ipv4_sysctl(key: &str, value: &str) -> Result<()> {
    if key.contains("..") {
        return Err(Error::invalid("sysctl", key.to_string()));
    }
    let p = format!("/proc/sys/net/ipv4/{key}");
    std::fs::write(&p, value).map_err(Error::sys(format!("write {value} to {p}")))
}

/// Runs `f` on a thread inside the network namespace of process `pid`.
pub fn in_netns_of<T: Send>(pid: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&path)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::invalid("netns thread", "panicked")))
    })
}

/// The host end of a vserver's routed veth: `vsh` + 8 hex digits of a hash
/// of the name (fits IFNAMSIZ).
pub fn host_veth_name(vserver: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in vserver.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("vsh{h:08x}")
}

/// Gateway address the vserver's namespace routes through (on the host veth).
pub const NETNS_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Wires the network namespace of `init_pid` with a routed veth: `eth0`
/// with `ip/32` and a default route via 169.254.1.1 inside; on the host a
/// route `ip/32` to the veth with proxy ARP, and, when `uplink` is given,
/// proxy ARP on it plus IPv4 forwarding so peers on that link reach the IP.
pub fn wire_routed_veth(
    init_pid: i32,
    host_if: &str,
    ip: Ipv4Addr,
    uplink: Option<&str>,
) -> Result<()> {
    create_veth(host_if, "eth0", init_pid)?;
    let r = (|| {
        add_address(host_if, NETNS_GATEWAY, 32, None)?;
        set_ipv4_sysctl(&format!("conf/{host_if}/proxy_arp"), "1")?;
        link_up(host_if)?;
        add_route(ip, 32, host_if, None)?;
        if let Some(up) = uplink {
            set_ipv4_sysctl(&format!("conf/{up}/proxy_arp"), "1")?;
            set_ipv4_sysctl("ip_forward", "1")?;
        }
        in_netns_of(init_pid, || {
            link_up("lo")?;
            add_address("eth0", ip, 32, None)?;
            link_up("eth0")?;
            add_route(NETNS_GATEWAY, 32, "eth0", None)?;
            add_route(Ipv4Addr::UNSPECIFIED, 0, "eth0", Some(NETNS_GATEWAY))
        })
    })();
    if r.is_err() {
        let _ = delete_link(host_if);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout_matches_tcpdump() {
        let mac = Mac([0x2e, 0x2a, 0xf5, 0x72, 0x5d, 0x46]);
        let ip = Ipv4Addr::new(192, 168, 77, 50);
        let f = arp_frame(1, mac, mac, ip, [0; 6], ip, [0xff; 6]);
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x2e, 0x2a, 0xf5, 0x72, 0x5d, 0x46, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x2e, 0x2a, 0xf5, 0x72, 0x5d, 0x46,
            0xc0, 0xa8, 0x4d, 0x32, 0, 0, 0, 0, 0, 0, 0xc0, 0xa8, 0x4d, 0x32,
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn broadcast_addresses() {
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 1, 2, 3), 24),
            Ipv4Addr::new(10, 1, 2, 255)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 1, 2, 3), 32),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 1, 2, 3), 0),
            Ipv4Addr::BROADCAST
        );
    }
}
