//! The crate's error type: every variant says what was refused or failed, and why.

use std::path::PathBuf;

/// Errors of scanning, sending, receiving and verifying trees.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A local filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("lstat", "open", "write", ...).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The byte stream to the peer failed or closed early.
    #[error("stream: {0}")]
    Stream(#[source] std::io::Error),
    /// The stream ended in the middle of a round.
    #[error("stream truncated: the peer closed the connection in the middle of a round ({0})")]
    Truncated(&'static str),
    /// A frame declared a length beyond what this protocol allows.
    #[error("refused frame: declared length {len} exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared length.
        len: u64,
        /// Maximum accepted.
        max: u64,
    },
    /// A frame could not be decoded.
    #[error("refused frame: malformed {what}: {why}")]
    Malformed {
        /// Which frame or field.
        what: &'static str,
        /// Why it is malformed.
        why: String,
    },
    /// The peer speaks another protocol version or no protocol at all.
    #[error("refused handshake: {0}")]
    Handshake(String),
    /// The token did not match.
    #[error("refused: authentication token does not match")]
    BadToken,
    /// A path from the peer would leave the destination or is otherwise not acceptable.
    #[error("refused path {path:?}: {why}")]
    BadPath {
        /// The offending path (lossy).
        path: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The peer sent something out of order or inconsistent with the round so far.
    #[error("refused: protocol violation: {0}")]
    Protocol(String),
    /// Content did not hash to what the sender declared.
    #[error(
        "refused: content of {path:?} does not match its declared blake3 hash (corrupt stream?)"
    )]
    HashMismatch {
        /// The file whose content was corrupt.
        path: String,
    },
    /// The tree digest the sender announced differs from what was built.
    #[error("refused round: tree digest mismatch (sender {expected}, built {got})")]
    DigestMismatch {
        /// Sender's digest (hex).
        expected: String,
        /// Receiver's digest (hex).
        got: String,
    },
    /// The peer refused the round and said why.
    #[error("peer refused the round: {0}")]
    PeerRefused(String),
    /// Another round for the same name is in progress.
    #[error("refused: a round for {0:?} is already in progress")]
    Busy(String),
    /// The tree name is not acceptable.
    #[error(
        "refused name {0:?}: names are 1-64 characters of [A-Za-z0-9._-] not starting with '.'"
    )]
    BadName(String),
    /// Freezing the cgroup failed or would exceed the configured maximum.
    #[error("freeze: {0}")]
    Freeze(String),
    /// The change journal could not be used.
    #[error("journal: {0}")]
    Journal(String),
    /// The round was aborted (shutdown, freeze bound exceeded).
    #[error("round aborted: {0}")]
    Aborted(String),
}

/// Result alias of this crate.
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// Attach an operation and path to an I/O error.
pub(crate) trait IoCtx<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| SyncError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}

impl<T> IoCtx<T> for rustix::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| SyncError::Io {
            op,
            path: path.into(),
            source: e.into(),
        })
    }
}
