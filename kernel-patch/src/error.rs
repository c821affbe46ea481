//! The crate's error type: every variant names the failed step and the reason.

use std::io;
use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the vserver kernel interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed; `step` says which and on what.
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a BPF program; the verifier log says why.
    #[error("bpf: loading the {prog} program failed: {source}; verifier log: {log}")]
    BpfLoad {
        prog: &'static str,
        #[source]
        source: io::Error,
        log: String,
    },
    /// The context child failed before it could exec its command.
    #[error("context {name}: child failed at `{step}`: {source}")]
    Child {
        name: String,
        step: String,
        #[source]
        source: io::Error,
    },
    /// A configuration file is invalid.
    #[error("{}: field `{field}`: {reason}", file.display())]
    Config {
        file: PathBuf,
        field: String,
        reason: String,
    },
    /// The kernel lacks something the crate needs (hint says what to do).
    #[error("kernel probe: {what}; hint: {hint}")]
    Unsupported { what: String, hint: String },
    /// A hook script returned non-zero; its output is attached.
    #[error("hook {} {phase} {name} failed ({status}); output: {output}", script.display())]
    Hook {
        script: PathBuf,
        phase: String,
        name: String,
        status: String,
        output: String,
    },
    /// The vserver is not running.
    #[error("vserver {0} is not running")]
    NotRunning(String),
    /// The vserver is already running.
    #[error("vserver {0} is already running")]
    AlreadyRunning(String),
    /// A wait ran out of time.
    #[error("{step}: timed out after {secs} s")]
    Timeout { step: String, secs: u64 },
    /// Some other invalid argument.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl Error {
    /// Builds a closure mapping an `io::Error` to `Error::Sys` for `step`.
    pub fn sys<S: Into<String>>(step: S) -> impl FnOnce(io::Error) -> Error {
        let step = step.into();
        move |source| Error::Sys { step, source }
    }

    /// `Error::Sys` from the current `errno`.
    pub fn last_os<S: Into<String>>(step: S) -> Error {
        Error::Sys {
            step: step.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// `Error::Invalid` shorthand.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// The OS error code, when the error carries one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Sys { source, .. }
            | Error::BpfLoad { source, .. }
            | Error::Child { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
