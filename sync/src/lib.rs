//! vsha-sync: consistent, fast, faithful replication of vserver trees (issue 4).
//!
//! * [`scan`] walks a tree in parallel into a sorted [`Index`] with blake3
//!   content hashes (reused when size, mtime and inode are unchanged).
//! * [`journal`] is the fanotify change journal: rounds rescan only the
//!   directories that changed.
//! * [`wire`] is the framed, versioned protocol; [`sender::send`] and
//!   [`receiver::receive`] run a round over any tokio byte stream.
//! * [`store`] is the receiver's side on disk: versions built beside the
//!   current one, fsynced, switched atomically by a symlink rename.
//! * [`net`] has the standalone TCP `serve` and `push`; [`verify`] compares trees.
//!
//! See README.md in this crate for the protocol and the choices.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod delta;
pub mod entry;
pub mod error;
pub mod freeze;
pub(crate) mod fsops;
pub mod journal;
pub mod net;
pub mod receiver;
pub mod scan;
pub mod sender;
pub mod session;
pub mod store;
pub(crate) mod undo;
pub mod verify;
pub mod wire;

pub use entry::{Entry, Kind};
pub use error::{Result, SyncError};
pub use freeze::FreezeConfig;
pub use net::{push, push_round, serve, serve_with};
pub use receiver::{receive, Received};
pub use scan::{scan as scan_tree, Index};
pub use sender::{send, PushOptions, RoundStats, SenderState};
pub use store::{Snapshot, Store};
pub use verify::{verify, Difference};
