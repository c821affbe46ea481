//! The guard: a small process beside the agent that kills the node's
//! vservers and withdraws their IPs when the agent can no longer vouch for
//! them — when the lease deadline the agent last gave it passes (the agent
//! is hung or stopped with SIGSTOP), or when the agent dies (its pipe
//! closes). It is `vshad guard`, started by the agent with a pipe on stdin.
//!
//! Protocol, one line each, from the agent:
//! - `deadline MS` — the lease's fencing point on CLOCK_MONOTONIC (0 = none);
//! - `hold NAME CGROUP DEV IP PREFIX` — a running vserver (`DEV` is `-`
//!   when it has no alias of ours);
//! - `release NAME` — it was stopped;
//! - `detach` — on the agent's exit, leave the vservers running until the
//!   lease deadline, then fence them (the operator's documented `detach`
//!   policy: a stopped agent does not cut service at once, yet a copy
//!   never outlives the lease).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::clock::mono_ms;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub cgroup: PathBuf,
    pub alias: Option<(String, Ipv4Addr, u8)>,
}

/// One line of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardMsg {
    Deadline(u64),
    Hold(String, Held),
    Release(String),
    Detach,
}

impl GuardMsg {
    pub fn encode(&self) -> String {
        match self {
            GuardMsg::Deadline(ms) => format!("deadline {ms}\n"),
            GuardMsg::Hold(name, h) => {
                let (dev, ip, prefix) = match &h.alias {
                    Some((d, ip, p)) => (d.clone(), ip.to_string(), *p),
                    None => ("-".to_string(), "0.0.0.0".to_string(), 0),
                };
                format!("hold {name} {} {dev} {ip} {prefix}\n", h.cgroup.display())
            }
            GuardMsg::Release(name) => format!("release {name}\n"),
            GuardMsg::Detach => "detach\n".to_string(),
        }
    }

    pub fn decode(line: &str) -> Result<GuardMsg, String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["deadline", ms] => ms
                .parse()
                .map(GuardMsg::Deadline)
                .map_err(|_| format!("deadline: {ms:?} is not a number")),
            ["hold", name, cg, dev, ip, prefix] => {
                let alias = if *dev == "-" {
                    None
                } else {
                    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("ip: {ip:?}"))?;
                    let p: u8 = prefix.parse().map_err(|_| format!("prefix: {prefix:?}"))?;
                    Some((dev.to_string(), ip, p))
                };
                Ok(GuardMsg::Hold(
                    name.to_string(),
                    Held {
                        cgroup: PathBuf::from(cg),
                        alias,
                    },
                ))
            }
            ["release", name] => Ok(GuardMsg::Release(name.to_string())),
            ["detach"] => Ok(GuardMsg::Detach),
            _ => Err(format!("unknown guard line {line:?}")),
        }
    }
}

/// The agent's end of the guard.
pub struct GuardHandle {
    child: Child,
    /// `None` once closed (on drop).
    stdin: Option<ChildStdin>,
}

impl GuardHandle {
    /// Starts `EXE guard` (normally vshad itself).
    pub fn spawn(exe: &std::path::Path) -> std::io::Result<GuardHandle> {
        use std::os::unix::process::CommandExt;
        // A process group of its own: a Ctrl-C meant for the agent's
        // terminal must not kill the guard before the agent (then nothing
        // would fence); it ends when the agent's pipe closes.
        let mut child = Command::new(exe)
            .arg("guard")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("guard has no stdin"))?;
        Ok(GuardHandle {
            child,
            stdin: Some(stdin),
        })
    }

    pub fn send(&mut self, msg: &GuardMsg) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("guard pipe closed"))?;
        stdin.write_all(msg.encode().as_bytes())?;
        stdin.flush()
    }

    /// Whether the guard still runs (if not, nothing protects the node:
    /// the agent treats it like a lost lease).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for GuardHandle {
    fn drop(&mut self) {
        // Closing stdin is the "agent gone" signal; then reap the guard.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// What the guard does to fence: kill each held cgroup, remove each alias.
pub fn fence(held: &BTreeMap<String, Held>) {
    for (name, h) in held {
        let kill = h.cgroup.join("cgroup.kill");
        match std::fs::write(&kill, "1") {
            Ok(()) => tracing::warn!(vserver = %name, "guard: killed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(vserver = %name, error = %e, "guard: cgroup.kill failed"),
        }
        if let Some((dev, ip, prefix)) = &h.alias {
            if let Err(e) = vsha_kernel::net::del_address(dev, *ip, *prefix) {
                tracing::error!(vserver = %name, error = %e, "guard: removing the address failed");
            }
        }
    }
}

/// `vshad guard`: runs until the agent's pipe closes.
pub fn run_guard() {
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut deadline = 0u64;
    let mut detach = false;
    let mut fenced = true;
    loop {
        let now = mono_ms();
        let wait = if deadline > now && !fenced {
            Duration::from_millis(deadline - now)
        } else {
            Duration::from_secs(3600)
        };
        match rx.recv_timeout(wait) {
            Ok(Some(line)) => match GuardMsg::decode(&line) {
                Ok(GuardMsg::Deadline(ms)) => {
                    deadline = ms;
                    fenced = ms <= mono_ms();
                    if fenced {
                        fence(&held);
                    }
                }
                Ok(GuardMsg::Hold(name, h)) => {
                    held.insert(name, h);
                    if fenced || deadline <= mono_ms() {
                        // Never let a copy run past a lapsed lease.
                        fence(&held);
                    }
                }
                Ok(GuardMsg::Release(name)) => {
                    held.remove(&name);
                }
                Ok(GuardMsg::Detach) => detach = true,
                Err(e) => tracing::error!(error = %e, "guard: bad line"),
            },
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if detach {
                    // They outlive the agent, never its lease.
                    let now = mono_ms();
                    if !fenced && deadline > now {
                        tracing::warn!(
                            ms = deadline - now,
                            "guard: agent gone; vservers left running until the lease deadline (detach policy)"
                        );
                        std::thread::sleep(Duration::from_millis(deadline - now));
                    }
                    fence(&held);
                } else {
                    tracing::warn!(held = held.len(), "guard: agent gone; killing its vservers");
                    fence(&held);
                }
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !fenced && mono_ms() >= deadline {
                    if held.is_empty() {
                        tracing::info!("guard: lease deadline passed (nothing runs here)");
                    } else {
                        tracing::warn!(held = held.len(), "guard: lease deadline passed; fencing");
                    }
                    fence(&held);
                    fenced = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_bad_lines_are_refused() {
        let msgs = [
            GuardMsg::Deadline(42),
            GuardMsg::Hold(
                "web".into(),
                Held {
                    cgroup: "/sys/fs/cgroup/vsha/web".into(),
                    alias: Some(("eth0".into(), "10.0.0.5".parse().unwrap(), 24)),
                },
            ),
            GuardMsg::Hold(
                "db".into(),
                Held {
                    cgroup: "/x/db".into(),
                    alias: None,
                },
            ),
            GuardMsg::Release("web".into()),
            GuardMsg::Detach,
        ];
        for m in msgs {
            assert_eq!(GuardMsg::decode(m.encode().trim_end()).unwrap(), m);
        }
        assert!(GuardMsg::decode("deadline soon").is_err());
        assert!(GuardMsg::decode("hold a b c 1.2.3 4").is_err());
        assert!(GuardMsg::decode("explode").is_err());
    }
}
