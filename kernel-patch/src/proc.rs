//! Reading `/proc` for `ps`-like listings (the paper's `vps`). Parsers take
//! a proc root so they can be tested against fixture trees.

use std::fs;
use std::path::Path;

use serde::Serialize;

/// One process row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcInfo {
    /// pid in the host's (reader's) pid namespace.
    pub pid: i32,
    /// pid inside the innermost pid namespace (last `NSpid` entry).
    pub inner_pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    /// The v2 cgroup path (`0::` line).
    pub cgroup: String,
    pub command: String,
}

/// Parses one `/proc/PID` directory under `proc_root`.
pub fn read_proc(proc_root: &Path, pid: i32) -> Option<ProcInfo> {
    let d = proc_root.join(pid.to_string());
    let status = fs::read_to_string(d.join("status")).ok()?;
    let mut info = ProcInfo {
        pid,
        inner_pid: pid,
        ppid: 0,
        uid: 0,
        state: String::new(),
        cgroup: String::new(),
        command: String::new(),
    };
    let mut name = String::new();
    for l in status.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "Name" => name = v.to_string(),
            "State" => info.state = v.split_whitespace().next().unwrap_or("").to_string(),
            "PPid" => info.ppid = v.parse().unwrap_or(0),
            "Uid" => {
                info.uid = v
                    .split_whitespace()
                    .next()
                    .and_then(|u| u.parse().ok())
                    .unwrap_or(0)
            }
            "NSpid" => {
                info.inner_pid = v
                    .split_whitespace()
                    .last()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(pid)
            }
            _ => {}
        }
    }
    if let Ok(cg) = fs::read_to_string(d.join("cgroup")) {
        info.cgroup = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("")
            .to_string();
    }
    let cmdline = fs::read(d.join("cmdline")).unwrap_or_default();
    let cmd: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    info.command = if cmd.is_empty() {
        format!("[{name}]")
    } else {
        cmd.join(" ")
    };
    Some(info)
}

/// All processes under `proc_root`.
pub fn all(proc_root: &Path) -> Vec<ProcInfo> {
    let mut v: Vec<ProcInfo> = fs::read_dir(proc_root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
                .filter_map(|pid| read_proc(proc_root, pid))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|p| p.pid);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_proc_tree() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("4242");
        fs::create_dir(&d).unwrap();
        fs::write(
            d.join("status"),
            "Name:\tsleep\nState:\tS (sleeping)\nPPid:\t4200\nUid:\t0\t0\t0\t0\nNSpid:\t4242\t3\n",
        )
        .unwrap();
        fs::write(d.join("cgroup"), "12:pids:/vsha/web\n0::/vsha/web\n").unwrap();
        fs::write(d.join("cmdline"), b"sleep\x00100\x00").unwrap();
        fs::create_dir(t.path().join("self")).unwrap();
        let all = all(t.path());
        assert_eq!(all.len(), 1);
        let p = &all[0];
        assert_eq!((p.pid, p.inner_pid, p.ppid), (4242, 3, 4200));
        assert_eq!(p.cgroup, "/vsha/web");
        assert_eq!(p.command, "sleep 100");
        assert_eq!(p.state, "S");
    }
}
