//! `new_s_context`, `enter`/`exec` and `stop` on a stock kernel.
//!
//! new_s_context: `clone3(CLONE_NEWPID|NEWNS|NEWUTS|NEWIPC [|NEWNET] |
//! CLONE_INTO_CGROUP|CLONE_PIDFD)`: the child is born inside the context's
//! cgroup v2 directory, so the ipv4root programs already apply to it. The
//! parent moves it into the v1 cgroups, then releases it; the child
//! unshares its cgroup namespace, makes its mounts private, pivots into the
//! tree, mounts /proc (with /proc/sys and other global knobs read-only), a
//! minimal /dev on tmpfs with a private devpts, sets host and domain name,
//! nice, reduces its capabilities and execs the start command as PID 1.
//!
//! The child of a raw clone in a multi-threaded process may only make system
//! calls: everything it needs (C strings, argv, candidate paths) is prepared
//! before the clone, and failures travel back as (step, errno) over a
//! close-on-exec pipe.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::capabilities::{self, CapMask};
use crate::cgroup::ContextCgroup;
use crate::sys::{cstring, path_cstring, pidfd_send_signal, pipe};
use crate::{Error, Result};

/// Where the context's standard streams go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stdio {
    /// The caller's stdin/stdout/stderr.
    #[default]
    Inherit,
    /// /dev/null for all three.
    Null,
    /// stdin from /dev/null, stdout and stderr appended to this file.
    Log(PathBuf),
}

/// What `new_s_context` builds.
#[derive(Debug, Clone, Default)]
pub struct ContextSpec {
    /// Name (logs and errors only).
    pub name: String,
    /// The vserver tree to pivot into; `None` keeps the caller's filesystem
    /// view (as chcontext did) but still mounts a private /proc.
    pub root: Option<PathBuf>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// Capability ceiling.
    pub caps: CapMask,
    /// argv; argv[0] without a '/' is looked up in the standard PATH.
    pub command: Vec<String>,
    /// Environment (`KEY=VALUE`); empty gives a minimal default.
    pub env: Vec<String>,
    pub nice: Option<i32>,
    /// A new network namespace as well (the `netns` network mode).
    pub new_netns: bool,
    /// Run as this uid/gid after the capability drop.
    pub user: Option<(u32, u32)>,
    /// Start a new session (detach from the caller's terminal).
    pub setsid: bool,
    /// The `lock` flag: a seccomp filter forbids creating or joining
    /// namespaces (unshare, setns, clone with CLONE_NEW*), so no new context
    /// can be made from inside (user namespaces included).
    pub lock: bool,
    pub stdio: Stdio,
    /// On a patched kernel: `set_ipv4root(ip)` with this syscall number in
    /// the child before exec (inherited by everything it starts).
    pub ipv4root_call: Option<(i64, std::net::Ipv4Addr)>,
}

/// A process created in a context.
#[derive(Debug)]
pub struct Spawned {
    /// pid in the caller's pid namespace.
    pub pid: i32,
    /// pidfd of that process.
    pub pidfd: OwnedFd,
}

impl Spawned {
    /// Waits for the process (it must be our child); returns the exit code
    /// (128+n for signal n).
    pub fn wait(&self) -> Result<i32> {
        crate::sys::wait_child(self.pid).map(crate::sys::exit_code)
    }
}

const CLONE_NEWNS: u64 = libc::CLONE_NEWNS as u64;
const CLONE_NEWPID: u64 = libc::CLONE_NEWPID as u64;
const CLONE_NEWUTS: u64 = libc::CLONE_NEWUTS as u64;
const CLONE_NEWIPC: u64 = libc::CLONE_NEWIPC as u64;
const CLONE_NEWNET: u64 = libc::CLONE_NEWNET as u64;
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Raw clone3 with fork semantics (no new stack). Returns 0 in the child.
fn clone3(flags: u64, cgroup_fd: Option<RawFd>, pidfd_out: &mut i32) -> std::io::Result<i32> {
    let mut args = CloneArgs {
        flags,
        pidfd: if flags & CLONE_PIDFD != 0 {
            pidfd_out as *mut i32 as u64
        } else {
            0
        },
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd.map(|f| f as u64).unwrap_or(0),
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM and with stack 0 behaves like fork: the
    // child gets a copy of the address space. `args` is a valid clone_args
    // struct whose size is passed; the pidfd pointer stays valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// Everything the child needs, prepared before the clone.
struct Prepared {
    root: Option<CString>,
    proc_dir: CString,
    ro_binds: Vec<CString>,
    dev: Vec<(CString, u32, u64)>,
    dev_dir: CString,
    pts_dir: CString,
    ptmx_link: CString,
    shm_dir: CString,
    hostname: Option<CString>,
    domainname: Option<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    candidates: Vec<CString>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    caps: CapMask,
    last_cap: u32,
    nice: Option<i32>,
    user: Option<(u32, u32)>,
    setsid: bool,
    lock: bool,
    stdio: [RawFd; 3],
    ipv4root_call: Option<(i64, std::net::Ipv4Addr)>,
}

const STD_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn prepare_exec(
    command: &[String],
    env: &[String],
) -> Result<(Vec<CString>, Vec<CString>, Vec<CString>)> {
    let Some(arg0) = command.first() else {
        return Err(Error::invalid("command", "empty command"));
    };
    let argv = command
        .iter()
        .map(|a| cstring(a, "command"))
        .collect::<Result<Vec<_>>>()?;
    let candidates = if arg0.contains('/') {
        vec![cstring(arg0, "command")?]
    } else {
        STD_PATH
            .iter()
            .map(|d| cstring(&format!("{d}/{arg0}"), "command"))
            .collect::<Result<Vec<_>>>()?
    };
    let mut env: Vec<String> = env.to_vec();
    if env.is_empty() {
        env.push(format!("PATH={}", STD_PATH.join(":")));
        env.push("HOME=/root".into());
        if let Ok(t) = std::env::var("TERM") {
            env.push(format!("TERM={t}"));
        }
    }
    let envp = env
        .iter()
        .map(|e| cstring(e, "environment"))
        .collect::<Result<Vec<_>>>()?;
    Ok((argv, candidates, envp))
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    let mut p: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
    p.push(std::ptr::null());
    p
}

/// Opened stdio fds kept alive until the child is released.
struct StdioFds {
    _owned: Vec<OwnedFd>,
    fds: [RawFd; 3],
}

fn open_stdio(s: &Stdio) -> Result<StdioFds> {
    use std::os::fd::FromRawFd;
    use std::os::fd::IntoRawFd;
    match s {
        Stdio::Inherit => Ok(StdioFds {
            _owned: vec![],
            fds: [0, 1, 2],
        }),
        Stdio::Null | Stdio::Log(_) => {
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(Error::sys("open /dev/null"))?;
            let out = match s {
                Stdio::Log(p) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(Error::sys(format!("open {}", p.display())))?,
                _ => null.try_clone().map_err(Error::sys("dup /dev/null"))?,
            };
            let n = null.into_raw_fd();
            let o = out.into_raw_fd();
            // SAFETY: both fds were just released by `into_raw_fd` and are owned here.
            let owned = unsafe { vec![OwnedFd::from_raw_fd(n), OwnedFd::from_raw_fd(o)] };
            Ok(StdioFds {
                _owned: owned,
                fds: [n, o, o],
            })
        }
    }
}

fn write_err(fd: RawFd, step: usize, errno: i32) {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writes 8 bytes from a stack buffer to a pipe fd we hold.
    unsafe {
        libc::write(fd, buf.as_ptr() as *const libc::c_void, 8);
    }
}

/// Step names the child reports by index.
const STEPS: &[&str] = &[
    "wait for the parent",             // 0
    "dup2 stdio",                      // 1
    "setsid",                          // 2
    "unshare(CLONE_NEWCGROUP)",        // 3
    "make mounts private",             // 4
    "bind-mount the tree onto itself", // 5
    "chdir into the tree",             // 6
    "mount /proc",                     // 7
    "bind a /proc knob read-only",     // 8
    "mount tmpfs on /dev",             // 9
    "mknod in /dev",                   // 10
    "mount devpts",                    // 11
    "pivot_root",                      // 12
    "detach the old root",             // 13
    "sethostname",                     // 14
    "setdomainname",                   // 15
    "setpriority",                     // 16
    "reducecap",                       // 17
    "setgroups/setgid/setuid",         // 18
    "prctl(PR_SET_NO_NEW_PRIVS)",      // 19
    "execve",                          // 20
    "setns(pidfd)",                    // 21
    "fork inside the context",         // 22
    "chdir /",                         // 23
    "seccomp lock filter",             // 24
    "set_ipv4root",                    // 25
];

/// Classic-BPF `struct sock_filter`.
#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const fn sf(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
const CLONE_NEW_MASK: u32 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// The `lock` flag's seccomp filter: unshare and setns fail with EPERM,
/// clone with a CLONE_NEW* flag fails with EPERM, clone3 reports ENOSYS (so
/// libc falls back to clone, whose flags can be inspected); everything else
/// is allowed. Other architectures are not filtered.
static LOCK_FILTER: [SockFilter; 13] = [
    sf(0x20, 0, 0, 4),                               // 0: A = arch
    sf(0x15, 1, 0, AUDIT_ARCH_X86_64),               // 1: x86_64 -> 3
    sf(0x06, 0, 0, RET_ALLOW),                       // 2
    sf(0x20, 0, 0, 0),                               // 3: A = nr
    sf(0x15, 6, 0, libc::SYS_unshare as u32),        // 4: -> 11
    sf(0x15, 5, 0, libc::SYS_setns as u32),          // 5: -> 11
    sf(0x15, 5, 0, libc::SYS_clone3 as u32),         // 6: -> 12
    sf(0x15, 0, 2, libc::SYS_clone as u32),          // 7: clone -> 8, else 10
    sf(0x20, 0, 0, 16),                              // 8: A = args[0] (low half)
    sf(0x45, 1, 0, CLONE_NEW_MASK),                  // 9: any CLONE_NEW* -> 11
    sf(0x06, 0, 0, RET_ALLOW),                       // 10
    sf(0x06, 0, 0, RET_ERRNO | libc::EPERM as u32),  // 11
    sf(0x06, 0, 0, RET_ERRNO | libc::ENOSYS as u32), // 12
];

macro_rules! tryc {
    ($err:expr, $step:expr, $e:expr) => {
        if $e < 0 {
            let en = capabilities::errno();
            write_err($err, $step, en);
            // SAFETY: _exit never returns and runs no destructors.
            unsafe { libc::_exit(127) }
        }
    };
}

fn sys_mount(
    src: *const libc::c_char,
    dst: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> libc::c_int {
    // SAFETY: all pointers are NULL or valid NUL-terminated strings owned by
    // the prepared data of the caller.
    unsafe { libc::mount(src, dst, fstype, flags, data as *const libc::c_void) }
}

/// The common tail of every context child: capabilities, uid, NNP, exec.
fn child_exec(p: &Prepared, err: RawFd) -> ! {
    if let Some((nr, ip)) = p.ipv4root_call {
        if let Err(e) = crate::patched::call_set_ipv4root(nr, Some(ip)) {
            write_err(err, 25, e.raw_os_error().unwrap_or(libc::EINVAL));
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(127) }
        }
    }
    if let Some(n) = p.nice {
        // SAFETY: setpriority with integer arguments.
        tryc!(err, 16, unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, n)
        });
    }
    if let Err((_, e)) = capabilities::apply_raw(p.caps, p.last_cap) {
        write_err(err, 17, e);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(127) }
    }
    if let Some((uid, gid)) = p.user {
        // SAFETY: setgroups with an empty list, setgid/setuid with integers.
        tryc!(err, 18, unsafe { libc::setgroups(0, std::ptr::null()) });
        // SAFETY: as above.
        tryc!(err, 18, unsafe { libc::setgid(gid) });
        // SAFETY: as above.
        tryc!(err, 18, unsafe { libc::setuid(uid) });
    }
    if let Err((_, e)) = capabilities::no_new_privs_raw() {
        write_err(err, 19, e);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(127) }
    }
    if p.lock {
        let prog = SockFprog {
            len: LOCK_FILTER.len() as u16,
            filter: LOCK_FILTER.as_ptr(),
        };
        // SAFETY: PR_SET_SECCOMP with a pointer to a valid sock_fprog whose
        // filter array is static; NO_NEW_PRIVS is already set.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const SockFprog,
                0,
                0,
            )
        };
        tryc!(err, 24, r);
    }
    let mut last = libc::ENOENT;
    for cand in &p.candidates {
        // SAFETY: argv/envp pointer arrays were made null-terminated before the
        // clone and point into CStrings owned by `p`; execve only returns on
        // failure.
        unsafe { libc::execve(cand.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr()) };
        let e = capabilities::errno();
        if e != libc::ENOENT {
            last = e;
        }
    }
    write_err(err, 20, last);
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(127) }
}

fn mode_of(kind: u32, perm: u32) -> u32 {
    kind | perm
}

impl Prepared {
    fn new(spec: &ContextSpec, stdio: [RawFd; 3]) -> Result<Prepared> {
        let (argv, candidates, envp) = prepare_exec(&spec.command, &spec.env)?;
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);
        let root = match &spec.root {
            Some(r) => {
                if !r.join("proc").is_dir() || !r.join("dev").is_dir() {
                    return Err(Error::invalid(
                        format!("tree {}", r.display()),
                        "needs the directories proc/ and dev/ (build the tree first)",
                    ));
                }
                Some(path_cstring(r)?)
            }
            None => None,
        };
        // Inside the tree, paths are relative to the tree (cwd); without a
        // tree they are the caller's absolute paths.
        let pre = if root.is_some() { "" } else { "/" };
        let c = |s: &str| cstring(&format!("{pre}{s}"), "path");
        let mut ro_binds = Vec::new();
        for k in [
            "proc/sys",
            "proc/sysrq-trigger",
            "proc/irq",
            "proc/bus",
            "proc/fs",
            "proc/kcore",
            "proc/keys",
            "proc/timer_list",
        ] {
            ro_binds.push(c(k)?);
        }
        let chr = libc::S_IFCHR;
        let dev = [
            ("dev/null", 0o666, 1, 3),
            ("dev/zero", 0o666, 1, 5),
            ("dev/full", 0o666, 1, 7),
            ("dev/random", 0o666, 1, 8),
            ("dev/urandom", 0o666, 1, 9),
            ("dev/tty", 0o666, 5, 0),
        ]
        .iter()
        .map(|(n, m, ma, mi)| {
            Ok((
                cstring(n, "dev")?,
                mode_of(chr, *m),
                libc::makedev(*ma, *mi),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            root,
            proc_dir: c("proc")?,
            ro_binds,
            dev,
            dev_dir: cstring("dev", "dev")?,
            pts_dir: cstring("dev/pts", "dev")?,
            ptmx_link: cstring("dev/ptmx", "dev")?,
            shm_dir: cstring("dev/shm", "dev")?,
            hostname: spec
                .hostname
                .as_deref()
                .map(|h| cstring(h, "hostname"))
                .transpose()?,
            domainname: spec
                .domainname
                .as_deref()
                .map(|h| cstring(h, "domainname"))
                .transpose()?,
            _argv: argv,
            argv_ptrs,
            candidates,
            _envp: envp,
            envp_ptrs,
            caps: spec.caps,
            last_cap: capabilities::last_cap(),
            nice: spec.nice,
            user: spec.user,
            setsid: spec.setsid,
            lock: spec.lock,
            stdio,
            ipv4root_call: spec.ipv4root_call,
        })
    }
}

fn child_stdio(p: &Prepared, err: RawFd) {
    for (n, fd) in p.stdio.iter().enumerate() {
        if *fd != n as RawFd {
            // SAFETY: dup2 of an fd we hold onto a standard descriptor.
            tryc!(err, 1, unsafe { libc::dup2(*fd, n as RawFd) });
        }
    }
}

/// The new context's first process, between clone3 and exec.
fn child_main(p: &Prepared, sync: RawFd, err: RawFd) -> ! {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a stack buffer from the sync pipe.
    let n = unsafe { libc::read(sync, b.as_mut_ptr() as *mut libc::c_void, 1) };
    if n != 1 {
        write_err(err, 0, libc::EPIPE);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(127) }
    }
    child_stdio(p, err);
    if p.setsid {
        // SAFETY: setsid takes no arguments.
        tryc!(err, 2, unsafe { libc::setsid() });
    }
    // SAFETY: unshare with a flag constant.
    tryc!(err, 3, unsafe { libc::unshare(libc::CLONE_NEWCGROUP) });
    let null = std::ptr::null();
    tryc!(
        err,
        4,
        sys_mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            null
        )
    );
    if let Some(root) = &p.root {
        tryc!(
            err,
            5,
            sys_mount(
                root.as_ptr(),
                root.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                null
            )
        );
        // SAFETY: chdir to a prepared NUL-terminated path.
        tryc!(err, 6, unsafe { libc::chdir(root.as_ptr()) });
    }
    let nsx = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    tryc!(
        err,
        7,
        sys_mount(
            c"proc".as_ptr(),
            p.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            nsx,
            null
        )
    );
    for k in &p.ro_binds {
        if sys_mount(
            k.as_ptr(),
            k.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            null,
        ) < 0
        {
            let e = capabilities::errno();
            if e == libc::ENOENT {
                continue;
            }
            write_err(err, 8, e);
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(127) }
        }
        tryc!(
            err,
            8,
            sys_mount(
                null,
                k.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nsx,
                null
            )
        );
    }
    if p.root.is_some() {
        tryc!(
            err,
            9,
            sys_mount(
                c"tmpfs".as_ptr(),
                p.dev_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=755,size=65536k".as_ptr()
            )
        );
        for (path, mode, dev) in &p.dev {
            // SAFETY: mknod of a prepared path with integer mode/dev.
            tryc!(err, 10, unsafe { libc::mknod(path.as_ptr(), *mode, *dev) });
            // SAFETY: chmod of the node just made (umask may have cut bits).
            tryc!(err, 10, unsafe {
                libc::chmod(path.as_ptr(), *mode & 0o777)
            });
        }
        // SAFETY: mkdir of a prepared path.
        tryc!(err, 11, unsafe { libc::mkdir(p.pts_dir.as_ptr(), 0o755) });
        tryc!(
            err,
            11,
            sys_mount(
                c"devpts".as_ptr(),
                p.pts_dir.as_ptr(),
                c"devpts".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"newinstance,ptmxmode=0666,mode=0620,gid=5".as_ptr()
            )
        );
        // SAFETY: symlink between prepared strings.
        tryc!(err, 11, unsafe {
            libc::symlink(c"pts/ptmx".as_ptr(), p.ptmx_link.as_ptr())
        });
        // SAFETY: mkdir of a prepared path.
        tryc!(err, 9, unsafe { libc::mkdir(p.shm_dir.as_ptr(), 0o1777) });
        tryc!(
            err,
            9,
            sys_mount(
                c"tmpfs".as_ptr(),
                p.shm_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                nsx,
                c"mode=1777".as_ptr()
            )
        );
        for (t, l) in [
            (c"/proc/self/fd", c"dev/fd"),
            (c"/proc/self/fd/0", c"dev/stdin"),
            (c"/proc/self/fd/1", c"dev/stdout"),
            (c"/proc/self/fd/2", c"dev/stderr"),
        ] {
            // SAFETY: symlink between static strings.
            unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) };
        }
        // pivot_root(".", ".") stacks the old root under the new one; the
        // detach then removes it (no .oldroot directory needed).
        // SAFETY: pivot_root with two static strings.
        let pr = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
        tryc!(err, 12, pr as libc::c_int);
        // SAFETY: umount2 of the stacked old root.
        tryc!(err, 13, unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        });
        // SAFETY: chdir to a static string.
        tryc!(err, 13, unsafe { libc::chdir(c"/".as_ptr()) });
    }
    if let Some(h) = &p.hostname {
        // SAFETY: sethostname with a prepared string and its length.
        tryc!(err, 14, unsafe {
            libc::sethostname(h.as_ptr(), h.as_bytes().len())
        });
    }
    if let Some(d) = &p.domainname {
        // SAFETY: setdomainname with a prepared string and its length.
        tryc!(err, 15, unsafe {
            libc::setdomainname(d.as_ptr(), d.as_bytes().len())
        });
    }
    child_exec(p, err)
}

fn read_child_error(name: &str, err_r: &OwnedFd) -> Option<Error> {
    let mut buf = [0u8; 8];
    let mut got = 0usize;
    while got < 8 {
        // SAFETY: reads into the remaining part of a stack buffer.
        let n = unsafe {
            libc::read(
                err_r.as_raw_fd(),
                buf[got..].as_mut_ptr() as *mut libc::c_void,
                8 - got,
            )
        };
        if n < 0 && capabilities::errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got < 8 {
        return None;
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Some(Error::Child {
        name: name.to_string(),
        step: STEPS.get(step).copied().unwrap_or("?").to_string(),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

fn release(sync_w: &OwnedFd) -> Result<()> {
    // SAFETY: writes one byte from a static buffer to the sync pipe.
    let n = unsafe { libc::write(sync_w.as_raw_fd(), b"g".as_ptr() as *const libc::c_void, 1) };
    if n != 1 {
        return Err(Error::last_os("release the context child"));
    }
    Ok(())
}

/// `new_s_context`: creates the context's first process inside `cg` and
/// returns once it has exec'd its command (or with the child's error).
/// The ipv4root programs must already be attached to `cg`.
pub fn new_s_context(spec: &ContextSpec, cg: &ContextCgroup) -> Result<Spawned> {
    let stdio = open_stdio(&spec.stdio)?;
    let prep = Prepared::new(spec, stdio.fds)?;
    let cgfd = cg.open_v2()?;
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut flags =
        CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_PIDFD | CLONE_INTO_CGROUP;
    if spec.new_netns {
        flags |= CLONE_NEWNET;
    }
    let mut pidfd: i32 = -1;
    let pid = clone3(flags, Some(cgfd.as_raw_fd()), &mut pidfd)
        .map_err(Error::sys(format!("clone3 for context {}", spec.name)))?;
    if pid == 0 {
        child_main(&prep, sync_r.as_raw_fd(), err_w.as_raw_fd());
    }
    // SAFETY: CLONE_PIDFD stored a fresh pidfd owned by us.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    drop(sync_r);
    drop(err_w);
    let spawned = Spawned { pid, pidfd };
    if let Err(e) = cg.join_v1(pid) {
        let _ = pidfd_send_signal(spawned.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = spawned.wait();
        return Err(e);
    }
    release(&sync_w)?;
    drop(sync_w);
    if let Some(e) = read_child_error(&spec.name, &err_r) {
        let _ = spawned.wait();
        return Err(e);
    }
    tracing::info!(name = %spec.name, pid, "context started");
    Ok(spawned)
}

/// What `enter`/`exec` runs inside a running context.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// Apply the `lock` seccomp filter (as the context's init has it).
    pub lock: bool,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub caps: CapMask,
    pub user: Option<(u32, u32)>,
    pub stdio: Stdio,
    /// On a patched kernel the context's address is per process, not per
    /// cgroup: a process that joins later pins itself too.
    pub ipv4root_call: Option<(i64, std::net::Ipv4Addr)>,
}

/// Runs a command inside the context whose init is `init_pid`: a helper
/// process is born in the context's cgroup (CLONE_INTO_CGROUP) and moved into
/// its v1 cgroups, joins all its namespaces at once (`setns(pidfd)`), then
/// forks the command (the pid namespace applies to children only), which
/// reduces its capabilities to the same ceiling and execs. Returns the helper,
/// whose exit code is the command's.
pub fn enter(init_pid: i32, cg: &ContextCgroup, spec: &ExecSpec) -> Result<Spawned> {
    // Cgroup and pidfd first: after setns the host paths are gone.
    let cgfd = cg.open_v2()?;
    let target = crate::sys::pidfd_open(init_pid)?;
    // The pid must still be the context's init (pid reuse).
    let want = cg.procs()?;
    if !want.contains(&init_pid) {
        return Err(Error::invalid(
            format!("context init {init_pid}"),
            "is not in the context's cgroup (stale run state?)",
        ));
    }
    let stdio = open_stdio(&spec.stdio)?;
    let cspec = ContextSpec {
        name: format!("enter:{init_pid}"),
        caps: spec.caps,
        command: spec.command.clone(),
        env: spec.env.clone(),
        user: spec.user,
        lock: spec.lock,
        ipv4root_call: spec.ipv4root_call,
        ..Default::default()
    };
    let prep = Prepared::new(&cspec, stdio.fds)?;
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut pidfd: i32 = -1;
    let pid = clone3(
        CLONE_PIDFD | CLONE_INTO_CGROUP,
        Some(cgfd.as_raw_fd()),
        &mut pidfd,
    )
    .map_err(Error::sys("clone3 for enter"))?;
    if pid == 0 {
        enter_helper(
            &prep,
            target.as_raw_fd(),
            sync_r.as_raw_fd(),
            err_w.as_raw_fd(),
        );
    }
    // SAFETY: CLONE_PIDFD stored a fresh pidfd owned by us.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    drop(sync_r);
    drop(err_w);
    let spawned = Spawned { pid, pidfd };
    if let Err(e) = cg.join_v1(pid) {
        let _ = pidfd_send_signal(spawned.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = spawned.wait();
        return Err(e);
    }
    release(&sync_w)?;
    drop(sync_w);
    if let Some(e) = read_child_error(&cspec.name, &err_r) {
        let _ = spawned.wait();
        return Err(e);
    }
    Ok(spawned)
}

fn enter_helper(p: &Prepared, target: RawFd, sync: RawFd, err: RawFd) -> ! {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a stack buffer.
    let n = unsafe { libc::read(sync, b.as_mut_ptr() as *mut libc::c_void, 1) };
    if n != 1 {
        write_err(err, 0, libc::EPIPE);
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(127) }
    }
    child_stdio(p, err);
    let all = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWNET;
    // SAFETY: setns with a pidfd we hold and namespace flags.
    tryc!(err, 21, unsafe { libc::setns(target, all) });
    let mut unused = -1;
    let child = match clone3(0, None, &mut unused) {
        Ok(c) => c,
        Err(e) => {
            write_err(err, 22, e.raw_os_error().unwrap_or(0));
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(127) }
        }
    };
    if child == 0 {
        // SAFETY: chdir to a static string (the context's root after setns).
        tryc!(err, 23, unsafe { libc::chdir(c"/".as_ptr()) });
        child_exec(p, err);
    }
    // SAFETY: close our copy of the error pipe so the caller sees EOF on exec.
    unsafe { libc::close(err) };
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a stack out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child || (r < 0 && capabilities::errno() != libc::EINTR) {
            break;
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    };
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(code) }
}

/// Stops a context: SIGTERM to its init (unless `stop_cmd_done`), wait up to
/// `grace` for `populated 0`, then `cgroup.kill` and wait again. Reaps
/// `reap_pid` when it is our child. Does not remove the cgroups.
pub fn terminate(
    cg: &ContextCgroup,
    init: Option<&Spawned>,
    grace: Duration,
    signal_init: bool,
) -> Result<()> {
    let reap = init.map(|s| s.pid);
    let mut shielded_init = None;
    if signal_init {
        if let Some(s) = init {
            if let Err(e) = pidfd_send_signal(s.pidfd.as_raw_fd(), libc::SIGTERM) {
                tracing::debug!(error = %e, "SIGTERM to the context init");
            }
            if sigterm_disposition(s.pid) == Some(SigtermDisposition::Default) {
                shielded_init = Some(s.pid);
            }
        }
    }
    let emptied = match shielded_init {
        // The kernel shields a pid namespace's init from signals it has no
        // handler for, so SIGTERM does nothing to a service run directly as
        // init (httpd, sleep). What SIGTERM would do to any other process,
        // end it, is done by cgroup.kill once the rest of the context had
        // its SIGTERM and is gone; the grace period is not waited in vain.
        Some(pid) => {
            tracing::info!(pid, "the context init has no SIGTERM handler; the rest of the context gets SIGTERM, then cgroup.kill");
            signal_all_but(cg, pid, libc::SIGTERM);
            cg.wait_only(pid, grace)?
        }
        None => cg.wait_empty(grace, reap)?,
    };
    match (emptied, shielded_init) {
        (true, None) => return Ok(()),
        (true, Some(_)) => {}
        (false, _) => {
            tracing::info!(cgroup = %cg.v2.display(), "grace period over, cgroup.kill")
        }
    }
    cg.kill()?;
    if cg.wait_empty(Duration::from_secs(30), reap)? {
        return Ok(());
    }
    Err(Error::Timeout {
        step: format!("waiting for {} to empty after cgroup.kill", cg.v2.display()),
        secs: 30,
    })
}

/// What a process does on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigtermDisposition {
    Caught,
    Ignored,
    Default,
}

/// SIGTERM's disposition for `pid`, from `SigIgn`/`SigCgt` in its status;
/// `None` when the process is gone or the file unreadable.
pub(crate) fn sigterm_disposition(pid: i32) -> Option<SigtermDisposition> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_sigterm_disposition(&status)
}

fn parse_sigterm_disposition(status: &str) -> Option<SigtermDisposition> {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let bit = 1u64 << (libc::SIGTERM - 1);
    let (caught, ignored) = (mask("SigCgt:")?, mask("SigIgn:")?);
    Some(if caught & bit != 0 {
        SigtermDisposition::Caught
    } else if ignored & bit != 0 {
        SigtermDisposition::Ignored
    } else {
        SigtermDisposition::Default
    })
}

/// Sends `sig` to every process of `cg` except `keep`; a process that is
/// gone by then is no error.
fn signal_all_but(cg: &ContextCgroup, keep: i32, sig: i32) {
    let procs = match cg.procs() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "listing the context's processes");
            return;
        }
    };
    for pid in procs.into_iter().filter(|&p| p != keep) {
        // a pidfd, so that a pid reused after the listing is not signalled
        if let Ok(fd) = crate::sys::pidfd_open(pid) {
            let _ = pidfd_send_signal(fd.as_raw_fd(), sig);
        }
    }
}

#[cfg(test)]
mod disposition_tests {
    use super::*;

    fn status(cgt: &str, ign: &str) -> String {
        format!("Name:\thttpd\nSigBlk:\t0000000000000000\nSigIgn:\t{ign}\nSigCgt:\t{cgt}\n")
    }

    #[test]
    fn sigterm_bit_is_read_from_caught_then_ignored() {
        // SIGTERM is signal 15: bit 14, 0x4000
        let d = |c, i| parse_sigterm_disposition(&status(c, i));
        assert_eq!(
            d("0000000000004000", "0000000000000000"),
            Some(SigtermDisposition::Caught)
        );
        assert_eq!(
            d("0000000000000000", "0000000000004000"),
            Some(SigtermDisposition::Ignored)
        );
        assert_eq!(
            d("0000000000010002", "0000000000001000"),
            Some(SigtermDisposition::Default)
        );
        assert_eq!(
            d("0000000180014a03", "0000000000000000"),
            Some(SigtermDisposition::Caught)
        );
        assert_eq!(parse_sigterm_disposition("Name:\tx\n"), None);
    }
}
