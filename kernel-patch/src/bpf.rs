//! `set_ipv4root` on a stock kernel: cgroup-BPF `sock_addr` programs,
//! hand-assembled and loaded with the raw `bpf()` system call (no clang, no
//! BPF toolchain).
//!
//! Programs attached to the context's cgroup v2 directory with
//! `BPF_F_ALLOW_MULTI` stay attached after the loader exits and go away with
//! the cgroup:
//!
//! * `bind4`: 0.0.0.0 → the vserver IP; the vserver IP and 127/8 allowed;
//!   anything else fails with EPERM.
//! * `connect4`: for a non-loopback destination, `bpf_bind()` pins the source
//!   address to the vserver IP.
//! * `sendmsg4` (UDP): for a non-loopback destination the source is the
//!   vserver IP.
//! * `bind6`/`connect6`/`sendmsg6`: denied (EPERM) unless IPv6 is allowed;
//!   otherwise a `[::]` dual-stack bind would listen on every host IPv4.
//!
//! Address compares use 32-bit (JMP32) instructions: the IP is an `i32`
//! immediate in network order and a 64-bit compare would sign-extend it when
//! the last octet is ≥ 128.
//!
//! **Known gap**: `listen()` on a socket that was never bound (autobind)
//! still lands on 0.0.0.0. Closing it needs a BPF-LSM `socket_listen` hook,
//! which many kernels lack; use the `netns` network mode when that matters.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::cvt;
use crate::{Error, Result};

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The cgroup `sock_addr` attach points used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    Inet4Bind = 8,
    Inet6Bind = 9,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
}

impl AttachType {
    fn name(self) -> &'static str {
        match self {
            AttachType::Inet4Bind => "bind4",
            AttachType::Inet6Bind => "bind6",
            AttachType::Inet4Connect => "connect4",
            AttachType::Inet6Connect => "connect6",
            AttachType::Udp4Sendmsg => "sendmsg4",
            AttachType::Udp6Sendmsg => "sendmsg6",
        }
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

// Opcodes (class | size/op | source).
const LDXW: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const STXW: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const STXH: u8 = 0x6b; // BPF_STX | BPF_MEM | BPF_H
const STXDW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
const MOV64K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV32K: u8 = 0xb4; // BPF_ALU | BPF_MOV | BPF_K
const AND32K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ADD64K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const JEQ32K: u8 = 0x16; // BPF_JMP32 | BPF_JEQ | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Offsets in `struct bpf_sock_addr`.
const USER_IP4: i16 = 4;
const MSG_SRC_IP4: i16 = 40;
/// `bpf_bind` helper id.
const HELPER_BIND: i32 = 64;

/// The IPv4 address as the 32-bit immediate the program compares against
/// (network byte order as it sits in memory, read as a native u32).
fn imm(ip: Ipv4Addr) -> i32 {
    u32::from_ne_bytes(ip.octets()) as i32
}

/// `bind4`: 0.0.0.0 → VIP; VIP and 127/8 allowed; anything else denied.
pub fn prog_bind4(vip: Ipv4Addr) -> Vec<Insn> {
    vec![
        i(LDXW, 2, 1, USER_IP4, 0),   // 0: w2 = ctx->user_ip4
        i(JEQ32K, 2, 0, 5, 0),        // 1: 0.0.0.0 -> 7 (rewrite)
        i(JEQ32K, 2, 0, 7, imm(vip)), // 2: VIP -> 10 (allow)
        i(AND32K, 2, 0, 0, 0xff),     // 3: first octet
        i(JEQ32K, 2, 0, 5, 127),      // 4: 127/8 -> 10 (allow)
        i(MOV64K, 0, 0, 0, 0),        // 5: deny => EPERM
        i(EXIT, 0, 0, 0, 0),          // 6
        i(MOV32K, 3, 0, 0, imm(vip)), // 7: w3 = VIP
        i(STXW, 1, 3, USER_IP4, 0),   // 8: ctx->user_ip4 = w3
        i(MOV64K, 0, 0, 0, 1),        // 9: allow (falls through)
        i(MOV64K, 0, 0, 0, 1),        // 10: allow
        i(EXIT, 0, 0, 0, 0),          // 11
    ]
}

/// `connect4`: non-loopback destinations get the VIP as source (`bpf_bind`).
pub fn prog_connect4(vip: Ipv4Addr) -> Vec<Insn> {
    vec![
        i(MOV64X, 6, 1, 0, 0),             // 0: r6 = ctx
        i(LDXW, 2, 1, USER_IP4, 0),        // 1: w2 = destination
        i(AND32K, 2, 0, 0, 0xff),          // 2: first octet
        i(JEQ32K, 2, 0, 12, 127),          // 3: loopback -> 16 (allow)
        i(MOV64K, 2, 0, 0, 0),             // 4: r2 = 0
        i(STXDW, 10, 2, -16, 0),           // 5: zero struct sockaddr_in at fp-16
        i(STXDW, 10, 2, -8, 0),            // 6
        i(MOV32K, 2, 0, 0, libc::AF_INET), // 7: sin_family
        i(STXH, 10, 2, -16, 0),            // 8
        i(MOV32K, 2, 0, 0, imm(vip)),      // 9: sin_addr = VIP (port 0)
        i(STXW, 10, 2, -12, 0),            // 10
        i(MOV64X, 1, 6, 0, 0),             // 11: r1 = ctx
        i(MOV64X, 2, 10, 0, 0),            // 12: r2 = fp
        i(ADD64K, 2, 0, 0, -16),           // 13: r2 = fp - 16
        i(MOV64K, 3, 0, 0, 16),            // 14: r3 = sizeof(sockaddr_in)
        i(CALL, 0, 0, 0, HELPER_BIND),     // 15: bpf_bind(ctx, &sa, 16); result ignored
        i(MOV64K, 0, 0, 0, 1),             // 16: allow
        i(EXIT, 0, 0, 0, 0),               // 17
    ]
}

/// `sendmsg4` (UDP): non-loopback destinations get the VIP as source.
pub fn prog_sendmsg4(vip: Ipv4Addr) -> Vec<Insn> {
    vec![
        i(LDXW, 2, 1, USER_IP4, 0),    // 0: w2 = destination
        i(AND32K, 2, 0, 0, 0xff),      // 1: first octet
        i(JEQ32K, 2, 0, 2, 127),       // 2: loopback -> 5
        i(MOV32K, 3, 0, 0, imm(vip)),  // 3: w3 = VIP
        i(STXW, 1, 3, MSG_SRC_IP4, 0), // 4: ctx->msg_src_ip4 = VIP
        i(MOV64K, 0, 0, 0, 1),         // 5: allow
        i(EXIT, 0, 0, 0, 0),           // 6
    ]
}

/// Denies the operation (EPERM).
pub fn prog_deny() -> Vec<Insn> {
    vec![i(MOV64K, 0, 0, 0, 0), i(EXIT, 0, 0, 0, 0)]
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _rest: [u32; 27],
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _rest: [u32; 25],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` points to a properly sized, zero-initialised `union
    // bpf_attr` prefix that lives for the duration of the call; the size passed
    // is the size of that struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    cvt(r)
}

/// Loads one `CGROUP_SOCK_ADDR` program; the verifier log is in the error.
pub fn load(insns: &[Insn], attach: AttachType) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    let n = format!("vsha_{}", attach.name());
    name[..n.len().min(15)].copy_from_slice(&n.as_bytes()[..n.len().min(15)]);
    let mut attr = ProgLoadAttr {
        prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: attach as u32,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: BPF_PROG_LOAD returned a new program fd that we own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        }
        Err(source) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(Error::BpfLoad {
                prog: attach.name(),
                source,
                log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
            })
        }
    }
}

/// Attaches `prog` to the cgroup directory `cgroup_fd` with `BPF_F_ALLOW_MULTI`.
pub fn attach(cgroup_fd: RawFd, prog: &OwnedFd, attach: AttachType) -> Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: cgroup_fd as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: attach as u32,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map(|_| ())
        .map_err(Error::sys(format!("bpf(PROG_ATTACH, {})", attach.name())))
}

/// Number of programs attached directly to the cgroup for `attach`.
pub fn query_count(cgroup_fd: RawFd, attach: AttachType) -> Result<u32> {
    let mut ids = [0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup_fd as u32,
        attach_type: attach as u32,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)
        .map_err(Error::sys(format!("bpf(PROG_QUERY, {})", attach.name())))?;
    Ok(attr.prog_cnt)
}

/// The programs `set_ipv4root` attaches, in order.
pub fn ipv4root_programs(vip: Ipv4Addr, allow_ipv6: bool) -> Vec<(AttachType, Vec<Insn>)> {
    let mut v = vec![
        (AttachType::Inet4Bind, prog_bind4(vip)),
        (AttachType::Inet4Connect, prog_connect4(vip)),
        (AttachType::Udp4Sendmsg, prog_sendmsg4(vip)),
    ];
    if !allow_ipv6 {
        v.push((AttachType::Inet6Bind, prog_deny()));
        v.push((AttachType::Inet6Connect, prog_deny()));
        v.push((AttachType::Udp6Sendmsg, prog_deny()));
    }
    v
}

/// `set_ipv4root`: loads and attaches the ipv4root programs to the cgroup v2
/// directory open as `cgroup_fd`. Call it before any process runs there.
pub fn set_ipv4root(cgroup_fd: RawFd, vip: Ipv4Addr, allow_ipv6: bool) -> Result<()> {
    for (at, insns) in ipv4root_programs(vip, allow_ipv6) {
        let prog = load(&insns, at)?;
        attach(cgroup_fd, &prog, at)?;
        tracing::debug!(prog = at.name(), %vip, "ipv4root program attached");
    }
    Ok(())
}

/// Only the IPv6 refusals of [`set_ipv4root`]: the kernel patch's
/// `set_ipv4root` covers IPv4 only, as the paper's did.
pub fn deny_ipv6(cgroup_fd: RawFd) -> Result<()> {
    for at in [
        AttachType::Inet6Bind,
        AttachType::Inet6Connect,
        AttachType::Udp6Sendmsg,
    ] {
        let prog = load(&prog_deny(), at)?;
        attach(cgroup_fd, &prog, at)?;
    }
    Ok(())
}

/// Whether the caller may load BPF programs (loads and drops a trivial
/// `sock_addr` program). Used to check that a context cannot.
pub fn can_load() -> Result<()> {
    load(&prog_deny(), AttachType::Inet4Bind).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_is_network_order_and_32_bit() {
        let v = imm(Ipv4Addr::new(10, 0, 0, 200));
        assert_eq!(v.to_ne_bytes(), [10, 0, 0, 200]);
        // a last octet >= 128 gives a negative i32 on little endian; JMP32 keeps it exact
        assert!(prog_bind4(Ipv4Addr::new(10, 0, 0, 200))
            .iter()
            .filter(|x| x.code & 0x07 == 0x06 || x.code & 0x07 == 0x05)
            .all(|x| x.code == JEQ32K || x.code == CALL || x.code == EXIT));
    }

    #[test]
    fn jumps_stay_inside_programs() {
        for (_, p) in ipv4root_programs(Ipv4Addr::new(192, 168, 1, 130), false) {
            for (n, x) in p.iter().enumerate() {
                if x.code == JEQ32K {
                    let t = n as i64 + 1 + x.off as i64;
                    assert!(t > 0 && (t as usize) < p.len(), "jump out of range at {n}");
                }
            }
            assert_eq!(p.last().map(|x| x.code), Some(EXIT));
        }
    }
}
