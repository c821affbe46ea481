//! Run-time detection of the vserver kernel patch (kernel-patch/linux/):
//! a patched kernel advertises its calls in /proc/self/status, as the
//! original Linux-VServer patch did. When present, a context is pinned to
//! its IPv4 address with the `set_ipv4root` system call (which also covers
//! `listen()` without `bind()`); otherwise with cgroup-BPF (crate::bpf).

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

/// How contexts get their ipv4root on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv4rootMechanism {
    /// Stock kernel: cgroup-BPF `sock_addr` programs.
    #[default]
    CgroupBpf,
    /// Patched kernel: the `set_ipv4root` system call with this number.
    KernelCall { nr: i64 },
}

impl fmt::Display for Ipv4rootMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ipv4rootMechanism::CgroupBpf => f.write_str("cgroup-bpf"),
            Ipv4rootMechanism::KernelCall { nr } => write!(f, "kernel set_ipv4root (syscall {nr})"),
        }
    }
}

/// The numbers a patched kernel advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchedCalls {
    pub set_ipv4root: i64,
    pub new_s_context: i64,
}

/// Reads the patch's lines from a /proc/PID/status text.
pub fn parse_status(text: &str) -> Option<PatchedCalls> {
    let field = |key: &str| -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .filter(|n: &i64| *n > 0)
    };
    Some(PatchedCalls {
        set_ipv4root: field("__NR_set_ipv4root")?,
        new_s_context: field("__NR_new_s_context")?,
    })
}

/// Decides from the status text and a probe of the call (`probe(nr)`
/// returns the errno of `set_ipv4root(0, 0)`, 0 on success). A call that
/// answers ENOSYS is absent whatever the text says.
pub fn decide(status: &str, probe: impl FnOnce(i64) -> i32) -> Ipv4rootMechanism {
    let Some(calls) = parse_status(status) else {
        return Ipv4rootMechanism::CgroupBpf;
    };
    // 0: unpinned and left so; EPERM: already pinned (one-shot). Both
    // prove the call exists.
    match probe(calls.set_ipv4root) {
        0 | libc::EPERM => Ipv4rootMechanism::KernelCall {
            nr: calls.set_ipv4root,
        },
        _ => Ipv4rootMechanism::CgroupBpf,
    }
}

/// This host's mechanism, probed once per process.
pub fn probe() -> Ipv4rootMechanism {
    static MECHANISM: OnceLock<Ipv4rootMechanism> = OnceLock::new();
    *MECHANISM.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let m = decide(&status, |nr| match call_set_ipv4root(nr, None) {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        });
        tracing::debug!(mechanism = %m, "ipv4root mechanism");
        m
    })
}

/// `set_ipv4root(addr, 0)` on the calling thread (`None`: the no-op probe).
/// Async-signal-safe: the context child calls it between clone and exec.
pub fn call_set_ipv4root(nr: i64, ip: Option<Ipv4Addr>) -> std::io::Result<()> {
    let addr = ip.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0);
    // SAFETY: a system call taking two integers; on a kernel without it
    // the number is unassigned (above upstream's range) and answers ENOSYS.
    let r = unsafe { libc::syscall(nr, addr as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCHED: &str = "Name:\tbash\nPid:\t1\ns_context:\t0\nipv4root:\t0.0.0.0\n__NR_set_ipv4root:\t600\n__NR_new_s_context:\t601\n";

    #[test]
    fn parses_the_advertised_numbers() {
        assert_eq!(
            parse_status(PATCHED),
            Some(PatchedCalls {
                set_ipv4root: 600,
                new_s_context: 601
            })
        );
        assert_eq!(parse_status("Name:\tbash\nPid:\t1\n"), None);
        assert_eq!(
            parse_status("__NR_set_ipv4root:\tx\n__NR_new_s_context:\t601\n"),
            None
        );
    }

    #[test]
    fn decides_by_text_and_probe() {
        assert_eq!(
            decide(PATCHED, |_| 0),
            Ipv4rootMechanism::KernelCall { nr: 600 }
        );
        assert_eq!(
            decide(PATCHED, |_| libc::EPERM),
            Ipv4rootMechanism::KernelCall { nr: 600 }
        );
        // Advertised but not there (a forged line in a container's /proc).
        assert_eq!(
            decide(PATCHED, |_| libc::ENOSYS),
            Ipv4rootMechanism::CgroupBpf
        );
        let mut probed = false;
        assert_eq!(
            decide("Name:\tx\n", |_| {
                probed = true;
                0
            }),
            Ipv4rootMechanism::CgroupBpf
        );
        assert!(!probed, "no probe without the advertisement");
    }

    #[test]
    fn this_stock_kernel_uses_cgroup_bpf() {
        // The test machines run stock kernels; the patched one runs under
        // QEMU only (kernel-patch/linux/test).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        if parse_status(&status).is_none() {
            assert_eq!(probe(), Ipv4rootMechanism::CgroupBpf);
        }
    }
}
