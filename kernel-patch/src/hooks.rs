//! The per-vserver hook script (the paper's `/etc/vservers/NAME.sh`), called
//! on the host with `pre-start`, `post-start`, `pre-stop` or `post-stop` and
//! the vserver name. A failing `pre-start` aborts the start.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::{Error, Result};

/// When the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    PreStart,
    PostStart,
    PreStop,
    PostStop,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreStart => "pre-start",
            Phase::PostStart => "post-start",
            Phase::PreStop => "pre-stop",
            Phase::PostStop => "post-stop",
        }
    }
}

/// `<config_dir>/<name>.sh`.
pub fn script_path(config_dir: &Path, name: &str) -> PathBuf {
    config_dir.join(format!("{name}.sh"))
}

/// Runs the hook if the script exists. Output is captured; a non-zero exit
/// becomes [`Error::Hook`] carrying it.
pub fn run(script: &Path, phase: Phase, name: &str) -> Result<()> {
    if !script.exists() {
        return Ok(());
    }
    let out = Command::new(script)
        .arg(phase.as_str())
        .arg(name)
        .env("VSHA_PHASE", phase.as_str())
        .output()
        .map_err(Error::sys(format!(
            "run hook {} {}",
            script.display(),
            phase.as_str()
        )))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(Error::Hook {
            script: script.to_path_buf(),
            phase: phase.as_str().into(),
            name: name.into(),
            status: out.status.to_string(),
            output: text.trim().to_string(),
        });
    }
    tracing::debug!(script = %script.display(), phase = phase.as_str(), name, "hook ran");
    Ok(())
}
