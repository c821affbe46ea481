//! Everything that touches raft-rs types lives below this module: the disk
//! storage, the slog bridge and the core that runs the Ready loop.

mod core;
mod logger;
mod storage;

pub use self::core::{Applied, CoreConfig, Outgoing, Progress, ProposeRefused, RaftCore};

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft storage: {step}: {detail}")]
    Storage { step: &'static str, detail: String },
    #[error("raft data on disk is corrupt: {0}; refusing to start with partial state (restore the data dir from a backup, or remove it and re-add this node)")]
    Corrupt(String),
    #[error("malformed raft data: {0}")]
    Malformed(String),
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
}
