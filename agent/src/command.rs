//! What goes into the Raft log: a versioned envelope around one command.
//! The encoding is JSON so that a log written by one version is readable by
//! the next; unknown versions are refused, never guessed at.

use crate::model::{AdminState, Desired, FailoverGroup, NodeId, NodeRecord, VserverSpec};
use serde::{Deserialize, Serialize};

pub const ENVELOPE_VERSION: u32 = 1;

/// A change to the replicated state. Membership changes travel as raft
/// ConfChangeV2 entries whose context is an envelope holding a
/// [`Command::AddNode`], [`Command::PromoteNode`] or [`Command::RemoveNode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Proposed once by the first leader of a new cluster.
    Bootstrap {
        cluster_id: String,
        members: Vec<NodeRecord>,
    },
    AddNode(NodeRecord),
    PromoteNode {
        id: NodeId,
    },
    RemoveNode {
        id: NodeId,
    },
    SetNodeAdmin {
        id: NodeId,
        admin: AdminState,
    },
    AddVserver(VserverSpec),
    RemoveVserver {
        name: String,
    },
    SetPair {
        vserver: String,
        group: FailoverGroup,
    },
    RemovePair {
        vserver: String,
    },
    /// A placement change decided by the leader's failover controller: a
    /// compare-and-set on the vserver's generation (the fencing token), so
    /// of two racing moves at most one applies.
    SetPlacement {
        vserver: String,
        node: NodeId,
        generation: u64,
        /// The generation this move replaces; 0 = the vserver is unplaced.
        expect_generation: u64,
        /// Why (controller's move reason), for status and events.
        reason: String,
    },
    /// The operator's wish: run the vserver (placing it if needed) or keep
    /// it stopped wherever it is placed.
    SetDesired {
        vserver: String,
        desired: Desired,
    },
    /// The newest complete replica of `vserver` on `node` (recorded now and
    /// then; the leader also learns it live from heartbeats).
    RecordReplica {
        vserver: String,
        node: NodeId,
        snapshot_source_unix_ms: u64,
        digest: String,
    },
}

impl Command {
    /// Membership commands must go through a raft conf change.
    pub fn is_membership(&self) -> bool {
        matches!(
            self,
            Command::AddNode(_) | Command::PromoteNode { .. } | Command::RemoveNode { .. }
        )
    }
}

/// Identifies a proposal so the proposing agent can hand the applied result
/// back to the waiting caller. `incarnation` is random per agent start, so a
/// restarted agent never mistakes a replayed old entry for its own new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    pub proposer: NodeId,
    pub incarnation: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub id: Option<ProposalId>,
    pub cmd: Command,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("log entry is not a valid vsha command: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("log entry has envelope version {found}; this agent understands {ENVELOPE_VERSION}")]
    Version { found: u32 },
}

impl Envelope {
    pub fn new(id: Option<ProposalId>, cmd: Command) -> Self {
        Envelope {
            v: ENVELOPE_VERSION,
            id,
            cmd,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let env: Envelope = serde_json::from_slice(bytes)?;
        if env.v != ENVELOPE_VERSION {
            return Err(CodecError::Version { found: env.v });
        }
        Ok(env)
    }
}
