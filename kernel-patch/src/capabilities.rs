//! `reducecap`: the capability ceiling of a context.
//!
//! The default ceiling is the paper's `--secure` set (VSERVER.md): the 16
//! capabilities it removes stay removed, and CAP_SYS_PTRACE, CAP_SYS_ADMIN,
//! CAP_BPF and CAP_PERFMON (and every other capability newer than the paper)
//! are never kept by default. `S_CAPS` / `--cap CAP_X` adds back,
//! `--cap !CAP_X` removes.
//!
//! Applying a ceiling: drop every capability up to `cap_last_cap` that is not
//! kept from the bounding set, clear the ambient set, `capset` so that
//! effective = permitted = kept and inheritable = 0, then
//! `PR_SET_NO_NEW_PRIVS`. After that no exec (setuid-root included) can bring
//! a capability back. The names and bit values come from the `caps` crate;
//! the calls themselves are raw so they can run in a freshly cloned child
//! without allocating.

use std::str::FromStr;

use caps::Capability;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The capabilities a vserver root keeps by default (the paper's kept set
/// minus CAP_SYS_PTRACE, plus AUDIT_WRITE and SETFCAP which postdate it and
/// are harmless under a reduced bounding set).
pub const SECURE_KEEP: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SYS_TTY_CONFIG,
    Capability::CAP_LEASE,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// The 16 capabilities the paper's `--secure` removes (QUOTACTL has no
/// mainline equivalent; its bit 29 is AUDIT_WRITE there, so it is not listed).
pub const SECURE_DROP: &[Capability] = &[
    Capability::CAP_LINUX_IMMUTABLE,
    Capability::CAP_NET_BROADCAST,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_IPC_LOCK,
    Capability::CAP_IPC_OWNER,
    Capability::CAP_SYS_MODULE,
    Capability::CAP_SYS_RAWIO,
    Capability::CAP_SYS_PACCT,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_BOOT,
    Capability::CAP_SYS_NICE,
    Capability::CAP_SYS_RESOURCE,
    Capability::CAP_SYS_TIME,
    Capability::CAP_MKNOD,
];

/// A set of capabilities as a bitmask (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapMask(pub u64);

impl CapMask {
    pub fn secure() -> CapMask {
        CapMask(SECURE_KEEP.iter().fold(0, |m, c| m | c.bitmask()))
    }

    /// Every capability this kernel knows (0..=cap_last_cap).
    pub fn all() -> CapMask {
        let last = last_cap();
        CapMask(if last >= 63 {
            u64::MAX
        } else {
            (1u64 << (last + 1)) - 1
        })
    }

    pub fn has(self, c: Capability) -> bool {
        self.0 & c.bitmask() != 0
    }

    pub fn with(self, c: Capability) -> CapMask {
        CapMask(self.0 | c.bitmask())
    }

    pub fn without(self, c: Capability) -> CapMask {
        CapMask(self.0 & !c.bitmask())
    }

    /// Names of the capabilities in the mask, `CAP_` form, sorted by bit.
    pub fn names(self) -> Vec<String> {
        let mut v: Vec<Capability> = caps::all().into_iter().filter(|c| self.has(*c)).collect();
        v.sort_by_key(|c| c.index());
        v.into_iter().map(|c| c.to_string()).collect()
    }
}

/// Parses a capability name: `CAP_NET_RAW`, `net_raw` or `NET_RAW`.
pub fn parse_cap(name: &str) -> Result<Capability> {
    let n = name.trim().to_ascii_uppercase();
    let n = if n.starts_with("CAP_") {
        n
    } else {
        format!("CAP_{n}")
    };
    Capability::from_str(&n)
        .map_err(|_| Error::invalid("capability", format!("unknown capability {name:?}")))
}

/// Resolves a ceiling: the secure set (or everything when `secure` is false),
/// plus each `CAP_X`, minus each `!CAP_X`.
pub fn resolve(secure: bool, caps: &[String]) -> Result<CapMask> {
    let mut m = if secure {
        CapMask::secure()
    } else {
        CapMask::all()
    };
    for c in caps {
        if let Some(rest) = c.trim().strip_prefix('!') {
            m = m.without(parse_cap(rest)?);
        } else {
            m = m.with(parse_cap(c)?);
        }
    }
    Ok(m)
}

/// `/proc/sys/kernel/cap_last_cap` (falls back to the `caps` crate's list).
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            caps::all()
                .iter()
                .map(|c| c.index() as u32)
                .max()
                .unwrap_or(40)
        })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Which step of [`apply_raw`] failed.
pub type RawStep = &'static str;

/// Applies the ceiling `keep` to the calling thread: bounding-set drop up to
/// `last`, ambient cleared, capset (eff = prm = keep, inh = 0). Does not set
/// NO_NEW_PRIVS (the caller does, after an optional uid change). Allocation
/// free: safe to call in a child right after clone.
pub fn apply_raw(keep: CapMask, last: u32) -> std::result::Result<(), (RawStep, i32)> {
    for c in 0..=last.min(63) {
        if keep.0 & (1u64 << c) == 0 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
            if r < 0 {
                let e = errno();
                if e != libc::EINVAL {
                    return Err(("prctl(PR_CAPBSET_DROP)", e));
                }
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", errno()));
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep.0 as u32,
            permitted: keep.0 as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep.0 >> 32) as u32,
            permitted: (keep.0 >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: header and the two data structs match the v3 capset ABI and live
    // across the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r < 0 {
        return Err(("capset", errno()));
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`.
pub fn no_new_privs_raw() -> std::result::Result<(), (RawStep, i32)> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r < 0 {
        return Err(("prctl(PR_SET_NO_NEW_PRIVS)", errno()));
    }
    Ok(())
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The capability masks of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ProcCaps {
    pub inh: u64,
    pub prm: u64,
    pub eff: u64,
    pub bnd: u64,
    pub amb: u64,
    pub no_new_privs: bool,
}

/// Parses the `Cap*:` and `NoNewPrivs:` lines of a `/proc/PID/status` text.
pub fn parse_status(status: &str) -> ProcCaps {
    let mut c = ProcCaps::default();
    for l in status.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let hex = || u64::from_str_radix(v, 16).unwrap_or(0);
        match k {
            "CapInh" => c.inh = hex(),
            "CapPrm" => c.prm = hex(),
            "CapEff" => c.eff = hex(),
            "CapBnd" => c.bnd = hex(),
            "CapAmb" => c.amb = hex(),
            "NoNewPrivs" => c.no_new_privs = v == "1",
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_set_matches_the_paper() {
        let s = CapMask::secure();
        for c in SECURE_DROP {
            assert!(!s.has(*c), "{c} must be dropped");
        }
        for c in [
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_BPF,
            Capability::CAP_PERFMON,
        ] {
            assert!(!s.has(c), "{c} never kept by default");
        }
        assert!(s.has(Capability::CAP_NET_BIND_SERVICE));
        assert!(s.has(Capability::CAP_CHOWN));
        // the notes' measured mask plus SYS_TTY_CONFIG and LEASE
        assert_eq!(s.0 & 0xa00405ff, 0xa00405ff);
    }

    #[test]
    fn resolve_adds_and_removes() {
        let m = resolve(true, &["CAP_NET_RAW".into(), "!chown".into()]).unwrap();
        assert!(m.has(Capability::CAP_NET_RAW));
        assert!(!m.has(Capability::CAP_CHOWN));
        let e = resolve(true, &["CAP_NOPE".into()]).unwrap_err();
        assert!(e.to_string().contains("CAP_NOPE"), "{e}");
        assert!(resolve(false, &[]).unwrap().has(Capability::CAP_SYS_ADMIN));
    }

    #[test]
    fn status_parsing() {
        let c = parse_status("Name:\tsh\nCapInh:\t0000000000000000\nCapPrm:\t00000000a00405ff\nCapEff:\t00000000a00405ff\nCapBnd:\t00000000a00405ff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n");
        assert_eq!(c.eff, 0xa00405ff);
        assert_eq!(c.bnd, 0xa00405ff);
        assert!(c.no_new_privs);
    }
}
