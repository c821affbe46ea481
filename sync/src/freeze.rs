//! Consistent rounds: freeze the vserver's cgroup during the last short
//! pass, measured and bounded. Works with a cgroup v2 directory
//! (`cgroup.freeze`, `cgroup.events`) or a v1 freezer directory (`freezer.state`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, SyncError};

/// Which cgroup to freeze and for how long at most.
#[derive(Debug, Clone)]
pub struct FreezeConfig {
    /// The cgroup directory.
    pub cgroup: PathBuf,
    /// Longest acceptable freeze; a pass that would exceed it is aborted,
    /// the cgroup thawed and the round retried later.
    pub max: Duration,
    /// Attempts before giving up.
    pub attempts: u32,
}

/// A frozen cgroup; thawed on drop.
#[derive(Debug)]
pub struct Frozen {
    cgroup: PathBuf,
    v2: bool,
    /// When the freeze took effect.
    pub since: Instant,
    thawed: bool,
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v)
        .map_err(|e| SyncError::Freeze(format!("write {v:?} to {}: {e}", p.display())))
}

/// Freeze `cgroup`, waiting (at most `max`) until every task is frozen.
pub fn freeze(cgroup: &Path, max: Duration) -> Result<Frozen> {
    let v2 = cgroup.join("cgroup.freeze").exists();
    let v1 = cgroup.join("freezer.state").exists();
    if !v2 && !v1 {
        return Err(SyncError::Freeze(format!(
            "{} is neither a cgroup v2 directory nor a v1 freezer",
            cgroup.display()
        )));
    }
    let start = Instant::now();
    let mut f = Frozen {
        cgroup: cgroup.to_path_buf(),
        v2,
        since: start,
        thawed: false,
    };
    if v2 {
        write(&cgroup.join("cgroup.freeze"), "1")?;
    } else {
        write(&cgroup.join("freezer.state"), "FROZEN")?;
    }
    loop {
        let done = if v2 {
            std::fs::read_to_string(cgroup.join("cgroup.events"))
                .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
                .unwrap_or(false)
        } else {
            std::fs::read_to_string(cgroup.join("freezer.state"))
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(false)
        };
        if done {
            tracing::debug!(cgroup = %cgroup.display(), took = ?start.elapsed(), "frozen");
            return Ok(f);
        }
        if start.elapsed() > max {
            f.thaw()?;
            return Err(SyncError::Freeze(format!(
                "{} did not freeze within {max:?}; thawed",
                cgroup.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a cgroup is frozen now.
pub fn is_frozen(cgroup: &Path) -> bool {
    if cgroup.join("cgroup.events").exists() {
        std::fs::read_to_string(cgroup.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
            .unwrap_or(false)
    } else {
        std::fs::read_to_string(cgroup.join("freezer.state"))
            .map(|s| s.trim() != "THAWED")
            .unwrap_or(false)
    }
}

impl Frozen {
    /// Thaw now; returns how long it was frozen.
    pub fn thaw(&mut self) -> Result<Duration> {
        if !self.thawed {
            if self.v2 {
                write(&self.cgroup.join("cgroup.freeze"), "0")?;
            } else {
                write(&self.cgroup.join("freezer.state"), "THAWED")?;
            }
            self.thawed = true;
        }
        Ok(self.since.elapsed())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::error!(error = %e, "could not thaw cgroup");
        }
    }
}
