//! The vserver kernel interface on a stock kernel (see issue 3).
//!
//! The paper's context system calls mapped onto what an unpatched Linux
//! (≥ 5.14) has:
//!
//! * [`context`]: `new_s_context` (clone3 into new PID/mount/UTS/IPC
//!   namespaces and the context's cgroup, pivot_root, minimal /dev, reducecap,
//!   exec), `enter`/`exec` (pidfd setns) and `stop` (`cgroup.kill`).
//! * [`cgroup`]: the cgroup v2 directory per context (identity, kill, freeze,
//!   BPF) plus v1 fallbacks for limits on hybrid hosts.
//! * [`bpf`]: `set_ipv4root` as cgroup-BPF `sock_addr` programs assembled by
//!   hand and loaded with raw `bpf()`.
//! * [`capabilities`]: `reducecap` and the paper's `--secure` set.
//! * [`net`]: rtnetlink address add/remove, gratuitous ARP and the ARP probe.
//! * [`config`]: the TOML vserver spec and the legacy `.conf` import.
//! * [`hooks`]: the per-vserver `NAME.sh` hook script.
//! * [`netmode`]: the `shared` and `netns` network modes behind one trait.
//! * [`patched`]: detects the vserver kernel patch (kernel-patch/linux/) and
//!   its `set_ipv4root` call, used instead of cgroup-BPF when present.
//! * [`syscall`]: the mockable kernel boundary ([`syscall::Syscall`]).
//! * [`local`]: one function per local CLI verb (`vsha vserver start` …).
//!
//! All `unsafe` of the project lives in this crate; each block carries a
//! `// SAFETY:` comment.

pub mod bpf;
pub mod capabilities;
pub mod cgroup;
pub mod config;
pub mod context;
pub mod error;
pub mod hooks;
pub mod local;
pub mod net;
pub mod netmode;
pub mod patched;
pub mod proc;
mod sys;
pub mod syscall;

pub use error::{Error, Result};
